"""Work handed to a worker thread, the one way the package hops off the event loop.

* A thread that cannot start (a process at its thread limit: ``RuntimeError: can't start
  new thread``, the runtime's own error) is a :class:`~fastcheckpoint.errors.StoreError`:
  every public call raises only :class:`~fastcheckpoint.errors.CheckpointError`. Nothing
  ran, so the operation changed nothing.
* A cancelled caller sees its cancellation only once the function has finished, or when it
  will never run. anyio and trio hold a cancellation back while a worker thread runs, but
  asyncio's own (``task.cancel()``, ``asyncio.wait_for``, ``asyncio.timeout``; LangGraph
  cancels its tasks that way) returns at once while the thread goes on: a store call would
  then land after its caller, and the calls that come after it, took it for not made.

What the function itself raises passes through unchanged.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from fastcheckpoint.errors import StoreError

__all__ = ["in_worker_thread"]

_T = TypeVar("_T")
_POLL_SECONDS = 0.001
"""How often a cancelled caller looks whether its worker thread has finished."""


class _Abandoned(Exception):
    """The caller was cancelled before the worker thread began: the function is not run."""


async def in_worker_thread(func: Callable[..., _T], *args: Any) -> _T:
    """``func(*args)`` in a worker thread (``anyio.to_thread.run_sync``)."""
    lock = threading.Lock()
    began = abandoned = False
    finished = threading.Event()

    def call() -> _T:
        nonlocal began
        with lock:
            if abandoned:
                raise _Abandoned
            began = True
        try:
            return func(*args)
        finally:
            finished.set()

    try:
        return await anyio.to_thread.run_sync(call)
    except RuntimeError as exc:
        if began:
            raise
        raise StoreError(f"could not start a worker thread: {exc}") from exc
    except BaseException:
        with lock:
            abandoned = not began
        if not abandoned:
            await _finished(finished)
        raise


async def _finished(done: threading.Event) -> None:
    """Wait for ``done`` through asyncio's own cancellations (each is delivered once; the
    caller raises the first when this returns)."""
    with anyio.CancelScope(shield=True):
        while not done.is_set():
            try:
                await anyio.sleep(_POLL_SECONDS)
            except anyio.get_cancelled_exc_class():
                continue
