"""The manager and its command line against what a review found.

* A corrupt checkpoint header shortens the store's page it sits in: the listing reads on, so
  that audit export, ``history`` and ``show --seq`` (which take a short page as the end) do
  not drop the intact checkpoints behind it; with nothing skipped no extra read is made.
* A create on a FAILED run resumes the run it wrote its checkpoint in, never a new run
  another process started under the same id meanwhile (after a ``delete_run``).
* A bad argument is a ``ValidationError`` (a bad setting a ``ConfigurationError``) however it
  is built: the message shows it cut short, never failing on a list nested deeper than
  ``repr`` recurses or an int too long to print.
* ``BlockingManager`` given a config that is not a ``CheckpointConfig`` says so.
* ``fastcheckpoint approve/reject --requested-at`` pins the decision to the request the
  reviewer saw, given as ``runs --json`` or ``runs`` shows its time.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from fastcheckpoint import (
    CheckpointConfig,
    CheckpointManager,
    CheckpointStatus,
    ConfigurationError,
    FileStore,
    MemoryStore,
    RetryPolicy,
    ValidationError,
    _ids,
)
from fastcheckpoint.blocking import BlockingManager
from fastcheckpoint.cli import EXIT_CONFLICT, EXIT_OK, EXIT_USAGE, main
from fastcheckpoint.stores import CheckpointHeader, CheckpointStore, StoredCheckpoint
from tests._helpers import ForwardingStore, make_store

pytestmark = pytest.mark.anyio


class _Counted(ForwardingStore):
    """Counts the header pages read."""

    def __init__(self, inner: CheckpointStore) -> None:
        super().__init__(inner)
        self.calls: Counter[str] = Counter()

    async def headers(self, run_key: str, **options: Any) -> tuple[list[CheckpointHeader],
                                                                    str | None]:
        self.calls["headers"] += 1
        return await super().headers(run_key, **options)


async def _append_corrupt(store: CheckpointStore, run_id: str, now: float) -> None:
    """The run's next checkpoint, written past the manager with a header that is not ours."""
    key = _ids.run_key(run_id)
    run = await store.get_run(key, now=now)
    assert run is not None
    sequence = run.latest_sequence + 1
    record = StoredCheckpoint(
        sequence=sequence, checkpoint_id=_ids.checkpoint_id(key, run.incarnation, sequence),
        created_at=now, expires_at=None, header=b"\x00junk", payload=b"junk")
    await store.append(key, record, run=run, keep_latest=None, now=now)


async def _run_with_corrupt(store: CheckpointStore, corrupt_at: int, total: int) -> None:
    """Run ``r`` with checkpoints 0 .. total-1, the one at ``corrupt_at`` corrupt."""
    manager = CheckpointManager(store, config=CheckpointConfig(max_checkpoints_per_run=None))
    for sequence in range(total):
        if sequence == corrupt_at:
            await _append_corrupt(store, "r", manager.config.clock())
        else:
            await manager.create("r", {"i": sequence}, force=True)


# -- a corrupt header does not end a listing ---------------------------------------------------


async def test_list_checkpoints_fills_a_page_past_a_corrupt_header() -> None:
    store = _Counted(MemoryStore())
    await _run_with_corrupt(store, corrupt_at=2, total=5)
    manager = CheckpointManager(store)

    first = await manager.list_checkpoints("r", 2)
    store.calls.clear()
    second = await manager.list_checkpoints("r", 2, before=first[-1].checkpoint_id)

    assert [m.sequence for m in first] == [4, 3]
    assert [m.sequence for m in second] == [1, 0]  # 2 is skipped, the page still full
    assert store.calls["headers"] == 2


async def test_list_checkpoints_reads_one_page_when_nothing_is_skipped() -> None:
    store = _Counted(MemoryStore())
    manager = CheckpointManager(store)
    for step in range(5):
        await manager.create("r", {"i": step}, force=True)
    store.calls.clear()

    listed = await manager.list_checkpoints("r", 2)

    assert [m.sequence for m in listed] == [4, 3]
    assert store.calls["headers"] == 1


