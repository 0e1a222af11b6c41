"""A loopback TCP proxy that injects network faults between a store's client and its server.

A :class:`FaultProxy` listens on 127.0.0.1 and forwards every connection to one upstream
server. It recognises requests in the client's byte stream with a :class:`Wire` (Redis
script calls, HTTP requests, PostgreSQL queries) and gives each one a fate drawn from a
:class:`FaultPlan`:

``pass``
    forwarded untouched.
``cut``
    part of the request's first chunk is forwarded, then both connections are closed: the
    connection dies mid-request and the server never applies it. Half the chunk on most
    wires; on PostgreSQL every message but the closing ``Sync``, so the server runs the
    statement inside its implicit transaction and the connection dies before the commit.
``lose-reply``
    the request is forwarded; when the server's reply starts to arrive (so the server has
    applied the request) both connections are closed and the reply is dropped: the client
    cannot tell whether the request happened.
``delay``
    forwarded after a pause.
``abandon``
    the request is forwarded whole and the client's connection closed at once, while the
    server's is kept (its replies drained) until the proxy stops: the server runs, and
    commits, what the client already takes for failed and may be retrying on another
    connection. Scripted only (not among :data:`INJECTED`).
``late``
    the request is held back whole (the proxy reads it to its end, without forwarding a byte)
    and the client's connection closed, while the server's is kept: the client takes the
    request for failed and its driver sends it again on another connection, where it is
    applied and answered. The held request reaches the server only when the test calls
    :meth:`FaultProxy.release_late`, after whatever later operations the test made: a request
    delivered late, as a network or a server's queue can hold one. Scripted only. Not for an
    HTTP request sent with ``Expect: 100-continue`` (S3's PUTs): its client waits for the
    interim answer before it sends the body, which the proxy waits for.

Threads carry the bytes, not the test's event loop: the proxy serves clients of any event
loop library and in other processes, and a test that blocks its loop cannot stall it.
"""

from __future__ import annotations

import contextlib
import enum
import random
import re
import socket
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType

__all__ = [
    "HTTP", "INJECTED", "POSTGRES", "POSTGRES_EXECUTIONS", "REDIS", "Fault", "FaultPlan",
    "FaultProxy", "Wire", "http_calling", "http_line", "postgres_running",
]

_CHUNK = 65536
_ACCEPT_POLL = 0.05
_JOIN_TIMEOUT = 5.0


class Fault(str, enum.Enum):
    PASS = "pass"
    CUT = "cut"
    LOSE_REPLY = "lose-reply"
    DELAY = "delay"
    ABANDON = "abandon"
    LATE = "late"


INJECTED = (Fault.CUT, Fault.LOSE_REPLY, Fault.DELAY)


@dataclass(frozen=True)
class Wire:
    """How requests and replies look on one protocol."""

    name: str
    starts_request: Callable[[bytes], bool]
    """Whether a chunk from the client begins a request that the plan decides about."""
    interim: Callable[[bytes], int] = lambda chunk: 0
    """How many bytes at the start of a chunk from the server are interim answers (HTTP
    ``100 Continue``), which come before the server applies the request and so are never the
    reply to drop (the reply may follow in the same chunk)."""
    cut_at: Callable[[bytes], int] = lambda chunk: len(chunk) // 2
    """How many bytes of a request's first chunk a cut forwards (fewer than the chunk)."""
    complete: Callable[[bytes], bool] = lambda request: True
    """Whether the bytes read of a request so far hold all of it (a late request is held
    back whole). One chunk is a whole request on Redis and PostgreSQL as the stores' drivers
    send them; an HTTP request is whole once its body is."""
    framing: Callable[[], Callable[[bytes], bool]] | None = None
    """For a protocol whose requests can only be told apart by following the stream: a
    factory of a per-connection reader that takes each client chunk in order and says whether
    it begins a request (used instead of ``starts_request``)."""


def _redis_operation(chunk: bytes) -> bool:
    # Store operations are script calls; handshakes (HELLO, CLIENT SETINFO, SCRIPT LOAD) pass,
    # so every decision of the plan falls on an operation of the store.
    return b"EVALSHA" in chunk or b"\r\nEVAL\r\n" in chunk


_HTTP_METHODS = (b"GET ", b"PUT ", b"POST ", b"DELETE ", b"HEAD ")

def _http_interim(chunk: bytes) -> int:
    """The length of the ``1xx`` answers a chunk from the server starts with (all of a chunk
    that ends inside one)."""
    at = 0
    while chunk.startswith(b"HTTP/1.1 1", at):
        end = chunk.find(b"\r\n\r\n", at)
        if end < 0:
            return len(chunk)
        at = end + 4
    return at


