"""Calls run concurrently, with one error for callers (never an ``ExceptionGroup``).

Callers of the stores and adapters catch :class:`~fastcheckpoint.errors.CheckpointError`; a
task group wraps what its tasks raise in a group, which these helpers unwrap.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

import anyio

from fastcheckpoint.errors import CheckpointError

if sys.version_info < (3, 11):
    # anyio installs the backport on 3.10; the type checker may run where it is absent.
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found,unused-ignore]

__all__ = ["gather", "one_error", "pair"]

_T = TypeVar("_T")
_A = TypeVar("_A")
_B = TypeVar("_B")

_PARALLEL = 16  # concurrent requests per batch: enough to hide latency, few enough for pools


async def gather(
    calls: Sequence[Callable[[], Awaitable[_T]]], *, parallel: int = _PARALLEL
) -> list[_T]:
    """Run ``calls`` concurrently (at most ``parallel`` at a time); results in call order.

    A failure cancels the other calls and is raised alone (see :func:`one_error`).
    """
    results: list[Any] = [None] * len(calls)
    limiter = anyio.CapacityLimiter(parallel)

    async def run(index: int, call: Callable[[], Awaitable[_T]]) -> None:
        async with limiter:
            results[index] = await call()

    if len(calls) == 1:
        return [await calls[0]()]
    with one_error():
        async with anyio.create_task_group() as group:
            for index, call in enumerate(calls):
                group.start_soon(run, index, call)
    return results


async def pair(
    first: Callable[[], Awaitable[_A]], second: Callable[[], Awaitable[_B]]
) -> tuple[_A, _B]:
    """Two different requests at once: one round trip instead of two. A failure cancels the
    other request and is raised alone (see :func:`one_error`)."""
    results: list[Any] = [None, None]

    async def run(index: int, call: Callable[[], Awaitable[Any]]) -> None:
        results[index] = await call()

    with one_error():
        async with anyio.create_task_group() as group:
            group.start_soon(run, 0, first)
            group.start_soon(run, 1, second)
    return results[0], results[1]


@contextlib.contextmanager
def one_error() -> Iterator[None]:
    """Turn the ``ExceptionGroup`` of a failed task group into one exception.

    Callers of the stores catch :class:`CheckpointError`, never a group: the first of our
    errors is raised (its driver exception stays chained), else the first other failure.
    A group holding a cancellation or an interrupt (a ``BaseException`` that is not an
    ``Exception``) is re-raised as it is, so cancellation keeps working.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if not all(isinstance(leaf, Exception) for leaf in leaves):
            raise
        chosen = next((leaf for leaf in leaves if isinstance(leaf, CheckpointError)), leaves[0])
    else:
        return
    # Raised outside the handler: the chosen error keeps its own cause and context.
    raise chosen


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            found += _leaves(error)
        else:
            found.append(error)
    return found
