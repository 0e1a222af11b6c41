"""The servers that the network stores are measured against.

* Redis: ``FASTCHECKPOINT_BENCH_REDIS_URL``, else ``redis://127.0.0.1:6379/0`` when something
  answers ``PING`` there; otherwise the Redis store is left out (with a note). Every run uses
  its own key prefix and deletes its keys afterwards.
* S3 and DynamoDB: a moto server that the harness starts on 127.0.0.1 in a **separate
  process** (in a thread of this process it would share the GIL with the code being timed).
  ``endpoint_url=moto`` in a ``--store`` URL means "that server".
* PostgreSQL: ``FASTCHECKPOINT_BENCH_POSTGRES_URL``, else
  ``postgresql://postgres@127.0.0.1:5432/postgres`` when something listens there; otherwise
  the PostgreSQL store is left out (with a note). The database ``FRESH`` in a ``--store`` URL
  (``postgresql://postgres@127.0.0.1:5432/FRESH``) means a new database that the harness
  creates for the run and drops afterwards; the default store list uses one too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib.util
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from fastcheckpoint.stores import available_schemes

__all__ = ["FRESH", "MOTO", "Services", "bench_services", "run_coroutine"]

MOTO = "moto"
"""``endpoint_url=moto`` in a store URL: the moto server the harness started."""

FRESH = "FRESH"
"""The database ``FRESH`` in a PostgreSQL store URL: a new database made for the run."""

REDIS_ENV = "FASTCHECKPOINT_BENCH_REDIS_URL"
_DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
POSTGRES_ENV = "FASTCHECKPOINT_BENCH_POSTGRES_URL"
_DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
_FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class Services:
    """What is reachable for this run, and the notes explaining what is not."""

    token: str = field(default_factory=lambda: secrets.token_hex(4))
    redis_url: str | None = None
    moto_url: str | None = None
    postgres_url: str | None = None
    """The PostgreSQL server's URL (any database there), when one answers."""
    notes: list[str] = field(default_factory=list)
    redis_prefixes: set[str] = field(default_factory=set)
    postgres_databases: dict[str, str] = field(default_factory=dict)
    """Databases this run created (name -> the URL of the server's admin database)."""

    def store_urls(self) -> list[str]:
        """Network store URLs for the default store list, for the backends available."""
        urls: list[str] = []
        if self.redis_url is not None and _usable("redis", "redis"):
            urls.append(self.resolve(_with_query(self.redis_url, prefix=f"fcbench-{self.token}")))
        if self.moto_url is not None and _usable("s3", "aiobotocore"):
            urls.append(self.resolve(
                f"s3://fcbench-{self.token}/bench?region=us-east-1&endpoint_url={MOTO}"))
        if self.moto_url is not None and _usable("dynamodb", "aiobotocore"):
            urls.append(self.resolve(
                f"dynamodb://fcbench-{self.token}?bucket=fcbench-blobs-{self.token}"
                f"&region=us-east-1&endpoint_url={MOTO}"))
        if self.postgres_url is not None and _usable("postgresql", "asyncpg"):
            parts = urlsplit(self.postgres_url)
            urls.append(self.resolve(urlunsplit(parts._replace(path=f"/{FRESH}", query=""))))
        return urls

    def resolve(self, url: str) -> str:
        """``url`` with ``endpoint_url=moto`` replaced; remembers Redis prefixes to clean up."""
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        if query.get("endpoint_url") == MOTO:
            if self.moto_url is None:
                raise ValueError(f"{url!r} asks for the moto server, which did not start")
            query["endpoint_url"] = self.moto_url
            url = urlunsplit(parts._replace(query=urlencode(query)))
        if parts.scheme.startswith("redis"):
            self.redis_prefixes.add(query.get("prefix", ""))
        if parts.scheme in ("postgresql", "postgres") and parts.path == f"/{FRESH}":
            name = f"fcbench_{self.token}"
            if name not in self.postgres_databases:
                admin = urlunsplit(parts._replace(path="/postgres", query=""))
                _create_database(admin, name)
                self.postgres_databases[name] = admin
            url = urlunsplit(urlsplit(url)._replace(path=f"/{name}"))
        return url


