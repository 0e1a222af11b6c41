"""The ``fastcheckpoint`` command: provisioning and benchmarks.

``fastcheckpoint init URL`` creates what a store needs (idempotent). ``fastcheckpoint bench``
runs the benchmark suite, which lives in the repository's ``benchmarks/`` (an editable
install of a checkout has it). The inspection commands of the specification (runs, show,
history, export...) are not built yet.

Exit codes: 0 done, 1 the store failed, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import anyio

from fastcheckpoint.errors import CheckpointError, ConfigurationError
from fastcheckpoint.stores import SupportsProvision, open_store

__all__ = ["main"]

EXIT_OK = 0
EXIT_STORE = 1
EXIT_USAGE = 2


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastcheckpoint", description="fastcheckpoint: provisioning and benchmarks."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    init = commands.add_parser(
        "init", help="create what a store needs (DynamoDB table, S3 bucket...); idempotent"
    )
    init.add_argument("url", metavar="URL", help="store URL, e.g. dynamodb://Table?bucket=b")
    init.set_defaults(run=_run_init)
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
    code: int = args.run(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
