"""The ``fastcheckpoint`` command line: the run commands, init and bench."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

import fastcheckpoint
import fastcheckpoint.stores as stores_module
from fastcheckpoint import CheckpointConfig, CheckpointManager, RunPage, open_store
from fastcheckpoint.cli import (
    EXIT_CONFLICT,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_STORE,
    EXIT_USAGE,
    main,
)
from fastcheckpoint.errors import CorruptCheckpointError, StoreUnavailableError
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
                                  ["show", f"ck-{'a' * 24}-{'b' * 8}-0"],
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


@pytest.mark.parametrize(("tags", "shown"), [
    (["prod", "v2"], "prod, v2"),
    (["a, b"], '["a, b"]'),
    (["a", "b"], "a, b"),
    (["a,b"], '["a,b"]'),
    ([""], '[""]'),
    (["-"], '["-"]'),
    ([" padded"], '[" padded"]'),
    (['["x"]'], '["[\\"x\\"]"]'),
    (["\u202eevil"], "\\u202eevil"),
    (["\u202e, x"], '["\\u202e, x"]'),
])
def test_tags_read_one_way_in_show_and_history(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tags: list[str], shown: str
) -> None:
    """A tag holding ``, `` would read as two tags: such lists are shown as JSON."""
    store_url = f"file://{tmp_path / 'store'}"

    async def seed() -> None:
        async with CheckpointManager(open_store(store_url)) as manager:
            await manager.create("tagged", {"x": 1}, step_name="s", tags=tags)

    anyio.run(seed)
    _, out, _ = run_cli(capsys, "show", "tagged", "--url", store_url)
    _, history, _ = run_cli(capsys, "history", "tagged", "--url", store_url)

    assert f"tags        {shown}\n" in out
    assert history.rstrip("\n").splitlines()[-1].endswith(f"  s  {shown}")


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


@pytest.mark.parametrize("argv", [["runs"], ["show", "order-17"], ["history", "order-17"],
                                  ["export", "order-17"], ["cleanup"], ["doctor", "--repair"],
                                  ["approve", "order-17", "--approver", "ana"]])
@pytest.mark.parametrize("where", ["sqlite:///{cwd}/typo-dir/runs.db",
                                   "sqlite:///typo-dir/runs.db?timeout=5",
                                   "SQLITE:///typo%2Ddir/runs.db"])
def test_a_sqlite_database_that_does_not_exist_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    argv: list[str], where: str
) -> None:
    monkeypatch.chdir(tmp_path)  # relative database paths are taken from here
    url = where.format(cwd=tmp_path)

    code, out, err = run_cli(capsys, *argv, "--url", url)

    assert (code, out) == (EXIT_USAGE, "")
    assert err == (f"error: no SQLite database at {str(tmp_path / 'typo-dir/runs.db')!r} (a "
                   f"mistyped path? fastcheckpoint doctor {shlex.quote(url)} creates it and "
                   "checks it)\n")
    assert list(tmp_path.iterdir()) == []


def test_a_sqlite_database_that_exists_is_used_whatever_its_url_says(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    created, _, _ = run_cli(capsys, "doctor", "sqlite:///a%20b/runs.db")  # creates, as documented

    code, out, _ = run_cli(capsys, "runs", "--json", "--url",
                           f"sqlite:///{tmp_path}/a b/runs.db?synchronous=normal&timeout=5")

    assert (created, code) == (EXIT_OK, EXIT_OK)
    assert json.loads(out)["runs"] == []  # the probe run is gone
    assert (tmp_path / "a b" / "runs.db").is_file()


@pytest.mark.parametrize(("url", "says"), [
    ("sqlite:///:memory:", "use memory://"),
    ("sqlite://host/runs.db", "names a file, not a host"),
    ("sqlite:///", "without a database path"),
])
def test_a_sqlite_url_naming_no_database_file_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    url: str, says: str
) -> None:
    monkeypatch.chdir(tmp_path)

    code, _, err = run_cli(capsys, "runs", "--url", url)

    assert code == EXIT_USAGE
    assert says in err
    assert list(tmp_path.iterdir()) == []


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
    [expires] = [line for line in out.splitlines() if line.startswith("expires")]
    assert re.fullmatch(r"expires +\+3\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", expires)


def test_a_decision_reports_who_decided(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run_cli(capsys, "reject", "order-17", "--approver", "alice", "--url", url)
    _, again, _ = run_cli(capsys, "reject", "order-17", "--approver", "bob", "--url", url)

    assert out.startswith("run order-17: rejected (rejected by alice at ")
    assert again.startswith("run order-17: rejected (rejected by alice at ")  # the first stands


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

    assert watched.getvalue().endswith(
        f"export order-17 to {target}: 3 of 3 checkpoints (100%), done\n")
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
    assert row.endswith("plan\\tthen\\r\\nact")  # escaped, as every table shows them


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
    assert ": 0 of 3 checkpoints (0%), stopped\nerror: connection lost\n" in watched.getvalue()
    assert not (tmp_path / "a.json").exists()


def test_passwords_stay_out_of_error_messages(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "runs", "--url", "redis+x://:s3cret@cache/0")

    assert code == EXIT_USAGE
    assert "s3cret" not in err
    assert ":***@" in err


# -- first contact: version, arguments, paging, configuration mistakes ---------------------------


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--version"])

    assert caught.value.code == EXIT_OK
    assert capsys.readouterr().out == f"fastcheckpoint {fastcheckpoint.__version__}\n"


@pytest.mark.parametrize("argv", [["runs", "--limit", "abc"], ["runs", "--limit", "0"],
                                  ["prune", "order-17", "--keep", "abc"]])
def test_a_count_that_is_not_a_positive_integer_says_so(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)

    assert caught.value.code == EXIT_USAGE
    assert f"must be a positive integer, got {argv[-1]!r}" in capsys.readouterr().err


def test_a_negative_sequence_is_refused(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["show", "order-17", "--seq", "-1", "--url", url])

    assert caught.value.code == EXIT_USAGE
    assert "--seq: must be a sequence number" in capsys.readouterr().err


def test_the_next_page_command_keeps_the_store_status_and_page_size(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async def more_paused() -> None:
        manager = CheckpointManager(open_store(url))
        for run_id in ("order-30", "order-31"):
            await manager.create(run_id, {"n": 1})
            await manager.pause(run_id, request={"run": run_id})
        await manager.aclose()

    anyio.run(more_paused)
    pages: list[list[str]] = []
    argv = ["runs", "--url", url, "--status", "paused", "--limit", "1"]
    while argv:
        code, out, _ = run_cli(capsys, *argv)
        assert code == EXIT_OK
        lines = out.splitlines()
        hint = lines[-1] if lines[-1].startswith("more: ") else None
        pages.append([line.split()[0] for line in lines[1:] if line is not hint])
        argv = [] if hint is None else shlex.split(hint.removeprefix("more: "))[1:]
        assert hint is None or argv[:7] == ["runs", "--url", url, "--status", "paused",
                                            "--limit", "1"]

    assert pages == [["order-31"], ["order-30"], ["order-17"]]


def test_the_next_page_command_hides_a_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def list_runs(*_: Any, **__: Any) -> Any:
        return RunPage([], "next")

    monkeypatch.setattr(CheckpointManager, "list_runs", list_runs)
    code, out, _ = run_cli(capsys, "runs", "--url", "memory://:s3cret@x")

    assert code == EXIT_OK
    assert out.splitlines()[-1] == ("more: fastcheckpoint runs --url 'memory://:***@x' "
                                    "--limit 50 --cursor next")


@pytest.mark.parametrize("command", ["runs", "init"])
@pytest.mark.parametrize(("url", "says"), [
    ("redis://127.0.0.1:6379/0?prefx=x", "did you mean 'prefix'"),  # an unknown option
    ("redis://[::1", "Invalid IPv6 URL"),
    ("file://", "names no directory"),
])
def test_a_bad_store_url_is_one_line_and_exit_2_never_a_traceback(
    capsys: pytest.CaptureFixture[str], command: str, url: str, says: str
) -> None:
    argv = [command, url] if command == "init" else [command, "--url", url]

    code, out, err = run_cli(capsys, *argv)

    assert (code, out) == (EXIT_USAGE, "")
    assert err.startswith("error: ")
    assert err.count("\n") == 1
    assert says in err


def test_an_unknown_setting_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FASTCHECKPOINT_MAX_CHECKPOINT_PER_RUN", "5")

    code, _, err = run_cli(capsys, "runs", "--url", f"file://{tmp_path}")

    assert code == EXIT_USAGE
    assert err.startswith("error: unknown setting FASTCHECKPOINT_MAX_CHECKPOINT_PER_RUN")
    assert err.count("\n") == 1


@pytest.mark.parametrize(("env", "ttl"), [
    ({"CHECKPOINT_TTL_DAYS": "2"}, 2 * 86_400.0),
    ({"CHECKPOINT_TTL_DAYS": "2", "FASTCHECKPOINT_DEFAULT_TTL_SECONDS": "60"}, 60.0),
])
def test_the_default_ttl_comes_from_the_environment_as_from_env_reads_it(
    url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str], ttl: float
) -> None:
    _, shown, _ = run_cli(capsys, "show", "order-18", "--url", url, "--json")
    source = json.loads(shown)["metadata"]["checkpoint_id"]
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    code, out, _ = run_cli(capsys, "fork", source, "--url", url, "--json")

    assert code == EXIT_OK
    forked = json.loads(out)
    assert forked["expires_at"] - forked["created_at"] == pytest.approx(ttl)


@pytest.mark.parametrize("command", ["runs", "init"])
@pytest.mark.parametrize(("days", "says"), [("abc", "CHECKPOINT_TTL_DAYS='abc' is not a number"),
                                            ("0", "CHECKPOINT_TTL_DAYS must be > 0, got '0'")])
def test_a_malformed_ttl_in_days_is_one_line_and_exit_2(
    url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    command: str, days: str, says: str
) -> None:
    monkeypatch.setenv("CHECKPOINT_TTL_DAYS", days)
    argv = [command, url] if command == "init" else [command, "--url", url]

    code, out, err = run_cli(capsys, *argv)

    assert (code, out) == (EXIT_USAGE, "")
    assert err == f"error: {says}\n"


def test_a_missing_extra_names_the_install_command(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # As if the redis package were not installed: importing it fails.
    monkeypatch.delitem(sys.modules, "fastcheckpoint.stores.redis", raising=False)
    monkeypatch.setitem(sys.modules, "redis", None)

    code, out, err = run_cli(capsys, "runs", "--url", "redis://127.0.0.1:6379/0")
    init_code, _, init_err = run_cli(capsys, "init", "redis://127.0.0.1:6379/0")

    assert (code, init_code) == (EXIT_USAGE, EXIT_USAGE)
    assert out == ""
    for message in (err, init_err):
        assert message.count("\n") == 1
        assert "pip install 'fastcheckpoint[redis]'" in message


def test_bench_from_an_installation_without_the_suite_says_what_to_get(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "benchmarks.cli", None)  # as in an installed wheel

    code, _, err = run_cli(capsys, "bench", "--quick")

    version = fastcheckpoint.__version__
    assert code == EXIT_USAGE
    assert "<" not in err
    assert f"pip download --no-deps --no-binary :all: fastcheckpoint=={version}" in err
    assert f"tar xzf fastcheckpoint-{version}.tar.gz" in err
    assert "pip install -e '.[bench]'" in err


def test_help_and_sources_cite_no_outside_document(capsys: pytest.CaptureFixture[str]) -> None:
    texts: list[str] = []
    for argv in (["--help"], *([name, "--help"] for name in (
            "runs", "show", "history", "export", "fork", "approve", "reject", "cleanup",
            "prune", "doctor", "init"))):
        with pytest.raises(SystemExit):
            main(argv)
        texts.append(capsys.readouterr().out)
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    texts.append(capsys.readouterr().out)
    root = Path(__file__).resolve().parents[1]
    for name in ("fastcheckpoint/cli.py", "fastcheckpoint/_export.py", "benchmarks/cli.py",
                 "docs/command-line.md"):
        texts.append((root / name).read_text())

    assert all(text for text in texts)
    assert not [text[:60] for text in texts if "§" in text or "SPEC" in text]


# -- show: checkpoint ids, sequences, paused runs ------------------------------------------------


def test_show_accepts_a_checkpoint_id(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    _, listed, _ = run_cli(capsys, "history", "order-17", "--url", url, "--json")
    middle = json.loads(listed)["checkpoints"][1]["checkpoint_id"]

    code, out, _ = run_cli(capsys, "show", middle, "--url", url, "--json")
    refused, _, err = run_cli(capsys, "show", middle, "--seq", "0", "--url", url)

    assert code == EXIT_OK
    assert json.loads(out)["metadata"]["checkpoint_id"] == middle
    assert json.loads(out)["state"] == {"step": 1}
    assert refused == EXIT_USAGE
    assert "--seq goes with a run id" in err


class UnreadableLatestStore(MemoryStore):
    """One store shared by every CLI call, whose newest checkpoint cannot be read."""

    shared: UnreadableLatestStore | None = None

    @classmethod
    def from_url(cls, url: str, **options: Any) -> UnreadableLatestStore:
        assert cls.shared is not None
        return cls.shared

    async def latest(self, run_key: str, *, now: float) -> Any:
        raise CorruptCheckpointError("payload checksum mismatch", key=f"{run_key}/latest")


def test_show_seq_reads_its_checkpoint_even_when_the_latest_is_unreadable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stores_module, "_REGISTRY", dict(stores_module._REGISTRY))
    register_store("unreadable", f"{__name__}:UnreadableLatestStore")
    store = UnreadableLatestStore()
    monkeypatch.setattr(UnreadableLatestStore, "shared", store)

    async def seed() -> None:
        manager = CheckpointManager(store)
        for step in range(3):
            await manager.create("r", {"step": step}, force=True)

    anyio.run(seed)
    code, out, _ = run_cli(capsys, "show", "r", "--seq", "0", "--url", "unreadable://",
                           "--json")

    assert code == EXIT_OK
    assert json.loads(out)["state"] == {"step": 0}


def test_the_approval_queue_and_show_give_each_request_and_how_long_it_waited(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async def paused_two_hours_ago() -> None:
        earlier = CheckpointManager(open_store(url), config=CheckpointConfig(
            clock=lambda: time.time() - 7_200))
        await earlier.create("order-40", {"n": 1})
        await earlier.pause("order-40", request={"action": "refund", "amount": 120.5})
        await earlier.aclose()

    anyio.run(paused_two_hours_ago)
    code, queue, _ = run_cli(capsys, "runs", "--status", "paused", "--url", url)
    _, shown, _ = run_cli(capsys, "show", "order-40", "--url", url)

    assert code == EXIT_OK
    header, *rows = queue.splitlines()
    assert header.split() == ["RUN", "REQUESTED", "WAITING", "REQUEST"]
    [row] = [row for row in rows if row.startswith("order-40 ")]
    assert re.fullmatch(r'order-40 +\S+Z +2h 00m +\{"action":"refund","amount":120\.5\}', row)
    fields = dict(line.split(None, 1) for line in shown.split("\n\n")[0].splitlines()[1:])
    assert fields["status"] == "paused"
    assert fields["request"] == '{"action":"refund","amount":120.5}'
    assert re.fullmatch(r"2h 00m \(since \S+Z\)", fields["waiting"])


# -- export and prune ------------------------------------------------------------------------------

ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
EPOCH = re.compile(r"\b1\d{9}(\.\d+)?\b")  # epoch seconds of these years


def times_in(value: Any) -> list[Any]:
    """Every value under a key that names a time (``at``, ``*_at``), at any depth."""
    if isinstance(value, list):
        return [time for item in value for time in times_in(item)]
    if not isinstance(value, dict):
        return []
    return [time for key, item in value.items() for time in (
        [item] if key == "at" or key.endswith("_at") else times_in(item))]


def test_every_time_in_every_export_format_is_iso_8601(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run_cli(capsys, "approve", "order-17", "--approver", "ana", "--url", url)
    outputs = {format: run_cli(capsys, "export", "order-17", "--format", format, "--state",
                               "--url", url)[1] for format in ("json", "csv", "markdown")}

    document = json.loads(outputs["json"])
    times = [time for time in times_in(document) if time is not None]
    assert len(times) == 2 + 2 + 2 + 3  # run, status changes, approval, checkpoints
    assert all(isinstance(time, str) and ISO.fullmatch(time) for time in times), times
    rows = list(csv.DictReader(io.StringIO(outputs["csv"])))
    assert all(ISO.fullmatch(row["at"]) for row in rows)
    run_data = json.loads(rows[0]["data"])
    assert [ISO.fullmatch(time) is not None for time in times_in(run_data)] == [True] * 3
    assert ISO.search(outputs["markdown"])
    assert not [format for format, text in outputs.items() if EPOCH.search(text)]


def test_export_json_flag_is_the_json_export_and_conflicts_with_another_format(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(capsys, "export", "order-17", "--json", "--url", url)
    _, plain, _ = run_cli(capsys, "export", "order-17", "--url", url)
    refused, refused_out, err = run_cli(capsys, "export", "order-17", "--json", "--format",
                                        "csv", "--url", url)

    assert code == EXIT_OK
    assert json.loads(out) == json.loads(plain)
    assert (refused, refused_out) == (EXIT_USAGE, "")
    assert "cannot go with --format csv" in err


def test_export_into_a_missing_directory_names_that_directory(
    url: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = tmp_path / "audits" / "2026"

    code, _, err = run_cli(capsys, "export", "order-17", "-o", str(missing / "a.json"),
                           "--url", url)

    assert code == EXIT_USAGE
    assert err == (f"error: cannot write {missing / 'a.json'}: there is no directory "
                   f"{str(missing)!r}\n")
    assert not (tmp_path / "audits").exists()


def test_export_to_stdout_shows_progress_only_when_the_output_goes_elsewhere(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    watched, out = Terminal(), io.StringIO()
    monkeypatch.setattr("sys.stderr", watched)
    monkeypatch.setattr("sys.stdout", out)

    assert main(["export", "order-17", "--url", url]) == EXIT_OK
    monkeypatch.setattr("sys.stdout", Terminal())
    assert main(["export", "order-17", "--url", url]) == EXIT_OK

    assert watched.getvalue().count("\n") == 1
    assert watched.getvalue().endswith("export order-17: 3 of 3 checkpoints (100%), done\n")
    assert json.loads(out.getvalue())["run"]["run_id"] == "order-17"


def test_a_long_prune_shows_progress_on_a_terminal(
    url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def long_run() -> None:
        manager = CheckpointManager(open_store(url))
        for step in range(30):
            await manager.create("order-50", {"step": step}, force=True)
        await manager.aclose()

    anyio.run(long_run)
    quiet, _, quiet_err = run_cli(capsys, "prune", "order-50", "--keep", "25", "--url", url)
    watched = Terminal()
    monkeypatch.setattr("sys.stderr", watched)
    code = main(["prune", "order-50", "--keep", "5", "--url", url])

    assert (quiet, quiet_err) == (EXIT_OK, "")
    assert code == EXIT_OK
    assert watched.getvalue().endswith(
        "prune order-50: 20 of 20 checkpoints removed (100%), done\n")
    assert "run order-50: removed 20 checkpoint(s), kept the newest 5" in capsys.readouterr().out


# -- init ------------------------------------------------------------------------------------------


class ReportingStore(MemoryStore):
    """A store whose provision() reports what it did, as the S3 and DynamoDB stores do."""

    @classmethod
    def from_url(cls, url: str, **options: Any) -> ReportingStore:
        return cls()

    async def provision(self) -> list[str]:
        return ["created bucket b", "found table t"]


def test_init_reports_what_it_created_and_found(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stores_module, "_REGISTRY", dict(stores_module._REGISTRY))
    register_store("reporting", f"{__name__}:ReportingStore")

    code, out, _ = run_cli(capsys, "init", "reporting://:s3cret@x")
    json_code, as_json, _ = run_cli(capsys, "init", "reporting://x", "--json")
    _, nothing, _ = run_cli(capsys, "init", "memory://", "--json")

    assert (code, json_code) == (EXIT_OK, EXIT_OK)
    assert out == "reporting://:***@x: provisioned\n  created bucket b\n  found table t\n"
    assert json.loads(as_json) == {"store": "reporting://x", "provisioned": True,
                                   "actions": ["created bucket b", "found table t"]}
    assert json.loads(nothing) == {"store": "memory://", "provisioned": False,
                                   "actions": None}


class AsciiTerminal(io.TextIOWrapper):
    """A stream that can encode only ASCII and fails on anything else, as stdout does under
    ``PYTHONIOENCODING=ascii`` (or in the C locale without UTF-8 mode)."""

    def __init__(self) -> None:
        super().__init__(io.BytesIO(), encoding="ascii", errors="strict", write_through=True)

    def text(self) -> str:
        self.flush()
        raw = self.buffer
        assert isinstance(raw, io.BytesIO)
        return raw.getvalue().decode("ascii")  # fails if a byte is not ASCII


@pytest.fixture
def cafe(url: str) -> str:
    """The store of ``url`` with the run ``café-🚀`` added."""
    async def seed() -> None:
        manager = CheckpointManager(open_store(url))
        await manager.create("café-🚀", {"note": "naïve ✓"}, step_name="étape")
        await manager.aclose()

    anyio.run(seed)
    return url


def ascii_terminals(monkeypatch: pytest.MonkeyPatch) -> tuple[AsciiTerminal, AsciiTerminal]:
    """stdout and stderr that cannot encode ``é`` or ``🚀`` (set in the test itself: pytest
    puts its own capture back after the fixtures)."""
    out, err = AsciiTerminal(), AsciiTerminal()
    monkeypatch.setattr("sys.stdout", out)
    monkeypatch.setattr("sys.stderr", err)
    return out, err


@pytest.mark.parametrize("argv", [["runs"], ["show", "café-🚀"], ["history", "café-🚀"],
                                  ["export", "café-🚀", "--format", "csv", "--state"],
                                  ["export", "café-🚀", "--format", "markdown"]])
def test_text_output_escapes_what_the_terminal_cannot_encode(
    cafe: str, monkeypatch: pytest.MonkeyPatch, argv: list[str]
) -> None:
    out, err = ascii_terminals(monkeypatch)

    code = main([*argv, "--url", cafe])

    assert (code, err.text()) == (EXIT_OK, "")
    assert "caf\\xe9-\\U0001f680" in out.text()
    if argv == ["runs"]:  # the columns stay aligned
        lines = out.text().splitlines()
        assert lines[1].index("active") == lines[2].index("active") == lines[0].index("STATUS")
    assert (out.errors, err.errors) == ("strict", "strict")  # as they were before the command


def test_paths_and_urls_reach_the_system_as_given_in_a_locale_that_is_not_utf8(
    tmp_path: Path,
) -> None:
    """In the C locale without UTF-8 mode a run id is read as UTF-8, while a non-ASCII store
    URL and ``--output`` path go back to the system in its own encoding (the bytes typed)."""
    store = tmp_path / "störe"

    async def seed() -> None:
        manager = CheckpointManager(open_store(f"file://{store}"))
        await manager.create("café", {"note": "naïve"})
        await manager.aclose()

    anyio.run(seed)
    output = tmp_path / "café.json"
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0",
           "PYTHONCOERCECLOCALE": "0", "PYTHONIOENCODING": ""}
    done = subprocess.run(
        [sys.executable, "-m", "fastcheckpoint.cli", "export", "café", "--state",
         "--url", f"file://{store}", "--output", str(output)],
        env=env, capture_output=True, timeout=120, check=False)

    assert (done.returncode, done.stderr) == (EXIT_OK, b"")
    document = json.loads(output.read_text(encoding="utf-8"))
    assert document["run"]["run_id"] == "café"


def test_a_repair_run_and_a_network_url_the_locale_could_not_decode_are_read_typed(
    cafe: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``doctor --repair --url URL RUN`` takes the run from the URL's place: it is read as
    UTF-8 too. A network store's URL is text (its names and options), read as UTF-8; a
    ``file://`` URL is a path and stays as the system gave it."""
    out, err = ascii_terminals(monkeypatch)
    typed = "café-🚀".encode().decode("ascii", "surrogateescape")

    repaired = main(["doctor", "--repair", "--url", cafe, typed])
    listed = main(["runs", "--url", "memory://" + "é".encode().decode("ascii", "surrogateescape"),
                   "--json"])

    assert (repaired, listed) == (EXIT_OK, EXIT_OK)
    # stderr holds only the note that a memory:// store is empty in every command
    [note] = err.text().splitlines()
    assert note.startswith("note: memory://\\xe9 is a store in this command's own memory")
    assert "nothing damaged" in out.text()