def _usable(scheme: str, driver: str) -> bool:
    """Whether ``open_store`` knows ``scheme`` and the backend's driver is installed."""
    return scheme in available_schemes() and _importable(driver)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def _with_query(url: str, **extra: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update(extra)
    return urlunsplit(parts._replace(query=urlencode(query)))


def _redis_answers(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), 1) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def _tcp_answers(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1",
                                       parts.port or default_port), 1):
            return True
    except OSError:
        return False


def run_coroutine(function: Callable[[], Awaitable[object]]) -> object:
    """Run ``function()`` on a new asyncio loop in a worker thread, from sync code that may
    itself be running inside an event loop (the suite is)."""

    async def main() -> object:
        return await function()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, main()).result()


def _create_database(admin_url: str, name: str) -> None:
    import asyncpg

    async def create() -> None:
        connection = await asyncpg.connect(admin_url)
        try:
            await connection.execute(f'CREATE DATABASE "{name}"')
        finally:
            await connection.close()

    run_coroutine(create)


def _drop_databases(databases: dict[str, str]) -> None:
    import asyncpg

    async def drop() -> None:
        for name, admin_url in databases.items():
            connection = await asyncpg.connect(admin_url)
            try:
                await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await connection.close()

    run_coroutine(drop)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def _moto_server(notes: list[str]) -> Iterator[str | None]:
    if not _importable("moto.server"):
        notes.append("S3 and DynamoDB skipped: moto is not installed "
                     "(pip install -e '.[dev]' installs moto[server])")
        yield None
        return
    port = _free_port()
    # moto's own server checks conditional writes without a lock, so concurrent writers (W2,
    # W6) could both win a sequence; the serialized one behaves like AWS.
    command = [sys.executable, "-m", "fastcheckpoint.testing.moto", str(port)]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{url}/moto-api/", timeout=1):
                    break
            except (urllib.error.URLError, OSError):
                if process.poll() is not None or time.monotonic() > deadline:
                    notes.append("S3 and DynamoDB skipped: the moto server did not start")
                    yield None
                    return
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _delete_redis_keys(url: str, prefixes: set[str]) -> None:
    """Delete this run's keys (and only them) from the benchmark's Redis."""
    if not prefixes or not _importable("redis"):
        return
    import redis

    client = redis.Redis.from_url(url)
    try:
        for prefix in prefixes:
            if not prefix:
                continue  # never sweep a whole database
            batch: list[bytes] = []
            for key in client.scan_iter(match=f"{prefix}*", count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    client.unlink(*batch)
                    batch.clear()
            if batch:
                client.unlink(*batch)
    finally:
        client.close()


@contextlib.contextmanager
def bench_services(need_moto: bool) -> Iterator[Services]:
    """Find Redis, start moto when ``need_moto``; afterwards stop moto and delete our keys."""
    services = Services()
    configured = os.environ.get(REDIS_ENV)
    candidate = configured or _DEFAULT_REDIS
    if _redis_answers(candidate):
        services.redis_url = candidate
    else:
        services.notes.append(f"Redis skipped: nothing answers at {candidate}"
                              + ("" if configured else f" (set {REDIS_ENV})"))
    configured_pg = os.environ.get(POSTGRES_ENV)
    candidate_pg = configured_pg or _DEFAULT_POSTGRES
    if _tcp_answers(candidate_pg, 5432):
        services.postgres_url = candidate_pg
    else:
        services.notes.append(f"PostgreSQL skipped: nothing listens at {candidate_pg}"
                              + ("" if configured_pg else f" (set {POSTGRES_ENV})"))
    # moto accepts any credentials; W6 workers inherit these. Only when moto is used, so a
    # run against real AWS keeps the caller's credential chain (profiles, roles) intact.
    saved = {name: os.environ.get(name) for name in _FAKE_AWS}
    if need_moto:
        for name, value in _FAKE_AWS.items():
            os.environ.setdefault(name, value)
    try:
        with _moto_server(services.notes) if need_moto else contextlib.nullcontext() as moto:
            services.moto_url = moto
            yield services
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
        if services.redis_url is not None:
            _delete_redis_keys(services.redis_url, services.redis_prefixes)
        if services.postgres_databases:
            _drop_databases(services.postgres_databases)
