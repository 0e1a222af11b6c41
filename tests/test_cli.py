"""The ``fastcheckpoint`` command line: the run commands, init and bench."""

from __future__ import annotations

import csv
import io
import json
import os
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

import fastcheckpoint.stores as stores_module
from fastcheckpoint import CheckpointConfig, CheckpointManager, open_store
from fastcheckpoint.cli import (
    EXIT_CONFLICT,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_STORE,
    EXIT_USAGE,
    _redacted,
    main,
)
from fastcheckpoint.errors import StoreUnavailableError
from fastcheckpoint.stores import register_store
from fastcheckpoint.stores.memory import MemoryStore

PROVISIONED: list[str] = []


class ProvisionedStore(MemoryStore):
    """A store with a backend to set up: records each provision() call."""

    @classmethod
    def from_url(cls, url: str, **options: Any) -> ProvisionedStore:
        return cls()

    async def provision(self) -> None:
        PROVISIONED.append("provisioned")


class BrokenStore(ProvisionedStore):
    async def provision(self) -> None:
        raise StoreUnavailableError("cannot reach the endpoint")

    async def list_runs(self, **_: Any) -> Any:
        raise StoreUnavailableError("cannot reach the endpoint")

    async def append(self, *_: Any, **__: Any) -> Any:
        raise StoreUnavailableError("cannot reach the endpoint")


class ReadOnlyRunsStore(MemoryStore):
    """Writes checkpoints but may not change run records; keeps every instance to look at."""

    opened: list[ReadOnlyRunsStore] = []  # noqa: RUF012 - shared on purpose

    @classmethod
    def from_url(cls, url: str, **options: Any) -> ReadOnlyRunsStore:
        store = cls()
        cls.opened.append(store)
        return store

    async def update_run(self, *_: Any, **__: Any) -> Any:
        raise StoreUnavailableError("access denied to run records")


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stores_module, "_REGISTRY", dict(stores_module._REGISTRY))
    register_store("provisioned", f"{__name__}:ProvisionedStore")
    register_store("broken", f"{__name__}:BrokenStore")
    register_store("readonly", f"{__name__}:ReadOnlyRunsStore")
    ReadOnlyRunsStore.opened.clear()
    PROVISIONED.clear()


@pytest.mark.usefixtures("registry")
def test_init_provisions_a_store_that_needs_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", "provisioned://x"]) == EXIT_OK
    assert main(["init", "provisioned://x"]) == EXIT_OK  # idempotent from the caller's side

    assert PROVISIONED == ["provisioned", "provisioned"]
    assert "provisioned" in capsys.readouterr().out


def test_init_of_a_store_without_provisioning_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["init", f"file://{tmp_path / 'ckpt'}"]) == EXIT_OK
    assert "nothing to provision" in capsys.readouterr().out


def test_init_with_a_bad_url_exits_with_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", "nosuch://x"]) == EXIT_USAGE
    assert "unknown store URL scheme" in capsys.readouterr().err


@pytest.mark.usefixtures("registry")
def test_init_when_the_backend_fails_exits_with_store_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["init", "broken://x"]) == EXIT_STORE
    assert "cannot reach" in capsys.readouterr().err


