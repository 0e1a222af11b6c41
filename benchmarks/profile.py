"""Where W1's time goes: ``python -m benchmarks.profile [--store URL ...] [--ops N]``.

For each store, on W1's content and configuration:

1. Mean create and restore time as the suite measures it, and again with the worker-thread
   hop replaced by a direct call: the difference is what the hop costs.
2. A cProfile of each phase (hops inlined, so the store's work in the worker thread is seen),
   its own time grouped into serialization, the round-trip verification of the codec,
   checksums, fsync, other system calls and the rest (manager and store logic in Python).
   cProfile slows Python code more than C code, so shares are indicative.
3. The codec alone: msgspec encode, the create-time check (the lossless-types screen, and the
   decode + compare that content outside the screen takes), CRC-32, and the decode
   ``restore`` does.

Prints Markdown (also written to ``--out``, default ``benchmarks/results/profile.md``).
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import pstats
import statistics
import time
import zlib
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import msgspec

from benchmarks.content import Content, make_content
from benchmarks.footprint import counting_syscalls
from benchmarks.settings import DEFAULT_KEEP, Sizes
from benchmarks.subjects import StoreTarget, prepared_targets, unique_run_id
from fastcheckpoint import CheckpointConfig, CheckpointManager

__all__ = ["main"]

_SYSCALLS = {
    "open", "close", "read", "write", "pread", "replace", "rename", "mkdir", "rmdir", "stat",
    "lstat", "fstat", "unlink", "listdir", "scandir", "flock", "link", "exists", "lexists",
}


@contextmanager
def inline_thread_hops() -> Iterator[None]:
    """Run ``anyio.to_thread.run_sync`` work directly on the event loop thread."""
    original = anyio.to_thread.run_sync

    async def direct(func: Callable[..., Any], *args: Any, **_: Any) -> Any:
        return func(*args)

    anyio.to_thread.run_sync = direct  # type: ignore[assignment]
    try:
        yield
    finally:
        anyio.to_thread.run_sync = original


def _category(function: tuple[str, int, str], caller_names: set[str]) -> str:
    _, _, name = function
    if "msgspec.msgpack.Encoder" in name and "encode" in name:
        return "msgpack encode"
    if "msgspec.msgpack.Decoder" in name and "decode" in name:
        if "_encode_plain" in caller_names:
            return "verify round trip: decode"
        return "msgpack decode"
    if name == "_encode_plain":
        return "verify round trip: compare"
    if name == "_lossless_only" or "gc.get_referents" in name or (
        "_lossless_only" in caller_names and "issuperset" in name
    ):
        return "verify: lossless-types screen"
    if "zlib.crc32" in name:
        return "CRC-32"
    if "fsync" in name:
        return "fsync"
    module_call = name.startswith(("<built-in method posix.", "<built-in method fcntl."))
    if module_call and name.split(".")[-1].rstrip(">").strip() in _SYSCALLS:
        return "other system calls"
    return "Python (manager, store, anyio)"


def _breakdown(profile: cProfile.Profile, ops: int) -> dict[str, float]:
    """Profiled µs per operation by category (own time)."""
    stats = pstats.Stats(profile)
    totals: dict[str, float] = defaultdict(float)
    for function, (_, _, own, _, callers) in stats.stats.items():  # type: ignore[attr-defined]
        names = {caller[2] for caller in callers}
        if function[2] == "_encode_plain" or "_encode_plain" not in names:
            totals[_category(function, names)] += own
            continue
        # Split a function called from the verification and from elsewhere by caller.
        for caller, (_, _, caller_own, _) in callers.items():
            totals[_category(function, {caller[2]})] += caller_own
    return {name: seconds / ops * 1e6 for name, seconds in totals.items()}


def _top_functions(profile: cProfile.Profile, ops: int, count: int = 8) -> list[tuple[str, float]]:
    """The functions with the most own time: ``(name, µs per operation)``."""
    stats = pstats.Stats(profile)
    rows = []
    for (filename, line, name), (_, _, own, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = name if filename == "~" else f"{Path(filename).name}:{line}({name})"
        rows.append((where, own / ops * 1e6))
    return sorted(rows, key=lambda row: -row[1])[:count]


async def _phase_times(
    target: StoreTarget, content: Content, ops: int, profile: bool
) -> dict[str, Any]:
    manager = CheckpointManager(
        target.open(), config=CheckpointConfig(max_checkpoints_per_run=DEFAULT_KEEP))
    run_id = unique_run_id("profile")
    phases: dict[str, Callable[[], Awaitable[Any]]] = {
        "create": functools.partial(manager.create, run_id, content.state,
                                    messages=content.messages),
        "restore": functools.partial(manager.restore, run_id),
    }
    result: dict[str, Any] = {}
    try:
        for _ in range(DEFAULT_KEEP):  # steady state: pruning active from the first timed create
            await phases["create"]()
        for phase, operation in phases.items():
            profiler = cProfile.Profile() if profile else None
            start = time.perf_counter_ns()
            if profiler is not None:
                profiler.enable()
            for _ in range(ops):
                await operation()
            if profiler is not None:
                profiler.disable()
            result[phase] = (time.perf_counter_ns() - start) / ops / 1e3
            if profiler is not None:
                result[f"{phase}_profile"] = _breakdown(profiler, ops)
                result[f"{phase}_top"] = _top_functions(profiler, ops)
    finally:
        await manager.delete_run(run_id)
        await manager.aclose()
    return result


async def _profile_store(
    target: StoreTarget, content: Content, ops: int, rounds: int
) -> dict[str, Any]:
    threaded: list[dict[str, Any]] = []
    inline: list[dict[str, Any]] = []
    for _ in range(rounds):  # alternated, so machine noise hits both alike
        with counting_syscalls() as counts:
            threaded.append(await _phase_times(target, content, ops, profile=False))
        with inline_thread_hops():
            inline.append(await _phase_times(target, content, ops, profile=False))
    with inline_thread_hops():
        profiled = await _phase_times(target, content, ops, profile=True)
    hops = counts["thread_hops"]
    summary: dict[str, Any] = {}
    for phase in ("create", "restore"):
        summary[phase] = {
            "threaded_us": statistics.median(run[phase] for run in threaded),
            "inline_us": statistics.median(run[phase] for run in inline) if hops else None,
            "profile": profiled[f"{phase}_profile"],
            "top": profiled[f"{phase}_top"],
        }
    return summary


def codec_costs(content: Content, iterations: int) -> dict[str, float]:
    """µs per call of the codec's steps on this content (median of 5 batches)."""
    from fastcheckpoint._codec import (  # private: measured, never relied on
        Codec,
        Payload,
        _lossless_only,
    )

    codec = Codec()
    payload = Payload(content.state, content.messages, [], {})
    encoder = msgspec.msgpack.Encoder()
    decoder = msgspec.msgpack.Decoder(Payload)
    body = encoder.encode(payload)
    blob = codec.encode_payload(content.state, content.messages, [], {})
    decoded = decoder.decode(body)
    steps: dict[str, Callable[[], Any]] = {
        "msgpack encode (Payload struct)": lambda: encoder.encode(payload),
        "check: lossless-types screen": lambda: _lossless_only(payload),
        "check outside the screen: decode": lambda: decoder.decode(body),
        "check outside the screen: compare": lambda: decoded == payload,
        "CRC-32 of the body": lambda: zlib.crc32(body),
        "Codec.encode_payload (all of the above)": lambda: codec.encode_payload(
            content.state, content.messages, [], {}),
        "Codec.decode_payload (restore)": lambda: codec.decode_payload(blob, "profile"),
    }
    costs: dict[str, float] = {}
    for name, step in steps.items():
        batches = []
        for _ in range(5):
            start = time.perf_counter_ns()
            for _ in range(iterations):
                step()
            batches.append((time.perf_counter_ns() - start) / iterations / 1e3)
        costs[name] = statistics.median(batches)
    return costs


