"""The ``fastcheckpoint`` command: inspect and act on runs, provision stores, benchmark.

``fastcheckpoint runs | show | history | export | fork | approve | reject | cleanup | prune |
doctor`` work on the store of ``--url`` (default: ``FASTCHECKPOINT_URL``, or
``CHECKPOINT_MODE`` as :meth:`CheckpointManager.from_env` reads it), configured by that method
(``FASTCHECKPOINT_*``, ``CHECKPOINT_TTL_DAYS``). They print tables for people and JSON with
``--json``.
``fastcheckpoint init URL`` creates what a store needs (idempotent). ``fastcheckpoint bench``
runs the benchmark suite, which ships in the source distribution, not in the installed package.

Exit codes: 0 done, 1 the store failed, 2 bad usage or configuration, 3 no such run or
checkpoint, 4 the run's status does not allow the change (e.g. approving a run that is not
paused, or whose pending request is not the one ``--requested-at`` names), 5 ``doctor
--repair`` found damage it could not repair.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import io
import json
import math
import os
import re
import secrets
import shlex
import stat
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TextIO, cast
from urllib.parse import urlsplit

import anyio
import msgspec

from fastcheckpoint import __version__, _ids
from fastcheckpoint._export import FORMATS, json_text, when
from fastcheckpoint._manager import CheckpointManager
from fastcheckpoint._model import Checkpoint, CheckpointStatus, RepairReport, RunInfo
from fastcheckpoint._untrusted import IN_MESSAGE, json_escaped, said, visible
from fastcheckpoint._urls import redacted, store_url_from_env, without_password
from fastcheckpoint.errors import (
    CheckpointError,
    CheckpointNotFound,
    ConfigurationError,
    ConflictError,
    ValidationError,
)
from fastcheckpoint.stores import (
    CheckpointStore,
    SupportsProvision,
    checked_store_url,
    names_a_network_store,
)
from fastcheckpoint.stores.file import parse_file_url

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

__all__ = ["main"]

EXIT_OK = 0
EXIT_STORE = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_CONFLICT = 4
EXIT_DAMAGED = 5
"""``doctor --repair`` found a damaged run record it could not rebuild: the store answered,
so retrying will not help; a person has to look (the report says why)."""
EXIT_OUTPUT_CLOSED = 141
"""The reader of stdout went away (``| head``) before the output was written: what shells
report for a tool that SIGPIPE ended (128 + 13), so ``set -o pipefail`` treats ours alike."""

_EXIT_CODES = ("Exit codes: 0 done, 1 the store failed, 2 bad usage or configuration, 3 no such "
               "run or checkpoint, 4 the run's status (or its pending request) does not allow "
               "the change, 5 doctor --repair found damage it could not repair, 141 the "
               "reader of the output went away (| head).")
_RUNS_PAGE = 50
_REQUEST_WIDTH = 60
"""Characters of a pending request shown in the approval queue (``show`` prints it whole)."""

Action = Callable[[CheckpointManager, argparse.Namespace], Awaitable[int]]


# -- init -----------------------------------------------------------------------------------------


async def _init(url: str) -> tuple[bool, list[str] | None]:
    """Whether the store has anything to provision, and what ``provision()`` reports it did
    (``None`` from a store that reports nothing). The store is opened with the configuration
    every other command reads (:func:`_manager_from_env`)."""
    manager = _manager_from_env(url)
    store = manager.store
    try:
        if not isinstance(store, SupportsProvision):
            return False, None
        # Stores report what they did as a list of lines; older ones return None.
        provision = cast(Callable[[], Awaitable[object]], store.provision)
        done = await provision()
    finally:
        await manager.aclose()
    if done is None:
        return True, None
    return True, [str(line) for line in cast(Sequence[object], done)]


def _run_init(args: argparse.Namespace) -> int:
    shown = _shown(args.url)
    try:
        if _file_store_path(args.url) == "":
            return _fail(_NO_DIRECTORY.format(url=args.url), EXIT_USAGE)
        provisioned, done = anyio.run(_init, args.url)
    except ConfigurationError as exc:
        return _fail(without_password(str(exc), args.url), EXIT_USAGE)
    except CheckpointError as exc:
        return _fail(without_password(str(exc), args.url), EXIT_STORE)
    except ValueError as exc:  # a URL too malformed to take apart
        return _fail(f"bad store URL {shown!r}: {exc}", EXIT_USAGE)
    _note_if_private(args.url)
    if args.json:
        _print_json({"store": shown, "provisioned": provisioned, "actions": done})
    elif not provisioned:
        print(f"{_said(shown)}: nothing to provision (the store creates what it needs on first "
              "use)")
    elif done is None:
        print(f"{_said(shown)}: provisioned (tables, buckets, indexes, TTL and lifecycle as "
              "needed)")
    else:
        print(f"{_said(shown)}: provisioned" + "".join(f"\n  {_said(line)}" for line in done))
    return EXIT_OK


# -- output ---------------------------------------------------------------------------------------


def _print_json(value: Any) -> None:
    print(_json_for(sys.stdout, msgspec.json.format(json_text(value), indent=2)))


_NOT_ASCII = re.compile(r"[^\x00-\x7f]")


def _json_for(stream: TextIO, text: str) -> str:
    """``text``, JSON, with each character ``stream`` cannot encode, and each one that would
    act on a terminal (:data:`fastcheckpoint._untrusted.ACTING`), written as a ``\\u``
    escape: the same document, exact and valid, on a terminal or pipe of any encoding.

    Outside strings JSON is ASCII, so only characters inside strings are escaped."""
    text = json_escaped(text)
    encoding = stream.encoding or "utf-8"
    try:
        text.encode(encoding)
    except UnicodeEncodeError:
        return _NOT_ASCII.sub(lambda found: _json_escaped(found[0], encoding), text)
    return text


def _json_escaped(char: str, encoding: str) -> str:
    try:
        char.encode(encoding)
    except UnicodeEncodeError:
        return json.dumps(char)[1:-1]  # \u00e9, or a surrogate pair beyond U+FFFF
    return char


# -- untrusted text -------------------------------------------------------------------------------
# Run ids, step names, tags, notes, comments, requests, store messages: text from agents,
# users and tools, printed for a person on a terminal. The characters that act instead of
# showing (move the cursor, clear the screen, set the title, reorder the line) are shown as
# escapes by the rule of fastcheckpoint._untrusted, which the Markdown export follows too.


class _Shown(str):
    """Text made safe to show (:func:`_visible`, :func:`_said`): :func:`_table` writes it as
    it is."""

    __slots__ = ()


def _visible(value: str) -> _Shown:
    """A value (an id, a name, a note) for people: each character that would act on the
    terminal, and each backslash, as a backslash escape (``run\\x1b[31m``, ``a\\\\b``)."""
    return _Shown(visible(value))


def _tags(tags: Sequence[str]) -> _Shown:
    """A checkpoint's tags for people, ``prod, v2``; as a JSON list (``["a, b", ""]``) when
    a tag would make that ambiguous (it holds a comma, is empty or ``-``, has space at an
    end, or begins with ``[``), so that two lists of tags never look alike."""
    if any(not tag or tag == "-" or "," in tag or tag != tag.strip() or tag.startswith("[")
           for tag in tags):
        return _Shown(json_escaped(json.dumps(list(tags), ensure_ascii=False)))
    return _Shown(", ".join(visible(tag) for tag in tags))


def _said(message: str) -> _Shown:
    """A message, or one line of it, for people: each character that would act on the
    terminal as a backslash escape. Its values are quoted (``repr``) or :func:`_visible`."""
    return _Shown(said(message))


def _shell_word(word: str) -> str:
    """``word`` quoted for a POSIX shell; one holding a character that would act on the
    terminal as ``$'...'``, in which bash and zsh read :func:`_visible`'s escapes back."""
    if not IN_MESSAGE.search(word):
        return shlex.quote(word)
    return "$'" + _visible(word).replace("'", "\\'") + "'"


@contextlib.contextmanager
def _tolerant_output() -> Iterator[None]:
    """stdout and stderr that write what their encoding cannot say as backslash escapes
    (``caf\\xe9``) instead of failing, while the command runs; as they were afterwards.

    Text for people stays readable this way; JSON escapes such characters itself
    (:func:`_json_for`), since a backslash escape would make it invalid."""
    changed: list[tuple[io.TextIOWrapper, str]] = []
    for stream in (sys.stdout, sys.stderr):
        # surrogateescape (the C locale without UTF-8 mode) fails on any other character
        if isinstance(stream, io.TextIOWrapper) and stream.errors in ("strict",
                                                                      "surrogateescape"):
            changed.append((stream, stream.errors))
            stream.reconfigure(errors="backslashreplace")
    try:
        yield
    finally:
        for stream, errors in changed:
            # Flushing may fail (a closed pipe, a full disk): the command has said its outcome.
            with contextlib.suppress(OSError):
                stream.reconfigure(errors=errors)


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], out: TextIO) -> None:
    """Left-aligned columns, two spaces apart; each cell :func:`_visible` (unless it is
    :class:`_Shown` already), and characters ``out`` cannot encode as backslash escapes:
    the widths count the escapes."""
    cells = [[_encodable(value if isinstance(value, _Shown) else _visible(str(value)), out)
              for value in row] for row in rows]
    widths = [max([len(header)] + [len(row[i]) for row in cells]) for i, header in
              enumerate(headers)]
    for row in [list(headers), *cells]:
        line = "  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True))
        out.write(line.rstrip() + "\n")


