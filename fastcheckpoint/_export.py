"""Audit export of one run: JSON, Markdown or CSV, produced as a stream of text.

The renderers take the run record and an async iterator of its checkpoints (metadata, and the
checkpoint itself when state is exported) and yield text chunks, one record at a time, so a
long run never has to fit in memory. The manager feeds them page by page.

Every time in every format is ISO 8601 in UTC with microseconds (``when``): an audit file is
read by people and by tools that parse dates, and epoch floats suit neither.

JSON and CSV are data for programs: every value exact. Markdown is a document for people that
viewers render: every value from a run renders as literal text, as the command line's tables
show it (:mod:`fastcheckpoint._untrusted`), and adds no markup, line or table cell.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import math
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import msgspec

from fastcheckpoint._codec import from_json_text, to_json_text
from fastcheckpoint._model import Checkpoint, CheckpointMetadata, RunInfo
from fastcheckpoint._untrusted import json_escaped, visible
from fastcheckpoint._validate import shown
from fastcheckpoint.errors import SerializationError, ValidationError

__all__ = ["FORMATS", "Entry", "Renderer", "json_text", "renderer", "when"]

Entry = tuple[CheckpointMetadata, Checkpoint | str | None]
"""A checkpoint's metadata and, when state is exported, the checkpoint: ``None`` if it expired
between listing and reading, or the reason it could not be read (a corrupt record)."""
Renderer = Callable[[RunInfo, AsyncIterator[Entry], bool], AsyncGenerator[str, None]]

_UNIX_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
_FIRST, _PAST_LAST = -62_135_596_800.0, 253_402_300_800.0
"""Epoch seconds of 0001-01-01 and 10000-01-01: the range ``datetime`` can show."""
_CYCLE = 146_097 * 86_400
"""Seconds in 400 Gregorian years: the calendar repeats exactly, weekdays included."""
_APPROVAL_TIMES = ("requested_at", "decided_at")


def when(epoch: float | None) -> str:
    """``2026-12-03T07:34:55.123456Z``: ISO 8601, UTC, microseconds; empty for ``None``.

    A time past the year 9999 (a TTL of millennia) gets an expanded year (``+33658-09-...``),
    as ISO 8601 allows: shifted by whole 400-year cycles into the range ``datetime`` can show,
    formatted, and the year put back.
    """
    if epoch is None:
        return ""
    if not math.isfinite(epoch):
        return str(epoch)
    shift = 0.0 if _FIRST <= epoch < _PAST_LAST else epoch - epoch % _CYCLE
    cycles = int(shift // _CYCLE)
    moment = _UNIX_EPOCH + _dt.timedelta(seconds=epoch - shift)
    text = moment.isoformat(timespec="microseconds").replace("+00:00", "Z")
    if not cycles:
        return text
    year = moment.year + 400 * cycles
    return f"{'+' if year > 0 else '-'}{abs(year):04d}{text[4:]}"


def _time(epoch: object) -> object:
    """``epoch`` as :func:`when` writes it; ``None`` (never) and non-numbers unchanged."""
    if isinstance(epoch, bool) or not isinstance(epoch, (int, float)):
        return epoch
    return when(epoch)


def _approval(approval: dict[str, Any] | None) -> dict[str, Any] | None:
    if approval is None:
        return None
    return {key: _time(value) if key in _APPROVAL_TIMES else value
            for key, value in approval.items()}


def _run_document(run: RunInfo) -> dict[str, Any]:
    """``RunInfo.to_dict()`` with every time (run, status history, approval) as :func:`when`."""
    document = run.to_dict()
    for name in ("created_at", "updated_at", "expires_at"):
        document[name] = _time(document[name])
    for change in document["history"]:
        change["at"] = _time(change["at"])
    document["approval"] = _approval(run.approval)
    return document


def _checkpoint_document(metadata: CheckpointMetadata) -> dict[str, Any]:
    """``CheckpointMetadata.to_dict()`` with ``created_at`` and ``expires_at`` as :func:`when`."""
    document = metadata.to_dict()
    document["created_at"] = _time(metadata.created_at)
    document["expires_at"] = _time(metadata.expires_at)
    return document


def json_text(value: Any) -> str:
    """JSON for people and audit files, for any content a checkpoint can hold.

    What JSON can say is written as :func:`to_json_text` writes it. Content it cannot say (a
    tuple as a dict key, an object a ``dec_hook`` rebuilt) is written with such keys as their
    ``repr`` and such values as ``{"repr": ..., "type": ...}`` instead of failing the export.
    """
    try:
        return to_json_text(value)
    except SerializationError:
        return _fallback_text(value)


def _key_text(key: Any) -> str:
    """A dict key as JSON writes it (1 as "1", a UUID as its text), else its ``repr``."""
    try:
        [text] = from_json_text(to_json_text({key: None}))
    except (SerializationError, ValueError):
        return repr(key)
    return str(text)


def _fallback_text(value: Any) -> str:
    """The JSON text of content :func:`to_json_text` refuses, written piece by piece so that
    each dict keeps every entry in order, as the JSON path does (``1`` and ``"1"`` both come
    out as ``"1"``: a dict built again would keep one)."""
    if isinstance(value, dict):
        entries = (f"{to_json_text(_key_text(key))}:{_fallback_text(item)}"
                   for key, item in value.items())
        return "{" + ",".join(entries) + "}"
    if isinstance(value, (list, tuple, set, frozenset)):
        return "[" + ",".join(_fallback_text(item) for item in value) + "]"
    try:
        return to_json_text(value)
    except SerializationError:
        return to_json_text({"repr": repr(value),
                             "type": f"{type(value).__module__}.{type(value).__qualname__}"})


def _content(checkpoint: Checkpoint | str | None) -> dict[str, Any] | None:
    if checkpoint is None:
        return None
    if isinstance(checkpoint, str):
        return {"unreadable": checkpoint}
    return {"state": checkpoint.state, "messages": checkpoint.messages,
            "tool_calls": checkpoint.tool_calls, "context": checkpoint.context}


# -- JSON ---------------------------------------------------------------------------------------


async def _json(
    run: RunInfo, entries: AsyncIterator[Entry], with_state: bool
) -> AsyncGenerator[str, None]:
    yield '{"run": ' + json_text(_run_document(run)) + ',\n "checkpoints": ['
    separator = "\n  "
    async for metadata, checkpoint in entries:
        record = _checkpoint_document(metadata)
        if with_state:
            record["content"] = _content(checkpoint)
        yield separator + json_text(record)
        separator = ",\n  "
    yield "\n]}\n"


# -- CSV ----------------------------------------------------------------------------------------

_CSV_COLUMNS = ("record", "at", "sequence", "checkpoint_id", "status", "step_name", "parent_id",
                "tags", "expires_at", "actor", "note", "data")


def _csv_row(values: dict[str, Any]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerow([values.get(column, "") for column in _CSV_COLUMNS])
    return buffer.getvalue()


async def _csv(
    run: RunInfo, entries: AsyncIterator[Entry], with_state: bool
) -> AsyncGenerator[str, None]:
    yield _csv_row({column: column for column in _CSV_COLUMNS})
    yield _csv_row({
        "record": "run", "at": when(run.created_at), "status": run.status.value,
        "expires_at": when(run.expires_at), "note": run.error or "",
        "data": json_text({
            "run_id": run.run_id, "updated_at": when(run.updated_at),
            "latest_sequence": run.latest_sequence, "checkpoint_count": run.checkpoint_count,
            "approval": _approval(run.approval), "metadata": run.metadata,
        }),
    })
    for change in run.history:
        yield _csv_row({"record": "status_change", "at": when(change.at),
                        "status": change.status.value, "actor": change.actor or "",
                        "note": change.note})
    async for metadata, checkpoint in entries:
        yield _csv_row({
            "record": "checkpoint", "at": when(metadata.created_at),
            "sequence": metadata.sequence, "checkpoint_id": metadata.checkpoint_id,
            "status": metadata.status.value, "step_name": metadata.step_name,
            "parent_id": metadata.parent_id or "", "tags": json_text(metadata.tags),
            "expires_at": when(metadata.expires_at),
            "data": json_text(_content(checkpoint)) if with_state else "",
        })


# -- Markdown -----------------------------------------------------------------------------------


_MARKDOWN_SYNTAX = re.compile(r"[!-/:-@\[-`{-~]")
"""ASCII punctuation: CommonMark lets a backslash escape each of these, and its syntax and
its extensions' (GFM tables, strikethrough and autolinks, math, emoji, typography) are made
of them."""
_ENTITIES = {"<": "&lt;", ">": "&gt;", "&": "&amp;"}
"""HTML's own: written as entities, which every renderer of HTML reads as text."""


