"""What gets benchmarked: fastcheckpoint stores, opened by URL, behind a small driver interface.

A :class:`Driver` turns "create / restore latest / list" into prepared zero-argument awaitables,
so the timed region holds nothing but the library call. The same W1, W4 and W7 code then drives
fastcheckpoint and, in :mod:`benchmarks.compare`, FastAgentic and LangGraph.

Any store URL that :func:`fastcheckpoint.open_store` understands is a target; stores that land
later (``redis://``, ``s3://``, ``dynamodb://``) plug in without changes here.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit

from benchmarks.content import Content
from benchmarks.services import MOTO, Services, bench_services
from fastcheckpoint import CheckpointConfig, CheckpointError, CheckpointManager, open_store
from fastcheckpoint.stores import CheckpointStore, SupportsProvision
from fastcheckpoint.stores.file import parse_file_url

__all__ = [
    "Driver",
    "FastcheckpointDriver",
    "Prepared",
    "StoreTarget",
    "Subject",
    "default_store_urls",
    "disk_usage",
    "prepared_targets",
    "unique_run_id",
]

Operation = Callable[[], Awaitable[Any]]


class Driver(Protocol):
    """One opened store (or saver) of one repetition."""

    def prepare_create(self, run_id: str, content: Content) -> Operation: ...

    def prepare_restore(self, run_id: str) -> Operation: ...

    def prepare_list(self, run_id: str) -> Operation: ...

    async def held(self, run_id: str) -> int:
        """Checkpoints the run holds now (to check pruning)."""
        ...


class Subject(Protocol):
    """A store or saver under test; ``session`` opens it fresh for one repetition."""

    label: str
    system: str
    """``fastcheckpoint``, ``fastagentic`` or ``langgraph``."""
    kind: str
    """What targets compare: ``memory``, ``file``, ``file-nofsync``, ``sqlite``, a URL scheme."""

    def session(self, keep: int | None) -> contextlib.AbstractAsyncContextManager[Driver]: ...


def unique_run_id(workload: str) -> str:
    return f"bench-{workload.lower()}-{secrets.token_hex(4)}"


class FastcheckpointDriver:
    """A :class:`CheckpointManager` over one store; remembers runs so they can be deleted."""

    def __init__(self, manager: CheckpointManager) -> None:
        self.manager = manager
        self.runs: set[str] = set()

    def prepare_create(self, run_id: str, content: Content) -> Operation:
        self.runs.add(run_id)
        return functools.partial(
            self.manager.create, run_id, content.state, messages=content.messages
        )

    def prepare_restore(self, run_id: str) -> Operation:
        return functools.partial(self.manager.restore, run_id)

    def prepare_list(self, run_id: str) -> Operation:
        return functools.partial(self.manager.list_checkpoints, run_id)

    async def held(self, run_id: str) -> int:
        info = await self.manager.get_run(run_id)
        return 0 if info is None else info.checkpoint_count


@dataclass
class StoreTarget:
    """A fastcheckpoint store given by URL."""

    url: str
    label: str = ""
    system: str = "fastcheckpoint"
    kind: str = field(init=False)

    def __post_init__(self) -> None:
        parts = urlsplit(self.url) if "://" in self.url else None
        scheme = parts.scheme.lower() if parts is not None else "file"
        options = dict(parse_qsl(parts.query)) if parts is not None else {}
        self.kind = "postgres" if scheme == "postgresql" else scheme
        if scheme == "file" and options.get("fsync", "true").lower() in ("0", "false", "no", "off"):
            self.kind = "file-nofsync"
        if scheme == "sqlite" and options.get("synchronous", "full").lower() == "normal":
            self.kind = "sqlite-normal"
        if not self.label:
            self.label = {"file": "file (fsync)", "file-nofsync": "file (no fsync)",
                          "sqlite": "sqlite (synchronous=FULL)",
                          "sqlite-normal": "sqlite (synchronous=NORMAL)"}.get(
                self.kind, self.kind)

    @property
    def shared_across_processes(self) -> bool:
        """Whether several OS processes opening this URL see one store (W6)."""
        return self.kind != "memory"

    @property
    def disk_path(self) -> str | None:
        """The directory of a file store (for disk usage), else ``None``."""
        if not self.kind.startswith("file"):
            return None
        return parse_file_url(self.url)[0]

    def open(self) -> CheckpointStore:
        return open_store(self.url)

    async def prepare(self) -> None:
        """Fail early, with the library's message, on a URL that cannot be opened; provision
        what a network store needs (bucket, table) where the store can do that itself."""
        try:
            store = self.open()
            try:
                if isinstance(store, SupportsProvision):
                    await store.provision()
            finally:
                await store.aclose()
        except CheckpointError as exc:
            raise ValueError(f"cannot open store {self.url!r}: {exc}") from exc

    @contextlib.asynccontextmanager
    async def session(self, keep: int | None) -> AsyncIterator[FastcheckpointDriver]:
        config = CheckpointConfig(max_checkpoints_per_run=keep)
        manager = CheckpointManager(self.open(), config=config)
        driver = FastcheckpointDriver(manager)
        try:
            yield driver
        finally:
            for run_id in driver.runs:
                await manager.delete_run(run_id)
            await manager.aclose()


def default_store_urls(root: str) -> list[str]:
    """``memory://``, a file store under ``root`` with fsync on and one with fsync off, and a
    SQLite database there (``synchronous=FULL``, the store's default)."""
    return [
        "memory://",
        f"file://{os.path.join(root, 'file-fsync')}",
        f"file://{os.path.join(root, 'file-nofsync')}?fsync=false",
        f"sqlite:///{os.path.join(root, 'bench.sqlite')}",  # four slashes: an absolute path
    ]


@dataclass
class Prepared:
    targets: list[StoreTarget]
    scratch: str
    """A directory for default file stores and comparison stores; removed afterwards."""
    services: Services


@contextlib.contextmanager
def prepared_targets(urls: list[str] | None) -> Iterator[Prepared]:
    """Targets for ``urls``, or by default the local stores plus every network store whose
    server is reachable (Redis) or can be started here (moto for S3 and DynamoDB)."""
    scratch = tempfile.mkdtemp(prefix="fastcheckpoint-bench-")
    need_moto = not urls or any(f"endpoint_url={MOTO}" in url for url in urls)
    try:
        with bench_services(need_moto) as services:
            if urls:
                chosen = [services.resolve(url) for url in urls]
            else:
                chosen = default_store_urls(scratch) + services.store_urls()
            yield Prepared([StoreTarget(url) for url in chosen], scratch, services)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def disk_usage(path: str) -> tuple[int, int]:
    """``(apparent bytes, allocated bytes)`` of every file and directory under ``path``."""
    apparent = allocated = 0
    for directory, names, files in os.walk(path):
        for name in (*names, *files):
            try:
                info = os.lstat(os.path.join(directory, name))
            except FileNotFoundError:
                continue  # removed while we walked: a concurrent prune
            apparent += info.st_size
            allocated += info.st_blocks * 512
    return apparent, allocated
