"""The public-surface fuzz of test_public_surface_fuzz.py on the server stores' methods:
Redis (also its Redis Cluster code path, on the plain server), PostgreSQL, S3 and
DynamoDB+S3 (moto in server mode).

Each example gets a backing of its own from tests/_backings.py (a Redis key prefix, its keys
deleted afterwards; the test's PostgreSQL schema, emptied afterwards; an S3 prefix; a
DynamoDB table), opens one store over it, seeds it as the local stores' fuzz does and makes
a few calls of the store's public methods with hostile and valid arguments: each returns or
raises a CheckpointError, and one that raised changed nothing the store holds.

CI runs a few fixed examples per store (moto serves one request at a time, and a snapshot
reads every run back); ``FUZZ_EXAMPLES=200`` hunts (random), ``-k redis`` picks a store.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.from_thread import BlockingPortal
from hypothesis import given
from hypothesis import strategies as st

from fastcheckpoint import ConflictError, ValidationError
from tests._backings import (
    Backing,
    DynamoDBBacking,
    PostgresBacking,
    RedisBacking,
    S3Backing,
)
from tests._hostile import DEEP, nested_list
from tests.stores._moto import REGION, moto_endpoint, unique_name  # noqa: F401
from tests.test_model_checking_stores import _redis_url, postgres_schema
from tests.test_public_surface_fuzz import (
    EXCLUDED,
    HUNT,
    BadRepr,
    NastyStr,
    World,
    check_call,
    fixed_call,
    fuzz_settings,
    fuzz_world,
    portal,  # noqa: F401
    public_methods,
    scratch,  # noqa: F401
)

SERVER_EXCLUDED: dict[str, str] = {
    **EXCLUDED,
    **{f"{cls}.aclose": "closes the store (takes no argument)"
       for cls in ("RedisStore", "PostgresStore", "S3Store", "DynamoDBStore")},
    **{f"{cls}.from_url": "builds a store from a URL, a configuration path (not the store's "
                          "calls on its data)"
       for cls in ("RedisStore", "PostgresStore", "S3Store", "DynamoDBStore")},
    **{f"{cls}.provision": "creates the schema, bucket or table (set-up, run once by the "
                           "fixtures)"
       for cls in ("PostgresStore", "S3Store", "DynamoDBStore")},
    "S3Store.client": "hands out the store's botocore client (no call on the data)",
    "DynamoDBStore.clients": "hands out the store's botocore clients (no call on the data)",
}
"""The local fuzz's exclusions, and the server stores' set-up and lifecycle methods."""

KINDS = ("redis", "redis-cluster-path", "postgres", "s3", "dynamodb")
CI_KINDS = ("redis", "redis-cluster-path", "postgres", "s3")
"""CI's fuzz leaves DynamoDB out (an example costs many seconds on moto; its findings are
replayed by the deterministic test below); ``FUZZ_EXAMPLES`` fuzzes every store."""
EXAMPLES = {"redis": 6, "redis-cluster-path": 4, "postgres": 5, "s3": 1, "dynamodb": 1}
"""CI's fixed examples per store."""

DYNAMODB_THRESHOLD = 512
"""Bytes past which the DynamoDB store puts a checkpoint or an item in the bucket."""


@pytest.fixture(scope="module")
def bucket(moto_endpoint: str) -> str:  # noqa: F811
    """A bucket of this module's own on the moto server."""
    pytest.importorskip("aiobotocore")
    from fastcheckpoint.stores.s3 import S3Store

    name = unique_name("fuzz")

    async def provision() -> None:
        store = S3Store(name, region=REGION, endpoint_url=moto_endpoint)
        try:
            await store.provision()
        finally:
            await store.aclose()

    anyio.run(provision, backend="asyncio")
    return name


