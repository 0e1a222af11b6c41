"""The command line as a first-time user meets it: a missing store URL, a ``memory://`` store
(empty in every command), a decision pinned to a request that is no longer pending, and the
``history`` table beside the exports."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import anyio
import pytest

from fastcheckpoint import CheckpointConfig, CheckpointManager, CheckpointStatus, FileStore
from fastcheckpoint._export import when
from fastcheckpoint.cli import EXIT_CONFLICT, EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE, main
from fastcheckpoint.errors import StoreUnavailableError
from tests._helpers import FakeClock

ASKED_FIRST = 1796283295.123456  # 2026-12-03T07:34:55.123456Z
ASKED_AGAIN = 1796568425.7022135


@pytest.fixture(autouse=True)
def no_store_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("FASTCHECKPOINT_", "CHECKPOINT_")):
            monkeypatch.delenv(name)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- no store URL ---------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["runs"], ["show", "order-17"], ["doctor"],
                                  ["doctor", "--repair"]])
def test_without_a_store_the_error_names_both_ways_to_give_one(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    code, out, err = run_cli(capsys, *argv)

    assert (code, out) == (EXIT_USAGE, "")
    [line] = err.splitlines()
    assert "--url URL" in line
    assert "FASTCHECKPOINT_URL" in line
    # Examples a shell can use: a memory:// store would be empty in every command.
    assert "memory://" not in line
    assert all(scheme in line for scheme in ("file://", "sqlite://", "redis://"))
    assert ("doctor URL" in line) is (argv[0] == "doctor")


# -- memory:// ------------------------------------------------------------------------------------


def _says_memory_is_private(err: str) -> bool:
    return any(line.startswith("note: memory:// ") and "starts empty" in line
               for line in err.splitlines())


@pytest.mark.parametrize(("argv", "expected"), [
    (["runs"], EXIT_OK),
    (["runs", "--json"], EXIT_OK),
    (["cleanup"], EXIT_OK),
    (["doctor", "--repair"], EXIT_OK),
    (["show", "order-17"], EXIT_NOT_FOUND),
    (["history", "order-17"], EXIT_NOT_FOUND),
    (["approve", "order-17", "--approver", "ana"], EXIT_NOT_FOUND),
    (["prune", "order-17", "--keep", "1"], EXIT_NOT_FOUND),
])
def test_a_memory_store_says_it_is_empty_and_private_to_the_command(
    capsys: pytest.CaptureFixture[str], argv: list[str], expected: int
) -> None:
    """A note on stderr, with the exit code the command has on any store without the run."""
    code, _, err = run_cli(capsys, *argv, "--url", "memory://")

    assert code == expected
    assert _says_memory_is_private(err)
    assert "file://" in err


def test_a_memory_store_from_checkpoint_mode_says_where_it_came_from(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHECKPOINT_MODE", "development")

    code, _, err = run_cli(capsys, "runs")

    assert code == EXIT_OK
    assert _says_memory_is_private(err)
    assert "CHECKPOINT_MODE=development" in err


def test_init_of_a_memory_store_says_so_too(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "init", "memory://", "--json")

    assert code == EXIT_OK
    assert json.loads(out)["provisioned"] is False
    assert _says_memory_is_private(err)


def test_doctor_probes_a_memory_store_without_a_note(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The probe is written and read back within the command: its result means what it says.
    Nor does a store shared between commands get the note."""
    probed, _, probe_err = run_cli(capsys, "doctor", "memory://")
    store = tmp_path / "store"
    store.mkdir()
    listed, _, listed_err = run_cli(capsys, "runs", "--url", f"file://{store}")

    assert (probed, listed) == (EXIT_OK, EXIT_OK)
    assert (probe_err, listed_err) == ("", "")


# -- --requested-at that no longer names the pending request --------------------------------------


def _paused_twice(path: Path) -> str:
    """A file store whose run ``r`` was paused at ASKED_FIRST, approved, and paused again at
    ASKED_AGAIN: the request now pending is the second."""
    clock = FakeClock(ASKED_FIRST)

    async def seed() -> None:
        manager = CheckpointManager(FileStore(path, fsync=False),
                                    config=CheckpointConfig(clock=clock))
        await manager.create("r", {"step": 0})
        await manager.pause("r", {"action": "refund 10"})
        await manager.approve("r", approver="bob")
        clock.now = ASKED_AGAIN
        await manager.pause("r", {"action": "refund 10000"})
        await manager.aclose()

    anyio.run(seed)
    return f"file://{path}?fsync=false"