async def test_list_checkpoints_stops_at_a_run_started_again_between_its_reads() -> None:
    inner = MemoryStore()
    await _run_with_corrupt(inner, corrupt_at=4, total=5)
    other = CheckpointManager(inner)

    class Restarted(ForwardingStore):
        """The run is deleted and started again after the first page is read."""

        async def headers(self, run_key: str, **options: Any) -> Any:
            page = await super().headers(run_key, **options)
            if options["before"] is None:
                await other.delete_run("r")
                for step in range(5):
                    await other.create("r", {"new": step}, force=True)
            return page

    listed = await CheckpointManager(Restarted(inner)).list_checkpoints("r", 2)

    assert [m.sequence for m in listed] == [3]  # none of the new run's checkpoints


async def test_list_checkpoints_reads_on_past_a_page_led_by_an_unreadable_id() -> None:
    # The next page's first header stood for the run's incarnation: one whose id is not an
    # id of ours made the listing end there, as if the run had been started again.
    import msgspec

    class Damaged(ForwardingStore):
        """Checkpoint 7's header and checkpoint 6's id are damaged."""

        async def headers(self, run_key: str, **options: Any) -> Any:
            page, status = await super().headers(run_key, **options)
            damaged = {7: {"header": b"\xc1garbage"}, 6: {"checkpoint_id": "garbage"}}
            return [msgspec.structs.replace(h, **damaged.get(h.sequence, {})) for h in page], \
                status

    manager = CheckpointManager(Damaged(MemoryStore()))
    for step in range(10):
        await manager.create("r", {"i": step}, force=True)

    listed = await manager.list_checkpoints("r", 3)

    assert [m.sequence for m in listed] == [9, 8, 5]


async def test_export_goes_past_a_page_shortened_by_a_corrupt_header() -> None:
    store = MemoryStore()
    await _run_with_corrupt(store, corrupt_at=2, total=5)
    manager = CheckpointManager(store)

    text = "".join([chunk async for chunk in manager.export_run("r", page_size=2)])

    assert [c["sequence"] for c in json.loads(text)["checkpoints"]] == [4, 3, 1, 0]


def _file_run_with_corrupt(path: Path, corrupt_at: int, total: int) -> str:
    anyio.run(_run_with_corrupt, FileStore(path, fsync=False), corrupt_at, total)
    return f"file://{path}?fsync=false"


