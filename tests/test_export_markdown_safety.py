"""The Markdown audit export is an inert rendering of the run: text from agents, users and
tools (run ids, step names, tags, ids, errors, notes, who, approval requests and comments,
metadata, content, the reason a checkpoint is unreadable) shows as literal text wherever it
appears, and cannot forge or hide part of the record.

Each value carrying an injection (HTML, links and images, emphasis, headings, list markers,
backticks, pipes, line breaks, CR, ESC sequences, bidirectional overrides, backslashes...) is
put in every field, and the document is rendered with a CommonMark renderer (markdown-it-py,
GFM tables and strikethrough on, raw HTML allowed): no element, attribute, link, heading or
line the value tried to add, tables keep their rows and cells, every name and text renders as
the command line's tables show it (``visible``: escapes for characters that act, backslashes
doubled), every JSON block reads back to the exact data. JSON and CSV stay exact.

CI runs a few fixed random examples too; hunt with more: ``MDSAFETY_EXAMPLES=2000``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import unicodedata
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from typing import Any

import anyio
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastcheckpoint import CheckpointManager
from fastcheckpoint._export import Entry, renderer, when
from fastcheckpoint._model import (
    Checkpoint,
    CheckpointMetadata,
    CheckpointStatus,
    RunInfo,
    StatusChange,
)
from fastcheckpoint._untrusted import visible
from fastcheckpoint.stores.memory import MemoryStore

INJECTIONS = {
    "html": "<img src=x onerror=alert(1)><script>alert(2)</script><b>bold</b>",
    "html comment": "<!-- hidden --> <?php x ?> <![CDATA[x]]>",
    "entities": "&lt;b&gt; &amp; &#60;i&#62; &copy;",
    "link": "[click](https://evil.example/login) [js](javascript:alert(1)) [ref][1]",
    "image": "![pic](https://evil.example/x.png)",
    "autolinks": "<https://evil.example> <a@evil.example> https://evil.example www.evil.example",
    "emphasis": "**bold** __strong__ *em* _it_ ~~gone~~",
    "heading": "# fake section",
    "heading on a new line": "x\n# fake section\nSetext\n===\n---",
    "list markers": "- item\n* item\n+ item\n1. item\n2) item\n> quote",
    "backticks": "`a` ``b`` ```json",
    "backtick ends": "`x`",
    "fences": "```\n~~~\n```json\n}",
    "pipes": "a | b || c \\| d |",
    "line breaks": "one\ntwo\r\nthree\rfour\u2028five\u2029six\x85seven",
    "escape sequences": "\x1b[31mred\x1b[0m\x1b]0;title\x07\x1b[2J\x9b1m",
    "bidi": "abc\u202edcba\u2066x\u2069\u200b\ufeff\u00ad",
    "backslashes": "\\ a\\b \\* \\| \\` \\\\ \\",
    "spaces": "  padded  ",
    "math": "$x$ $$y$$ $`z`$",
    "indented code": "\n    code\n\ttab",
    "nul and del": "a\x00b\x7fc",
    "braces and more": "{#id .class} ^sup^ ==mark== ++ins++ :smile: @user #123 (c) -- ...",
}
"""Injections, each put into every field."""

SHOWN = {
    "line breaks": "one\\ntwo\\r\\nthree\\rfour\\u2028five\\u2029six\\u0085seven",
    "escape sequences": "\\x1b[31mred\\x1b[0m\\x1b]0;title\\x07\\x1b[2J\\u009b1m",
    "bidi": "abc\\u202edcba\\u2066x\\u2069\\u200b\\ufeff\\u00ad",
    "backslashes": "\\\\ a\\\\b \\\\* \\\\| \\\\` \\\\\\\\ \\\\",
    "nul and del": "a\\x00b\\x7fc",
    "pipes": "a | b || c \\\\| d |",
}
SHOWN.update({name: INJECTIONS[name].replace("\n", "\\n").replace("\t", "\\t") for name in (
    "heading on a new line", "list markers", "fences", "indented code")})
"""What some of them render as: the characters that act as escapes, backslashes doubled. The
others render exactly as they are."""

T = 1_765_000_000.25
TABLE_HEADERS = {
    "history": ["at", "status", "by", "note"],
    "checkpoints": ["sequence", "created", "step", "status", "tags", "parent", "expires", "id"],
}
ALLOWED_ELEMENTS = {"h1", "h2", "h3", "p", "ul", "li", "table", "thead", "tbody", "tr", "th",
                    "td", "code", "pre"}
ALLOWED_ATTRIBUTES = {("class", "language-json"), ("style", "text-align:right")}
FORBIDDEN_TOKENS = {"html_block", "html_inline", "link_open", "image", "em_open", "strong_open",
                    "s_open", "blockquote_open", "ordered_list_open", "hr", "code_block",
                    "softbreak", "hardbreak"}


def the_run(value: str) -> tuple[RunInfo, list[Entry]]:
    """A run with ``value`` in every field the export shows: three checkpoints, one with
    content, one unreadable, one expired before it was read."""
    run = RunInfo(
        run_id="run " + value, status=CheckpointStatus.FAILED, created_at=T, updated_at=T + 9,
        latest_sequence=2, checkpoint_count=3, error="error " + value,
        approval={"request": {"why " + value: value}, "requested_at": T + 1,
                  "decision": "approved", "decided_by": "by " + value, "decided_at": T + 2,
                  "comment": "comment " + value},
        metadata={"meta " + value: [value]},
        history=[
            StatusChange(status=CheckpointStatus.PAUSED, at=T + 1, note="asked " + value),
            StatusChange(status=CheckpointStatus.ACTIVE, at=T + 2, actor="actor " + value,
                         note="ok " + value),
            StatusChange(status=CheckpointStatus.FAILED, at=T + 3, note="error " + value),
        ],
    )

    def metadata(sequence: int, **fields: Any) -> CheckpointMetadata:
        return CheckpointMetadata(run_id=run.run_id, sequence=sequence, created_at=T + sequence,
                                  status=CheckpointStatus.FAILED, **fields)

    newest = metadata(2, checkpoint_id="id " + value, step_name="step " + value,
                      parent_id="parent " + value, tags=["tag " + value, value, "plain"],
                      expires_at=T + 99)
    entries: list[Entry] = [
        (newest, Checkpoint(newest, state={"state " + value: value}, messages=[value],
                            tool_calls=[{"call": value}], context={value: value})),
        (metadata(1, checkpoint_id="ck " + value, step_name=value, tags=[value]),
         "unreadable: " + value),
        (metadata(0, checkpoint_id="c" + value), None),
    ]
    return run, entries


def markdown(run: RunInfo, entries: list[Entry], with_state: bool) -> str:
    async def listed() -> AsyncIterator[Entry]:
        for entry in entries:
            yield entry

    async def rendered() -> str:
        return "".join([chunk async for chunk in renderer("markdown")(run, listed(),
                                                                       with_state)])

    return anyio.run(rendered)


# -- what the document must be ------------------------------------------------------------------


def acting(text: str) -> list[str]:
    """Characters of ``text`` that would act (the Unicode database's Cc, Cf, Zl, Zp) but the
    document's own line breaks."""
    return [char for char in text if char != "\n"
            and unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp")]


def borders(line: str) -> int:
    """The cells of a GFM table row: a pipe after a backslash is text, not a border."""
    return len(re.findall(r"(?<!\\)\|", line)) - 1


def check_text(document: str, with_state: bool) -> None:
    """What holds of the file itself, read as text: no character that acts, every value on
    its line (as many lines as a run of plain values has), every table row with its table's
    cells."""
    assert acting(document) == []
    plain = markdown(*the_run("x"), with_state)
    assert document.count("\n") == plain.count("\n"), document
    table: list[str] = []
    for line in [*document.split("\n"), ""]:
        if line.startswith("|"):
            table.append(line)
            continue
        assert len({borders(row) for row in table}) <= 1, table
        table = []


class Tree(HTMLParser):
    """The elements of rendered HTML, each with its attributes, and the text of each."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, list[tuple[str, str | None]]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, attrs))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, attrs))


def inline_text(token: Any) -> str:
    """The text an inline token renders as: its text, entities, escapes and code spans."""
    kinds = {child.type for child in token.children}
    assert kinds <= {"text", "text_special", "code_inline"}, kinds
    return "".join(child.content for child in token.children)


def blocks(tokens: list[Any]) -> list[tuple[str, Any]]:
    """The document as (what, content): headings, table rows (cell texts), list items,
    paragraphs, fences."""
    shape: list[tuple[str, Any]] = []
    row: list[str] | None = None
    for index, token in enumerate(tokens):
        assert token.type not in FORBIDDEN_TOKENS, token
        if token.type == "tr_open":
            row = []
        elif token.type == "tr_close":
            shape.append(("row", row))
            row = None
        elif token.type == "inline" and row is not None:
            row.append(inline_text(token))
        elif token.type == "inline":
            opened = tokens[index - 1]
            what = opened.tag if opened.type == "heading_open" else opened.type
            if what == "paragraph_open" and tokens[index - 2].type == "list_item_open":
                what = "li"
            shape.append((what, inline_text(token)))
        elif token.type == "fence":
            shape.append((f"fence {token.info}", json.loads(token.content)))
        elif token.type in ("table_open", "table_close", "bullet_list_open",
                            "bullet_list_close"):
            shape.append((token.type, None))
    return shape


def expected_blocks(run: RunInfo, entries: list[Entry], with_state: bool) -> list[Any]:
    """What the document says, value by value, as a renderer must show it."""
    summary = [["status", run.status.value], ["created", when(run.created_at)],
               ["updated", when(run.updated_at)],
               ["latest sequence", str(run.latest_sequence)],
               ["checkpoints held", str(run.checkpoint_count)],
               ["expires", when(run.expires_at) or "never"]]
    if run.error:
        summary.append(["error", visible(run.error)])
    approval = {key: when(value) if key in ("requested_at", "decided_at") else value
                for key, value in (run.approval or {}).items()}
    shape: list[tuple[str, Any]] = [
        ("h1", "Run " + visible(run.run_id)),
        ("table_open", None), ("row", ["", ""]), *[("row", row) for row in summary],
        ("table_close", None),
    ]
    if run.metadata:
        shape += [("h2", "Run metadata"), ("fence json", run.metadata)]
    if run.approval is not None:
        shape += [("h2", "Approval"), ("fence json", approval)]
    if run.history:
        shape += [
            ("h2", "Status history"), ("table_open", None), ("row", TABLE_HEADERS["history"]),
            *[("row", [when(change.at), change.status.value, visible(change.actor or ""),
                       visible(change.note)]) for change in run.history],
            ("table_close", None)]
    shape.append(("h2", "Checkpoints, newest first"))
    if not with_state:
        shape += [("table_open", None), ("row", TABLE_HEADERS["checkpoints"])]
    for metadata, checkpoint in entries:
        tags = ", ".join(visible(tag) for tag in metadata.tags)
        if not with_state:
            shape.append(("row", [
                str(metadata.sequence), when(metadata.created_at), visible(metadata.step_name),
                metadata.status.value, tags, visible(metadata.parent_id or ""),
                when(metadata.expires_at), visible(metadata.checkpoint_id)]))
            continue
        shape += [
            ("h3", f"Checkpoint {metadata.sequence}"), ("bullet_list_open", None),
            ("li", "id: " + visible(metadata.checkpoint_id)),
            ("li", "created: " + when(metadata.created_at)),
            ("li", "step: " + (visible(metadata.step_name) or "-")),
            ("li", "status: " + metadata.status.value),
            ("li", "tags: " + (tags or "-")),
            ("li", "parent: " + (visible(metadata.parent_id) if metadata.parent_id else "-")),
            ("li", "expires: " + (when(metadata.expires_at) or "never")),
            ("bullet_list_close", None),
        ]
        if isinstance(checkpoint, str):
            shape.append(("paragraph_open", f"(unreadable: {visible(checkpoint)})"))
        elif checkpoint is None:
            shape.append(("paragraph_open", "(expired before it was read)"))
        else:
            shape.append(("fence json", {
                "state": checkpoint.state, "messages": checkpoint.messages,
                "tool_calls": checkpoint.tool_calls, "context": checkpoint.context}))
    if not with_state:
        shape.append(("table_close", None))
    return shape


@pytest.fixture(scope="module")
def commonmark() -> Any:
    """markdown-it-py (CommonMark; GFM tables and strikethrough; raw HTML allowed, as on most
    viewers before their sanitizer)."""
    markdown_it = pytest.importorskip("markdown_it")
    return markdown_it.MarkdownIt("commonmark", {"html": True}).enable(
        ["table", "strikethrough"])


def check_rendered(renderer_: Any, document: str, run: RunInfo, entries: list[Entry],
                   with_state: bool) -> None:
    """What holds of the document a viewer renders: only the exporter's elements, headings,
    rows, cells and items, each value's text exactly as ``visible`` shows it, each JSON block
    exact."""
    assert blocks(renderer_.parse(document)) == expected_blocks(run, entries, with_state)
    tree = Tree()
    tree.feed(renderer_.render(document))
    tree.close()
    assert {tag for tag, _ in tree.elements} <= ALLOWED_ELEMENTS
    assert {pair for _, attrs in tree.elements for pair in attrs} <= ALLOWED_ATTRIBUTES


# -- injections, one by one, in every field ----------------------------------------------------


@pytest.mark.parametrize("with_state", [False, True], ids=["table", "state"])
@pytest.mark.parametrize("name", list(INJECTIONS))
def test_an_injection_in_every_field_renders_as_literal_text(
    commonmark: Any, name: str, with_state: bool
) -> None:
    value = INJECTIONS[name]
    run, entries = the_run(value)

    document = markdown(run, entries, with_state)

    check_text(document, with_state)
    check_rendered(commonmark, document, run, entries, with_state)
    heading = next(token for token in commonmark.parse(document) if token.type == "inline")
    assert inline_text(heading) == "Run run " + SHOWN.get(name, value)  # the rule, spelled out


def test_the_file_reads_as_it_renders_where_nothing_needs_escaping() -> None:
    """Names are code spans, so the file holds them as they are (an auditor can search it for
    a checkpoint id); free text escapes only punctuation; times and statuses are as written."""
    run, entries = the_run("plain")
    table = markdown(run, entries, with_state=False)
    detailed = markdown(run, entries, with_state=True)

    assert table.startswith("# Run `run plain`\n")
    assert "| error | error plain |" in table
    assert (f"| 2 | {when(T + 2)} | `step plain` | failed | `tag plain`, `plain`, `plain` "
            f"| `parent plain` | {when(T + 99)} | `id plain` |") in table
    assert "- id: `id plain`\n" in detailed
    assert "- tags: `tag plain`, `plain`, `plain`\n" in detailed
    assert "(unreadable: unreadable\\: plain)" in detailed


def test_free_text_escapes_markdown_and_html_punctuation() -> None:
    run, entries = the_run("<b>*x*</b> & [y](z) `q` | \\")

    table = markdown(run, entries, with_state=False)

    assert ("| error | error &lt;b&gt;\\*x\\*&lt;\\/b&gt; &amp; \\[y\\]\\(z\\) \\`q\\` \\| "
            "\\\\\\\\ |") in table
    assert "| ``step <b>*x*</b> & [y](z) `q` \\| \\\\`` |" in table  # a name: a code span


def test_a_code_span_keeps_spaces_and_backticks_at_its_ends(commonmark: Any) -> None:
    """A code span loses one space at each end when it has one at both, and cannot begin or
    end with a backtick of its own fence: padding keeps the value exact."""
    for value in (" x ", "`x`", "``", " ", "x ", "a ``` b", "`", "\xa0x\u3000"):
        run, entries = the_run("")
        run = msgspec.structs.replace(run, run_id=value)
        document = markdown(run, entries, with_state=False)
        heading = next(token for token in commonmark.parse(document) if token.type == "inline")
        assert inline_text(heading) == "Run " + value, (value, document.split("\n")[0])


# -- random text ------------------------------------------------------------------------------

HUNT = os.environ.get("MDSAFETY_EXAMPLES")
"""Examples when hunting (random); unset, CI's few fixed ones."""

SYNTAX = [
    *"<>&[]()!*_~`|#-+=.:@$\\{}^\"'/ \n\r\tab1", "\x1b", "\x00", "\x7f", "\x85", "\x9b", "\u202e",
    "\u2066", "\u200b", "\u2028", "\ufeff", "é", "\xa0", "\u3000", "\U0001f680", "\U000e0041",
    "&lt;", "<img src=x>", "```", "\r\n", "\n# ", "\n- ", "\n    ", "www.", "http://",
    "javascript:"]


@settings(max_examples=int(HUNT) if HUNT else 40, derandomize=not HUNT, database=None,
          deadline=None)
@given(value=st.lists(st.sampled_from(SYNTAX), max_size=24).map("".join),
       with_state=st.booleans())
def test_random_text_in_every_field_renders_as_literal_text(
    commonmark: Any, value: str, with_state: bool
) -> None:
    run, entries = the_run(value)

    document = markdown(run, entries, with_state)

    check_text(document, with_state)
    check_rendered(commonmark, document, run, entries, with_state)


# -- through the manager, and the formats for programs ----------------------------------------

EVIL = "".join(INJECTIONS.values())
"""Every injection at once."""


async def seeded_manager() -> CheckpointManager:
    manager = CheckpointManager(MemoryStore())
    with anyio.fail_after(10):
        await manager.create("run " + EVIL, {"said": EVIL}, step_name="plan " + EVIL,
                             tags=["tag " + EVIL, "b"], messages=[EVIL])
        await manager.create("run " + EVIL, {"said": EVIL}, step_name="act " + EVIL,
                             tags=[EVIL], force=True)
        await manager.pause("run " + EVIL, request={"why": EVIL})
        await manager.approve("run " + EVIL, approver="ana " + EVIL, comment="ok " + EVIL)
        await manager.mark_failed("run " + EVIL, "boom " + EVIL)
    return manager


@pytest.mark.parametrize("with_state", [False, True], ids=["table", "state"])
def test_export_run_writes_an_inert_markdown_document(commonmark: Any, with_state: bool) -> None:
    async def exported() -> tuple[str, RunInfo, list[Entry]]:
        manager = await seeded_manager()
        document = "".join([chunk async for chunk in manager.export_run(
            "run " + EVIL, "markdown", include_state=with_state)])
        run = await manager.get_run("run " + EVIL)
        assert run is not None
        listed = await manager.list_checkpoints("run " + EVIL, 10, include_expired=True)
        entries: list[Entry] = [(metadata, await manager.restore_from(metadata.checkpoint_id))
                                for metadata in listed]
        return document, run, entries

    document, run, entries = anyio.run(exported)

    assert acting(document) == []
    check_rendered(commonmark, document, run, entries, with_state)


def test_the_json_and_csv_exports_stay_exact() -> None:
    """Data for programs: every value as it is, control characters included."""
    async def exported(format: str) -> str:
        manager = await seeded_manager()
        return "".join([chunk async for chunk in manager.export_run(
            "run " + EVIL, format, include_state=True)])

    as_json, as_csv = anyio.run(exported, "json"), anyio.run(exported, "csv")

    document = json.loads(as_json)
    assert document["run"]["run_id"] == "run " + EVIL
    assert document["run"]["error"] == "boom " + EVIL
    assert document["run"]["approval"]["comment"] == "ok " + EVIL
    assert [c["step_name"] for c in document["checkpoints"]] == ["act " + EVIL, "plan " + EVIL]
    assert document["checkpoints"][1]["content"]["messages"] == [EVIL]
    rows = list(csv.DictReader(io.StringIO(as_csv, newline="")))
    assert rows[0]["note"] == "boom " + EVIL
    assert [row["step_name"] for row in rows if row["record"] == "checkpoint"] == [
        "act " + EVIL, "plan " + EVIL]
    assert json.loads(rows[-1]["tags"]) == ["tag " + EVIL, "b"]
