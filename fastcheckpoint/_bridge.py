"""Blocking calls into async code: the one way synchronous interfaces reach the library
(:class:`fastcheckpoint.blocking.BlockingManager`, the LangGraph saver's blocking methods).

A blocking call runs its coroutine on the loop the bridge is bound to (the asyncio loop
running when its owner was built, or entered with ``async with``), from the caller's thread,
and waits for it. Called on that loop's own thread it would wait for itself forever, so it
raises instead. With no bound loop running (a program without asyncio, or after the bound
loop ended) the bridge starts a loop of its own in a daemon thread on first use; ``stop()``
ends it. Stores opened from that thread live on its loop, so they are closed through it too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, TypeVar

from fastcheckpoint.errors import ConfigurationError, StoreError

_T = TypeVar("_T")

_POLL_SECONDS = 0.25
"""How often a waiting caller checks that the loop running its call still runs."""
_STOP_SECONDS = 10.0


class LoopBridge:
    """Runs coroutines for callers outside the event loop; see the module docstring.
    ``owner`` names what the bridge serves in error messages (``"the saver"``)."""

    def __init__(self, owner: str = "the manager") -> None:
        self._owner = owner
        self._lock = threading.Lock()
        self._bound: asyncio.AbstractEventLoop | None = None
        self._own: asyncio.AbstractEventLoop | None = None
        self._own_thread: threading.Thread | None = None

    def bind(self) -> None:
        """Bind to the running asyncio loop, unless bound to one that still runs."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        with self._lock:
            if self._bound is None or self._bound.is_closed() or not self._bound.is_running():
                self._bound = loop

    def call(self, make: Callable[[], Coroutine[Any, Any, _T]], name: str) -> _T:
        """Run ``make()`` on the bridge's loop and return its result (or raise its error)."""
        loop = self._target(name)
        return self._wait(asyncio.run_coroutine_threadsafe(make(), loop), loop, name)

    def iterate(self, items: AsyncIterator[_T], name: str) -> Iterator[_T]:
        """Iterate ``items`` on the bridge's loop, one item per round trip to it."""
        loop = self._target(name)
        try:
            while True:
                done, item = self._wait(
                    asyncio.run_coroutine_threadsafe(_next(items), loop), loop, name)
                if done:
                    return
                yield item  # type: ignore[misc]  # not done: an item
        finally:
            close = getattr(items, "aclose", None)
            if close is not None and not loop.is_closed():
                self._wait(asyncio.run_coroutine_threadsafe(close(), loop), loop, name)

    def stop(self) -> None:
        """Stop the bridge's own loop thread, if it started one (the bound loop is the
        caller's: never stopped here)."""
        with self._lock:
            loop, thread = self._own, self._own_thread
            self._own = self._own_thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        if threading.current_thread() is not thread:
            thread.join(_STOP_SECONDS)

    def _target(self, name: str) -> asyncio.AbstractEventLoop:
        try:
            current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        bound = self._bound
        if bound is not None and bound.is_running():
            if current is bound:
                raise ConfigurationError(
                    f"{name}() blocks until the store answers, and it was called on the event "
                    f"loop {self._owner} is bound to, which would wait for itself forever: "
                    f"use the async API there, or call {name}() from another thread "
                    "(asyncio.to_thread)")
            return bound
        own = self._own_loop()
        if current is own:
            raise ConfigurationError(
                f"{name}() was called on {self._owner}'s own event loop thread; use the "
                "async API there")
        return own

    def _own_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._own is not None:
                return self._own
            loop = asyncio.new_event_loop()
            ready = threading.Event()
            thread = threading.Thread(
                target=_run_forever, args=(loop, ready), name="fastcheckpoint-loop",
                daemon=True)
            try:
                thread.start()
            except RuntimeError as exc:  # a process at its thread limit
                loop.close()
                raise StoreError(
                    f"could not start {self._owner}'s event loop thread: {exc}") from exc
            ready.wait()
            self._own, self._own_thread = loop, thread
            return loop

    def _wait(
        self,
        future: concurrent.futures.Future[_T], loop: asyncio.AbstractEventLoop, name: str
    ) -> _T:
        while True:
            try:
                return future.result(timeout=_POLL_SECONDS)
            except concurrent.futures.TimeoutError:
                if loop.is_running():
                    continue
                future.cancel()
                raise ConfigurationError(
                    f"{name}(): the event loop running it stopped before it finished "
                    f"({self._owner}'s loop ended; build it where its loop lives, or close it "
                    "before the loop ends)") from None
            except concurrent.futures.CancelledError as exc:
                raise ConfigurationError(
                    f"{name}() was cancelled: its event loop shut down") from exc


async def _next(items: AsyncIterator[_T]) -> tuple[bool, _T | None]:
    try:
        return False, await items.__anext__()
    except StopAsyncIteration:
        return True, None


def _run_forever(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
    asyncio.set_event_loop(loop)
    loop.call_soon(ready.set)
    try:
        loop.run_forever()
    finally:
        # Closes what stores opened on this loop (their clients are closed by its shutdown).
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