@pytest.fixture
def backing(request: pytest.FixtureRequest) -> Iterator[Callable[[], Backing]]:
    """What builds each example's backing for the store kind of the test."""
    kind = request.param
    if kind in ("redis", "redis-cluster-path"):
        url = _redis_url()
        yield lambda: RedisBacking(url, cluster=kind != "redis", tag="fcfuzz")
    elif kind == "postgres":
        with postgres_schema(request.config) as (target, schema):
            yield lambda: PostgresBacking(target, schema)
    elif kind == "s3":
        pytest.importorskip("moto")
        name, endpoint = request.getfixturevalue("bucket"), request.getfixturevalue(
            "moto_endpoint")
        yield lambda: S3Backing(endpoint, name, tag="fuzz")
    else:
        pytest.importorskip("moto")
        name, endpoint = request.getfixturevalue("bucket"), request.getfixturevalue(
            "moto_endpoint")
        yield lambda: DynamoDBBacking(endpoint, name, threshold=DYNAMODB_THRESHOLD,
                                      tag="fuzz")


_worlds = itertools.count()


def open_world(kind: str, made: Backing, portal: BlockingPortal,  # noqa: F811
               scratch: Path) -> World:  # noqa: F811
    portal.call(made.prepare)
    return World(kind, portal, scratch / f"server-{next(_worlds)}", store=made.open())


def close_world(world: World, made: Backing, portal: BlockingPortal) -> None:  # noqa: F811
    try:
        world.close()
    finally:
        portal.call(made.clean)


@pytest.mark.parametrize("backing", KINDS if HUNT else CI_KINDS, indirect=True)
def test_server_store_methods(backing: Callable[[], Backing], portal: BlockingPortal,  # noqa: F811
                              scratch: Path, request: pytest.FixtureRequest  # noqa: F811
                              ) -> None:
    kind = request.node.callspec.params["backing"]

    @fuzz_settings(EXAMPLES[kind])
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        made = backing()
        world = open_world(kind, made, portal, scratch)
        try:
            fuzz_world(world, "store", portal, data, SERVER_EXCLUDED)
        finally:
            close_world(world, made, portal)

    fuzz()


def test_every_server_exclusion_names_something_that_exists() -> None:
    from fastcheckpoint.stores.dynamodb import DynamoDBStore
    from fastcheckpoint.stores.postgres import PostgresStore
    from fastcheckpoint.stores.redis import RedisStore
    from fastcheckpoint.stores.s3 import S3Store

    classes = {cls.__name__: cls for cls in (RedisStore, PostgresStore, S3Store, DynamoDBStore)}
    for name in SERVER_EXCLUDED:
        owner, _, attribute = name.partition(".")
        if owner in classes:
            assert callable(getattr(classes[owner], attribute, None)), name
    for cls in classes.values():
        assert {"append", "get", "headers", "update_run", "scan_items", "purge_expired",
                "read_with_items"} <= set(public_methods(cls, SERVER_EXCLUDED))


# -- what the fuzz found, one deterministic case each --------------------------------------