def test_show_seq_finds_a_checkpoint_behind_a_corrupt_newest_header(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = _file_run_with_corrupt(tmp_path / "store", corrupt_at=1, total=2)

    assert main(["show", "--url", url, "r", "--seq", "0", "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["state"] == {"i": 0}


def test_history_lists_the_checkpoints_behind_a_page_with_a_corrupt_header(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # history reads 500 headers at a time: the corrupt one shortens the first page
    url = _file_run_with_corrupt(tmp_path / "store", corrupt_at=300, total=502)

    assert main(["history", "--url", url, "r"]) == EXIT_OK
    out = capsys.readouterr().out
    table = out.splitlines()
    rows = table[next(i for i, line in enumerate(table) if line.startswith("SEQ")) + 1:]
    listed = [int(line.split()[0]) for line in rows]
    assert listed == [s for s in range(501, -1, -1) if s != 300]


# -- a late resume leaves a new run of the same id alone ----------------------------------------


async def _start_again_and_fail(manager: CheckpointManager) -> None:
    await manager.delete_run("r")
    await manager.create("r", {"new": 1})
    await manager.mark_failed("r", "the new run's own failure")


@pytest.mark.parametrize("kind", ["memory", "file"])
@pytest.mark.parametrize("when", ["after the append", "before the status change"])
async def test_a_late_resume_leaves_a_new_run_of_the_same_id_failed(
    tmp_path: Path, kind: str, when: str
) -> None:
    inner = make_store(kind, tmp_path / "store", fsync=False)
    other = CheckpointManager(inner)  # another process
    acted: list[str] = []

    class Slow(ForwardingStore):
        """Another process deletes the run and starts it again at ``when``."""

        async def append(self, run_key: str, record: StoredCheckpoint, **options: Any) -> str:
            status = await self.inner.append(run_key, record, **options)
            if when == "after the append":
                acted.append(when)
                await _start_again_and_fail(other)
            return status

        async def update_run(self, run_key: str, **options: Any) -> Any:
            if when == "before the status change" and not acted:
                acted.append(when)
                await _start_again_and_fail(other)
            return await self.inner.update_run(run_key, **options)

    await other.create("r", {"old": 0})
    await other.mark_failed("r", "the old run's failure")

    created = await CheckpointManager(Slow(inner)).create("r", {"old": 1})

    run = await other.get_run("r")
    assert acted == [when]
    assert created is not None
    assert created.metadata.status is CheckpointStatus.FAILED  # the run's status as it is
    assert run is not None
    assert run.status is CheckpointStatus.FAILED
    assert run.error == "the new run's own failure"
    assert [change.status for change in run.history] == [CheckpointStatus.FAILED]


# -- a bad argument of any shape is a ValidationError --------------------------------------------


def _nested(depth: int = 3000) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


_TOO_LONG_TO_PRINT = -(10**5000)
"""An int ``repr`` refuses (more digits than ``sys.get_int_max_str_digits()``)."""

_Call = Callable[[CheckpointManager, str, object], Awaitable[object]]


async def _exported(manager: CheckpointManager, **arguments: Any) -> None:
    async for _ in manager.export_run("r", **arguments):
        pass


_CALLS: dict[str, _Call] = {
    "list_runs status": lambda m, c, bad: m.list_runs(bad),  # type: ignore[arg-type]
    "list_runs limit": lambda m, c, bad: m.list_runs(limit=bad),  # type: ignore[arg-type]
    "list_runs cursor": lambda m, c, bad: m.list_runs(cursor=bad),  # type: ignore[arg-type]
    "count_runs status": lambda m, c, bad: m.count_runs(bad),  # type: ignore[arg-type]
    "create ttl_seconds": lambda m, c, bad: m.create("r", {}, ttl_seconds=bad),  # type: ignore[arg-type]
    "create expected_sequence": lambda m, c, bad: m.create(
        "r", {}, expected_sequence=bad),  # type: ignore[arg-type]
    "prune keep": lambda m, c, bad: m.prune("r", bad),  # type: ignore[arg-type]
    "list_checkpoints limit": lambda m, c, bad: m.list_checkpoints("r", bad),  # type: ignore[arg-type]
    "pause latest_sequence": lambda m, c, bad: m.pause(
        "r", {}, latest_sequence=bad),  # type: ignore[arg-type]
    "approve requested_at": lambda m, c, bad: m.approve(
        "r", approver="ana", requested_at=bad),  # type: ignore[arg-type]
    "reject requested_at": lambda m, c, bad: m.reject(
        "r", approver="ana", requested_at=bad),  # type: ignore[arg-type]
    "fork ttl_seconds": lambda m, c, bad: m.fork(c, ttl_seconds=bad),  # type: ignore[arg-type]
    "export_run format": lambda m, c, bad: _exported(m, format=bad),
    "export_run include_state": lambda m, c, bad: _exported(m, include_state=bad),
    "export_run page_size": lambda m, c, bad: _exported(m, page_size=bad),
}


@pytest.mark.parametrize("bad", [_nested(), _TOO_LONG_TO_PRINT], ids=["nested", "long int"])
@pytest.mark.parametrize("call", list(_CALLS))
async def test_a_bad_argument_of_any_shape_is_a_validation_error(call: str, bad: object) -> None:
    manager = CheckpointManager(MemoryStore())
    created = await manager.create("r", {})
    assert created is not None

    with pytest.raises(ValidationError) as raised:
        await _CALLS[call](manager, created.checkpoint_id, bad)

    assert len(str(raised.value)) < 400  # the value shown cut short


_SETTINGS = ["auto_checkpoint", "checkpoint_interval", "max_checkpoints_per_run",
             "default_ttl_seconds", "cleanup_interval", "compress_min_bytes",
             "offload_min_bytes", "cleanup_batch_size", "max_sequence_retries",
             "history_min_entries", "enc_hook", "dec_hook", "clock"]


@pytest.mark.parametrize("bad", [_nested(), _TOO_LONG_TO_PRINT], ids=["nested", "long int"])
@pytest.mark.parametrize("name", _SETTINGS)
def test_a_bad_setting_of_any_shape_is_a_configuration_error(name: str, bad: object) -> None:
    settings: dict[str, Any] = {name: bad}
    with pytest.raises(ConfigurationError, match=name) as raised:
        CheckpointConfig(**settings)
    assert len(str(raised.value)) < 400


@pytest.mark.parametrize("name", ["base_delay", "max_delay", "max_retries"])
def test_a_bad_retry_setting_of_any_shape_is_a_configuration_error(name: str) -> None:
    settings: dict[str, Any] = {name: _nested()}
    with pytest.raises(ConfigurationError, match=name):
        RetryPolicy(**settings)


# -- BlockingManager's config ---------------------------------------------------------------------


@pytest.mark.parametrize("target", ["memory://", "store"])
@pytest.mark.parametrize("config", [{"max_checkpoints_per_run": 5}, {}])
def test_blocking_manager_refuses_a_config_that_is_not_a_checkpoint_config(
    target: str, config: dict[str, Any]
) -> None:
    store_or_url = MemoryStore() if target == "store" else target
    with pytest.raises(ConfigurationError, match="config must be a CheckpointConfig, got dict"):
        BlockingManager(store_or_url, config=config)  # type: ignore[arg-type]


# -- approve and reject --requested-at -------------------------------------------------------------


def _paused(path: Path, request: dict[str, Any], *, first: bool = True) -> str:
    """``file://`` store at ``path`` whose run ``r`` waits for a decision on ``request``."""

    async def pause() -> None:
        manager = CheckpointManager(FileStore(path, fsync=False))
        if first:
            await manager.create("r", {"step": 0})
        await manager.pause("r", request)
        await manager.aclose()

    anyio.run(pause)
    return f"file://{path}?fsync=false"


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _requested_at_as_printed(capsys: pytest.CaptureFixture[str], url: str) -> tuple[str, str]:
    """The pending request's time as ``runs --json`` and as ``runs --status paused`` print it."""
    _, listed, _ = _cli(capsys, "runs", "--url", url, "--json")
    epoch = json.loads(listed)["runs"][0]["approval"]["requested_at"]
    _, table, _ = _cli(capsys, "runs", "--url", url, "--status", "paused")
    row = next(line for line in table.splitlines() if line.startswith("r "))
    return repr(epoch), row.split()[1]


def _run(url: str) -> Any:
    path = url.removeprefix("file://").removesuffix("?fsync=false")
    return anyio.run(CheckpointManager(FileStore(path, fsync=False)).get_run, "r")


@pytest.mark.parametrize("form", ["epoch", "iso"])
@pytest.mark.parametrize("decision", ["approve", "reject"])
def test_a_decision_pinned_to_a_request_no_longer_pending_exits_4(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], form: str, decision: str
) -> None:
    url = _paused(tmp_path / "store", {"action": "refund 10"})
    seen = _requested_at_as_printed(capsys, url)[form == "iso"]
    assert _cli(capsys, "approve", "--url", url, "r", "--approver", "bob")[0] == EXIT_OK
    _paused(tmp_path / "store", {"action": "refund 10000"}, first=False)

    code, _, err = _cli(capsys, decision, "--url", url, "r", "--approver", "alice",
                        "--requested-at", seen)

    assert code == EXIT_CONFLICT
    assert "read the run again before deciding" in err
    run = _run(url)
    assert run.status is CheckpointStatus.PAUSED
    assert run.approval["request"] == {"action": "refund 10000"}


@pytest.mark.parametrize("form", ["epoch", "iso"])
@pytest.mark.parametrize("decision", ["approve", "reject"])
def test_a_decision_pinned_to_the_pending_request_is_made(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], form: str, decision: str
) -> None:
    url = _paused(tmp_path / "store", {"action": "refund 10"})
    seen = _requested_at_as_printed(capsys, url)[form == "iso"]

    code, out, _ = _cli(capsys, decision, "--url", url, "r", "--approver", "alice",
                        "--requested-at", seen, "--json")

    assert code == EXIT_OK
    decided = json.loads(out)
    assert decided["status"] == ("active" if decision == "approve" else "rejected")
    assert decided["approval"]["decided_by"] == "alice"
    assert decided["approval"]["request"] == {"action": "refund 10"}


@pytest.mark.parametrize("text", ["soon", "nan", "inf", "2026-13-01T00:00:00Z", ""])
def test_a_requested_at_that_is_not_a_time_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    url = _paused(tmp_path / "store", {"action": "refund 10"})

    with pytest.raises(SystemExit) as caught:  # argparse's own exit
        main(["approve", "--url", url, "r", "--approver", "alice", "--requested-at", text])

    assert caught.value.code == EXIT_USAGE
    assert "--requested-at: must be" in capsys.readouterr().err
    assert _run(url).status is CheckpointStatus.PAUSED
