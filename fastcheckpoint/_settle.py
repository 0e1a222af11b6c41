"""Changes awaited to their end whatever cancels the caller meanwhile.

A change that several store calls make (an event and the state it changes, a clean-up after a
failed write) must not be cut short between two of them by the caller's cancellation. anyio's
shield (``CancelScope(shield=True)``) holds back anyio's and trio's cancellations, but not
asyncio's own (``task.cancel()``, ``asyncio.wait_for``, ``asyncio.timeout``; LangGraph, the
OpenAI Agents SDK and ADK cancel that way): those interrupt whatever the task awaits, shield
or not. :func:`settled` runs the change as a task of its own on asyncio and waits for it
through both kinds; the caller's cancellation is raised once the change has ended.

A change known to complete without suspending (calls to a store whose calls never suspend,
:func:`~fastcheckpoint.stores.never_suspends`) cannot be cut: nothing can deliver a
cancellation before it ends. ``settled(change, instant=True)`` runs it at once in the caller's
task, without the task and the two event-loop turns that waiting for one costs.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import types
from collections.abc import Awaitable, Coroutine, Generator
from typing import Any, TypeVar

import anyio
import anyio.lowlevel

from fastcheckpoint.stores._loops import running_library

__all__ = ["settled"]

_T = TypeVar("_T")

logger = logging.getLogger("fastcheckpoint")


async def settled(change: Awaitable[_T], *, instant: bool = False) -> _T:
    """Await ``change`` to its end even if the caller is cancelled meanwhile, then raise the
    cancellation (what ``change`` returned is dropped for it, what it raised is logged);
    otherwise return what ``change`` returns, or raise what it raises.

    ``instant``: ``change`` is a coroutine that completes without suspending; it runs at once.
    Should it suspend after all (a store that claims it never does, wrongly), it is awaited
    from there like any coroutine, unshielded, and a warning says so."""
    if instant and isinstance(change, types.CoroutineType):
        return await _at_once(change)
    if running_library() != "asyncio":
        with anyio.CancelScope(shield=True):
            result = await change
        await anyio.lowlevel.checkpoint_if_cancelled()
        return result
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(change, loop=loop)
    cancelled: asyncio.CancelledError | None = None
    with anyio.CancelScope(shield=True):  # anyio's own cancellations wait outside
        while not task.done():
            # A future of its own to wait on: a cancellation of the caller cancels it, not
            # the task (cheaper than asyncio.wait, which the hot paths of the savers pay).
            waiter = loop.create_future()
            task.add_done_callback(functools.partial(_wake, waiter))
            try:
                await waiter
            except asyncio.CancelledError as exc:  # asyncio's own: once each
                cancelled = cancelled or exc
    failure = None if task.cancelled() else task.exception()  # retrieved either way
    try:
        if cancelled is not None:
            raise cancelled
        await anyio.lowlevel.checkpoint_if_cancelled()  # anyio's, held back meanwhile
    except BaseException:
        if failure is not None:  # the caller gets its cancellation: say what it hides
            logger.warning("a change failed while its caller was being cancelled: %s",
                           failure, exc_info=failure)
        raise
    return task.result()


async def _at_once(change: Coroutine[Any, Any, _T]) -> _T:
    try:
        suspended = change.send(None)
    except StopIteration as done:
        result: _T = done.value
        return result
    logger.warning("a change expected to complete at once suspended (%s); a cancellation can "
                   "cut it short from there", getattr(change, "__qualname__", change))
    return await _resumed(change, suspended)


@types.coroutine
def _resumed(change: Coroutine[Any, Any, _T], suspended: Any) -> Generator[Any, Any, _T]:
    """``change``, suspended once (its first step yielded ``suspended``), awaited from there:
    what the event loop sends or throws goes to it, what it yields goes to the event loop."""
    try:
        while True:
            try:
                sent = yield suspended
            except GeneratorExit:
                change.close()
                raise
            except BaseException as exc:  # delivered to the change, as an await does
                suspended = change.throw(exc)
            else:
                suspended = change.send(sent)
    except StopIteration as done:
        result: _T = done.value
        return result


def _wake(waiter: asyncio.Future[None], _task: object) -> None:
    if not waiter.done():
        waiter.set_result(None)