SERVER_CALLS: list[tuple[str, dict[str, Any]]] = [
    ("get", {"run_key": "RUN", "sequence": BadRepr()}),
    ("get", {"run_key": "RUN", "sequence": 1, "now": BadRepr()}),
    ("get", {"run_key": "RUN", "sequence": 1, "now": 10**400}),
    ("latest", {"run_key": "RUN", "now": "\ud800"}),
    ("read_with_items", {"run_key": "RUN", "sequence": nested_list(DEEP)}),
    ("headers", {"run_key": "RUN", "before": "\ud800", "limit": 5}),
    ("headers", {"run_key": "RUN", "before": None, "limit": None}),
    ("headers", {"run_key": "RUN", "before": None, "limit": 5,
                 "include_expired": NastyStr("x")}),
    ("delete", {"run_key": "RUN", "sequence": BadRepr(), "checkpoint_id": "c"}),
    ("delete", {"run_key": "RUN", "sequence": 1, "checkpoint_id": "\ud800"}),
    ("get_run", {"run_key": "RUN", "now": None}),
    ("update_run", {"run_key": "RUN", "incarnation": "\ud800", "version": 0,
                    "status": "active", "data": b""}),
    ("update_run", {"run_key": "RUN", "incarnation": "INC", "version": BadRepr(),
                    "status": "active", "data": b""}),
    ("update_run", {"run_key": "RUN", "incarnation": "INC", "version": 0,
                    "status": "\ud800", "data": b""}),
    ("list_runs", {"status": BadRepr(), "limit": 5, "cursor": None}),
    ("list_runs", {"status": None, "limit": None, "cursor": None}),
    ("list_runs", {"status": None, "limit": 5, "cursor": BadRepr()}),
    ("runs_with_label", {"label": "x", "limit": 5, "cursor": nested_list(DEEP)}),
    ("count_runs", {"status": "\ud800"}),
    ("count_runs", {"status": None, "now": {"a": BadRepr()}}),
    ("put_items", {"run_key": "RUN", "items": [], "create_only": NastyStr("x")}),
    ("put_owned_items", {"run_key": "RUN", "items": [], "owner": BadRepr(),
                         "checkpoint_id": "c", "if_absent": False}),
    ("put_owned_items", {"run_key": "RUN", "items": [], "owner": 1,
                         "checkpoint_id": "\ud800", "if_absent": False}),
    ("put_owned_items", {"run_key": "RUN", "items": [], "owner": 1,
                         "checkpoint_id": "c", "if_absent": NastyStr("x")}),
    ("get_items", {"run_key": "RUN", "keys": 5}),
    ("get_items", {"run_key": "RUN", "keys": ["\ud800"]}),
    ("delete_items", {"run_key": "RUN", "keys": 0.5}),
    ("delete_items", {"run_key": "RUN", "keys": [BadRepr()]}),
    ("scan_items", {"run_key": "RUN", "prefix": None}),
    ("scan_items", {"run_key": "RUN", "start_after": "\ud800"}),
    ("scan_items", {"run_key": "RUN", "limit": None}),
    ("scan_items", {"run_key": "RUN", "reverse": NastyStr("x")}),
    ("purge_expired", {"limit": None}),
    ("purge_expired", {"limit": 5, "now": float("nan")}),
    ("damaged_runs", {"now": BadRepr()}),
    ("rebuild_run", {"run_key": "RUN", "seed": None}),
    ("append", {"run_key": BadRepr(), "record": None, "run": None, "keep_latest": None}),
    ("append", {"run_key": "RUN", "record": None, "run": None, "keep_latest": None,
                "now": BadRepr()}),
]
"""Store calls that leaked an error of the driver, of Python or of the value itself on the
Redis, PostgreSQL, S3 or DynamoDB store (``RUN``: a run key the store holds; ``INC``: its
incarnation)."""

FOUND_ON = ("redis", "redis-cluster-path", "postgres", "s3", "dynamodb")


@pytest.mark.parametrize("backing", FOUND_ON, indirect=True)
def test_a_server_store_refuses_a_bad_argument_and_changes_nothing(
    backing: Callable[[], Backing], portal: BlockingPortal, scratch: Path,  # noqa: F811
    request: pytest.FixtureRequest,
) -> None:
    kind = request.node.callspec.params["backing"]
    made = backing()
    world = open_world(kind, made, portal, scratch)
    try:
        # No call here may change the store: one snapshot before them all and one after (a
        # snapshot per call costs seconds on moto).
        before = world.snapshot()
        for method, kwargs in SERVER_CALLS:
            _, raised = check_call(f"{kind}.{method}", getattr(world.store, method),
                                   fixed_call(world, method, kwargs), portal=portal)
            # Refused, or (an incarnation no run has) a conflict: never another error.
            assert raised is None or isinstance(raised, (ValidationError, ConflictError)), (
                method, raised)
        assert world.snapshot() == before
    finally:
        close_world(world, made, portal)