def _markdown(results: dict[str, dict[str, Any]], codec: dict[str, float], ops: int) -> str:
    lines = [f"# Where W1's time goes ({ops} creates and {ops} restores per measurement)", "",
             "Mean µs are medians over alternated rounds; cProfile slows Python code more "
             "than C code, so its µs are larger than the unprofiled means.", ""]
    lines += ["## Codec steps on W1 content (µs per call)", "", "| step | µs |", "| --- | ---: |"]
    lines += [f"| {name} | {value:.1f} |" for name, value in codec.items()]
    encode = codec["msgpack encode (Payload struct)"]
    screen = codec["check: lossless-types screen"]
    exact = codec["check outside the screen: decode"] + codec["check outside the screen: compare"]
    lines += ["", f"The create-time check costs {screen:.1f} µs ({screen / encode:.1f}x the "
              f"encode it checks) for content made only of dict, list, str, int, float, bool, "
              f"None and bytes, like this one; other content takes the decode + compare check, "
              f"{exact:.1f} µs ({exact / encode:.1f}x).", ""]
    for label, phases in results.items():
        lines += [f"## {label}", "", "| phase | mean µs | without thread hop | hop µs |",
                  "| --- | ---: | ---: | ---: |"]
        for phase, data in phases.items():
            inline = data["inline_us"]
            if inline is None:  # the store never leaves the event loop thread
                lines.append(f"| {phase} | {data['threaded_us']:.1f} | - | 0 (no hop) |")
                continue
            lines.append(f"| {phase} | {data['threaded_us']:.1f} | {inline:.1f} | "
                         f"{data['threaded_us'] - inline:.1f} |")
        lines += ["", "cProfile own time by category (µs per operation, thread hop inlined; "
                  "profiling inflates Python code):", "",
                  "| category | create | restore |", "| --- | ---: | ---: |"]
        categories = sorted(
            set(phases["create"]["profile"]) | set(phases["restore"]["profile"]),
            key=lambda name: -phases["create"]["profile"].get(name, 0.0),
        )
        for category in categories:
            create = phases["create"]["profile"].get(category, 0.0)
            restore = phases["restore"]["profile"].get(category, 0.0)
            lines.append(f"| {category} | {create:.1f} | {restore:.1f} |")
        for phase, data in phases.items():
            lines += ["", f"Most own time in {phase} (µs per operation, profiled):", ""]
            lines += [f"- {name}: {micros:.1f}" for name, micros in data["top"]]
        lines.append("")
    return "\n".join(lines)


async def _run(urls: list[str] | None, ops: int, rounds: int) -> dict[str, dict[str, Any]]:
    content = make_content(Sizes().state_bytes, Sizes().messages)
    results: dict[str, dict[str, Any]] = {}
    with prepared_targets(urls) as prepared:
        for target in prepared.targets:
            await target.prepare()
            results[target.label] = await _profile_store(target, content, ops, rounds)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", action="append", metavar="URL",
                        help="store URL (repeatable); default: memory and file stores")
    parser.add_argument("--ops", type=int, default=500, help="operations per measurement")
    parser.add_argument("--rounds", type=int, default=5,
                        help="measurements with and without the thread hop (medians)")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "profile.md")
    args = parser.parse_args(argv)
    results = anyio.run(_run, args.store, args.ops, args.rounds)
    text = _markdown(results, codec_costs(make_content(Sizes().state_bytes, Sizes().messages),
                                          1000), args.ops)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
