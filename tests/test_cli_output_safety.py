"""Text the command line did not write itself (run ids, step names, tags, notes, comments,
requests, store messages) shown to a person: a character that would act on the terminal
(ESC, CSI, OSC, BEL, CR, LF, NUL, DEL, a C1 control, a bidirectional override) never reaches
stdout or stderr as it is; it shows as a backslash escape, and tables stay aligned. JSON stays
exact, CSV stays exact unless it goes to a terminal, Markdown is escaped and keeps its shape."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path
from typing import Any

import anyio
import pytest

import fastcheckpoint.stores as stores_module
import tests.test_cli
from fastcheckpoint import CheckpointManager, open_store
from fastcheckpoint._ids import run_key
from fastcheckpoint._untrusted import ACTING
from fastcheckpoint.cli import (
    EXIT_CONFLICT,
    EXIT_DAMAGED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_USAGE,
    _shell_word,
    _visible,
    main,
)
from fastcheckpoint.stores import register_store
from fastcheckpoint.stores.memory import MemoryStore
from tests.test_cli_repair import RepairableStore

EVIL = "\x1b[31mred\x1b[0m\x1b]0;title\x07\x1b[2J\r\n\tnul\x00del\x7fcsi\x9bbidi\u202eok\u2066"
"""ESC and CSI (colour, clear screen), OSC (the window title) ended by BEL, CR, LF, TAB, NUL,
DEL, the C1 control CSI (U+009B), a right-to-left override and a left-to-right isolate."""
SHOWN = (r"\x1b[31mred\x1b[0m\x1b]0;title\x07\x1b[2J\r\n\tnul\x00del\x7fcsi\u009bbidi"
         r"\u202eok\u2066")
"""``EVIL`` as tables and messages show it."""
IN_JSON = (r"\u001b[31mred\u001b[0m\u001b]0;title\u0007\u001b[2J\r\n\tnul\u0000del\u007fcsi"
           r"\u009bbidi\u202eok\u2066")
"""``EVIL`` inside a JSON string as the commands write it (and as Markdown shows it)."""

RUN = "run-" + EVIL
STEP = "step-" + EVIL
TAG = "tag-" + EVIL
ASKED = "asked-" + EVIL
APPROVER = "ana-" + EVIL
COMMENT = "ok-" + EVIL
ERROR = "boom-" + EVIL


def unsafe(text: str) -> list[str]:
    """The characters of ``text`` that would act on a terminal: every character of the
    categories Cc, Cf, Zl and Zp but the line breaks the output is made of (judged by the
    Unicode database, not by the command's own list)."""
    return [char for char in text if char != "\n"
            and unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp")]


def assert_safe(text: str) -> None:
    assert unsafe(text) == [], text
    data = text.encode("utf-8")
    raw = [b"\x1b", b"\x07", b"\r", b"\x00", b"\x7f", b"\t", "\x9b".encode(), "\u202e".encode(),
           "\u2066".encode()]
    assert [found for found in raw if found in data] == []


@pytest.fixture
def url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A file store holding ``RUN``: two checkpoints (the newest with ``STEP`` and ``TAG``),
    paused with a request holding ``ASKED``; and ``order-2``, failed with ``ERROR``."""
    for name in list(os.environ):
        if name.startswith(("FASTCHECKPOINT_", "CHECKPOINT_")):
            monkeypatch.delenv(name)
    store_url = f"file://{tmp_path / 'store'}"

    async def seed() -> None:
        manager = CheckpointManager(open_store(store_url))
        await manager.create(RUN, {"said": EVIL}, step_name="plan")
        await manager.create(RUN, {"said": EVIL}, step_name=STEP, tags=[TAG, "b"], force=True)
        await manager.pause(RUN, request={"why": ASKED})
        await manager.create("order-2", {"n": 1})
        await manager.mark_failed("order-2", error=ERROR)
        await manager.aclose()

    anyio.run(seed)
    return store_url


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """The command's exit code, stdout and stderr, each checked to hold no acting character."""
    code, out, err = tests.test_cli.run_cli(capsys, *argv)
    assert_safe(out)
    assert_safe(err)
    return code, out, err


def column(header: str, name: str) -> int:
    """Where the column ``name`` starts in a table's header line."""
    found = re.search(rf"(?<!\S){name}(?!\S)", header)
    assert found is not None, header
    return found.start()


# -- the rule -------------------------------------------------------------------------------------


def test_the_rule_covers_every_control_format_and_separator_character() -> None:
    """Judged against the running Python's Unicode database: nothing that acts is missed,
    nothing that shows is escaped."""
    acting = re.compile(f"[{ACTING}]")
    missed = [hex(code) for code in range(sys.maxunicode + 1)
              if unicodedata.category(chr(code)) in ("Cc", "Cf", "Zl", "Zp")
              and not acting.match(chr(code))]
    extra = [hex(code) for code in range(sys.maxunicode + 1)
             if acting.match(chr(code))
             and unicodedata.category(chr(code)) not in ("Cc", "Cf", "Zl", "Zp", "Cn")]

    assert (missed, extra) == ([], [])
    assert _visible("café-🚀 ß 東京\xa0x") == "café-🚀 ß 東京\xa0x"  # letters, emoji, spaces
    assert _visible(EVIL) == SHOWN
    assert _visible("a\\x1bb") == "a\\\\x1bb"  # not the escaped form of a<ESC>b
    assert _visible("tag\U000e0041") == "tag\\U000e0041"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("word", [EVIL.replace("\x00", ""), "it's a\\b\x1b", "plain-id"])
def test_a_shown_value_reads_back_in_a_shell(word: str) -> None:
    """What the docs say: a value shown with escapes is typed back as ``$'...'`` (bash, zsh);
    ``_shell_word`` (the next-page command of ``runs``) quotes one that way. A shell cannot
    pass NUL in an argument, so that one is left out."""
    environment = {**os.environ, "LC_ALL": "C.UTF-8"}
    quoted = _shell_word(word)
    typed = "$'" + _visible(word).replace("'", "\\'") + "'"
    for text in (quoted, typed):
        echoed = subprocess.run(["bash", "-c", f"printf %s {text}"], capture_output=True,
                                env=environment, check=True).stdout
        assert echoed == word.encode("utf-8")
    assert quoted.startswith("$'") is (word != "plain-id")


# -- every command ---------------------------------------------------------------------------------


@pytest.mark.parametrize("json_output", [False, True], ids=["people", "json"])
@pytest.mark.parametrize("argv", [
    ["runs"], ["runs", "--status", "paused"], ["show", RUN], ["history", RUN],
    ["history", "order-2"], ["export", RUN, "--state"],
    ["approve", RUN, "--approver", APPROVER, "--comment", COMMENT],
    ["reject", RUN, "--approver", APPROVER, "--reason", COMMENT],
    ["prune", RUN, "--keep", "1"],
    ["fork", "FIRST", "--run", "copy-" + EVIL], ["cleanup"], ["doctor"],
    ["show", "nope-" + EVIL], ["prune", "nope-" + EVIL, "--keep", "1"],
], ids=lambda argv: "-".join(word for word in argv if word.isalpha()))
def test_no_command_writes_an_acting_character(
    url: str, capsys: pytest.CaptureFixture[str], argv: list[str], json_output: bool
) -> None:
    """``run_cli`` scans stdout and stderr; the text from runs is in each command's output
    (not in that of ``cleanup`` and ``doctor``, which print counts and their own probe)."""
    if "FIRST" in argv:
        _, shown, _ = run_cli(capsys, "show", RUN, "--seq", "0", "--json", "--url", url)
        argv = [json.loads(shown)["metadata"]["checkpoint_id"], *argv[2:]]
        argv.insert(0, "fork")
    code, out, err = run_cli(capsys, *argv, *(["--json"] if json_output else []), "--url", url)

    assert code in (EXIT_OK, EXIT_NOT_FOUND)
    escaped = ("\\x1b[31mred", "\\u001b[31mred")  # as text shows it, as JSON does
    assert any(form in out + err for form in escaped) is (argv[0] not in ("cleanup", "doctor"))
    if json_output and code == EXIT_OK:
        json.loads(out)


# -- tables and text ------------------------------------------------------------------------------


def test_runs_shows_run_ids_escaped_in_aligned_columns(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(capsys, "runs", "--url", url)

    assert code == EXIT_OK
    header, *rows = out.splitlines()
    assert len(rows) == 2  # one line per run, whatever its id holds
    [row] = [line for line in rows if line.startswith("run-")]
    assert row.startswith(f"run-{SHOWN}  ")
    assert row[column(header, "STATUS"):].startswith("paused  ")
    assert rows[0][column(header, "STATUS"):].startswith(("paused", "failed"))


def test_the_approval_queue_shows_the_request_with_json_escapes(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(capsys, "runs", "--status", "paused", "--url", url)

    assert code == EXIT_OK
    header, row = out.splitlines()
    assert row.startswith(f"run-{SHOWN}  ")
    assert row[column(header, "REQUESTED"):].startswith("20")
    request = row[column(header, "REQUEST"):]
    assert request.startswith('{"why":"asked-\\u001b[31mred')
    assert len(request) == 60
    assert request.endswith("...")


def test_show_escapes_every_field_and_the_content(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(capsys, "show", RUN, "--url", url)

    assert code == EXIT_OK
    table, content = out.split("\n\n", 1)
    header, *rows = table.splitlines()
    fields = {row.split()[0]: row[column(header, "VALUE"):] for row in rows}
    assert fields["run"] == f"run-{SHOWN}"
    assert fields["step"] == f"step-{SHOWN}"
    assert fields["tags"] == f"tag-{SHOWN}, b"
    assert fields["request"] == f'{{"why":"asked-{IN_JSON}"}}'
    assert len(rows) == 11  # no field spilled onto a line of its own
    assert json.loads(content)["state"] == {"said": EVIL}  # JSON escapes: the same data
    assert IN_JSON in content

    by_id, by_id_out, _ = run_cli(capsys, "show", fields["checkpoint"], "--url", url)
    assert by_id == EXIT_OK
    assert by_id_out.splitlines()[1] == table.splitlines()[1]  # the run, escaped alike


def test_history_escapes_the_header_status_changes_and_checkpoints(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run_cli(capsys, "approve", RUN, "--approver", APPROVER, "--comment", COMMENT, "--url", url)

    code, out, _ = run_cli(capsys, "history", RUN, "--url", url)
    failed, failed_out, _ = run_cli(capsys, "history", "order-2", "--url", url)

    assert code == EXIT_OK
    first, changes, checkpoints = out.split("\n\n")
    assert first.startswith(f"run run-{SHOWN}: active, created ")
    header, *rows = changes.splitlines()
    assert len(rows) == 2  # paused, approved
    [approved] = [row for row in rows if " active " in row]
    by, note = column(header, "BY"), column(header, "NOTE")
    assert approved[by:note].rstrip() == f"ana-{SHOWN}"
    assert approved[note:] == f"ok-{SHOWN}"
    header, *rows = checkpoints.splitlines()
    assert len(rows) == 2
    assert rows[0][column(header, "STEP"):] == f"step-{SHOWN}  tag-{SHOWN}, b"
    assert rows[0][column(header, "CHECKPOINT"):].startswith("ck-")
    assert failed == EXIT_OK
    assert failed_out.splitlines()[1] == f"error: boom-{SHOWN}"


def test_approve_and_reject_say_who_decided_escaped(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(capsys, "reject", RUN, "--approver", APPROVER, "--reason", COMMENT,
                           "--url", url)
    again, _, err = run_cli(capsys, "approve", RUN, "--approver", APPROVER, "--url", url)

    assert code == EXIT_OK
    assert out.startswith(f"run run-{SHOWN}: rejected (rejected by ana-{SHOWN} at ")
    assert out.count("\n") == 1
    assert again == EXIT_CONFLICT
    assert err.count("\n") == 1
    assert err.startswith("error: run 'run-\\x1b[31mred")


def test_fork_prune_and_their_progress_show_ids_escaped(
    url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, shown, _ = run_cli(capsys, "show", RUN, "--json", "--url", url)
    checkpoint_id = json.loads(shown)["metadata"]["checkpoint_id"]

    code, out, _ = run_cli(capsys, "fork", checkpoint_id, "--run", "copy-" + EVIL, "--url", url)
    assert code == EXIT_OK
    assert out.startswith(f"forked {checkpoint_id} into run copy-{SHOWN} as ck-")

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    watched = Terminal()
    monkeypatch.setattr("sys.stderr", watched)
    code, out, _ = run_cli(capsys, "prune", RUN, "--keep", "1", "--url", url)
    assert code == EXIT_OK
    assert out == f"run run-{SHOWN}: removed 1 checkpoint(s), kept the newest 1\n"
    progress = watched.getvalue()
    assert progress.startswith(f"\rprune run-{SHOWN}: ")  # the count's own \r only
    for update in progress.split("\r"):
        assert_safe(update)


def test_errors_show_what_was_asked_for_escaped(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    missing, _, err = run_cli(capsys, "show", "nope-" + EVIL, "--url", url)
    assert missing == EXIT_NOT_FOUND
    assert err.count("\n") == 1
    assert "nope-\\x1b[31mred" in err

    missing, _, err = run_cli(capsys, "history", "nope-" + EVIL, "--url", url)
    assert missing == EXIT_NOT_FOUND
    assert err.count("\n") == 1

    with pytest.raises(SystemExit) as usage:
        main(["runs", "--url", url, "extra-" + EVIL])
    assert usage.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert_safe(err)
    assert f"unrecognized arguments: extra-{SHOWN}" in err


# -- JSON -----------------------------------------------------------------------------------------


def test_json_outputs_hold_the_exact_strings_with_every_acting_character_escaped(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _, runs, _ = run_cli(capsys, "runs", "--json", "--url", url)
    _, shown, _ = run_cli(capsys, "show", RUN, "--json", "--url", url)
    _, decided, _ = run_cli(capsys, "approve", RUN, "--approver", APPROVER, "--comment",
                            COMMENT, "--json", "--url", url)
    _, history, _ = run_cli(capsys, "history", RUN, "--json", "--url", url)

    assert {run["run_id"] for run in json.loads(runs)["runs"]} == {RUN, "order-2"}
    assert IN_JSON in runs
    metadata = json.loads(shown)["metadata"]
    assert (metadata["run_id"], metadata["step_name"], metadata["tags"]) == (RUN, STEP,
                                                                             [TAG, "b"])
    assert json.loads(shown)["state"] == {"said": EVIL}
    approval = json.loads(decided)["approval"]
    assert (approval["decided_by"], approval["comment"]) == (APPROVER, COMMENT)
    exported = json.loads(history)
    assert exported["run"]["run_id"] == RUN
    assert exported["run"]["history"][-1]["actor"] == APPROVER
    assert exported["checkpoints"][0]["step_name"] == STEP


# -- exports --------------------------------------------------------------------------------------


def test_the_json_export_is_exact(url: str, capsys: pytest.CaptureFixture[str],
                                  tmp_path: Path) -> None:
    code, out, _ = run_cli(capsys, "export", RUN, "--state", "--url", url)
    target = tmp_path / "audit.json"
    run_cli(capsys, "export", RUN, "--state", "-o", str(target), "--url", url)

    assert code == EXIT_OK
    assert json.loads(out) == json.loads(target.read_text(encoding="utf-8"))
    assert json.loads(out)["checkpoints"][0]["content"]["state"] == {"said": EVIL}


def markdown_tables(text: str) -> list[list[str]]:
    """The tables of a Markdown document, each as its lines."""
    tables: list[list[str]] = []
    current: list[str] = []
    for line in [*text.split("\n"), ""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables


def cells(line: str) -> int:
    """The cells of a GFM table row: a pipe after a backslash is text, not a border."""
    return len(re.findall(r"(?<!\\)\|", line)) - 1


@pytest.mark.parametrize("state", [False, True])
def test_the_markdown_export_is_escaped_and_keeps_its_shape(
    url: str, capsys: pytest.CaptureFixture[str], tmp_path: Path, state: bool
) -> None:
    run_cli(capsys, "approve", RUN, "--approver", "a|b\\" + EVIL, "--comment", "x\\|y|z" + EVIL,
            "--url", url)
    extra = ["--state"] if state else []
    code, out, _ = run_cli(capsys, "export", RUN, "--format", "markdown", *extra, "--url", url)
    target = tmp_path / "audit.md"
    run_cli(capsys, "export", RUN, "--format", "markdown", *extra, "-o", str(target),
            "--url", url)

    assert code == EXIT_OK
    written = target.read_text(encoding="utf-8")
    assert_safe(written)
    assert written == out
    assert out.split("\n")[0] == f"# Run `run-{SHOWN}`"  # as tables show it, on its line
    assert IN_JSON in out  # the approval's JSON block
    tables = markdown_tables(out)
    assert len(tables) == (2 if state else 3)
    for table in tables:
        assert {cells(line) for line in table} == {cells(table[0])}, table
    history = tables[1]
    assert len(history) == 4  # header, rule, paused, approved: no row broken in two
    if state:
        blocks = re.findall(r"```json\n(.*?)\n```", out, flags=re.DOTALL)
        assert json.loads(blocks[-1])["state"] == {"said": EVIL}


def test_the_csv_export_is_exact_and_escaped_only_on_a_terminal(
    url: str, capsys: pytest.CaptureFixture[str], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    target = tmp_path / "audit.csv"
    main(["export", RUN, "--format", "csv", "-o", str(target), "--url", url])
    main(["export", RUN, "--format", "csv", "--url", url])
    piped = capsys.readouterr().out

    with target.open(encoding="utf-8", newline="") as written:
        exact = written.read()
    rows = list(csv.DictReader(io.StringIO(exact, newline="")))
    assert [row["step_name"] for row in rows if row["record"] == "checkpoint"] == [STEP, "plan"]
    assert piped == exact  # data for programs, as they wrote it

    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    code = main(["export", RUN, "--format", "csv", "--url", url])
    shown = capsys.readouterr().out
    assert code == EXIT_OK
    lines = shown.split("\r\n")  # CSV's own line ends, on a terminal too
    assert lines[-1] == ""
    assert len(lines) - 1 == len(list(csv.reader(io.StringIO(piped, newline=""))))
    assert_safe("\n".join(lines))
    assert f"step-{SHOWN}" in shown


# -- doctor --repair and init ---------------------------------------------------------------------


@pytest.fixture
def damaged(monkeypatch: pytest.MonkeyPatch) -> RepairableStore:
    """``RUN`` with a damaged record whose problem says ``EVIL``."""
    monkeypatch.setattr(stores_module, "_REGISTRY", dict(stores_module._REGISTRY))
    register_store("repairable", "tests.test_cli_repair:RepairableStore")
    shared = RepairableStore()
    monkeypatch.setattr(RepairableStore, "shared", shared)

    async def seed() -> None:
        await CheckpointManager(shared).create(RUN, {"step": 0})

    anyio.run(seed)
    shared.damage[run_key(RUN)] = "fails its checksum " + EVIL
    shared.damage["g" * 24] = "unreadable " + EVIL
    return shared


@pytest.mark.usefixtures("damaged")
def test_repair_reports_show_run_ids_and_problems_escaped(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run_cli(capsys, "doctor", "--repair", "repairable://x")

    assert code == EXIT_DAMAGED
    lines = out.splitlines()
    assert len(lines) == 6  # summary, header, two rows, a line per run
    header = lines[1]
    [row] = [line for line in lines[2:4] if line.startswith("run-")]
    assert row.startswith(f"run-{SHOWN}  rebuilt")
    assert row[column(header, "PROBLEM"):].startswith(f"fails its checksum {SHOWN}  ")
    assert row[column(header, "RECORD"):] == f"runs/{run_key(RUN)}/run.rec"
    assert lines[4].startswith(f"run-{SHOWN}: rebuilt")


class ChattyStore(MemoryStore):
    """Provisions, and reports what it did with text from elsewhere."""

    @classmethod
    def from_url(cls, url: str, **options: Any) -> ChattyStore:
        return cls()

    async def provision(self) -> list[str]:
        return ["created table " + EVIL]


def test_init_shows_what_the_store_reports_escaped(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stores_module, "_REGISTRY", dict(stores_module._REGISTRY))
    register_store("chatty", f"{__name__}:ChattyStore")

    code, out, _ = run_cli(capsys, "init", "chatty://x")

    assert code == EXIT_OK
    assert out == f"chatty://x: provisioned\n  created table {SHOWN}\n"


# -- the reported reproduction, bytes and all -----------------------------------------------------


def test_the_installed_command_writes_no_control_bytes(url: str) -> None:
    typed = RUN.replace("\x00", "")  # an argument cannot hold NUL

    async def seed() -> None:
        manager = CheckpointManager(open_store(url))
        await manager.create(typed, {"n": 1}, step_name=STEP)
        await manager.aclose()

    anyio.run(seed)
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    for argv, shown in ((["runs"], _visible(typed)), (["history", typed], f"step-{SHOWN}")):
        done = subprocess.run([sys.executable, "-m", "fastcheckpoint.cli", *argv, "--url", url],
                              capture_output=True, env=environment, check=False)
        assert_safe(done.stdout.decode("utf-8"))
        assert_safe(done.stderr.decode("utf-8"))
        assert done.returncode == EXIT_OK
        assert shown.encode() in done.stdout


# -- logs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("approval", ["gone", "refused"])
def test_the_agent_framework_storage_logs_a_checkpoint_id_quoted(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, approval: str
) -> None:
    """A log line cannot be forged by the id a workflow gave its checkpoint."""
    pytest.importorskip("agent_framework")
    from fastcheckpoint.errors import StoreUnavailableError
    from fastcheckpoint.integrations.agent_framework import FastCheckpointStorage

    storage = FastCheckpointStorage(MemoryStore())
    forged = "ck-1\nERROR fastcheckpoint: forged " + EVIL
    storage._remember(forged, "paused")
    if approval == "refused":
        async def refuse(*_: Any, **__: Any) -> Any:
            raise StoreUnavailableError("down")

        monkeypatch.setattr(storage._manager, "approve", refuse)
    caplog.set_level("DEBUG", logger="fastcheckpoint")

    anyio.run(storage._answered, forged, "ck-2")

    [record] = [r for r in caplog.records if "paused" in r.getMessage().lower()]
    assert unsafe(record.getMessage()) == []
    assert "forged" in record.getMessage()