@pytest.mark.parametrize("typed", [when(ASKED_FIRST), repr(ASKED_FIRST)])
@pytest.mark.parametrize("decision", ["approve", "reject"])
def test_a_request_no_longer_pending_is_named_by_its_iso_time_and_epoch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], typed: str, decision: str
) -> None:
    url = _paused_twice(tmp_path / "store")

    code, out, err = run_cli(capsys, decision, "--url", url, "r", "--approver", "alice",
                             "--requested-at", typed)

    assert (code, out) == (EXIT_CONFLICT, "")
    assert err == (
        f"error: run 'r' awaits the request made at 2026-12-06T14:47:05.702214Z "
        f"({ASKED_AGAIN!r}), not the one made at 2026-12-03T07:34:55.123456Z "
        f"({ASKED_FIRST!r}); read the run again before deciding "
        "(fastcheckpoint runs --status paused)\n")
    run = anyio.run(CheckpointManager(FileStore(tmp_path / "store")).get_run, "r")
    assert run is not None
    assert run.status is CheckpointStatus.PAUSED
    assert run.approval is not None
    assert run.approval["request"] == {"action": "refund 10000"}


def test_a_run_that_is_not_paused_keeps_the_managers_refusal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = _paused_twice(tmp_path / "store")
    assert run_cli(capsys, "approve", "--url", url, "r", "--approver", "bob")[0] == EXIT_OK

    code, _, err = run_cli(capsys, "approve", "--url", url, "r", "--approver", "alice",
                           "--requested-at", when(ASKED_AGAIN))

    assert code == EXIT_CONFLICT
    assert "is not awaiting approval (it is active)" in err


def test_a_store_that_fails_to_say_which_request_is_pending_leaves_the_refusal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading the run again only words the error: if that read fails, the decision was
    still refused (exit 4, the manager's reason), not a store failure."""
    url = _paused_twice(tmp_path / "store")

    async def unavailable(*_: Any, **__: Any) -> Any:
        raise StoreUnavailableError("cannot reach the store")

    monkeypatch.setattr(CheckpointManager, "get_run", unavailable)
    code, _, err = run_cli(capsys, "approve", "--url", url, "r", "--approver", "alice",
                           "--requested-at", repr(ASKED_FIRST))

    assert code == EXIT_CONFLICT
    assert "read the run again before deciding" in err


# -- history --------------------------------------------------------------------------------------


def _status_rows(out: str) -> list[str]:
    """The lines between the run's summary and the checkpoint table."""
    return out.split("\n\n")[1].splitlines()


def test_history_lists_the_status_changes_the_exports_hold_and_no_other(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = _paused_twice(tmp_path / "store")

    async def fresh() -> None:
        manager = CheckpointManager(FileStore(tmp_path / "store", fsync=False))
        await manager.create("new", {"step": 0})
        await manager.aclose()

    anyio.run(fresh)
    code, out, _ = run_cli(capsys, "history", "r", "--url", url)
    _, exported, _ = run_cli(capsys, "history", "r", "--url", url, "--json")
    new_code, new_out, _ = run_cli(capsys, "history", "new", "--url", url)
    _, new_exported, _ = run_cli(capsys, "history", "new", "--url", url, "--json")

    assert (code, new_code) == (EXIT_OK, EXIT_OK)
    header, *rows = _status_rows(out)
    assert header.split() == ["AT", "STATUS", "BY", "NOTE"]
    assert [row.split()[:2] for row in rows] == [
        [change["at"], change["status"]] for change in json.loads(exported)["run"]["history"]]
    assert json.loads(new_exported)["run"]["history"] == []
    assert _status_rows(new_out) == ["no status change since the run was created"]
    assert "run started" not in out + new_out


# -- the URL the store will be opened at -----------------------------------------------------------


def test_a_home_relative_path_names_the_store_there(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The check that a file store is there looked for a literal "~/ckpt" and reported no store
    # at all, while open_store expands the ~ (init made the store, runs could not find it).
    monkeypatch.setenv("HOME", str(tmp_path))
    anyio.run(CheckpointManager(FileStore(tmp_path / "ckpt")).create, "order-17", {"step": 1})

    code, out, err = run_cli(capsys, "runs", "--url", "~/ckpt", "--json")

    assert (code, err) == (EXIT_OK, "")
    assert [run["run_id"] for run in json.loads(out)["runs"]] == ["order-17"]


def test_a_scheme_without_its_slashes_is_refused_with_the_url_meant(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    code, _, err = run_cli(capsys, "runs", "--url", "sqlite:runs.db")

    assert code == EXIT_USAGE
    assert "did you mean 'sqlite:///runs.db'" in err
    assert "doctor" not in err  # doctor refuses that URL too: no advice to run it
    assert list(tmp_path.iterdir()) == []
