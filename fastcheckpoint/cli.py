"""The ``fastcheckpoint`` command: inspect and act on runs, provision stores, benchmark.

``fastcheckpoint runs | show | history | export | fork | approve | reject | cleanup | prune |
doctor`` work on the store of ``--url`` (default: ``FASTCHECKPOINT_URL``, or
``CHECKPOINT_MODE`` as :meth:`CheckpointManager.from_env` reads it), with the rest of the
configuration from ``FASTCHECKPOINT_*``. They print tables for people and JSON with ``--json``.
``fastcheckpoint init URL`` creates what a store needs (idempotent). ``fastcheckpoint bench``
runs the benchmark suite, which lives in the repository's ``benchmarks/`` (an editable install
of a checkout has it).

Exit codes: 0 done, 1 the store failed, 2 bad usage or configuration, 3 no such run or
checkpoint, 4 the run's status does not allow the change (e.g. approving a run that is not
paused).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import secrets
import stat
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TextIO
from urllib.parse import urlsplit

import anyio
import msgspec

from fastcheckpoint import _ids
from fastcheckpoint._config import CheckpointConfig
from fastcheckpoint._export import FORMATS, json_text, when
from fastcheckpoint._manager import CheckpointManager, _store_url
from fastcheckpoint._model import CheckpointStatus
from fastcheckpoint.errors import (
    CheckpointError,
    CheckpointNotFound,
    ConfigurationError,
    ConflictError,
    ValidationError,
)
from fastcheckpoint.stores import SupportsProvision, open_store
from fastcheckpoint.stores.file import parse_file_url

__all__ = ["main"]

EXIT_OK = 0
EXIT_STORE = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_CONFLICT = 4

Action = Callable[[CheckpointManager, argparse.Namespace], Awaitable[int]]


async def _init(url: str) -> str:
    store = open_store(url)
    try:
        if not isinstance(store, SupportsProvision):
            return f"{url}: nothing to provision (the store creates what it needs on first use)"
        await store.provision()
        return f"{url}: provisioned (tables, buckets, indexes, TTL and lifecycle as needed)"
    finally:
        await store.aclose()


def _run_init(args: argparse.Namespace) -> int:
    try:
        print(anyio.run(_init, args.url))
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_STORE
    return EXIT_OK


# -- output ---------------------------------------------------------------------------------------


def _print_json(value: Any) -> None:
    print(msgspec.json.format(json_text(value), indent=2))


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], out: TextIO) -> None:
    """Left-aligned columns, two spaces apart; line breaks in cells shown as spaces."""
    cells = [[_flat(str(value)) for value in row] for row in rows]
    widths = [max([len(header)] + [len(row[i]) for row in cells]) for i, header in
              enumerate(headers)]
    for row in [list(headers), *cells]:
        line = "  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True))
        out.write(line.rstrip() + "\n")


def _flat(text: str) -> str:
    """One line: line breaks and tabs as spaces."""
    return re.sub(r"[\r\n\t\v\f]", " ", text)


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


# -- commands on a store --------------------------------------------------------------------------


async def _runs(manager: CheckpointManager, args: argparse.Namespace) -> int:
    page = await manager.list_runs(args.status, limit=args.limit, cursor=args.cursor)
    if args.json:
        _print_json({"runs": [run.to_dict() for run in page],
                     "next_cursor": page.next_cursor})
        return EXIT_OK
    _table(("RUN", "STATUS", "CREATED", "UPDATED", "LATEST", "HELD"),
           [(run.run_id, run.status.value, when(run.created_at), when(run.updated_at),
             run.latest_sequence, run.checkpoint_count) for run in page], sys.stdout)
    if page.next_cursor:
        print(f"more: fastcheckpoint runs --cursor {page.next_cursor}")
    return EXIT_OK


async def _show(manager: CheckpointManager, args: argparse.Namespace) -> int:
    checkpoint = await manager.restore(args.run)
    if checkpoint is None:
        return _fail(f"run {args.run!r} has no live checkpoint", EXIT_NOT_FOUND)
    if args.seq is not None and args.seq != checkpoint.metadata.sequence:
        key, incarnation, _ = _ids.require_checkpoint_id(checkpoint.checkpoint_id)
        wanted = _ids.checkpoint_id(key, incarnation, args.seq)
        found = await manager.restore_from(wanted) if args.seq >= 0 else None
        if found is None:
            return _fail(f"run {args.run!r} holds no live checkpoint at sequence {args.seq}",
                         EXIT_NOT_FOUND)
        checkpoint = found
    if args.json:
        _print_json(checkpoint.to_dict())
        return EXIT_OK
    metadata = checkpoint.metadata
    _table(("FIELD", "VALUE"), [
        ("run", metadata.run_id), ("checkpoint", metadata.checkpoint_id),
        ("sequence", metadata.sequence), ("created", when(metadata.created_at)),
        ("status", metadata.status.value), ("step", metadata.step_name or "-"),
        ("parent", metadata.parent_id or "-"), ("tags", ", ".join(metadata.tags) or "-"),
        ("expires", when(metadata.expires_at) or "never"),
    ], sys.stdout)
    print()
    _print_json({"state": checkpoint.state, "messages": checkpoint.messages,
                 "tool_calls": checkpoint.tool_calls, "context": checkpoint.context})
    return EXIT_OK


async def _history(manager: CheckpointManager, args: argparse.Namespace) -> int:
    if args.json:
        return await _export_to_stdout(manager, args.run, "json", include_state=False)
    run = await manager.get_run(args.run)
    if run is None:
        return _fail(f"run {args.run!r} does not exist (or expired)", EXIT_NOT_FOUND)
    print(f"run {run.run_id}: {run.status.value}, created {when(run.created_at)}, "
          f"{run.checkpoint_count} checkpoint(s) held, latest sequence {run.latest_sequence}")
    if run.error:
        print(f"error: {run.error}")
    print()
    _table(("AT", "STATUS", "BY", "NOTE"),
           [(when(run.created_at), CheckpointStatus.ACTIVE.value, "", "run started")]
           + [(when(c.at), c.status.value, c.actor or "", c.note) for c in run.history],
           sys.stdout)
    print()
    # Streamed a page at a time, so a run of any length prints in constant memory: the
    # columns before the free text have widths known in advance.
    digits = len(str(run.latest_sequence))
    width, id_width = max(3, digits), 37 + digits  # ck-<24>-<8>-<sequence>
    print(f"{'SEQ':<{width}}  {'CREATED':<24}  {'STATUS':<9}  {'CHECKPOINT':<{id_width}}  "
          "STEP  TAGS")
    before: str | None = None
    while True:
        page = await manager.list_checkpoints(args.run, 500, before=before,
                                              include_expired=True)
        for m in page:
            line = (f"{m.sequence:<{width}}  {when(m.created_at):<24}  {m.status.value:<9}  "
                    f"{m.checkpoint_id:<{id_width}}  {_flat(m.step_name) or '-'}  "
                    f"{_flat(', '.join(m.tags))}")
            print(line.rstrip())
        if len(page) < 500:
            return EXIT_OK
        before = page[-1].checkpoint_id


class _Progress:
    """A one-line count on stderr while a long command runs, when a person watches (stderr is
    a terminal that the command's output does not go to); silent otherwise."""

    def __init__(self, label: str, *, output_is_terminal: bool) -> None:
        self._label = label
        self._shown = sys.stderr.isatty() and not output_is_terminal
        self._count = 0
        self._last = 0.0

    def step(self) -> None:
        self._count += 1
        now = time.monotonic()
        if self._shown and now - self._last >= 0.2:
            self._last = now
            sys.stderr.write(f"\r{self._label}: {self._count:,} chunks written")
            sys.stderr.flush()

    def close(self, *, ok: bool) -> None:
        if self._shown and self._last:
            outcome = "done" if ok else "stopped"
            sys.stderr.write(f"\r{self._label}: {self._count:,} chunks written, {outcome}\n")
            sys.stderr.flush()


async def _export_to_stdout(
    manager: CheckpointManager, run_id: str, format: str, *, include_state: bool
) -> int:
    progress = _Progress(f"export {run_id}", output_is_terminal=sys.stdout.isatty())
    ok = False
    try:
        async for chunk in manager.export_run(run_id, format, include_state=include_state):
            sys.stdout.write(chunk)
            progress.step()
        ok = True
    finally:
        progress.close(ok=ok)
    return EXIT_OK


async def _export_command(manager: CheckpointManager, args: argparse.Namespace) -> int:
    if args.output is None:
        return await _export_to_stdout(manager, args.run, args.format,
                                       include_state=args.state)
    target = anyio.Path(args.output)
    try:
        mode: int | None = (await target.lstat()).st_mode
    except FileNotFoundError:
        mode = None
    # A new or regular file is written beside the target and renamed over it at the end (with
    # the old file's permissions): a failed export leaves the file that was there before. A
    # link, pipe or device is written through, as any program would.
    partial = (target.with_name(f".{target.name}.{secrets.token_hex(4)}.partial")
               if mode is None or stat.S_ISREG(mode) else None)
    progress = _Progress(f"export {args.run} to {args.output}", output_is_terminal=False)
    ok = False
    try:
        async with await anyio.open_file(partial or target, "w", encoding="utf-8",
                                         newline="") as out:
            if partial is not None and mode is not None:
                os.chmod(out.wrapped.fileno(), stat.S_IMODE(mode))
            async for chunk in manager.export_run(args.run, args.format,
                                                  include_state=args.state):
                await out.write(chunk)
                progress.step()
        if partial is not None:
            await partial.replace(target)
        ok = True
    finally:
        progress.close(ok=ok)
        if partial is not None:
            with contextlib.suppress(FileNotFoundError):
                await partial.unlink()
    return EXIT_OK


async def _fork(manager: CheckpointManager, args: argparse.Namespace) -> int:
    forked = await manager.fork(args.checkpoint_id, args.run)
    if args.json:
        _print_json(forked.metadata.to_dict())
    else:
        print(f"forked {args.checkpoint_id} into run {forked.run_id} "
              f"as {forked.checkpoint_id}")
    return EXIT_OK


async def _decide(manager: CheckpointManager, args: argparse.Namespace) -> int:
    if args.command == "approve":
        run = await manager.approve(args.run, approver=args.approver, comment=args.comment)
    else:
        run = await manager.reject(args.run, approver=args.approver, reason=args.reason)
    if run is None:
        return _fail(f"run {args.run!r} does not exist (or expired)", EXIT_NOT_FOUND)
    if args.json:
        _print_json(run.to_dict())
    else:
        decision = run.approval or {}
        print(f"run {run.run_id}: {run.status.value} ({decision.get('decision', '?')} by "
              f"{decision.get('decided_by', '?')} at {when(decision.get('decided_at'))})")
    return EXIT_OK


async def _prune(manager: CheckpointManager, args: argparse.Namespace) -> int:
    if await manager.get_run(args.run) is None:
        return _fail(f"run {args.run!r} does not exist (or expired)", EXIT_NOT_FOUND)
    removed = await manager.prune(args.run, args.keep)
    if args.json:
        _print_json({"run_id": args.run, "removed_checkpoints": removed})
    else:
        print(f"run {args.run}: removed {removed} checkpoint(s), kept the newest {args.keep}")
    return EXIT_OK


async def _cleanup(manager: CheckpointManager, args: argparse.Namespace) -> int:
    removed = await manager.cleanup_expired()
    if args.json:
        _print_json({"removed_checkpoints": removed})
    else:
        print(f"removed {removed} expired checkpoint(s), with expired runs and items")
    return EXIT_OK


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
    """Connectivity, permissions and provisioning as the store itself sees them."""
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
                detail = _without_password(f"{type(exc).__name__}: {exc}", args.store_url)
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
    shown = _redacted(args.store_url)
    if args.json:
        _print_json({"store": shown, "ok": not failed, "checks": checks})
    else:
        print(f"store: {shown}")
        _table(("CHECK", "RESULT", "MS", "DETAIL"),
               [(c["check"], "ok" if c["ok"] else "FAILED", f"{c['ms']:.1f}", c["detail"])
                for c in checks], sys.stdout)
    return EXIT_STORE if failed else EXIT_OK


def _redacted(url: str) -> str:
    """The URL with any password replaced, for printing."""
    return _without_password(url, url)


def _without_password(text: str, url: str) -> str:
    """``text`` with the URL's password, if any, replaced (error messages may quote it)."""
    parts = urlsplit(url) if "://" in url else None
    password = None if parts is None else parts.password
    return text.replace(password, "***") if password else text


def _missing_file_store(url: str) -> str | None:
    """The directory of a ``file://`` URL (or plain path) that does not exist, else None.

    Only a path that is not there counts: one this process may not look into is left to the
    store, which reports the permission problem."""
    if "://" in url and urlsplit(url).scheme.lower() != "file":
        return None
    path, _ = parse_file_url(url)
    try:
        os.stat(path)
    except FileNotFoundError:
        return path
    except OSError:
        return None
    return None


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def _on_store(action: Action) -> Callable[[argparse.Namespace], int]:
    """Open the store, run ``action`` with a manager on it, map errors to exit codes."""

    def run(args: argparse.Namespace) -> int:
        try:
            url = getattr(args, "target", None) or args.url or _store_url(os.environ)
            args.store_url = url
            missing = _missing_file_store(url)
            if missing is not None and args.command != "doctor":
                return _fail(f"no file store at {missing!r} (a mistyped path? fastcheckpoint "
                             f"doctor {url} creates it and checks it)", EXIT_USAGE)
            config = CheckpointConfig.from_env()
            store = open_store(url)
        except ConfigurationError as exc:
            return _fail(_without_password(str(exc), getattr(args, "store_url", "")), EXIT_USAGE)

        async def go() -> int:
            manager = CheckpointManager(store, config=config)
            try:
                return await action(manager, args)
            finally:
                await manager.aclose()

        def fail(exc: Exception, code: int) -> int:
            return _fail(_without_password(str(exc), url), code)

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
        except BrokenPipeError:  # the reader went away (| head): not an error of ours
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_OK
        except OSError as exc:  # --output could not be written
            return _fail(str(exc), EXIT_USAGE)

    return run


def _run_bench(bench_args: list[str]) -> int:
    try:
        from benchmarks.cli import main as bench_main
    except ImportError:
        print(
            "error: the benchmark suite ships with the source, not the wheel; run it from a "
            "checkout: git clone <repository> && cd fastcheckpoint && make bench "
            "(or pip install -e '.[bench]' then fastcheckpoint bench)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return bench_main(bench_args)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastcheckpoint",
        description="fastcheckpoint: inspect and act on runs, provision stores, benchmark.",
        epilog="Exit codes: 0 done, 1 the store failed, 2 bad usage or configuration, "
               "3 no such run or checkpoint, 4 the run's status does not allow the change.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    on_store = argparse.ArgumentParser(add_help=False)
    on_store.add_argument("--url", help="store URL (default: FASTCHECKPOINT_URL)")
    on_store.add_argument("--json", action="store_true", help="JSON output, for scripts")

    def store_command(name: str, action: Action, helptext: str,
                      *positional: str) -> argparse.ArgumentParser:
        command = commands.add_parser(name, parents=[on_store], help=helptext)
        for argument in positional:
            command.add_argument(argument.lower(), metavar=argument)
        command.set_defaults(handler=_on_store(action))
        return command

    runs = store_command("runs", _runs, "list runs, newest first")
    runs.add_argument("--status", choices=[s.value for s in CheckpointStatus
                                           if s is not CheckpointStatus.EXPIRED])
    runs.add_argument("--limit", type=_positive, default=50, help="runs per page (50)")
    runs.add_argument("--cursor", help="the next page, as the previous page printed it")
    show = store_command("show", _show,
                         "a run's latest checkpoint (or --seq N) with its content", "RUN")
    show.add_argument("--seq", type=int, help="the checkpoint at this sequence")
    store_command("history", _history, "a run's status changes and checkpoints", "RUN")
    export = store_command("export", _export_command, "audit export of a run (streamed)", "RUN")
    export.add_argument("--format", choices=FORMATS, default="json")
    export.add_argument("--state", action="store_true", help="include checkpoint content")
    export.add_argument("--output", "-o", help="write to this file (default: stdout)")
    fork = store_command("fork", _fork, "start a new run from a checkpoint", "CHECKPOINT_ID")
    fork.add_argument("--run", help="the new run's id (default: a fresh one)")
    for name, note in (("approve", "comment"), ("reject", "reason")):
        decide = store_command(name, _decide, f"{name} a paused run", "RUN")
        decide.add_argument("--approver", required=True, help="who decides")
        decide.add_argument(f"--{note}", default="")
    store_command("cleanup", _cleanup, "remove expired checkpoints, runs and items now")
    prune = store_command("prune", _prune, "keep only a run's newest checkpoints", "RUN")
    prune.add_argument("--keep", type=_positive, required=True,
                       help="how many of the newest live checkpoints to keep")
    doctor = store_command("doctor", _doctor,
                           "check connectivity, permissions and provisioning with a probe run")
    doctor.add_argument("target", nargs="?", metavar="URL", help="store URL (or --url)")

    init = commands.add_parser(
        "init", help="create what a store needs (DynamoDB table, S3 bucket...); idempotent"
    )
    init.add_argument("url", metavar="URL", help="store URL, e.g. dynamodb://Table?bucket=b")
    init.set_defaults(handler=_run_init)
    # Listed for --help only: main() hands everything after "bench" to the suite's own parser.
    commands.add_parser(
        "bench", help="run the benchmark suite (options as python -m benchmarks, e.g. --quick)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["bench"]:
        return _run_bench(arguments[1:])
    args = _parser().parse_args(arguments)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