_EDGE_SPACE = re.compile(r"^\s+|\s+$")
"""Spaces a table cell would lose: written as character references, which it keeps."""


def _text(value: str) -> str:
    """Free text (an error, a note, who) as Markdown that renders as :func:`visible` shows it,
    in a table cell or in a line: each ASCII punctuation character backslash-escaped (HTML's
    as entities), so no markup, link, image, HTML or line break of its own; spaces at its
    ends as character references (``&#32;``), which a table cell does not trim."""
    text = _MARKDOWN_SYNTAX.sub(lambda found: _ENTITIES.get(found[0], "\\" + found[0]),
                                visible(value))
    return _EDGE_SPACE.sub(lambda found: "".join(f"&#{ord(char)};" for char in found[0]), text)


def _longest_backticks(text: str) -> int:
    return max((len(run) for run in re.findall(r"`+", text)), default=0)


def _code(value: str, *, in_table: bool = False) -> str:
    """A name (an id, a step, a tag) as an inline code span that renders as :func:`visible`
    shows it, and reads as it is in the file: the renderer takes the content literally. The
    fence is longer than any backtick run in it; a space (which the renderer takes off) pads
    content that would begin or end with a backtick, or begin and end with a space. In a
    table cell a ``|`` is written ``\\|``, which GFM reads as ``|`` there, code spans
    included; elsewhere it stays as it is."""
    text = visible(value)
    if not text:
        return ""
    fence = "`" * (_longest_backticks(text) + 1)
    padded = text[0] == "`" or text[-1] == "`" or (
        text[0] == " " and text[-1] == " " and text.strip(" ") != "")
    padding = " " if padded else ""
    if in_table:
        text = text.replace("|", "\\|")
    return f"{fence}{padding}{text}{padding}{fence}"