def test_a_path_the_locale_could_not_decode_is_shown_as_text_in_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store ``init --json`` names is a string (the path's bytes read as UTF-8), not
    the export's stand-in for a value JSON cannot hold; the path itself is used as given."""
    out, err = ascii_terminals(monkeypatch)
    path = str(tmp_path / "störe").encode().decode("ascii", "surrogateescape")

    code = main(["init", f"file://{path}", "--json"])

    assert (code, err.text()) == (EXIT_OK, "")
    assert json.loads(out.text())["store"] == f"file://{tmp_path / 'störe'}"
    assert (tmp_path / "störe").is_dir()


def test_an_argument_the_locale_could_not_decode_names_the_run_typed(
    cafe: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In the C locale without UTF-8 mode, ``café`` arrives as ``caf`` and two lone
    surrogates (one per byte): it still names the run ``café``."""
    out, err = ascii_terminals(monkeypatch)
    typed = "café-🚀".encode().decode("ascii", "surrogateescape")

    code = main(["show", typed, "--url", cafe, "--json"])

    assert (code, err.text()) == (EXIT_OK, "")
    assert json.loads(out.text())["state"] == {"note": "naïve ✓"}


@pytest.mark.parametrize("argv", [["runs", "--json"], ["show", "café-🚀", "--json"],
                                  ["history", "café-🚀", "--json"],
                                  ["export", "café-🚀", "--state"]])
def test_json_output_stays_exact_json_on_a_terminal_that_cannot_encode_it(
    cafe: str, monkeypatch: pytest.MonkeyPatch, argv: list[str]
) -> None:
    out, err = ascii_terminals(monkeypatch)

    code = main([*argv, "--url", cafe])

    assert (code, err.text()) == (EXIT_OK, "")
    text = out.text()
    assert "\\u00e9" in text
    assert "café-🚀" in json.dumps(json.loads(text), ensure_ascii=False)
    if argv[0] == "show":
        assert json.loads(text)["state"] == {"note": "naïve ✓"}


def test_json_output_is_unchanged_where_the_terminal_can_encode_it(
    cafe: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(capsys, "runs", "--url", cafe, "--json")

    assert code == EXIT_OK
    assert '"run_id": "café-🚀"' in out


def test_an_error_about_a_run_the_terminal_cannot_encode_is_one_line(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, err = ascii_terminals(monkeypatch)

    code = main(["approve", "thé", "--approver", "zoë", "--url", url])

    assert (code, out.text()) == (EXIT_NOT_FOUND, "")
    assert err.text().startswith("error: ")
    assert "th\\xe9" in err.text()


# -- a reader that went away ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_run(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A file store URL with run ``long``, whose export is far more than a pipe holds."""
    url = f"file://{tmp_path_factory.mktemp('closed-output') / 'store'}"

    async def seed() -> None:
        manager = CheckpointManager(open_store(url),
                                    config=CheckpointConfig(max_checkpoints_per_run=None))
        for i in range(150):
            await manager.create("long", {"i": i, "text": "x" * 1000}, force=True)
        await manager.aclose()

    anyio.run(seed)
    return url


_WRITERS = [
    ["init", "{url}", "--json"],
    ["runs", "--url", "{url}"],
    ["runs", "--url", "{url}", "--json"],
    ["history", "long", "--url", "{url}"],
    ["show", "long", "--url", "{url}", "--json"],
    ["export", "long", "--state", "--url", "{url}"],
    ["export", "long", "--url", "{url}", "--format", "csv"],
    ["export", "long", "--url", "{url}", "--format", "markdown"],
    ["doctor", "{url}", "--json"],
    ["--help"],
]


def _cli(argv: list[str], url: str) -> list[str]:
    return [sys.executable, "-m", "fastcheckpoint.cli", *(arg.format(url=url) for arg in argv)]


@pytest.mark.parametrize("argv", _WRITERS, ids=" ".join)
def test_a_closed_stdout_ends_a_command_quietly_with_exit_code_141(
    long_run: str, argv: list[str]
) -> None:
    """Nobody reads the pipe the command writes to: no traceback, no "Exception ignored"
    when the interpreter exits, the exit code a shell reports for a tool SIGPIPE ended."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # before the command starts: every write it makes fails
    try:
        done = subprocess.run(_cli(argv, long_run), stdout=write_end, stderr=subprocess.PIPE,
                              timeout=120, check=False)
    finally:
        os.close(write_end)

    assert (done.returncode, done.stderr.decode()) == (141, "")


@pytest.mark.parametrize("argv", [["export", "long", "--state", "--url", "{url}"]],
                         ids=" ".join)
def test_a_reader_that_stops_early_ends_a_command_quietly(long_run: str, argv: list[str]) -> None:
    """``fastcheckpoint export ... | head -c 10``: the reader takes a little, then closes.
    (Only output far larger than a pipe holds: a shorter one, ``history`` say, may be
    written whole before the reader closes, and then the command rightly exits 0.)"""
    command = subprocess.Popen(_cli(argv, long_run), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    assert command.stdout is not None
    assert command.stderr is not None
    first = command.stdout.read(10)
    command.stdout.close()
    try:
        code = command.wait(timeout=120)
    finally:
        command.kill()
    errors = command.stderr.read().decode()
    command.stderr.close()

    assert len(first) == 10
    assert (code, errors) == (141, "")