def test_bench_passes_its_arguments_to_the_suite(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def fake_main(argv: list[str]) -> int:
        seen.append(argv)
        return 0

    monkeypatch.setattr("benchmarks.cli.main", fake_main)
    assert main(["bench", "--quick", "--store", "memory://"]) == EXIT_OK
    assert seen == [["--quick", "--store", "memory://"]]


def test_a_missing_command_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as caught:
        main([])
    assert caught.value.code == 2


# -- commands on a store ----------------------------------------------------------------------


@pytest.fixture
def url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A file store holding: order-17 (3 checkpoints, paused for a refund), order-18 (one
    checkpoint) and order-19 (one checkpoint that expired ten minutes ago)."""
    for name in list(os.environ):
        if name.startswith(("FASTCHECKPOINT_", "CHECKPOINT_")):
            monkeypatch.delenv(name)
    store_url = f"file://{tmp_path / 'store'}"

    async def seed() -> None:
        manager = CheckpointManager(open_store(store_url))
        for step in range(3):
            await manager.create("order-17", {"step": step}, step_name=f"step {step}",
                                 tags=["refund"], force=True)
        await manager.create("order-18", {"x": 1})
        await manager.pause("order-17", request={"amount": 12})
        await manager.aclose()
        past = CheckpointManager(open_store(store_url),
                                 config=CheckpointConfig(clock=lambda: time.time() - 600))
        await past.create("order-19", {"old": True}, ttl_seconds=60)
        await past.aclose()

    anyio.run(seed)
    return store_url


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_runs_lists_newest_first_and_filters_by_status(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(capsys, "runs", "--url", url)
    paused_code, paused, _ = run_cli(capsys, "runs", "--url", url, "--status", "paused",
                                     "--json")

    assert code == EXIT_OK
    lines = out.splitlines()
    assert lines[0].split() == ["RUN", "STATUS", "CREATED", "UPDATED", "LATEST", "HELD"]
    assert [line.split()[:2] for line in lines[1:]] == [["order-18", "active"],
                                                       ["order-17", "paused"]]
    assert paused_code == EXIT_OK
    document = json.loads(paused)
    assert [run["run_id"] for run in document["runs"]] == ["order-17"]
    assert document["runs"][0]["approval"]["request"] == {"amount": 12}
    assert document["next_cursor"] is None


def test_runs_pages_with_the_cursor_it_prints(
    url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FASTCHECKPOINT_URL", url)  # the default when --url is not given
    _, first, _ = run_cli(capsys, "runs", "--limit", "1")
    cursor = first.splitlines()[-1].split("--cursor ", 1)[1]
    _, second, _ = run_cli(capsys, "runs", "--limit", "1", "--cursor", cursor)

    assert first.splitlines()[1].startswith("order-18")
    assert second.splitlines()[1].startswith("order-17")


def test_show_prints_the_latest_or_the_asked_sequence_with_its_content(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(capsys, "show", "order-17", "--url", url)
    seq_code, seq_json, _ = run_cli(capsys, "show", "order-17", "--seq", "0", "--url", url,
                                    "--json")

    assert code == EXIT_OK
    assert "sequence    2" in out
    assert '"step": 2' in out
    assert seq_code == EXIT_OK
    shown = json.loads(seq_json)
    assert shown["metadata"]["sequence"] == 0
    assert shown["metadata"]["status"] == "paused"
    assert shown["state"] == {"step": 0}


@pytest.mark.parametrize("argv", [["show", "no-such-run"], ["show", "order-17", "--seq", "9"],
                                  ["show", "order-17", "--seq", "-1"],
                                  ["history", "no-such-run"], ["export", "no-such-run"],
                                  ["approve", "no-such-run", "--approver", "ana"]])
def test_a_missing_run_or_checkpoint_exits_3(
    url: str, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    code, out, err = run_cli(capsys, *argv, "--url", url)

    assert code == EXIT_NOT_FOUND
    assert out == ""
    assert err.startswith("error: ")


def test_history_shows_status_changes_and_every_checkpoint(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(capsys, "history", "order-17", "--url", url)
    _, as_json, _ = run_cli(capsys, "history", "order-17", "--url", url, "--json")
    _, exported, _ = run_cli(capsys, "export", "order-17", "--url", url)

    assert code == EXIT_OK
    assert out.startswith("run order-17: paused")
    assert "paused" in out.split("SEQ")[0]
    assert [line.split()[0] for line in out.split("SEQ")[1].splitlines()[1:]] == ["2", "1", "0"]
    assert json.loads(as_json) == json.loads(exported)


def test_export_writes_every_format_to_stdout_or_a_file(
    url: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, _ = run_cli(capsys, "export", "order-17", "--format", "csv", "--state",
                           "--url", url)
    target = tmp_path / "order-17.md"
    file_code, file_out, _ = run_cli(capsys, "export", "order-17", "--format", "markdown",
                                     "-o", str(target), "--url", url)

    assert code == EXIT_OK
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [row["record"] for row in rows] == ["run", "status_change"] + ["checkpoint"] * 3
    assert json.loads(rows[-1]["data"])["state"] == {"step": 0}
    assert file_code == EXIT_OK
    assert file_out == ""
    assert target.read_text().startswith("# Run `order-17`")


def test_approve_and_reject_decide_once_and_report_conflicts(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(capsys, "approve", "order-17", "--approver", "ana", "--comment",
                           "ok", "--url", url, "--json")
    again, _, err = run_cli(capsys, "reject", "order-17", "--approver", "bo", "--url", url)

    assert code == EXIT_OK
    decided = json.loads(out)
    assert decided["status"] == "active"
    assert decided["approval"]["decided_by"] == "ana"
    assert decided["history"][-1]["note"] == "ok"
    assert again == EXIT_CONFLICT
    assert "active" in err


def test_fork_starts_a_new_run_from_a_checkpoint(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _, shown, _ = run_cli(capsys, "show", "order-18", "--url", url, "--json")
    source = json.loads(shown)["metadata"]["checkpoint_id"]
    code, out, _ = run_cli(capsys, "fork", source, "--run", "order-18-retry", "--url", url)
    _, copy, _ = run_cli(capsys, "show", "order-18-retry", "--url", url, "--json")
    taken, _, _ = run_cli(capsys, "fork", source, "--run", "order-18-retry", "--url", url)

    assert code == EXIT_OK
    assert "order-18-retry" in out
    assert json.loads(copy)["state"] == {"x": 1}
    assert json.loads(copy)["metadata"]["parent_id"] == source
    assert taken == EXIT_CONFLICT


def test_cleanup_removes_what_expired(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "cleanup", "--url", url, "--json")
    _, runs, _ = run_cli(capsys, "runs", "--url", url, "--json")

    assert code == EXIT_OK
    assert json.loads(out) == {"removed_checkpoints": 1}
    assert {run["run_id"] for run in json.loads(runs)["runs"]} == {"order-17", "order-18"}


def test_run_commands_need_a_store(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("FASTCHECKPOINT_URL", "CHECKPOINT_MODE"):
        monkeypatch.delenv(name, raising=False)
    missing, _, missing_err = run_cli(capsys, "runs")
    unknown, _, unknown_err = run_cli(capsys, "runs", "--url", "nosuch://x")
    monkeypatch.setenv("FASTCHECKPOINT_MAX_CHECKPOINTS_PER_RUN", "many")
    malformed, _, _ = run_cli(capsys, "runs", "--url", f"file://{tmp_path}")

    assert (missing, unknown, malformed) == (EXIT_USAGE, EXIT_USAGE, EXIT_USAGE)
    assert "FASTCHECKPOINT_URL" in missing_err
    assert "unknown store URL scheme" in unknown_err


@pytest.mark.usefixtures("registry")
def test_a_failing_store_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "runs", "--url", "broken://x")

    assert code == EXIT_STORE
    assert "cannot reach" in err


def test_doctor_runs_every_operation_on_a_probe_run_and_removes_it(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(capsys, "doctor", url)
    json_code, as_json, _ = run_cli(capsys, "doctor", "--url", url, "--json")
    _, runs, _ = run_cli(capsys, "runs", "--url", url, "--json")

    assert (code, json_code) == (EXIT_OK, EXIT_OK)
    assert out.splitlines()[0] == f"store: {url}"
    assert len(out.splitlines()) == 2 + 6
    assert out.count("  ok  ") == 6
    assert "FAILED" not in out
    report = json.loads(as_json)
    assert report["ok"] is True
    assert [check["check"] for check in report["checks"]] == [
        "write", "read latest", "read by id", "list", "update run", "delete run"]
    assert all(check["ok"] for check in report["checks"])
    assert {run["run_id"] for run in json.loads(runs)["runs"]} == {"order-17", "order-18"}


@pytest.mark.usefixtures("registry")
def test_doctor_reports_the_first_failure_with_what_to_do(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run_cli(capsys, "doctor", "broken://x", "--json")

    assert code == EXIT_STORE
    report = json.loads(out)
    assert report["ok"] is False
    [check] = report["checks"]
    assert check["check"] == "write"
    assert "cannot reach the endpoint" in check["detail"]
    assert "fastcheckpoint init URL" in check["detail"]


@pytest.mark.usefixtures("registry")
def test_doctor_removes_its_probe_when_a_later_step_fails(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run_cli(capsys, "doctor", "readonly://x")

    assert code == EXIT_STORE
    assert [line.split()[:2] for line in out.splitlines()[2:]] == [
        ["write", "ok"], ["read", "latest"], ["read", "by"], ["list", "ok"],
        ["update", "run"]]
    assert "FAILED" in out.splitlines()[-1]
    [store] = ReadOnlyRunsStore.opened
    assert anyio.run(lambda: store.count_runs(status=None, now=time.time())) == 0


def test_prune_keeps_the_newest_checkpoints_of_a_run(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(capsys, "prune", "order-17", "--keep", "1", "--url", url, "--json")
    _, history, _ = run_cli(capsys, "history", "order-17", "--url", url, "--json")
    missing, _, _ = run_cli(capsys, "prune", "no-such-run", "--keep", "1", "--url", url)
    with pytest.raises(SystemExit) as refused:
        main(["prune", "order-17", "--keep", "0", "--url", url])

    assert code == EXIT_OK
    assert json.loads(out) == {"run_id": "order-17", "removed_checkpoints": 2}
    assert [c["sequence"] for c in json.loads(history)["checkpoints"]] == [2]
    assert missing == EXIT_NOT_FOUND
    assert refused.value.code == EXIT_USAGE


def test_a_failed_export_leaves_the_file_that_was_there(
    url: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    target = tmp_path / "audit.json"
    target.write_text("yesterday's export")

    code, _, _ = run_cli(capsys, "export", "no-such-run", "-o", str(target), "--url", url)

    assert code == EXIT_NOT_FOUND
    assert target.read_text() == "yesterday's export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.json", "store"]


def test_a_file_store_path_that_does_not_exist_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(capsys, "runs", "--url", f"file://{tmp_path / 'typo'}")

    assert code == EXIT_USAGE
    assert "no file store at" in err
    assert not (tmp_path / "typo").exists()


def test_times_no_calendar_can_show_do_not_break_the_output(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async def forever() -> None:
        manager = CheckpointManager(open_store(url))
        await manager.create("order-20", {"n": 1}, ttl_seconds=1e12)
        await manager.aclose()

    anyio.run(forever)
    code, out, _ = run_cli(capsys, "show", "order-20", "--url", url)
    csv_code, _, _ = run_cli(capsys, "export", "order-20", "--format", "csv", "--url", url)

    assert (code, csv_code) == (EXIT_OK, EXIT_OK)
    assert "(epoch seconds)" in out


def test_a_decision_reports_who_decided(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run_cli(capsys, "reject", "order-17", "--approver", "alice", "--url", url)
    _, again, _ = run_cli(capsys, "reject", "order-17", "--approver", "bob", "--url", url)

    assert out.startswith("run order-17: rejected (rejected by alice at ")
    assert again.startswith("run order-17: rejected (rejected by alice at ")  # the first stands


def test_printed_urls_hide_passwords() -> None:
    assert _redacted("redis://:s3cret@cache:6379/0") == "redis://:***@cache:6379/0"
    assert _redacted("rediss://app:s3cret@cache/0?prefix=a") == "rediss://app:***@cache/0?prefix=a"
    assert _redacted("file:///var/lib/ckpt") == "file:///var/lib/ckpt"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_long_export_to_a_file_shows_progress_on_a_terminal(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    watched = Terminal()
    monkeypatch.setattr("sys.stderr", watched)
    target = tmp_path / "audit.csv"

    assert main(["export", "order-17", "--format", "csv", "-o", str(target), "--url", url]) == 0

    assert watched.getvalue().endswith(f"export order-17 to {target}: 6 chunks written, done\n")
    assert len(target.read_text().splitlines()) == 6


def test_no_progress_when_nobody_watches(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(capsys, "export", "order-17", "-o", str(tmp_path / "a.json"),
                           "--url", url)

    assert code == EXIT_OK
    assert err == ""


def test_history_keeps_one_line_per_checkpoint_whatever_the_step_name(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async def odd() -> None:
        manager = CheckpointManager(open_store(url))
        await manager.create("order-21", {"n": 1}, step_name="plan\tthen\r\nact")
        await manager.aclose()

    anyio.run(odd)
    code, out, _ = run_cli(capsys, "history", "order-21", "--url", url)

    assert code == EXIT_OK
    [row] = [line for line in out.splitlines() if line.startswith("0 ")]
    assert "plan then  act" in row


def test_export_to_an_existing_file_keeps_its_permissions_and_writes_through_links(
    url: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    private = tmp_path / "private.json"
    private.write_text("old")
    private.chmod(0o600)
    link = tmp_path / "latest.json"
    link.symlink_to(private)

    code, _, _ = run_cli(capsys, "export", "order-17", "-o", str(link), "--url", url)

    assert code == EXIT_OK
    assert link.is_symlink()
    assert json.loads(private.read_text())["run"]["run_id"] == "order-17"
    assert private.stat().st_mode & 0o777 == 0o600


def test_a_failed_export_says_so_on_the_terminal(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    watched = Terminal()
    monkeypatch.setattr("sys.stderr", watched)
    real = CheckpointManager.export_run

    async def breaks(*args: Any, **kwargs: Any) -> Any:
        async for chunk in real(*args, **kwargs):
            yield chunk
            raise StoreUnavailableError("connection lost")

    monkeypatch.setattr(CheckpointManager, "export_run", breaks)
    code = main(["export", "order-17", "-o", str(tmp_path / "a.json"), "--url", url])

    assert code == EXIT_STORE
    assert "1 chunks written, stopped\n" in watched.getvalue()
    assert not (tmp_path / "a.json").exists()


def test_passwords_stay_out_of_error_messages(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "runs", "--url", "redis+x://:s3cret@cache/0")

    assert code == EXIT_USAGE
    assert "s3cret" not in err
    assert ":***@" in err