def _http_complete(request: bytes) -> bool:
    head, found, body = request.partition(b"\r\n\r\n")
    if not found:
        return False
    length = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
    return len(body) >= (int(length.group(1)) if length else 0)


def _http_starts(chunk: bytes) -> bool:
    return chunk.startswith(_HTTP_METHODS)


REDIS = Wire("redis", _redis_operation)
HTTP = Wire("http", _http_starts, _http_interim, complete=_http_complete)


def http_calling(*operations: str) -> Wire:
    """HTTP where only requests of these DynamoDB operations (``X-Amz-Target``) meet faults."""
    targets = tuple(f"DynamoDB_20120810.{name}\r\n".encode() for name in operations)

    def starts(chunk: bytes) -> bool:
        return _http_starts(chunk) and any(target in chunk for target in targets)

    return Wire(f"http-{'-'.join(operations)}", starts, _http_interim, complete=_http_complete)


def http_line(pattern: bytes) -> Wire:
    """HTTP where only requests whose request line matches ``pattern`` (a regular expression:
    ``rb"^POST /[^ ]*[?&]delete"`` for S3's DeleteObjects) meet faults."""
    line = re.compile(pattern)

    def starts(chunk: bytes) -> bool:
        return _http_starts(chunk) and line.search(chunk.partition(b"\r\n")[0]) is not None

    return Wire(f"http-{pattern.decode(errors='replace')}", starts, _http_interim,
                complete=_http_complete)

_PG_SYNC = b"S\x00\x00\x00\x04"
_PG_UNTYPED_REQUESTS = (80877103, 80877104, 80877102)
"""SSLRequest, GSSENCRequest, CancelRequest: untyped messages before (or instead of) the
startup message, which is untyped too."""
_PG_NOT_REQUESTS = b"pX"
"""Password (and SASL) answers belong to the handshake; Terminate closes the connection."""


class _PostgresFrames:
    """Follows one client connection of the PostgreSQL protocol (version 3) message by message.

    A request is a simple ``Query``, or the extended-protocol messages up to and including
    the ``Sync`` or ``Flush`` that makes the server answer them (asyncpg prepares with
    ``Parse``, ``Describe``, ``Flush`` and runs with ``Bind``, ``Execute``, ``Sync``): one
    round trip, which the server answers after it has run (and, at a ``Sync`` outside a
    transaction block, committed) what came before. The startup packets and the
    authentication handshake are no requests, so every fault falls on a statement.

    With ``executions_only``, only requests that run a statement count (``Query``,
    ``Bind``..``Sync``), not those that only prepare one (``Parse``..``Flush``); with
    ``statement``, only those that run a statement whose text contains it (a simple
    ``Query``, or a ``Bind`` of a statement prepared with such a text).
    """

    def __init__(self, *, executions_only: bool = False, statement: bytes | None = None) -> None:
        self._first_kinds = b"QB" if executions_only or statement else None
        self._statement = statement
        self._marked: set[bytes] = set()  # prepared statements whose text holds ``statement``
        self._started = False  # the startup message has gone by
        self._pending = b""  # the start of a message whose length is not known yet
        self._left = 0  # bytes of the current message still to come
        self._in_batch = False  # inside an extended-protocol request, before its Sync

    def __call__(self, chunk: bytes) -> bool:
        begins = False
        data = self._pending + chunk
        at = 0
        if self._left:
            skipped = min(self._left, len(data))
            at, self._left = skipped, self._left - skipped
        while at < len(data):
            if not self._started:
                if len(data) - at < 8:
                    break
                length, code = struct.unpack("!ii", data[at : at + 8])
                self._started = code not in _PG_UNTYPED_REQUESTS
            else:
                if len(data) - at < 5:
                    break
                kind = data[at : at + 1]
                (length,) = struct.unpack("!i", data[at + 1 : at + 5])
                length += 1  # the type byte
                body = data[at + 5 : at + length]  # what of it has arrived
                if kind == b"P" and self._statement is not None:
                    name, _, text = body.partition(b"\x00")
                    if self._statement in text:
                        self._marked.add(name)
                if kind not in _PG_NOT_REQUESTS and not self._in_batch:
                    begins = begins or self._counts(kind, body)
                    self._in_batch = kind != b"Q"
                if kind in b"SH":  # Sync, Flush: the server answers what came before
                    self._in_batch = False
            if at + length > len(data):
                self._left = at + length - len(data)
                at = len(data)
            else:
                at += length
        self._pending = data[at:]
        return begins

    def _counts(self, kind: bytes, body: bytes) -> bool:
        """Whether a request that begins with this message meets the plan."""
        if self._first_kinds is None:
            return True
        if kind not in self._first_kinds:
            return False
        if self._statement is None:
            return True
        if kind == b"Q":
            return self._statement in body
        _portal, _, rest = body.partition(b"\x00")
        return rest.partition(b"\x00")[0] in self._marked


