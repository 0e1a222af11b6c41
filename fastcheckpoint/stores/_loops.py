"""Which async library is running, and driver clients kept per asyncio event loop.

Drivers built on asyncio (redis-py, aiobotocore) bind their connections to the event loop
that opened them. A store used from several ``asyncio.run()`` calls (a module-level manager,
as FastAgentic's docs write it) must therefore build one client per loop, and a store whose
driver needs asyncio must say so on trio instead of failing inside the driver.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import sys
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, Generic, ParamSpec, TypeVar, cast

from fastcheckpoint.errors import ConfigurationError

__all__ = ["CLOSE_WAIT_S", "GivenClientLoop", "PerLoop", "holds_clients", "require_asyncio",
           "running_library"]

_T = TypeVar("_T")
_P = ParamSpec("_P")
_R = TypeVar("_R")

CLOSE_WAIT_S = 10.0
"""How long closing a client waits for the calls holding it: a call hanging on a server that
never answers must not hang the close (the calls still running then fail)."""

logger = logging.getLogger("fastcheckpoint.stores")


def running_library() -> str | None:
    """``"asyncio"``, ``"trio"`` or ``None`` outside any event loop.

    Checked without sniffio (which anyio no longer installs): trio is running only if it was
    imported, and asks nothing of a program that never imported it.
    """
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            pass
        else:
            return "trio"
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return None
    return "asyncio"


def require_asyncio(store: str, driver: str) -> asyncio.AbstractEventLoop:
    """The running asyncio loop, or :class:`ConfigurationError` saying ``store`` needs one.

    Call it before sending anything, so nothing is half-done when the error is raised.
    """
    library = running_library()
    if library != "asyncio":
        where = f"under {library}" if library else "outside an event loop"
        raise ConfigurationError(
            f"{store} runs on asyncio only ({driver} needs an asyncio event loop), but it was "
            f"called {where}; on trio use MemoryStore, FileStore or SQLiteStore, or run this store "
            "under asyncio (anyio.run(main, backend='asyncio'))"
        )
    return asyncio.get_running_loop()


class _Held(Generic[_T]):
    """A resource built for one loop, and how many store calls hold it (see
    :func:`holds_clients`)."""

    def __init__(self, resource: _T, loop: asyncio.AbstractEventLoop) -> None:
        self.resource = resource
        self.loop = loop
        self.calls = 0
        self.closing = False
        self.closed_under_calls = False
        self._idle: asyncio.Event | None = None

    def release(self) -> bool:
        """Let go of the resource; True if this was the last call holding it and it was
        closed under such calls (they may have reconnected it): close it again."""
        self.calls -= 1
        if not self.calls and self._idle is not None:
            self._idle.set()
        return not self.calls and self.closed_under_calls

    async def idle(self) -> None:
        """Return once no call holds the resource."""
        if self.calls:
            self._idle = asyncio.Event()
            await self._idle.wait()


class _Call:
    """The resources one store call holds until it returns."""

    def __init__(self) -> None:
        self.held: dict[tuple[PerLoop[Any], asyncio.AbstractEventLoop], _Held[Any]] = {}
        self.ended = False


_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar(
    "fastcheckpoint_store_call", default=None)


@contextlib.asynccontextmanager
async def _holding() -> AsyncIterator[None]:
    if (outer := _CALL.get()) is not None and not outer.ended:
        yield  # a call inside another: the outer one holds what both use
        return
    call = _Call()
    token = _CALL.set(call)
    try:
        yield
    finally:
        _CALL.reset(token)
        call.ended = True  # a task the call started and left running holds nothing
        again = [owner._close_again(held)
                 for (owner, _), held in call.held.items() if held.release()]
        if again:
            # Shielded: a cancelled call must not leave what it reconnected open.
            await asyncio.shield(asyncio.gather(*again))


def holds_clients(
    method: Callable[_P, Coroutine[Any, Any, _R]],
) -> Callable[_P, Coroutine[Any, Any, _R]]:
    """Mark a store's public call: the :class:`PerLoop` resources it gets (each once; later
    gets in the call, and in the tasks it starts, return the same one) are held until it
    returns, and closing one waits for the calls holding it (:meth:`PerLoop.aclose`)."""

    @functools.wraps(method)
    async def call(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        async with _holding():
            return await method(*args, **kwargs)

    return call


class PerLoop(Generic[_T]):
    """One resource (a driver client) per asyncio event loop, built on first use in each.

    Concurrent first users in one loop share one build; a build that failed (or was
    cancelled) is not kept, so the next user builds again. Each resource is closed in its own
    loop when that loop shuts down (``asyncio.run()`` finalizes async generators before it
    closes the loop, and each resource is guarded by one), so a module-level store used by
    several ``asyncio.run()`` calls leaves no connection open; entries of closed loops are
    dropped when another loop builds its own. :meth:`aclose` closes the resources of the
    running loop and of the other loops running.

    Closing a resource waits for the calls holding it (methods marked :func:`holds_clients`),
    at most :data:`CLOSE_WAIT_S`; a resource being closed is never handed out again: the next
    :meth:`get` builds a new one. One closed while calls still held it is closed again as the
    last of them returns (redis-py reconnects a client closed under a running command), unless
    it was built again meanwhile (a client handed to the store is built again as itself).
    """

    def __init__(
        self,
        build: Callable[[], Coroutine[Any, Any, _T]],
        close: Callable[[_T], Awaitable[None]],
        *,
        store: str,
        driver: str,
    ) -> None:
        self._build = build
        self._close = close
        self._store = store
        self._driver = driver
        self._by_loop: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, asyncio.Future[_Held[_T]]
        ] = weakref.WeakKeyDictionary()
        self._guards: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, AsyncGenerator[None, None]
        ] = weakref.WeakKeyDictionary()

    async def get(self) -> _T:
        loop = require_asyncio(self._store, self._driver)
        call = _CALL.get()
        if call is not None and call.ended:
            call = None
        while True:
            if call is not None and (mine := call.held.get((self, loop))) is not None:
                return cast(_T, mine.resource)  # held by this call since its first get
            held = await self._held(loop)
            if held.closing:
                continue  # aclose() took it while this call waited: the next one is built
            if call is None:
                return held.resource
            if (self, loop) not in call.held:  # else a task of the call got one meanwhile
                held.calls += 1
                call.held[self, loop] = held

    async def _held(self, loop: asyncio.AbstractEventLoop) -> _Held[_T]:
        pending = self._by_loop.get(loop)
        if pending is None or _failed(pending):  # failed while all its callers were cancelled
            self._drop_closed_loops()
            pending = loop.create_task(self._build_guarded(loop))
            self._by_loop[loop] = pending
        try:
            # Shielded: one caller's cancellation must not cancel the build others wait for.
            return await asyncio.shield(pending)
        except BaseException:
            if _failed(pending) and self._by_loop.get(loop) is pending:
                del self._by_loop[loop]  # a failed build is not kept: the next call tries again
            raise

    async def _build_guarded(self, loop: asyncio.AbstractEventLoop) -> _Held[_T]:
        held = _Held(await self._build(), loop)
        guard = self._closing(held)
        await guard.asend(None)  # first iteration: the loop now finalizes it at shutdown
        self._guards[loop] = guard
        return held

    async def _closing(self, held: _Held[_T]) -> AsyncGenerator[None, None]:
        """Closes the resource when finalized (by the loop's shutdown, or by :meth:`aclose`)
        once the calls holding it have returned, or after :data:`CLOSE_WAIT_S`."""
        try:
            yield
        finally:
            held.closing = True
            self._forget(held)
            try:
                await asyncio.wait_for(held.idle(), CLOSE_WAIT_S)
            except asyncio.TimeoutError:
                logger.warning("%s: closing a %s client %d calls still use after %g s",
                               self._store, self._driver, held.calls, CLOSE_WAIT_S)
                held.closed_under_calls = True
            finally:
                await self._close_logged(held.resource)

    async def _close_again(self, held: _Held[_T]) -> None:
        pending = self._by_loop.get(held.loop)
        if pending is not None:
            await asyncio.wait([pending])
            if not _failed(pending) and pending.result().resource is held.resource:
                return  # built again as itself, and in use: its own close comes later
        await self._close_logged(held.resource)

    async def _close_logged(self, resource: _T) -> None:
        try:
            await self._close(resource)
        except Exception:
            logger.warning("%s: closing a %s client failed", self._store, self._driver,
                           exc_info=True)

    def _forget(self, held: _Held[_T]) -> None:
        pending = self._by_loop.get(held.loop)
        if pending is not None and pending.done() and not _failed(pending) \
                and pending.result() is held:
            del self._by_loop[held.loop]

    def _drop_closed_loops(self) -> None:
        for loop in [loop for loop in self._by_loop if loop.is_closed()]:
            del self._by_loop[loop]
            self._guards.pop(loop, None)

    def current(self) -> _T | None:
        """The resource of the running loop if it was built already (no I/O)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        pending = self._by_loop.get(loop)
        if pending is None or not pending.done() or _failed(pending):
            return None
        return pending.result().resource

    async def aclose(self) -> None:
        """Close the running loop's resource, waiting for it if it is being built (else it
        would be built after this and never closed), and those of the other loops running,
        each in its own loop. A resource of a loop that is not running (nor closed) is let go:
        that loop closes it when it runs again (asyncio finalizes the guard there)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not in an asyncio loop: it built nothing here
            self._by_loop.clear()
            self._guards.clear()
            return
        pending = self._by_loop.get(loop)
        self._by_loop.clear()
        others = {other: guard for other, guard in self._guards.items() if other is not loop}
        for other in others:
            del self._guards[other]
        elsewhere = _close_elsewhere(others)
        if pending is not None:
            with contextlib.suppress(Exception):  # a build that failed: nothing to close
                await asyncio.shield(pending)
        guard = self._guards.pop(loop, None)
        self._guards.clear()
        if guard is not None:
            await guard.aclose()  # closes the resource, once
        if elsewhere:
            await asyncio.wait(elsewhere, timeout=CLOSE_WAIT_S + _CLOSE_SLACK_S)


_CLOSE_SLACK_S = 5.0
"""How much longer than :data:`CLOSE_WAIT_S` :meth:`PerLoop.aclose` waits for the close of
another loop's resource (the close itself, after the wait for its calls)."""


def _close_elsewhere(
    guards: dict[asyncio.AbstractEventLoop, AsyncGenerator[None, None]],
) -> set[asyncio.Future[None]]:
    """Start closing each guard's resource in its own loop, if that loop is running."""
    started: set[asyncio.Future[None]] = set()
    for loop, guard in guards.items():
        if loop.is_closed() or not loop.is_running():
            continue
        close = _finalize(guard)
        try:
            started.add(asyncio.wrap_future(asyncio.run_coroutine_threadsafe(close, loop)))
        except RuntimeError:  # that loop was closed meanwhile (and finalized the guard)
            close.close()
    return started


async def _finalize(guard: AsyncGenerator[None, None]) -> None:
    try:
        await guard.aclose()
    except Exception:  # e.g. its loop shutting down finalizes it at the same time
        logger.warning("closing a client in its own event loop failed", exc_info=True)


def _failed(build: asyncio.Future[Any]) -> bool:
    """Whether a build ended without a resource (its exception counts as retrieved)."""
    return build.done() and (build.cancelled() or build.exception() is not None)


class GivenClientLoop:
    """The event loop a client handed to a store belongs to: the first loop that used it.

    Driver clients cannot change loops. :meth:`check` (call it before sending anything)
    remembers the first loop and refuses any other with :class:`ConfigurationError`.
    """

    def __init__(self, store: str, driver: str, remedy: str) -> None:
        self._store = store
        self._driver = driver
        self._remedy = remedy
        self._loop: weakref.ref[asyncio.AbstractEventLoop] | None = None

    def check(self) -> asyncio.AbstractEventLoop:
        loop = require_asyncio(self._store, self._driver)
        if self._loop is None:
            self._loop = weakref.ref(loop)
        elif self._loop() is not loop:
            raise ConfigurationError(
                f"{self._store} was given a client that belongs to another event loop (the "
                f"first one it was used in); {self._driver} clients cannot change loops. "
                f"{self._remedy}"
            )
        return loop
