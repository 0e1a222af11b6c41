"""Work handed to a worker thread, the one way the package hops off the event loop.

``anyio.to_thread.run_sync`` raises the runtime's own error when it cannot start a thread (a
process at its thread limit: ``RuntimeError: can't start new thread``); every public call
raises only :class:`~fastcheckpoint.errors.CheckpointError`, so that failure becomes a
:class:`~fastcheckpoint.errors.StoreError` here. Nothing ran: the operation changed nothing.
What the function itself raises passes through unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import anyio.to_thread

from fastcheckpoint.errors import StoreError

__all__ = ["in_worker_thread"]

_T = TypeVar("_T")


async def in_worker_thread(func: Callable[..., _T], *args: Any) -> _T:
    """``func(*args)`` in a worker thread (``anyio.to_thread.run_sync``)."""
    began = False

    def call() -> _T:
        nonlocal began
        began = True
        return func(*args)

    try:
        return await anyio.to_thread.run_sync(call)
    except RuntimeError as exc:
        if began:
            raise
        raise StoreError(f"could not start a worker thread: {exc}") from exc