def _postgres_cut(chunk: bytes) -> int:
    # Run the statement, but never reach the Sync that would commit it.
    if chunk.endswith(_PG_SYNC) and len(chunk) > len(_PG_SYNC):
        return len(chunk) - len(_PG_SYNC)
    return len(chunk) // 2


POSTGRES = Wire(
    "postgres",
    lambda chunk: False,  # never used: the framing reads the stream
    cut_at=_postgres_cut,
    framing=_PostgresFrames,
)
POSTGRES_EXECUTIONS = Wire(
    "postgres-executions",
    lambda chunk: False,
    cut_at=_postgres_cut,
    framing=lambda: _PostgresFrames(executions_only=True),
)
"""PostgreSQL where only requests that run a statement meet faults: every fault falls on a
statement the server runs (and, for a store call, commits), none on a prepare."""


def postgres_running(statement: bytes) -> Wire:
    """PostgreSQL where only requests that run a statement whose text contains ``statement``
    meet faults (e.g. one store function: every fault falls on a call of it)."""
    return Wire(f"postgres-{statement.decode(errors='replace')}", lambda chunk: False,
                cut_at=_postgres_cut,
                framing=lambda: _PostgresFrames(statement=statement))


class FaultPlan:
    """The fate of each request: a scripted prefix, then random faults at ``rate``.

    Seeded, so a run can be replayed; thread-safe.
    """

    def __init__(
        self,
        *,
        rate: float = 0.0,
        kinds: Iterable[Fault] = INJECTED,
        seed: int = 0,
        script: Iterable[Fault] = (),
    ) -> None:
        self.rate = rate
        self.kinds = tuple(kinds)
        self._script = deque(script)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    @classmethod
    def opening(
        cls, seed: int, *, rate: float, kinds: tuple[Fault, ...] = INJECTED, passes: int = 6
    ) -> FaultPlan:
        """Random faults at ``rate``, after an opening that holds each kind twice, shuffled
        among ``passes`` passes per kind: even a short run meets every kind of fault, as long
        as it makes ``2 + passes`` requests per kind."""
        rng = random.Random(seed)
        script = [*kinds, *kinds, *[Fault.PASS] * (passes * len(kinds))]
        rng.shuffle(script)
        return cls(rate=rate, kinds=kinds, seed=rng.randrange(2**32), script=script)

    def next(self) -> Fault:
        with self._lock:
            if self._script:
                return self._script.popleft()
            if self._rng.random() >= self.rate:
                return Fault.PASS
            return self._rng.choice(self.kinds)


class FaultProxy:
    """Forwards ``127.0.0.1:<port>`` to ``upstream``, injecting the faults ``plan`` draws.

    Use as a context manager (or ``start()``/``stop()``). ``counts`` holds how many requests
    met each fate so far; ``injected`` sums the faults.
    """

    def __init__(
        self,
        upstream: tuple[str, int],
        wire: Wire,
        plan: FaultPlan | None = None,
        *,
        delay_seconds: float = 0.05,
    ) -> None:
        self.upstream = upstream
        self.wire = wire
        self.plan = plan or FaultPlan()
        self.delay_seconds = delay_seconds
        self.counts: Counter[Fault] = Counter()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._links: list[_Link] = []

    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("the proxy is not started")
        port: int = self._listener.getsockname()[1]
        return port

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:<port>``, for clients that take an endpoint URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def injected(self) -> int:
        with self._lock:
            return sum(count for fault, count in self.counts.items() if fault is not Fault.PASS)

    def start(self) -> FaultProxy:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(_ACCEPT_POLL)
        self._spawn(self._serve)
        return self

    def stop(self) -> None:
        self._stopping.set()
        for thread in self._threads[:1]:  # the accept loop: no new links after it ends
            thread.join(_JOIN_TIMEOUT)
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            links = list(self._links)
        for link in links:
            link.close(stopping=True)
        for thread in self._threads[1:]:
            thread.join(_JOIN_TIMEOUT)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def release_late(self, *, timeout: float = 10.0) -> int:
        """Send every request held back by a ``late`` fault to the server, on the connection
        it came on, and wait until the server has answered each (so has applied it). Returns
        how many were sent."""
        with self._lock:
            held = [link for link in self._links if link.late is not None]
        for link in held:
            link.deliver_late()
        for link in held:
            if not link.answered.wait(timeout):
                raise TimeoutError("the server did not answer a request delivered late")
        return len(held)

    def decide(self) -> Fault:
        """The next request's fate, counted."""
        fault = self.plan.next()
        with self._lock:
            self.counts[fault] += 1
        return fault

    def _spawn(self, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, daemon=True, name=f"fault-proxy-{self.wire.name}")
        with self._lock:
            # Keep the accept loop first; forget finished pumps so a soak does not pile them up.
            self._threads = self._threads[:1] + [t for t in self._threads[1:] if t.is_alive()]
            self._links = [link for link in self._links if not link.finished]
            self._threads.append(thread)
        thread.start()

    def _serve(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=_JOIN_TIMEOUT)
            except OSError:
                client.close()  # the client sees a refused connection, as without the proxy
                continue
            link = _Link(self, client, upstream)
            with self._lock:
                self._links.append(link)
            self._spawn(link.client_to_server)
            self._spawn(link.server_to_client)


