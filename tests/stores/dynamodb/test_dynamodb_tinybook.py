"""The whole store contract on DynamoDB run items whose book details only 2 entries, so
that the contract's runs of more than two checkpoints with gaps, expiries or large payloads
reach the book's back (counted, not detailed) and its refills: the bounded book keeps every
clause of the contract. Marked slow (a second pass of the contract on moto).

A contract test whose runs never fill a 2-entry book runs here the very code
``TestDynamoDBStore`` runs (the capacity is read only when the book is full), so those listed
in ``NEVER_FILL_THE_BOOK`` are not collected here; ``FC_HUNT=1`` runs them too, and fails one
that now fills the book (take it off the list)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from fastcheckpoint.stores import CheckpointStore
from fastcheckpoint.stores import _dynamodb_layout as layout
from fastcheckpoint.testing import StoreContract
from tests._sweeps import HUNT
from tests.stores._moto import moto_endpoint
from tests.stores.dynamodb.test_dynamodb import (
    DEADLINE,
    atomic_moto,
    aws_names,
    new_table,
    opened,
    provisioned,
)

__all__ = ["atomic_moto", "aws_names", "moto_endpoint", "provisioned"]

pytestmark = pytest.mark.slow

NEVER_FILL_THE_BOOK = frozenset(f"test_{name}" for name in (
    "a_bad_keep_latest_is_refused_before_any_change",
    "a_run_record_of_another_run_is_refused_before_any_change",
    "a_sequence_that_is_no_int_is_refused",
    "append_after_delete_run_starts_at_zero",
    "append_at_zero_creates_run_record",
    "append_at_zero_on_live_run_conflicts",
    "append_existing_sequence_conflicts",
    "append_keeps_run_fields_other_than_the_log",
    "append_next_sequence_updates_run_record",
    "append_nonzero_on_absent_run_conflicts",
    "append_refuses_what_is_not_a_run_key",
    "append_skipping_a_sequence_conflicts",
    "append_with_other_incarnation_conflicts",
    "appends_leave_version_alone",
    "bytes_given_as_a_bytearray_are_stored_as_they_were",
    "concurrent_appends_one_winner",
    "concurrent_first_appends_one_winner",
    "count_runs",
    "delete_and_delete_run_refuse_what_is_not_a_run_key",
    "delete_items_returns_count",
    "delete_latest_does_not_reuse_its_sequence",
    "delete_of_a_sequence_that_is_no_int_is_refused",
    "delete_removes_owned_items",
    "delete_returns_whether_it_removed_one",
    "delete_run_of_absent_run_returns_zero",
    "delete_run_removes_everything",
    "delete_with_another_id_removes_nothing",
    "delete_with_id_of_a_deleted_run",
    "deleting_every_checkpoint_empties_the_run",
    "empty_and_binary_bytes",
    "expired_items_are_hidden",
    "fields_of_the_wrong_type_are_refused_before_any_change",
    "get_expired_returns_none",
    "get_missing_returns_none",
    "get_run_absent_or_expired_is_none",
    "headers_before_and_limit",
    "headers_of_absent_run",
    "items_of_runs_are_separate",
    "items_of_the_wrong_type_are_refused_and_nothing_is_written",
    "items_refuse_what_is_not_a_run_key",
    "items_survive_appends",
    "keep_latest_keeps_newest",
    "keep_latest_none_keeps_all",
    "keep_latest_of_an_int_subclass_is_its_value",
    "large_payload_round_trip",
    "latest_returns_newest",
    "list_and_count_runs_exclude_expired",
    "list_and_count_runs_follow_status_changes",
    "list_and_count_runs_of_empty_store",
    "list_runs_newest_created_first_by_status",
    "list_runs_pages_through_runs_created_together",
    "list_runs_pages_visit_every_run_once",
    "lowered_keep_latest_converges_on_next_append",
    "pruning_removes_owned_items",
    "put_and_get_items",
    "put_items_create_only_conflict_writes_nothing",
    "put_items_create_only_replaces_expired_item",
    "reads_fill_the_store_key",
    "reads_refuse_what_is_not_a_run_key",
    "reads_report_current_run_status",
    "run_records_refuse_what_is_not_a_run_key",
    "runs_are_independent",
    "scan_items_after_a_key_with_limit",
    "scan_items_by_a_prefix_of_the_highest_code_point",
    "scan_items_by_prefix",
    "scan_items_in_code_point_order",
    "scan_items_with_prefix_and_start_after",
    "update_run_of_absent_or_expired_run",
    "update_run_with_stale_incarnation_conflicts",
    "update_run_with_stale_version_conflicts",
))
"""Contract tests (all their parameters) that add no checkpoint to a full book."""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiobotocore runs on asyncio only


def _watch_the_book(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that gets the sequence of each checkpoint added to a book already full."""
    full: list[int] = []
    real = layout.Book.add

    def add(book: layout.Book, sequence: int, expires_at: float | None, blob: str | None, *,
            capacity: int) -> None:
        if book.back is not None or book.detail >= capacity:
            full.append(sequence)
        real(book, sequence, expires_at, blob, capacity=capacity)

    monkeypatch.setattr(layout.Book, "add", add)
    return full


class TestDynamoDBStoreWithATinyBook(StoreContract):
    deadline_seconds = DEADLINE

    @pytest.fixture
    async def store(
        self, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, provisioned: str,
        aws_names: tuple[str, str],
    ) -> AsyncIterator[CheckpointStore]:
        name = request.node.originalname
        full = _watch_the_book(monkeypatch)
        table = await new_table(provisioned, "tiny")
        async with opened(provisioned, (table, aws_names[1])) as store:
            store._book_capacity = 2
            yield store
        assert not (name in NEVER_FILL_THE_BOOK and full), \
            f"{name} fills the book now: take it off NEVER_FILL_THE_BOOK"


for _name in NEVER_FILL_THE_BOOK:
    assert hasattr(StoreContract, _name), f"NEVER_FILL_THE_BOOK names no contract test {_name}"
    if not HUNT:
        setattr(TestDynamoDBStoreWithATinyBook, _name, None)  # not collected
