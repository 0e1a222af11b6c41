"""A loopback TCP proxy that injects network faults between a store's client and its server.

A :class:`FaultProxy` listens on 127.0.0.1 and forwards every connection to one upstream
server. It recognises requests in the client's byte stream with a :class:`Wire` (Redis
script calls, HTTP requests) and gives each one a fate drawn from a :class:`FaultPlan`:

``pass``
    forwarded untouched.
``cut``
    half of the request's first chunk is forwarded, then both connections are closed: the
    connection dies mid-request and the server never runs it.
``lose-reply``
    the request is forwarded; when the server's reply starts to arrive (so the server has
    applied the request) both connections are closed and the reply is dropped: the client
    cannot tell whether the request happened.
``delay``
    forwarded after a pause.

Threads carry the bytes, not the test's event loop: the proxy serves clients of any event
loop library and in other processes, and a test that blocks its loop cannot stall it.
"""

from __future__ import annotations

import contextlib
import enum
import random
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType

__all__ = ["HTTP", "INJECTED", "REDIS", "Fault", "FaultPlan", "FaultProxy", "Wire"]

_CHUNK = 65536
_ACCEPT_POLL = 0.05
_JOIN_TIMEOUT = 5.0


class Fault(str, enum.Enum):
    PASS = "pass"
    CUT = "cut"
    LOSE_REPLY = "lose-reply"
    DELAY = "delay"


INJECTED = (Fault.CUT, Fault.LOSE_REPLY, Fault.DELAY)


@dataclass(frozen=True)
class Wire:
    """How requests and replies look on one protocol."""

    name: str
    starts_request: Callable[[bytes], bool]
    """Whether a chunk from the client begins a request that the plan decides about."""
    is_interim: Callable[[bytes], bool] = lambda chunk: False
    """Whether a chunk from the server is an interim answer (HTTP ``100 Continue``), which
    comes before the server applies the request and so is never the reply to drop."""


def _redis_operation(chunk: bytes) -> bool:
    # Store operations are script calls; handshakes (HELLO, CLIENT SETINFO, SCRIPT LOAD) pass,
    # so every decision of the plan falls on an operation of the store.
    return b"EVALSHA" in chunk or b"\r\nEVAL\r\n" in chunk


_HTTP_METHODS = (b"GET ", b"PUT ", b"POST ", b"DELETE ", b"HEAD ")

REDIS = Wire("redis", _redis_operation)
HTTP = Wire(
    "http",
    lambda chunk: chunk.startswith(_HTTP_METHODS),
    lambda chunk: chunk.startswith(b"HTTP/1.1 100 "),
)


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
            link.close()
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
                fault = self.proxy.decide() if self.proxy.wire.starts_request(data) else None
                if not self._forward(data, fault):
                    return
        except OSError:
            pass
        finally:
            self._pump_done()

    def _forward(self, data: bytes, fault: Fault | None) -> bool:
        """Forward a chunk, applying the fate of the request it begins (``None``: it begins
        none); ``False`` when the connection is to die now."""
        if fault is Fault.CUT:
            self.upstream.sendall(data[: len(data) // 2])
            return False
        if fault is Fault.DELAY:
            time.sleep(self.proxy.delay_seconds)
        if fault is Fault.LOSE_REPLY:
            self.dropping_reply.set()  # before forwarding: the reply cannot outrun the flag
        self.upstream.sendall(data)
        return True

    def server_to_client(self) -> None:
        try:
            while data := self.upstream.recv(_CHUNK):
                if self.dropping_reply.is_set() and not self.proxy.wire.is_interim(data):
                    return  # the server has answered, so it applied the request: drop it
                self.client.sendall(data)
        except OSError:
            pass
        finally:
            self._pump_done()

    def close(self) -> None:
        """Shut both connections down; the pumps wake up, and the last one frees the sockets."""
        with self._lock:
            if self._shut:
                return
            self._shut = True
        for sock in (self.client, self.upstream):
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