class _Link:
    """One proxied connection: two pumps, one per direction, and the fault state between them."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, upstream: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        for sock in (client, upstream):
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.dropping_reply = threading.Event()
        self.abandoned = threading.Event()
        self.late: bytes | None = None  # a request held back, until release_late
        self.answered = threading.Event()  # the server answered since the late delivery
        framing = proxy.wire.framing
        self._begins: Callable[[bytes], bool] = (
            proxy.wire.starts_request if framing is None else framing())
        self._lock = threading.Lock()
        self._shut = False
        self._pumps_left = 2

    @property
    def finished(self) -> bool:
        with self._lock:
            return self._pumps_left == 0

    def client_to_server(self) -> None:
        try:
            while data := self.client.recv(_CHUNK):
                fault = self.proxy.decide() if self._begins(data) else None
                if fault is Fault.LATE:
                    self._hold(data)
                    return
                if not self._forward(data, fault):
                    return
        except OSError:
            pass
        finally:
            self._pump_done()

    def _hold(self, data: bytes) -> None:
        """Read the rest of the request, keep it for :meth:`deliver_late`, and close the
        client's connection (the server's stays, for the late delivery)."""
        while not self.proxy.wire.complete(data) and (more := self.client.recv(_CHUNK)):
            data += more
        with self._lock:
            self.late = data
        self.abandoned.set()
        with contextlib.suppress(OSError):
            self.client.shutdown(socket.SHUT_RDWR)

    def deliver_late(self) -> None:
        with self._lock:
            late, self.late = self.late, None
        if late is not None:
            self.upstream.sendall(late)

    def _forward(self, data: bytes, fault: Fault | None) -> bool:
        """Forward a chunk, applying the fate of the request it begins (``None``: it begins
        none); ``False`` when the connection is to die now."""
        if fault is Fault.CUT:
            self.upstream.sendall(data[: self.proxy.wire.cut_at(data)])
            return False
        if fault is Fault.DELAY:
            time.sleep(self.proxy.delay_seconds)
        if fault is Fault.LOSE_REPLY:
            self.dropping_reply.set()  # before forwarding: the reply cannot outrun the flag
        if fault is Fault.ABANDON:
            self.abandoned.set()
            self.upstream.sendall(data)
            with contextlib.suppress(OSError):
                self.client.shutdown(socket.SHUT_RDWR)
            return False
        self.upstream.sendall(data)
        return True

    def server_to_client(self) -> None:
        try:
            while data := self.upstream.recv(_CHUNK):
                if self.abandoned.is_set():
                    self.answered.set()
                    continue  # nobody to answer: the server's connection is kept, drained
                if self.dropping_reply.is_set():
                    interim = self.proxy.wire.interim(data)
                    if interim < len(data):
                        # The server has answered, so it applied the request: drop the
                        # answer (an interim one before it in the chunk still goes).
                        self.client.sendall(data[:interim])
                        return
                self.client.sendall(data)
        except OSError:
            pass
        finally:
            self._pump_done()

    def close(self, *, stopping: bool = False) -> None:
        """Shut both connections down; the pumps wake up, and the last one frees the sockets.
        An abandoned request's server connection stays until the proxy stops."""
        keep = self.abandoned.is_set() and not stopping
        with self._lock:
            if self._shut and not stopping:
                return
            self._shut = True
        for sock in (self.client,) if keep else (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _pump_done(self) -> None:
        self.close()
        with self._lock:
            self._pumps_left -= 1
            last = self._pumps_left == 0
        if last:
            self.client.close()
            self.upstream.close()
