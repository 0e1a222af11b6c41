"""Which async library is running, and driver clients kept per asyncio event loop.

Drivers built on asyncio (redis-py, aiobotocore) bind their connections to the event loop
that opened them. A store used from several ``asyncio.run()`` calls (a module-level manager,
as FastAgentic's docs write it) must therefore build one client per loop, and a store whose
driver needs asyncio must say so on trio instead of failing inside the driver.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

from fastcheckpoint.errors import ConfigurationError

__all__ = ["GivenClientLoop", "PerLoop", "require_asyncio", "running_library"]

_T = TypeVar("_T")

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
            f"called {where}; on trio use MemoryStore or FileStore, or run this store under "
            "asyncio (anyio.run(main, backend='asyncio'))"
        )
    return asyncio.get_running_loop()


class PerLoop(Generic[_T]):
    """One resource (a driver client) per asyncio event loop, built on first use in each.

    Concurrent first users in one loop share one build; a build that failed (or was
    cancelled) is not kept, so the next user builds again. Each resource is closed in its own
    loop when that loop shuts down (``asyncio.run()`` finalizes async generators before it
    closes the loop, and each resource is guarded by one), so a module-level store used by
    several ``asyncio.run()`` calls leaves no connection open; entries of closed loops are
    dropped when another loop builds its own. :meth:`aclose` closes the current loop's
    resource and forgets the others.
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
            asyncio.AbstractEventLoop, asyncio.Future[_T]
        ] = weakref.WeakKeyDictionary()
        self._guards: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, AsyncGenerator[None, None]
        ] = weakref.WeakKeyDictionary()

    async def get(self) -> _T:
        loop = require_asyncio(self._store, self._driver)
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

    async def _build_guarded(self, loop: asyncio.AbstractEventLoop) -> _T:
        resource = await self._build()
        guard = self._closing(resource)
        await guard.asend(None)  # first iteration: the loop now finalizes it at shutdown
        self._guards[loop] = guard
        return resource

    async def _closing(self, resource: _T) -> AsyncGenerator[None, None]:
        """Closes ``resource`` when finalized: by the loop's shutdown, or by :meth:`aclose`."""
        try:
            yield
        finally:
            try:
                await self._close(resource)
            except Exception:
                logger.warning("%s: closing a %s client failed", self._store, self._driver,
                               exc_info=True)

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
        return pending.result()

    async def aclose(self) -> None:
        """Close the running loop's resource, waiting for it if it is being built (else it
        would be built after this and never closed); forget those of other (finished) loops."""
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # not in an asyncio loop: it built nothing
            loop = None
        pending = None if loop is None else self._by_loop.get(loop)
        self._by_loop.clear()
        if pending is None or loop is None:
            self._guards.clear()
            return
        try:
            await asyncio.shield(pending)
        except Exception:  # the build failed: nothing to close
            return
        guard = self._guards.pop(loop, None)
        self._guards.clear()
        if guard is not None:
            await guard.aclose()  # closes the resource, once


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