def _tags(tags: list[str], *, in_table: bool = False) -> str:
    return ", ".join(_code(tag, in_table=in_table) for tag in tags)


def _block(value: Any) -> str:
    """An indented JSON block, its fence longer than any backtick run in the text; characters
    that would act as JSON escapes (the same data)."""
    text = json_escaped(msgspec.json.format(json_text(value), indent=2))
    fence = "`" * max(3, _longest_backticks(text) + 1)
    return f"{fence}json\n{text}\n{fence}\n"


async def _markdown(
    run: RunInfo, entries: AsyncIterator[Entry], with_state: bool
) -> AsyncGenerator[str, None]:
    rows = [
        ("status", run.status.value),
        ("created", when(run.created_at)),
        ("updated", when(run.updated_at)),
        ("latest sequence", run.latest_sequence),
        ("checkpoints held", run.checkpoint_count),
        ("expires", when(run.expires_at) or "never"),
    ]
    if run.error:
        rows.append(("error", _text(run.error)))
    lines = [f"# Run {_code(run.run_id)}", "", "| | |", "| --- | --- |"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    yield "\n".join(lines) + "\n"
    if run.metadata:
        yield "\n## Run metadata\n\n" + _block(run.metadata)
    if run.approval is not None:
        yield "\n## Approval\n\n" + _block(_approval(run.approval))
    if run.history:
        lines = ["", "## Status history", "", "| at | status | by | note |",
                 "| --- | --- | --- | --- |"]
        lines += [f"| {when(c.at)} | {c.status.value} | {_text(c.actor or '')} "
                  f"| {_text(c.note)} |" for c in run.history]
        yield "\n".join(lines) + "\n"
    yield "\n## Checkpoints, newest first\n\n"
    if not with_state:
        yield ("| sequence | created | step | status | tags | parent | expires | id |\n"
               "| ---: | --- | --- | --- | --- | --- | --- | --- |\n")
    async for metadata, checkpoint in entries:
        if not with_state:
            yield (f"| {metadata.sequence} | {when(metadata.created_at)} "
                   f"| {_code(metadata.step_name, in_table=True)} | {metadata.status.value} "
                   f"| {_tags(metadata.tags, in_table=True)} "
                   f"| {_code(metadata.parent_id or '', in_table=True)} "
                   f"| {when(metadata.expires_at)} "
                   f"| {_code(metadata.checkpoint_id, in_table=True)} |\n")
            continue
        details = [
            f"### Checkpoint {metadata.sequence}", "",
            f"- id: {_code(metadata.checkpoint_id)}",
            f"- created: {when(metadata.created_at)}",
            f"- step: {_code(metadata.step_name) if metadata.step_name else '-'}",
            f"- status: {metadata.status.value}",
            f"- tags: {_tags(metadata.tags) or '-'}",
            f"- parent: {_code(metadata.parent_id) if metadata.parent_id else '-'}",
            f"- expires: {when(metadata.expires_at) or 'never'}", "",
        ]
        if isinstance(checkpoint, str):
            body = f"(unreadable: {_text(checkpoint)})\n"
        elif checkpoint is None:
            body = "(expired before it was read)\n"
        else:
            body = _block(_content(checkpoint))
        yield "\n".join(details) + "\n" + body + "\n"


_RENDERERS: dict[str, Renderer] = {"json": _json, "csv": _csv, "markdown": _markdown}
FORMATS = tuple(_RENDERERS)


def renderer(format: str) -> Renderer:
    """The renderer for ``format``; :class:`ValidationError` names the formats there are."""
    if isinstance(format, str) and type(format) is not str:
        format = str.__str__(format)  # looked up by hash: a subclass's own must not run
    try:
        return _RENDERERS[format]
    except (KeyError, TypeError):
        raise ValidationError(
            f"format must be one of {', '.join(FORMATS)}; got {shown(format)}") from None
