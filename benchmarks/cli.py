"""``python -m benchmarks``: run the suite, show progress, write results, print a summary."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from benchmarks.report import machine_info, ratios, render, targets, to_markdown, write_outputs
from benchmarks.settings import Sizes
from benchmarks.suite import run_suite
from benchmarks.workloads import WORKLOADS

__all__ = ["main"]

RESULTS = Path(__file__).resolve().parent / "results"


def _split(values: Sequence[str] | None) -> list[str] | None:
    if not values:
        return None
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark fastcheckpoint stores on workloads W1-W6 (sequential, "
                    "concurrent, large, pruning, scaling, multi-process), W7 (a long "
                    "conversation) and G1 (a LangGraph graph); docs/benchmarks.md describes "
                    "each.",
    )
    parser.add_argument(
        "--store", action="append", metavar="URL[,URL...]",
        help="store URL(s) to benchmark (repeatable); default: memory://, temporary "
             "file:// stores with fsync on and off, a temporary sqlite:// database, and "
             "the Redis, PostgreSQL and moto (S3, DynamoDB) servers reachable here",
    )
    parser.add_argument("--workload", action="append", metavar="W1,W2,...",
                        help=f"workloads to run; default: all of {', '.join(WORKLOADS)}; "
                             "W7 (a long conversation) and G1 (a LangGraph graph on each store's "
                             "saver) only when named")
    parser.add_argument("--compare", action="store_true",
                        help="also run W1, W4 and W7 on FastAgentic's stores and LangGraph's "
                             "savers (and G1 on LangGraph's savers)")
    parser.add_argument("--compare-only", metavar="SYSTEM", choices=("fastagentic", "langgraph"),
                        help="with --compare: only this system's stores or savers")
    parser.add_argument("--w5-levels", metavar="N,N,...",
                        help="W5's run lengths, ascending (default 10,1000,10000; "
                             "--quick 10,100,1000), e.g. 10,1000,10000,100000")
    parser.add_argument("--graph-steps", type=int, metavar="N",
                        help="G1's steps per thread (default 50; --quick 50 too)")
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes (what make bench runs)")
    parser.add_argument("--repetitions", type=int, metavar="N",
                        help="repetitions per workload (default 3; numbers are medians)")
    parser.add_argument("--out", type=Path, default=RESULTS, metavar="DIR",
                        help=f"where results go (default {RESULTS})")
    parser.add_argument("--name", metavar="STEM",
                        help="file name stem of the results (default: quick or full)")
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--render", type=Path, metavar="RESULTS.json",
                        help="only rewrite the Markdown and PNG beside an earlier JSON")
    return parser


@contextmanager
def _progress(enabled: bool) -> Iterator[tuple[Callable[[int], None], Callable[[str], None]]]:
    """``(set total, advance with label)``: a tqdm bar, or plain lines when tqdm is missing."""
    state: dict[str, object] = {"done": 0, "total": 0, "bar": None}

    def plan(total: int) -> None:
        state["total"] = total
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            print(f"(install tqdm for a progress bar) {total} steps", file=sys.stderr)
            return
        state["bar"] = tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr)

    def advance(label: str) -> None:
        state["done"] = int(state["done"]) + 1  # type: ignore[call-overload]
        bar = state["bar"]
        if bar is not None:
            bar.set_postfix_str(label)  # type: ignore[attr-defined]
            bar.update(1)  # type: ignore[attr-defined]
        elif enabled:
            print(f"[{state['done']}/{state['total']}] {label}", file=sys.stderr)

    try:
        yield plan, advance
    finally:
        if state["bar"] is not None:
            state["bar"].close()  # type: ignore[attr-defined]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.render is not None:
        print("wrote " + ", ".join(str(path) for path in render(args.render)))
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sizes = (Sizes.quick() if args.quick else Sizes.full()).with_repetitions(args.repetitions)
    try:
        levels = _split([args.w5_levels] if args.w5_levels else None)
        sizes = sizes.with_w5_levels(tuple(int(level) for level in levels) if levels else None)
    except ValueError as exc:
        print(f"error: --w5-levels: {exc}", file=sys.stderr)
        return 2
    if args.graph_steps is not None:
        if args.graph_steps < 1:
            print("error: --graph-steps: at least 1", file=sys.stderr)
            return 2
        sizes = replace(sizes, graph_steps=args.graph_steps)
    if sizes.repetitions < 3:
        print(f"note: {sizes.repetitions} repetition(s); published numbers use at least 3",
              file=sys.stderr)
    try:
        with _progress(not args.no_progress) as (plan, advance):
            report = run_suite(
                _split(args.store), _split(args.workload), sizes, compare=args.compare,
                compare_only=args.compare_only,
                progress=advance, on_plan=plan, backend=args.backend,
            )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stem = args.name or ("quick" if args.quick else "full")
    written = write_outputs(report, args.out, stem)
    print(to_markdown(report, machine_info()))
    for row in ratios(report):
        if row["workload"] == "W1" and row["phase"] in ("create", "restore"):
            print(f"ratio {row['workload']} {row['phase']}: {row['store']} is "
                  f"{row['ratio']:.2f}x {row['versus']}")
    print("wrote " + ", ".join(str(path) for path in written))
    failed = [result for result in report.results if result.error]
    missed = [row for row in targets(report) if row["met"] is False]
    if missed:
        print(f"{len(missed)} target(s) not met (see the Targets table)", file=sys.stderr)
    if failed:
        print(f"{len(failed)} workload(s) failed: "
              + "; ".join(f"{r.workload} {r.subject}: {r.error}" for r in failed), file=sys.stderr)
        return 1
    return 0