def _encodable(text: str, out: TextIO) -> str:
    """``text`` as ``out`` writes it: what its encoding cannot say as backslash escapes."""
    encoding = out.encoding or "utf-8"
    try:
        text.encode(encoding)
    except UnicodeEncodeError:
        return text.encode(encoding, "backslashreplace").decode(encoding)
    return text


def _clipped(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _duration(seconds: float) -> str:
    """``3d 4h``, ``2h 05m``, ``4m 12s``, ``12s``: how long, to the two largest units."""
    total = max(0, int(seconds))
    days, rest = divmod(total, 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def _fail(message: str, code: int) -> int:
    """``message`` on stderr, each line :func:`_said`; ``code``."""
    said = "\n".join(_said(line) for line in message.split("\n"))
    print(f"error: {said}", file=sys.stderr)
    return code


def _note_if_private(url: str) -> None:
    """Say on stderr that a ``memory://`` store is empty: each command opens its own, so
    what it lists, finds or removes there is nothing an application or another command
    wrote. A note, not an error: the command does what it says, on that empty store."""
    if "://" not in url or urlsplit(url).scheme.lower() != "memory":
        return
    shown = _shown(url)
    mode = os.environ.get("CHECKPOINT_MODE", "").strip().lower()
    if not os.environ.get("FASTCHECKPOINT_URL") and mode == "development":
        shown += " (what CHECKPOINT_MODE=development means)"
    print(f"note: {_said(shown)} is a store in this command's own memory: it starts empty and is "
          "gone when the command ends, so it holds no run of an application or of another "
          "command. Use a store they share: file://, sqlite:// or redis://", file=sys.stderr)


class _Progress:
    """A one-line count on stderr while a long command runs, only when a person watches.

    ``shown`` says whether one does: stderr is a terminal, and (for a command that streams
    its output) the output does not go to that terminal too. ``total`` is what the store said
    before the work started; work done meanwhile by others may end the count above or below.
    """

    def __init__(self, label: str, unit: str, total: int | None, *, shown: bool) -> None:
        self._label = label
        self._unit = unit
        self._total = total
        self._shown = shown
        self._count = 0
        self._last: float | None = None

    @staticmethod
    def watched(*, output_is_terminal: bool) -> bool:
        return sys.stderr.isatty() and not output_is_terminal

    def add(self, count: int) -> None:
        self._count += count
        now = time.monotonic()
        if self._shown and (self._last is None or now - self._last >= 0.2):
            self._last = now
            sys.stderr.write(f"\r{self._line()}")
            sys.stderr.flush()

    def close(self, *, ok: bool) -> None:
        if self._shown:
            sys.stderr.write(f"\r{self._line()}, {'done' if ok else 'stopped'}\n")
            sys.stderr.flush()

    def _line(self) -> str:
        if self._total is None:
            return f"{self._label}: {self._count:,} {self._unit}"
        total = max(self._total, self._count)
        percent = 100 * self._count // total if total else 100
        return f"{self._label}: {self._count:,} of {total:,} {self._unit} ({percent}%)"


class _Watched:
    """A store whose checkpoint listings and deletions are counted, for progress lines.

    Everything else is the store's own: attributes pass through, so capability checks see
    what the real store offers.
    """

    def __init__(
        self,
        store: CheckpointStore,
        *,
        listed: Callable[[int], None] | None = None,
        deleted: Callable[[int], None] | None = None,
    ) -> None:
        self._store = store
        self._listed = listed
        self._deleted = deleted

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def headers(self, run_key: str, **options: Any) -> Any:
        page, status = await self._store.headers(run_key, **options)
        if self._listed is not None:
            self._listed(len(page))
        return page, status

    async def delete(self, run_key: str, sequence: int, *, checkpoint_id: str) -> bool:
        deleted = await self._store.delete(run_key, sequence, checkpoint_id=checkpoint_id)
        if deleted and self._deleted is not None:
            self._deleted(1)
        return deleted


def _watched_manager(manager: CheckpointManager, store: _Watched) -> CheckpointManager:
    """A manager like ``manager`` on the watched store; ``manager`` still closes the store."""
    return CheckpointManager(cast(CheckpointStore, store), config=manager.config)


# -- commands on a store --------------------------------------------------------------------------


async def _runs(manager: CheckpointManager, args: argparse.Namespace) -> int:
    page = await manager.list_runs(args.status, limit=args.limit, cursor=args.cursor)
    if args.json:
        _print_json({"runs": [run.to_dict() for run in page],
                     "next_cursor": page.next_cursor})
        return EXIT_OK
    if args.status == CheckpointStatus.PAUSED.value:
        now = manager.config.clock()
        _table(("RUN", "REQUESTED", "WAITING", "REQUEST"),
               [(run.run_id, *_pending(run, now)) for run in page], sys.stdout)
    else:
        _table(("RUN", "STATUS", "CREATED", "UPDATED", "LATEST", "HELD"),
               [(run.run_id, run.status.value, when(run.created_at), when(run.updated_at),
                 run.latest_sequence, run.checkpoint_count) for run in page], sys.stdout)
    if page.next_cursor:
        print("more: " + _next_page(args, page.next_cursor))
    return EXIT_OK


def _pending(run: RunInfo, now: float, width: int = _REQUEST_WIDTH) -> tuple[str, str, str]:
    """When the run's approval request was made, how long it has waited, the request (its
    JSON, shown with JSON's escapes)."""
    requested_at = _asked_at(run)
    if requested_at is None:
        return "-", "-", "-"
    request = json_escaped(json_text((run.approval or {}).get("request")))
    return (when(requested_at), _duration(now - requested_at),
            _Shown(_clipped(request, width)))


def _next_page(args: argparse.Namespace, cursor: str) -> str:
    """The command for the next page: the same store, status and page size."""
    words = ["fastcheckpoint", "runs"]
    if args.url:
        words += ["--url", _shown(args.url)]
    if args.status:
        words += ["--status", args.status]
    words += ["--limit", str(args.limit), "--cursor", cursor]
    return " ".join(_shell_word(word) for word in words)


async def _show(manager: CheckpointManager, args: argparse.Namespace) -> int:
    wanted: str = args.target
    is_checkpoint_id = _ids.parse_checkpoint_id(wanted) is not None
    if is_checkpoint_id and args.seq is not None:
        return _fail("--seq goes with a run id; a checkpoint id names its checkpoint already",
                     EXIT_USAGE)
    if is_checkpoint_id:
        checkpoint = await manager.restore_from(wanted)
        if checkpoint is None:  # a run's id may look like a checkpoint id too
            checkpoint = await manager.restore(wanted)
    elif args.seq is None:
        checkpoint = await manager.restore(wanted)
    else:
        checkpoint = await _at_sequence(manager, wanted, args.seq)
    if checkpoint is None:
        return _fail(_not_shown(wanted, args.seq, is_checkpoint_id), EXIT_NOT_FOUND)
    if args.json:
        _print_json(checkpoint.to_dict())
        return EXIT_OK
    metadata = checkpoint.metadata
    rows: list[tuple[str, object]] = [
        ("run", metadata.run_id), ("checkpoint", metadata.checkpoint_id),
        ("sequence", metadata.sequence), ("created", when(metadata.created_at)),
        ("status", metadata.status.value), ("step", metadata.step_name or "-"),
        ("parent", metadata.parent_id or "-"),
        ("tags", _tags(metadata.tags) if metadata.tags else "-"),
        ("expires", when(metadata.expires_at) or "never"),
    ]
    if metadata.status is CheckpointStatus.PAUSED:
        rows += await _request_rows(manager, metadata.run_id)
    _table(("FIELD", "VALUE"), rows, sys.stdout)
    print()
    _print_json({"state": checkpoint.state, "messages": checkpoint.messages,
                 "tool_calls": checkpoint.tool_calls, "context": checkpoint.context})
    return EXIT_OK


async def _at_sequence(
    manager: CheckpointManager, run_id: str, sequence: int
) -> Checkpoint | None:
    """The run's live checkpoint at ``sequence``: its id from the newest checkpoint's header.

    Every live checkpoint of a run belongs to the run's current incarnation (a deleted run's
    checkpoints go with it), so the newest one's id gives the incarnation. Only its header is
    read: a large or unreadable newest checkpoint does not stand in the way of another one.
    """
    newest = await manager.list_checkpoints(run_id, 1)
    if not newest:
        return None
    key, incarnation, _ = _ids.require_checkpoint_id(newest[0].checkpoint_id)
    return await manager.restore_from(_ids.checkpoint_id(key, incarnation, sequence))


def _not_shown(wanted: str, sequence: int | None, is_checkpoint_id: bool) -> str:
    if is_checkpoint_id:
        return f"no live checkpoint {wanted!r} (and no run with that id)"
    if sequence is not None:
        return f"run {wanted!r} holds no live checkpoint at sequence {sequence}"
    return f"run {wanted!r} has no live checkpoint"


async def _request_rows(manager: CheckpointManager, run_id: str) -> list[tuple[str, object]]:
    """``show``'s rows for a paused run: the pending request, whole, and how long it waited."""
    run = await manager.get_run(run_id)
    if run is None or run.status is not CheckpointStatus.PAUSED:
        return []  # decided or deleted since the checkpoint was read
    requested, waiting, request = _pending(run, manager.config.clock(), width=sys.maxsize)
    return [("request", request), ("waiting", f"{waiting} (since {requested})")]


async def _history(manager: CheckpointManager, args: argparse.Namespace) -> int:
    if args.json:
        return await _export_to_stdout(manager, args.run, "json", include_state=False)
    run = await manager.get_run(args.run)
    if run is None:
        return _fail(f"run {args.run!r} does not exist (or expired)", EXIT_NOT_FOUND)
    print(f"run {_visible(run.run_id)}: {run.status.value}, created {when(run.created_at)}, "
          f"{run.checkpoint_count} checkpoint(s) held, latest sequence {run.latest_sequence}")
    if run.error:
        print(f"error: {_visible(run.error)}")
    print()
    # Only the recorded status changes, as every export holds them: a row made up for the
    # run's start would be one the JSON export and RunInfo.history do not have.
    if run.history:
        _table(("AT", "STATUS", "BY", "NOTE"),
               [(when(c.at), c.status.value, c.actor or "", c.note) for c in run.history],
               sys.stdout)
    else:
        print("no status change since the run was created")
    print()
    # Streamed a page at a time, so a run of any length prints in constant memory: the
    # columns before the free text have widths known in advance.
    digits = len(str(run.latest_sequence))
    width, id_width = max(3, digits), 37 + digits  # ck-<24>-<8>-<sequence>
    stamp = len(when(run.created_at))
    print(f"{'SEQ':<{width}}  {'CREATED':<{stamp}}  {'STATUS':<9}  "
          f"{'CHECKPOINT':<{id_width}}  STEP  TAGS")
    before: str | None = None
    while True:
        page = await manager.list_checkpoints(args.run, 500, before=before,
                                              include_expired=True)
        for m in page:
            line = (f"{m.sequence:<{width}}  {when(m.created_at):<{stamp}}  "
                    f"{m.status.value:<9}  {_visible(m.checkpoint_id):<{id_width}}  "
                    f"{_visible(m.step_name) or '-'}  {_tags(m.tags)}")
            print(line.rstrip())
        if len(page) < 500:
            return EXIT_OK
        before = page[-1].checkpoint_id


async def _export_progress(
    manager: CheckpointManager, run_id: str, label: str, *, output_is_terminal: bool
) -> tuple[CheckpointManager, _Progress]:
    """A manager that counts the checkpoints the export lists, and the progress it feeds."""
    shown = _Progress.watched(output_is_terminal=output_is_terminal)
    run = await manager.get_run(run_id) if shown else None
    total = None if run is None else run.checkpoint_count
    progress = _Progress(label, "checkpoints", total, shown=shown)
    return _watched_manager(manager, _Watched(manager.store, listed=progress.add)), progress


async def _export_to_stdout(
    manager: CheckpointManager, run_id: str, format: str, *, include_state: bool
) -> int:
    terminal = sys.stdout.isatty()
    exporter, progress = await _export_progress(
        manager, run_id, f"export {_visible(run_id)}", output_is_terminal=terminal)
    ok = False
    try:
        async for chunk in exporter.export_run(run_id, format, include_state=include_state):
            sys.stdout.write(_exported(chunk, format, terminal=terminal))
        ok = True
    finally:
        progress.close(ok=ok)
    return EXIT_OK


def _exported(chunk: str, format: str, *, terminal: bool) -> str:
    """An export's chunk as the command writes it to stdout: JSON with JSON's escapes for
    characters that would act on a terminal (the same data), Markdown as the library writes
    it (a document for people, which holds no such character), CSV exact (data for programs)
    unless it goes to a terminal: there each record (a chunk) is :func:`_said`, line breaks in
    values included, ending its line."""
    if format == "json":
        return _json_for(sys.stdout, chunk)
    if format == "markdown":
        return chunk
    if not terminal:
        return chunk
    record, end = (chunk[:-2], "\r\n") if chunk.endswith("\r\n") else (chunk, "")
    return _said(record) + end


def _export_format(args: argparse.Namespace) -> str | None:
    """``--format``, with ``--json`` as another way to say ``--format json``; None if both
    are given and disagree."""
    if args.json and args.format not in (None, "json"):
        return None
    return str(args.format or "json")


async def _export_command(manager: CheckpointManager, args: argparse.Namespace) -> int:
    format = _export_format(args)
    if format is None:
        return _fail(f"--json asks for the JSON export; it cannot go with --format "
                     f"{args.format}", EXIT_USAGE)
    if args.output is None:
        return await _export_to_stdout(manager, args.run, format, include_state=args.state)
    target = anyio.Path(args.output)
    if not await target.parent.is_dir():
        return _fail(f"cannot write {args.output}: there is no directory "
                     f"{str(target.parent)!r}", EXIT_USAGE)
    try:
        await _export_to_file(manager, args, format, target)
    except OSError as exc:
        return _fail(f"cannot write {args.output}: {exc.strerror or exc}", EXIT_USAGE)
    return EXIT_OK


async def _export_to_file(
    manager: CheckpointManager, args: argparse.Namespace, format: str, target: anyio.Path
) -> None:
    try:
        mode: int | None = (await target.lstat()).st_mode
    except FileNotFoundError:
        mode = None
    # A new or regular file is written beside the target and renamed over it at the end (with
    # the old file's permissions): a failed export leaves the file that was there before. A
    # link, pipe or device is written through, as any program would.
    partial = (target.with_name(f".{target.name}.{secrets.token_hex(4)}.partial")
               if mode is None or stat.S_ISREG(mode) else None)
    exporter, progress = await _export_progress(
        manager, args.run, f"export {_visible(args.run)} to {_said(args.output)}",
        output_is_terminal=False)
    ok = False
    try:
        async with await anyio.open_file(partial or target, "w", encoding="utf-8",
                                         newline="") as out:
            if partial is not None and mode is not None:
                os.chmod(out.wrapped.fileno(), stat.S_IMODE(mode))
            async for chunk in exporter.export_run(args.run, format,
                                                   include_state=args.state):
                await out.write(chunk)
        if partial is not None:
            await partial.replace(target)
        ok = True
    finally:
        progress.close(ok=ok)
        if partial is not None:
            with contextlib.suppress(FileNotFoundError):
                await partial.unlink()


async def _fork(manager: CheckpointManager, args: argparse.Namespace) -> int:
    forked = await manager.fork(args.checkpoint_id, args.run)
    if args.json:
        _print_json(forked.metadata.to_dict())
    else:
        print(f"forked {_visible(args.checkpoint_id)} into run {_visible(forked.run_id)} "
              f"as {_visible(forked.checkpoint_id)}")
    return EXIT_OK


async def _decide(manager: CheckpointManager, args: argparse.Namespace) -> int:
    requested_at = await _requested_at(manager, args.run, args.requested_at)
    try:
        if args.command == "approve":
            run = await manager.approve(args.run, approver=args.approver,
                                        comment=args.comment, requested_at=requested_at)
        else:
            run = await manager.reject(args.run, approver=args.approver, reason=args.reason,
                                       requested_at=requested_at)
    except ConflictError as refused:
        return _fail(await _refusal(manager, args, requested_at, refused), EXIT_CONFLICT)
    if args.json:
        _print_json(run.to_dict())
    else:
        decision = run.approval or {}
        print(f"run {_visible(run.run_id)}: {run.status.value} "
              f"({_visible(str(decision.get('decision', '?')))} by "
              f"{_visible(str(decision.get('decided_by', '?')))} at "
              f"{when(decision.get('decided_at'))})")
    return EXIT_OK


async def _requested_at(
    manager: CheckpointManager, run_id: str, given: float | _dt.datetime | None
) -> float | None:
    """The ``requested_at`` a decision is pinned to. Epoch seconds (``runs --json``) are the
    request's own; an ISO time (``runs``, ``show``) is shown to the microsecond, so it names
    the pending request when that request's time shows as it: then that request's exact
    time is passed, else the time given, which the manager refuses as another request."""
    if given is None or isinstance(given, float):
        return given
    pending = _asked_at(await manager.get_run(run_id))
    if pending is not None and when(pending) == when(given.timestamp()):
        return pending
    return given.timestamp()


async def _refusal(
    manager: CheckpointManager, args: argparse.Namespace, requested_at: float | None,
    refused: ConflictError,
) -> str:
    """What to say of a refused decision: the manager's reason, unless the run awaits
    another request than the one ``requested_at`` names (then :func:`_other_request`)."""
    try:
        other = await _other_request(manager, args.run, requested_at)
    except CheckpointError:  # the refusal stands, and its own message says why
        other = None
    return without_password(str(refused), args.store_url) if other is None else other


async def _other_request(
    manager: CheckpointManager, run_id: str, requested_at: float | None
) -> str | None:
    """Why a decision pinned to ``requested_at`` was refused, when the run awaits another
    request: both times as ``runs`` and ``show`` print them, with the epoch seconds of
    ``runs --json`` beside them (two requests may show alike to the microsecond). None when
    the refusal was about something else (the run is not paused)."""
    if requested_at is None:
        return None
    run = await manager.get_run(run_id)
    pending = _asked_at(run)
    paused = run is not None and run.status is CheckpointStatus.PAUSED
    if not paused or pending is None or pending == requested_at:
        return None
    return (f"run {run_id!r} awaits the request made at {_time_both_ways(pending)}, not the "
            f"one made at {_time_both_ways(requested_at)}; read the run again before deciding "
            "(fastcheckpoint runs --status paused)")


def _asked_at(run: RunInfo | None) -> float | None:
    """When the run's latest approval request was made (its ``requested_at``), if any."""
    asked = None if run is None else (run.approval or {}).get("requested_at")
    if isinstance(asked, (int, float)) and not isinstance(asked, bool):
        return float(asked)
    return None


def _time_both_ways(epoch: float) -> str:
    return f"{when(epoch)} ({epoch!r})"


async def _prune(manager: CheckpointManager, args: argparse.Namespace) -> int:
    run = await manager.get_run(args.run)
    if run is None:
        return _fail(f"run {args.run!r} does not exist (or expired)", EXIT_NOT_FOUND)
    # The result is one line printed at the end, so the count may share the terminal.
    progress = _Progress(f"prune {_visible(args.run)}", "checkpoints removed",
                         max(0, run.checkpoint_count - args.keep), shown=sys.stderr.isatty())
    pruner = _watched_manager(manager, _Watched(manager.store, deleted=progress.add))
    ok = False
    try:
        removed = await pruner.prune(args.run, args.keep)
        ok = True
    finally:
        progress.close(ok=ok)
    if args.json:
        _print_json({"run_id": args.run, "removed_checkpoints": removed})
    else:
        print(f"run {_visible(args.run)}: removed {removed} checkpoint(s), kept the newest "
              f"{args.keep}")
    return EXIT_OK


async def _cleanup(manager: CheckpointManager, args: argparse.Namespace) -> int:
    removed = await manager.cleanup_expired()
    if args.json:
        _print_json({"removed_checkpoints": removed})
    else:
        print(f"removed {removed} expired checkpoint(s), with expired runs and items")
    return EXIT_OK


# -- doctor ---------------------------------------------------------------------------------------

Step = tuple[str, Callable[[], Awaitable[str]]]


def _doctor_steps(manager: CheckpointManager, probe: str, found: dict[str, Any]) -> list[Step]:
    """Every operation the library makes, once, on the throwaway run ``probe``."""

    async def create() -> str:
        created = await manager.create(probe, {"probe": True}, step_name="doctor",
                                       ttl_seconds=600, force=True)
        assert created is not None
        found["id"] = created.checkpoint_id
        return f"checkpoint {created.checkpoint_id} (expires in 10 minutes if left behind)"

    async def restore() -> str:
        latest = await manager.restore(probe)
        if latest is None or latest.checkpoint_id != found["id"]:
            raise CheckpointError("the checkpoint just written is not the run's latest")
        return "latest checkpoint read back"

    async def restore_from() -> str:
        again = await manager.restore_from(found["id"])
        if again is None or again.state != {"probe": True}:
            raise CheckpointError("the checkpoint just written does not read back by id")
        return "read back by id, content intact"

    async def listing() -> str:
        listed = await manager.list_checkpoints(probe)
        if [m.checkpoint_id for m in listed] != [found["id"]]:
            raise CheckpointError(f"listing shows {len(listed)} checkpoint(s), expected 1")
        return "1 checkpoint listed"

    async def status() -> str:
        run = await manager.mark_completed(probe)
        if run is None or run.status is not CheckpointStatus.COMPLETED:
            raise CheckpointError("the run's status did not change")
        return "run record updated (compare-and-set)"

    async def delete() -> str:
        removed = await manager.delete_run(probe)
        return f"probe run deleted ({removed} checkpoint(s))"

    return [("write", create), ("read latest", restore), ("read by id", restore_from),
            ("list", listing), ("update run", status), ("delete run", delete)]


async def _doctor(manager: CheckpointManager, args: argparse.Namespace) -> int:
    """Connectivity, permissions and provisioning as the store itself sees them; or, with
    ``--repair``, damaged run records found and rebuilt."""
    if args.repair:
        return await _repair(manager, args)
    probe = f"fastcheckpoint-doctor-{secrets.token_hex(6)}"
    checks: list[dict[str, Any]] = []
    found: dict[str, Any] = {}
    steps = _doctor_steps(manager, probe, found)
    try:
        for number, (name, step) in enumerate(steps):
            started = time.perf_counter()
            try:
                detail = await step()
            except CheckpointError as exc:
                detail = without_password(f"{type(exc).__name__}: {exc}", args.store_url)
                provisioned = isinstance(manager.store, SupportsProvision)
                if number == 0 and provisioned and "fastcheckpoint init" not in detail:
                    detail += " (if the table or bucket does not exist: fastcheckpoint init URL)"
                checks.append({"check": name, "ok": False, "ms": _ms(started),
                               "detail": detail})
                break
            checks.append({"check": name, "ok": True, "ms": _ms(started), "detail": detail})
    finally:
        done = bool(checks) and checks[-1]["check"] == "delete run" and checks[-1]["ok"]
        if found and not done:  # failed or interrupted: leave nothing behind
            with anyio.CancelScope(shield=True), contextlib.suppress(CheckpointError):
                await manager.delete_run(probe)
    failed = not all(check["ok"] for check in checks)
    shown = _shown(args.store_url)
    if args.json:
        _print_json({"store": shown, "ok": not failed, "checks": checks})
    else:
        print(f"store: {_said(shown)}")
        _table(("CHECK", "RESULT", "MS", "DETAIL"),
               [(c["check"], "ok" if c["ok"] else "FAILED", f"{c['ms']:.1f}",
                 _said(c["detail"]))
                for c in checks], sys.stdout)
    return EXIT_STORE if failed else EXIT_OK


async def _repair(manager: CheckpointManager, args: argparse.Namespace) -> int:
    reports = await manager.repair(args.run)
    rebuilt = sum(report.outcome == "rebuilt" for report in reports)
    unrecoverable = sum(not report.repaired for report in reports)
    shown = _shown(args.store_url)
    if args.json:
        _print_json({"store": shown, "run_id": args.run, "damaged": len(reports),
                     "rebuilt": rebuilt, "reports": [report.to_dict() for report in reports]})
    else:
        _print_repairs(shown, args.run, reports, rebuilt)
    return EXIT_DAMAGED if unrecoverable else EXIT_OK


_RESULTS = {"rebuilt": "rebuilt", "not damaged": "repaired elsewhere",
            "unrecoverable": "NOT REBUILT"}


def _print_repairs(
    shown: str, run_id: str | None, reports: list[RepairReport], rebuilt: int
) -> None:
    where = _said(shown) if run_id is None else f"{_said(shown)}, run {_visible(run_id)}"
    if not reports:
        print(f"{where}: nothing damaged")
        return
    print(f"{where}: {len(reports)} damaged run record(s), {rebuilt} rebuilt, "
          f"{len(reports) - rebuilt} not rebuilt")
    _table(("RUN", "RESULT", "CHECKPOINTS", "PROBLEM", "RECORD"),
           [(report.run_id or "-", _RESULTS[report.outcome],
             report.checkpoints, _said(report.problem), report.key) for report in reports],
           sys.stdout)
    for report in reports:
        name = _visible(report.run_id or "") or f"record {_visible(report.key)}"
        if report.outcome == "rebuilt":
            print(f"{name}: rebuilt, every intact checkpoint restorable; lost with the damaged "
                  f"record: {'; '.join(report.lost) or 'nothing'}")
        else:
            print(f"{name}: not rebuilt: {_said(report.detail)}")


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


# -- store URLs -----------------------------------------------------------------------------------




def _file_store_path(url: str) -> str | None:
    """The directory of a ``file://`` URL or plain path; None for other stores."""
    if "://" in url and urlsplit(url).scheme.lower() != "file":
        return None
    return parse_file_url(url)[0]


def _sqlite_database_path(url: str) -> str | None:
    """The database file of a ``sqlite://`` URL, as the store resolves it; None for other
    stores. :class:`ConfigurationError` for a URL that names no file (``:memory:``...)."""
    if "://" not in url or urlsplit(url).scheme.lower() != "sqlite":
        return None
    try:
        from fastcheckpoint.stores.sqlite import parse_sqlite_url
    except ImportError:  # a Python without sqlite3: opening the store says so
        return None
    return os.path.abspath(parse_sqlite_url(url)[0])


def _missing_store(url: str) -> str | None:
    """Why a ``file://`` URL (or plain path) or a ``sqlite://`` URL names no store, else None.

    Only a path that is not there counts: one this process may not look into is left to the
    store, which reports the permission problem."""
    path = _file_store_path(url)
    if path == "":
        return _NO_DIRECTORY.format(url=url)
    what = "file store"
    if path is None:
        path, what = _sqlite_database_path(url), "SQLite database"
    if path is None:
        return None
    try:
        os.stat(path)
    except FileNotFoundError:
        return (f"no {what} at {path!r} (a mistyped path? fastcheckpoint doctor "
                f"{shlex.quote(url)} creates it and checks it)")
    except OSError:
        return None
    return None


_NO_DIRECTORY = "the URL {url!r} names no directory (file:///absolute/path)"


def _store_of(args: argparse.Namespace) -> str:
    """The store URL: ``doctor``'s URL argument, else ``--url``, else the environment."""
    target = getattr(args, "target", None) if args.command == "doctor" else None
    if target and args.url:
        if not args.repair or args.run:
            raise _UsageError("name the store once: a URL argument or --url")
        args.run, target = _as_typed(target), None  # doctor --repair --url URL RUN
    if target and args.repair and not args.run and _names_a_run(target):
        # doctor --repair RUN, the store from the environment
        args.run, target = _as_typed(target), None
    if args.command == "doctor" and args.run and not args.repair:
        raise _UsageError("a RUN goes with --repair (doctor --repair URL RUN)")
    if not (target or args.url or _environment_names_a_store()):
        raise _UsageError(_NO_STORE.format(
            argument="the URL (doctor URL), " if args.command == "doctor" else ""))
    return _url_argument(str(target or args.url or store_url_from_env(os.environ)))


# Examples a shell can use: a memory:// store would be empty in every command.
_NO_STORE = ("no store given: pass {argument}--url URL or set FASTCHECKPOINT_URL, e.g. "
             "file:///var/lib/ckpt, sqlite:///runs.db or redis://localhost:6379/0")


def _environment_names_a_store() -> bool:
    """Whether ``FASTCHECKPOINT_URL`` or ``CHECKPOINT_MODE`` is set: the environment then
    names the store, or :func:`store_url_from_env` says what is wrong with it."""
    return bool(os.environ.get("FASTCHECKPOINT_URL")
                or os.environ.get("CHECKPOINT_MODE", "").strip())


def _names_a_run(target: str) -> bool:
    """Whether ``doctor --repair TARGET`` names a run of the environment's store rather than
    a store: the environment names one, and TARGET is no URL and no path that exists."""
    return _environment_names_a_store() and "://" not in target and not os.path.lexists(target)


class _UsageError(Exception):
    """A mistake in the command line that argparse cannot see."""


def _manager_from_env(url: str) -> CheckpointManager:
    """A manager on the store of ``url``, configured as :meth:`CheckpointManager.from_env`
    configures one (``FASTCHECKPOINT_*``, ``CHECKPOINT_TTL_DAYS``): by that method itself,
    so the command line and applications read the environment alike."""
    return CheckpointManager.from_env({**os.environ, "FASTCHECKPOINT_URL": url})


def _open(args: argparse.Namespace) -> CheckpointManager:
    """A manager on the store, or :class:`ConfigurationError` / :class:`_UsageError` saying
    what is wrong with the store or the configuration."""
    # The URL open_store would open (a plain path's ~ expanded, a scheme missing its //
    # refused): the checks below look where the store will be.
    url = checked_store_url(_store_of(args))
    args.store_url = url
    try:
        creates_store = args.command == "doctor" and not args.repair
        missing = None if creates_store else _missing_store(url)
        if missing is not None:
            raise _UsageError(missing)
        return _manager_from_env(url)
    except ValueError as exc:  # a URL too malformed to take apart
        raise _UsageError(f"bad store URL {_shown(url)!r}: {exc}") from exc


def _on_store(action: Action) -> Callable[[argparse.Namespace], int]:
    """Open the store, run ``action`` with a manager on it, map errors to exit codes."""

    def run(args: argparse.Namespace) -> int:
        args.store_url = ""
        try:
            manager = _open(args)
        except _UsageError as exc:
            return _fail(str(exc), EXIT_USAGE)
        except ConfigurationError as exc:
            return _fail(without_password(str(exc), args.store_url), EXIT_USAGE)
        # doctor's probe is written and read back in this process: it means what it says.
        if args.command != "doctor" or args.repair:
            _note_if_private(args.store_url)

        async def go() -> int:
            try:
                return await action(manager, args)
            finally:
                await manager.aclose()

        def fail(exc: Exception, code: int) -> int:
            return _fail(without_password(str(exc), args.store_url), code)

        try:
            return anyio.run(go)
        except (ConfigurationError, ValidationError) as exc:
            return fail(exc, EXIT_USAGE)
        except CheckpointNotFound as exc:
            return fail(exc, EXIT_NOT_FOUND)
        except ConflictError as exc:
            return fail(exc, EXIT_CONFLICT)
        except CheckpointError as exc:
            return fail(exc, EXIT_STORE)
        except BrokenPipeError:  # the reader went away (| head): main() says so
            raise
        except OSError as exc:  # the output could not be written (disk full...)
            return _fail(f"cannot write the output: {exc}", EXIT_USAGE)

    return run


# -- bench ----------------------------------------------------------------------------------------


def _run_bench(bench_args: list[str]) -> int:
    try:
        from benchmarks.cli import main as bench_main
    except ModuleNotFoundError as exc:
        if exc.name not in ("benchmarks", "benchmarks.cli"):
            return _fail(f"the benchmark suite needs {exc.name}, which is not installed: "
                         "pip install -e '.[bench]' in the source directory", EXIT_USAGE)
        return _fail(_BENCH_NOT_INSTALLED.format(version=__version__), EXIT_USAGE)
    return bench_main(bench_args)


_BENCH_NOT_INSTALLED = """\
fastcheckpoint bench runs the benchmark suite, which is not part of the installed package:
it is the benchmarks/ directory of the fastcheckpoint source distribution. To run it:
  pip download --no-deps --no-binary :all: fastcheckpoint=={version}
  tar xzf fastcheckpoint-{version}.tar.gz && cd fastcheckpoint-{version}
  python -m venv .venv && .venv/bin/pip install -e '.[bench]'
  .venv/bin/fastcheckpoint bench --quick"""


# -- arguments ------------------------------------------------------------------------------------


def _positive(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _sequence(text: str) -> int:
    """An argparse type: a checkpoint sequence, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"must be a sequence number (0 for a run's first checkpoint), got {text!r}")
    return value


def _request_time(text: str) -> float | _dt.datetime:
    """An argparse type: when a request was made, in epoch seconds (``runs --json``) or as
    the ISO 8601 time ``runs`` prints (UTC unless it names a zone)."""
    try:
        epoch = float(text)
    except ValueError:
        pass
    else:
        if math.isfinite(epoch):
            return epoch
        raise argparse.ArgumentTypeError(f"must be a time, got {text!r}")
    iso = text.strip()
    if iso[-1:] in ("Z", "z"):
        iso = iso[:-1] + "+00:00"  # Python 3.10's fromisoformat takes no Z
    try:
        moment = _dt.datetime.fromisoformat(iso)
    except ValueError:
        raise argparse.ArgumentTypeError(
            "must be the request's requested_at: epoch seconds as `runs --json` prints them, "
            f"or the ISO time `runs --status paused` prints; got {text!r}") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=_dt.timezone.utc)


class _Parser(argparse.ArgumentParser):
    """argparse's parser, except that help written to a reader gone away (``--help | head``)
    is not ignored (argparse drops the write's error and exits 0 as if it was read), and that
    an error shows the arguments it repeats safely."""

    def print_help(self, file: SupportsWrite[str] | None = None) -> None:
        (file or sys.stdout).write(self.format_help())

    def error(self, message: str) -> NoReturn:
        """argparse's, the message :func:`_said`: it may repeat an argument as typed
        (``unrecognized arguments: ...``)."""
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {_said(message)}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fastcheckpoint",
        description="fastcheckpoint: inspect and act on runs, provision stores, benchmark.",
        epilog=_EXIT_CODES,
    )
    parser.add_argument("--version", action="version", version=f"fastcheckpoint {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    on_store = _Parser(add_help=False)
    on_store.add_argument("--url", type=_url_argument,
                          help="store URL (default: FASTCHECKPOINT_URL)")
    on_store.add_argument("--json", action="store_true", help="JSON output, for scripts")

    def store_command(name: str, action: Action, helptext: str,
                      *positional: str) -> argparse.ArgumentParser:
        command = commands.add_parser(name, parents=[on_store], help=helptext,
                                      epilog=_EXIT_CODES)
        for argument in positional:
            command.add_argument(argument.lower(), metavar=argument, type=_as_typed)
        command.set_defaults(handler=_on_store(action))
        return command

    runs = store_command("runs", _runs, "list runs, newest first; --status paused is the "
                                        "approval queue")
    runs.add_argument("--status", choices=[s.value for s in CheckpointStatus
                                           if s is not CheckpointStatus.EXPIRED])
    runs.add_argument("--limit", type=_positive, default=_RUNS_PAGE,
                      help=f"runs per page ({_RUNS_PAGE})")
    runs.add_argument("--cursor", help="the next page, as the previous page printed it")
    show = store_command("show", _show, "a checkpoint with its content: a run's latest (or "
                                        "--seq N), or the one a checkpoint id names")
    show.add_argument("target", metavar="RUN|CHECKPOINT_ID", type=_as_typed)
    show.add_argument("--seq", type=_sequence, help="the run's checkpoint at this sequence")
    store_command("history", _history, "a run's status changes and checkpoints", "RUN")
    export = store_command("export", _export_command, "audit export of a run (streamed)", "RUN")
    export.add_argument("--format", choices=FORMATS,
                        help="json (the default; also --json), csv or markdown")
    export.add_argument("--state", action="store_true", help="include checkpoint content")
    export.add_argument("--output", "-o", help="write to this file (default: stdout)")
    fork = store_command("fork", _fork, "start a new run from a checkpoint", "CHECKPOINT_ID")
    fork.add_argument("--run", type=_as_typed, help="the new run's id (default: a fresh one)")
    for name, note in (("approve", "comment"), ("reject", "reason")):
        decide = store_command(name, _decide, f"{name} a paused run", "RUN")
        decide.add_argument("--approver", required=True, type=_as_typed, help="who decides")
        decide.add_argument(f"--{note}", default="", type=_as_typed)
        decide.add_argument(
            "--requested-at", type=_request_time, metavar="TIME",
            help="decide only if the pending request is the one made at TIME (its "
                 "requested_at: epoch seconds from runs --json, or the time runs prints); "
                 "else exit 4")
    store_command("cleanup", _cleanup, "remove expired checkpoints, runs and items now")
    prune = store_command("prune", _prune, "keep only a run's newest checkpoints", "RUN")
    prune.add_argument("--keep", type=_positive, required=True,
                       help="how many of the newest live checkpoints to keep")
    doctor = store_command(
        "doctor", _doctor, "check connectivity, permissions and provisioning with a probe "
                           "run; with --repair, rebuild damaged run records")
    doctor.add_argument("target", nargs="?", metavar="URL", type=_url_argument,
                        help="store URL (or --url)")
    doctor.add_argument("run", nargs="?", metavar="RUN", type=_as_typed,
                        help="with --repair: only this run (default: every run)")
    doctor.add_argument("--repair", action="store_true",
                        help="find run records that cannot be read and rebuild them from the "
                             "runs' checkpoints")

    init = commands.add_parser(
        "init", help="create what a store needs (DynamoDB table, S3 bucket, PostgreSQL "
                     "tables...) or upgrade it; idempotent",
        epilog=_EXIT_CODES,
    )
    init.add_argument("url", metavar="URL", type=_url_argument,
                      help="store URL, e.g. dynamodb://Table?bucket=b")
    init.add_argument("--json", action="store_true", help="JSON output, for scripts")
    init.set_defaults(handler=_run_init)
    # Listed for --help only: main() hands everything after "bench" to the suite's own parser.
    commands.add_parser(
        "bench", help="run the benchmark suite (from the source distribution; --help there)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        return _command(arguments)
    except BrokenPipeError:
        return _output_closed()


def _command(arguments: list[str]) -> int:
    """Run the command; stdout flushed at the end (also after ``--help`` or a usage error),
    so that a reader gone away shows here rather than at the interpreter's exit."""
    try:
        if arguments[:1] == ["bench"]:
            return _run_bench(arguments[1:])
        with _tolerant_output():
            args = _parser().parse_args(arguments)
            code: int = args.handler(args)
        return code
    finally:
        if sys.stdout is not None:  # None when started with stdout closed
            sys.stdout.flush()


def _output_closed() -> int:
    """The reader of stdout went away (``| head``): the command stops quietly, as Unix tools
    do. What is still buffered goes to /dev/null, or the interpreter's closing flush of
    stdout would fail again and print "Exception ignored" on stderr."""
    with contextlib.suppress(OSError, ValueError):  # no descriptor (stdout replaced)
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
    return EXIT_OUTPUT_CLOSED


def _as_typed(argument: str) -> str:
    """A text argument (a run or checkpoint id, a name, a note) as it was typed. Where the
    locale is not UTF-8 (the C locale without UTF-8 mode), Python turns each byte of a
    non-ASCII argument into a lone surrogate; bytes that are UTF-8 are read again as UTF-8,
    as UTF-8 mode would (so ``café`` names the run ``café``). Others stay as they are (and are
    refused as invalid unicode). Paths and URLs are left as the system gave them: the system
    takes them back in its own encoding."""
    if argument.isascii() or not any("\udc80" <= char <= "\udcff" for char in argument):
        return argument
    try:
        return os.fsencode(argument).decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return argument


def _url_argument(url: str) -> str:
    """A store URL as typed. A network store's URL (host, names, options) is text, read as
    UTF-8 like the other text arguments; any other (``file://``, ``sqlite://``, a plain path,
    a third-party store's) may name a path, which goes back to the system as it came."""
    return _as_typed(url) if names_a_network_store(url) else url


def _shown(url: str) -> str:
    """A store URL for people: without its password, a path's bytes read as UTF-8."""
    return redacted(_as_typed(url))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
