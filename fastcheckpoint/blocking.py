"""A blocking facade over :class:`~fastcheckpoint.CheckpointManager`, for synchronous code.

Frameworks with synchronous persistence interfaces (CrewAI's flow persistence) and programs
without an event loop use it; every adapter that needs blocking calls goes through it rather
than running event loops of its own::

    from fastcheckpoint.blocking import BlockingManager

    with BlockingManager("sqlite:///runs.db") as manager:
        manager.create("run-1", state={"step": 1}, step_name="plan")
        checkpoint = manager.restore("run-1")

Each method is the manager's coroutine of the same name with the same arguments, run to its
end on an event loop: the asyncio loop that was running where the facade was built (from
other threads: calling it on that loop's own thread raises :class:`ConfigurationError`,
as it would wait for itself), else a loop of the facade's own in a daemon thread, started on
first use. :meth:`close` closes the manager and its store there and stops that thread.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

from fastcheckpoint._bridge import LoopBridge
from fastcheckpoint._config import CheckpointConfig
from fastcheckpoint._manager import CheckpointManager, RunPage
from fastcheckpoint._model import (
    Checkpoint,
    CheckpointMetadata,
    CheckpointStatus,
    RepairReport,
    RunInfo,
)
from fastcheckpoint.errors import ConfigurationError
from fastcheckpoint.stores import CheckpointStore, open_store

__all__ = ["BlockingManager"]

_T = TypeVar("_T")


class BlockingManager:
    """:class:`~fastcheckpoint.CheckpointManager` with blocking methods; see the module
    docstring. Built from a manager, a store or a store URL (``config`` applies to the last
    two). With ``own_loop`` it never uses the loop running where it is built and always runs
    on a loop thread of its own: for frameworks that call synchronous interfaces from their
    event loop's own thread (CrewAI does), where a call bound to that loop would wait for
    itself."""

    def __init__(
        self,
        target: CheckpointManager | CheckpointStore | str,
        *,
        config: CheckpointConfig | None = None,
        own_loop: bool = False,
    ) -> None:
        if isinstance(target, CheckpointManager):
            if config is not None:
                raise ConfigurationError("config applies to a store or URL, not to a manager")
            self._manager = target
        else:
            settings = CheckpointConfig() if config is None else config
            if not isinstance(settings, CheckpointConfig):  # before a URL opens a store
                raise ConfigurationError(
                    f"config must be a CheckpointConfig, got {type(settings).__name__}")
            store = open_store(target, retry=settings.retry) if isinstance(target, str) else target
            self._manager = CheckpointManager(store, config=settings)
        self._bridge = LoopBridge("the blocking manager")
        if not own_loop:
            self._bridge.bind()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> BlockingManager:
        """The store and settings :meth:`CheckpointManager.from_env` reads."""
        return cls(CheckpointManager.from_env(environ))

    @property
    def manager(self) -> CheckpointManager:
        """The async manager underneath (use it from async code)."""
        return self._manager

    @property
    def store(self) -> CheckpointStore:
        return self._manager.store

    def _call(self, method: Callable[..., Coroutine[Any, Any, _T]], *args: Any,
              **kwargs: Any) -> _T:
        return self._bridge.call(functools.partial(method, *args, **kwargs), method.__name__)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the manager's cleanup loop (removes expired checkpoints) on the facade's
        loop; :meth:`stop` or :meth:`close` stops it."""
        self._call(self._manager.start)

    def stop(self) -> None:
        """Stop the cleanup loop and wait until it has ended; the store stays open (unlike
        :meth:`close`), so the facade goes on working and may :meth:`start` again."""
        self._call(self._manager.stop)

    def close(self) -> None:
        """Stop the cleanup loop, close the manager's store, stop the facade's own loop
        thread. Safe to call twice."""
        try:
            self._call(self._manager.aclose)
        finally:
            self._bridge.stop()

    def __enter__(self) -> BlockingManager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- checkpoints ----------------------------------------------------------------------

    def create(
        self,
        run_id: str,
        state: Mapping[str, Any],
        *,
        messages: Sequence[Any] | None = None,
        tool_calls: Sequence[Any] | None = None,
        context: Mapping[str, Any] | None = None,
        step_name: str = "",
        parent_id: str | None = None,
        tags: Sequence[str] | None = None,
        ttl_seconds: float | None = None,
        force: bool = False,
        expected_sequence: int | None = None,
    ) -> Checkpoint | None:
        return self._call(
            self._manager.create, run_id, state, messages=messages, tool_calls=tool_calls,
            context=context, step_name=step_name, parent_id=parent_id, tags=tags,
            ttl_seconds=ttl_seconds, force=force, expected_sequence=expected_sequence)

    def restore(self, run_id: str) -> Checkpoint | None:
        return self._call(self._manager.restore, run_id)

    def restore_from(self, checkpoint_id: str) -> Checkpoint | None:
        return self._call(self._manager.restore_from, checkpoint_id)

    def list_checkpoints(
        self,
        run_id: str,
        limit: int = 100,
        *,
        before: str | None = None,
        tags: Sequence[str] | None = None,
        step_name: str | None = None,
        include_expired: bool = False,
    ) -> list[CheckpointMetadata]:
        return self._call(
            self._manager.list_checkpoints, run_id, limit, before=before, tags=tags,
            step_name=step_name, include_expired=include_expired)

    def lineage(self, checkpoint_id: str) -> list[CheckpointMetadata]:
        return self._call(self._manager.lineage, checkpoint_id)

    def fork(
        self,
        checkpoint_id: str,
        new_run_id: str | None = None,
        *,
        ttl_seconds: float | None = None,
    ) -> Checkpoint:
        return self._call(self._manager.fork, checkpoint_id, new_run_id, ttl_seconds=ttl_seconds)

    def delete(self, checkpoint_id: str) -> bool:
        return self._call(self._manager.delete, checkpoint_id)

    def delete_run(self, run_id: str) -> int:
        return self._call(self._manager.delete_run, run_id)

    def prune(self, run_id: str, keep: int) -> int:
        return self._call(self._manager.prune, run_id, keep)

    def cleanup_expired(self) -> int:
        return self._call(self._manager.cleanup_expired)

    def repair(self, run_id: str | None = None) -> list[RepairReport]:
        return self._call(self._manager.repair, run_id)

    # -- runs -----------------------------------------------------------------------------

    def get_run(self, run_id: str) -> RunInfo | None:
        return self._call(self._manager.get_run, run_id)

    def list_runs(
        self,
        status: CheckpointStatus | str | None = None,
        *,
        limit: int = 100,
        cursor: str | None = None,
    ) -> RunPage:
        return self._call(self._manager.list_runs, status, limit=limit, cursor=cursor)

    def count_runs(self, status: CheckpointStatus | str | None = None) -> int:
        return self._call(self._manager.count_runs, status)

    def mark_completed(self, run_id: str) -> RunInfo | None:
        return self._call(self._manager.mark_completed, run_id)

    def mark_failed(self, run_id: str, error: str = "") -> RunInfo | None:
        return self._call(self._manager.mark_failed, run_id, error)

    def pause(
        self,
        run_id: str,
        request: Mapping[str, Any] | None = None,
        *,
        latest_sequence: int | None = None,
    ) -> RunInfo:
        return self._call(self._manager.pause, run_id, request, latest_sequence=latest_sequence)

    def approve(
        self,
        run_id: str,
        *,
        approver: str,
        comment: str = "",
        requested_at: float | None = None,
    ) -> RunInfo:
        return self._call(self._manager.approve, run_id, approver=approver, comment=comment,
                          requested_at=requested_at)

    def reject(
        self,
        run_id: str,
        *,
        approver: str,
        reason: str = "",
        requested_at: float | None = None,
    ) -> RunInfo:
        return self._call(self._manager.reject, run_id, approver=approver, reason=reason,
                          requested_at=requested_at)

    def export_run(
        self,
        run_id: str,
        format: str = "json",
        *,
        include_state: bool = False,
        page_size: int = 100,
    ) -> Iterator[str]:
        """The run's history as text, streamed (see :meth:`CheckpointManager.export_run`)."""
        return self._bridge.iterate(
            self._manager.export_run(run_id, format, include_state=include_state,
                                     page_size=page_size), "export_run")
