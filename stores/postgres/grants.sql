-- Least privilege for fastcheckpoint_app, the role the application connects as.
-- Generated from the code (a test keeps it equal and runs the store as such a role).
-- Run it as the owner of the tables, after `fastcheckpoint init URL` or schema.sql;
-- create the role first, e.g.: CREATE ROLE fastcheckpoint_app LOGIN PASSWORD '...';
-- It may not create, alter or drop anything: upgrades run `fastcheckpoint init` as the owner.

GRANT USAGE ON SCHEMA "public" TO fastcheckpoint_app;
GRANT SELECT ON "public"."fc_migrations" TO fastcheckpoint_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON "public"."fc_runs" TO fastcheckpoint_app;
GRANT SELECT, INSERT, DELETE, UPDATE (token) ON "public"."fc_checkpoints" TO fastcheckpoint_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON "public"."fc_items" TO fastcheckpoint_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON "public"."fc_refs" TO fastcheckpoint_app;
GRANT SELECT, INSERT, DELETE ON "public"."fc_labels" TO fastcheckpoint_app;
GRANT SELECT, INSERT, DELETE ON "public"."fc_ops" TO fastcheckpoint_app;
GRANT EXECUTE ON FUNCTION "public"."fc_append"(text, bigint, text, double precision, double precision, bytea, bytea, bytea[], text, bytea, text, text, double precision, bigint, bytea, bytea[], bigint, double precision, bytea[], bytea[], bigint[], double precision[]) TO fastcheckpoint_app;
GRANT EXECUTE ON FUNCTION "public"."fc_damage"(text, bytea, text, bigint, bigint, double precision) TO fastcheckpoint_app;
GRANT EXECUTE ON FUNCTION "public"."fc_remove"(text, bigint[], boolean) TO fastcheckpoint_app;
GRANT EXECUTE ON FUNCTION "public"."fc_delete"(text, bigint, text, text) TO fastcheckpoint_app;
GRANT EXECUTE ON FUNCTION "public"."fc_delete_run"(text, text) TO fastcheckpoint_app;
GRANT EXECUTE ON FUNCTION "public"."fc_update_run"(text, text, bigint, text, bytea, double precision, text, bigint) TO fastcheckpoint_app;
GRANT EXECUTE ON FUNCTION "public"."fc_put_items"(text, bytea[], bytea[], bigint[], double precision[], boolean, double precision, text) TO fastcheckpoint_app;
GRANT EXECUTE ON FUNCTION "public"."fc_put_owned_items"(text, bigint, text, bytea[], bytea[], boolean, double precision, text) TO fastcheckpoint_app;
GRANT EXECUTE ON FUNCTION "public"."fc_purge"(double precision, integer) TO fastcheckpoint_app;
GRANT EXECUTE ON FUNCTION "public"."fc_get"(text, bigint, double precision) TO fastcheckpoint_app;
GRANT EXECUTE ON FUNCTION "public"."fc_latest"(text, double precision) TO fastcheckpoint_app;
GRANT EXECUTE ON FUNCTION "public"."fc_read_with_items"(text, bigint, double precision, boolean) TO fastcheckpoint_app;
GRANT EXECUTE ON FUNCTION "public"."fc_headers"(text, bigint, integer, double precision, boolean) TO fastcheckpoint_app;
GRANT EXECUTE ON FUNCTION "public"."fc_get_run"(text, double precision) TO fastcheckpoint_app;
GRANT EXECUTE ON FUNCTION "public"."fc_list_runs"(text, integer, double precision, text, double precision) TO fastcheckpoint_app;
GRANT EXECUTE ON FUNCTION "public"."fc_count_runs"(text, double precision) TO fastcheckpoint_app;
GRANT EXECUTE ON FUNCTION "public"."fc_runs_with_label"(bytea, integer, double precision, text, double precision) TO fastcheckpoint_app;
GRANT EXECUTE ON FUNCTION "public"."fc_get_items"(text, bytea[], double precision) TO fastcheckpoint_app;
GRANT EXECUTE ON FUNCTION "public"."fc_scan_items"(text, bytea, bytea, integer, boolean, double precision) TO fastcheckpoint_app;
GRANT EXECUTE ON FUNCTION "public"."fc_delete_items"(text, bytea[], text) TO fastcheckpoint_app;
GRANT EXECUTE ON FUNCTION "public"."fc_damaged_runs"(text, text, integer) TO fastcheckpoint_app;
GRANT EXECUTE ON FUNCTION "public"."fc_rebuild_run"(text, bytea, text, bytea, bytea[], double precision) TO fastcheckpoint_app;
