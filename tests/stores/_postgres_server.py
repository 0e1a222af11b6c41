"""PostgreSQL for the store tests: a fresh database per test session, dropped afterwards.

Where: the server on 127.0.0.1:5432 when it answers; else a private server started from the
``initdb``/``pg_ctl`` binaries on a free port in a temporary directory (run as the
``postgres`` user when the tests run as root, which initdb refuses); else every PostgreSQL
test is skipped with the reason, which ``-ra`` shows in the summary, and a closing line says
so. ``FC_TEST_POSTGRES=shared|private|none`` forces a choice (test-only, outside the
library's ``FASTCHECKPOINT_*`` namespace).

Each test gets a schema of its own in the session's database (dropped after the test), so
tests never see each other's tables.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests import _summary

SHARED_HOST, SHARED_PORT = "127.0.0.1", 5432
FORCE = "FC_TEST_POSTGRES"
ADMIN_USER = "postgres"

__all__ = [
    "RUN_ROW_DAMAGES", "PostgresTarget", "PrivatePgBouncer", "WireCounter", "append_checkpoint",
    "drop_schema", "free_port", "run_row_damage", "session_target", "unique_schema",
]


@dataclass(frozen=True)
class PostgresTarget:
    kind: str  # "shared" or "private"
    host: str
    port: int
    database: str

    def url(self, database: str | None = None, *, user: str = ADMIN_USER) -> str:
        return f"postgresql://{user}@{self.host}:{self.port}/{database or self.database}"

    @property
    def admin_url(self) -> str:
        return self.url("postgres")

    def describe(self) -> str:
        return f"{self.kind} PostgreSQL at {self.host}:{self.port}, database {self.database}"


def answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether a PostgreSQL server listens there (it answers an SSLRequest with S or N)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(struct.pack("!ii", 8, 80877103))
            return sock.recv(1) in (b"S", b"N")
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def binaries() -> tuple[str, str] | None:
    """``initdb`` and ``pg_ctl``: on the PATH, beside the ``postgres`` binary (which may be a
    link into the installation), or in Debian's versioned directory."""
    found = [shutil.which(name) for name in ("initdb", "pg_ctl")]
    if all(found):
        return found[0], found[1]  # type: ignore[return-value]
    server = shutil.which("postgres")
    beside = [Path(server).resolve().parent] if server is not None else []
    for directory in [*beside, *sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)]:
        if (directory / "initdb").exists() and (directory / "pg_ctl").exists():
            return str(directory / "initdb"), str(directory / "pg_ctl")
    return None


@dataclass
class PrivatePostgres:
    """A server of our own in a temporary directory: no fsync, trust auth, loopback only."""

    port: int
    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="fc-pg-")))

    def _as_server_user(self, command: list[str]) -> list[str]:
        if os.geteuid() != 0:
            return command
        try:
            pwd.getpwnam("postgres")
        except KeyError as exc:
            raise RuntimeError("initdb refuses root and there is no postgres user") from exc
        shutil.chown(self.directory, "postgres")
        return ["runuser", "-u", "postgres", "--", *command]

    def start(self) -> None:
        found = binaries()
        assert found is not None
        initdb, pg_ctl = found
        data = self.directory / "data"
        subprocess.run(
            self._as_server_user([initdb, "-D", str(data), "-U", ADMIN_USER, "--auth=trust",
                                  "-E", "UTF8", "--no-sync"]),
            check=True, capture_output=True, timeout=120)
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -c fsync=off "
                   f"-c unix_socket_directories={self.directory} -c max_connections=200")
        subprocess.run(
            self._as_server_user([pg_ctl, "-D", str(data), "-o", options, "-l",
                                  str(self.directory / "log"), "-w", "-t", "60", "start"]),
            check=True, capture_output=True, timeout=90)
        deadline = time.monotonic() + 30
        while not answers("127.0.0.1", self.port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the private PostgreSQL on port {self.port} did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        found = binaries()
        if found is not None and (self.directory / "data").exists():
            subprocess.run(
                self._as_server_user([found[1], "-D", str(self.directory / "data"), "-m",
                                      "immediate", "stop"]),
                check=False, capture_output=True, timeout=60)
        shutil.rmtree(self.directory, ignore_errors=True)


def _admin(host: str, port: int, statement: str) -> None:
    import asyncpg

    async def run() -> None:
        connection = await asyncpg.connect(
            host=host, port=port, user=ADMIN_USER, database="postgres", timeout=10)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    asyncio.run(run())


def _tier() -> str:
    forced = os.environ.get(FORCE, "")
    if forced:
        if forced not in ("shared", "private", "none"):
            raise pytest.UsageError(f"{FORCE} must be shared, private or none, not {forced!r}")
        return forced
    if answers(SHARED_HOST, SHARED_PORT):
        return "shared"
    if binaries() is not None:
        return "private"
    return "none"


class _Session:
    """The one PostgreSQL target of this test session (built on first use)."""

    def __init__(self) -> None:
        self.target: PostgresTarget | None = None
        self.skip_reason: str | None = None
        self.server: PrivatePostgres | None = None

    def open(self, config: pytest.Config) -> None:
        config.add_cleanup(self.close)
        self._open()
        if self.target is not None:
            _summary.note(f"postgres store tests ran against {self.target.describe()} "
                          "(dropped afterwards)")
        else:
            _summary.note(f"postgres store tests SKIPPED: {self.skip_reason}")

    def _open(self) -> None:
        tier = _tier()
        if tier == "none":
            self.skip_reason = (
                "no PostgreSQL: nothing answers on 127.0.0.1:5432 and the initdb/pg_ctl "
                f"binaries are missing (or {FORCE}=none)")
            return
        host, port, kind = SHARED_HOST, SHARED_PORT, "shared"
        if tier == "private":
            if binaries() is None:
                self.skip_reason = "no initdb/pg_ctl binaries to start a private PostgreSQL"
                return
            self.server = PrivatePostgres(free_port())
            try:
                self.server.start()
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                self.server.stop()
                self.server = None
                self.skip_reason = f"could not start a private PostgreSQL: {exc}"
                return
            host, port, kind = "127.0.0.1", self.server.port, "private"
        database = f"fc_test_{uuid.uuid4().hex[:12]}"
        _admin(host, port, f"CREATE DATABASE {database}")
        self.target = PostgresTarget(kind, host, port, database)

    def close(self) -> None:
        target, self.target = self.target, None
        if target is not None:
            with contextlib.suppress(Exception):
                _admin(target.host, target.port,
                       f"DROP DATABASE IF EXISTS {target.database} WITH (FORCE)")
        if self.server is not None:
            self.server.stop()
            self.server = None


_SESSION = _Session()


def session_target(config: pytest.Config) -> PostgresTarget:
    """The session's PostgreSQL database, or a skip saying why there is none."""
    if _SESSION.target is None and _SESSION.skip_reason is None:
        _SESSION.open(config)
    if _SESSION.target is None:
        pytest.skip(_SESSION.skip_reason or "no PostgreSQL")
    return _SESSION.target


def unique_schema() -> str:
    return f"t_{uuid.uuid4().hex[:12]}"


async def drop_schema(target: PostgresTarget, schema: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(target.url(), timeout=10)
    try:
        await connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await connection.close()


class WireCounter:
    """A loopback proxy in front of the server that reads what clients send: how many round
    trips they asked for (each ``Sync``, ``Flush`` and simple ``Query`` makes the server
    answer what came before, and the client waits for that answer) and the names of the
    statements they prepared (``""`` for an unnamed one). Threads carry the bytes, so a
    test's event loop cannot stall it."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        import threading

        self.upstream = upstream
        self.round_trips = 0
        self.statement_names: list[str] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._stopping = threading.Event()

    @property
    def port(self) -> int:
        assert self._listener is not None
        port: int = self._listener.getsockname()[1]
        return port

    def url(self, target: PostgresTarget) -> str:
        return f"postgresql://{ADMIN_USER}@127.0.0.1:{self.port}/{target.database}"

    def __enter__(self) -> WireCounter:
        import threading

        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        threading.Thread(target=self._serve, daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopping.set()
        assert self._listener is not None
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def _serve(self) -> None:
        import threading

        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False),
                             daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        buffer, started = b"", False
        try:
            while data := source.recv(65536):
                if from_client:
                    buffer, started = self._read(buffer + data, started)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_RDWR)

    def _read(self, buffer: bytes, started: bool) -> tuple[bytes, bool]:
        """Count the complete messages in ``buffer``; return what is left and whether the
        startup packet (untyped, like an SSL request before it) has gone by."""
        while True:
            if not started:
                if len(buffer) < 8:
                    return buffer, started
                (length, code) = struct.unpack("!ii", buffer[:8])
                if len(buffer) < length:
                    return buffer, started
                buffer = buffer[length:]
                started = code not in (80877103, 80877104)  # SSL, GSS encryption requests
                continue
            if len(buffer) < 5:
                return buffer, started
            kind, (length,) = buffer[:1], struct.unpack("!i", buffer[1:5])
            if len(buffer) < 1 + length:
                return buffer, started
            body, buffer = buffer[5:1 + length], buffer[1 + length:]
            with self._lock:
                if kind in (b"S", b"Q", b"H"):
                    self.round_trips += 1
                elif kind == b"P":
                    self.statement_names.append(body.split(b"\x00", 1)[0].decode())

    async def trips(self, action: object) -> int:
        """Round trips ``action()`` (an awaitable factory) asked for. Messages are counted
        before they are forwarded, so every one the server answered is counted by now."""
        with self._lock:
            before = self.round_trips
        await action()  # type: ignore[operator]
        with self._lock:
            return self.round_trips - before


@dataclass
class PrivatePgBouncer:
    """A ``pgbouncer`` of our own in transaction mode in front of the server: two server
    connections shared by every client, so no two calls of one client are sure to meet the
    same server session."""

    upstream: tuple[str, int]
    port: int = field(default_factory=free_port)
    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="fc-pgb-")))
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("pgbouncer")
        assert binary is not None
        (self.directory / "users.txt").write_text(f'"{ADMIN_USER}" ""\n')
        (self.directory / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host={self.upstream[0]} port={self.upstream[1]}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {self.directory / 'users.txt'}\n"
            "pool_mode = transaction\ndefault_pool_size = 2\nmax_client_conn = 200\n"
            "ignore_startup_parameters = extra_float_digits,options,application_name\n"
            f"logfile = {self.directory / 'log'}\n")
        command = [binary, str(self.directory / "pgbouncer.ini")]
        if os.geteuid() == 0:  # pgbouncer refuses root
            shutil.chown(self.directory, "postgres")
            for name in ("users.txt", "pgbouncer.ini"):
                shutil.chown(self.directory / name, "postgres")
            command = ["runuser", "-u", "postgres", "--", *command]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not answers("127.0.0.1", self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pgbouncer on port {self.port} did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
            self.process = None
        shutil.rmtree(self.directory, ignore_errors=True)


async def append_checkpoint(
    store: Any, run: Any, sequence: int, *, now: float | None = None,
    expires_at: float | None = None, keep_latest: int | None = None,
    refs: Sequence[str] = (), items: Sequence[Any] = (), labels: tuple[str, ...] = (),
) -> str:
    """Append checkpoint ``sequence`` of ``run`` with ``refs`` and ``items`` (through
    ``append_with_items``); ``labels`` and ``expires_at`` go into the seed too."""
    import msgspec

    from fastcheckpoint.testing import T0, key_of, make_checkpoint

    at = T0 if now is None else now
    record = msgspec.structs.replace(
        make_checkpoint(run, sequence, created_at=at, expires_at=expires_at), refs=tuple(refs))
    seed = msgspec.structs.replace(run, labels=labels, expires_at=expires_at)
    written: str = await store.append_with_items(key_of(run), record, run=seed,
                                                 keep_latest=keep_latest, now=at, items=items)
    return written


RUN_ROW_DAMAGES = {
    # An older copy of the row put back: it knows one sequence and one checkpoint fewer.
    "older-copy": "latest_sequence = latest_sequence - 1, checkpoint_count = "
                  "checkpoint_count - 1, forever_count = greatest(forever_count - 1, 0)",
    # A row of another incarnation of the run put back.
    "other-incarnation": "incarnation = 'aaaaaaaa'",
    # Bytes that are not UTF-8 for the run id (they start with a continuation byte).
    "run-id-not-utf8": "run_id = '\\x9bc3'::bytea",
}
"""What an operator, a restore or a foreign writer can do to a run row while its checkpoints
stay: the ``SET`` clause of an ``UPDATE`` of the row (a ``RepairContract`` damage)."""


def run_row_damage(target: PostgresTarget, kind: str) -> Any:
    """``await damage(store, run_key)``: apply :data:`RUN_ROW_DAMAGES` ``kind`` to the run row
    of a ``PostgresStore``, through a connection of its own (as the owner)."""
    assignments = RUN_ROW_DAMAGES[kind]

    async def damage(store: Any, run_key: str) -> None:
        import asyncpg

        table = store._names["runs"]
        connection = await asyncpg.connect(target.url())
        try:
            status = await connection.execute(
                f"UPDATE {table} SET {assignments} WHERE run_key = $1", run_key)
        finally:
            await connection.close()
        assert status == "UPDATE 1", status

    return damage
