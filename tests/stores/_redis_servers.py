"""Redis servers for the tests: the shared one, private ones started from the binary, a cluster.

Selection: 127.0.0.1:6379 when it answers, else a ``redis-server`` started here on a
free port, else fakeredis (which needs ``lupa`` for scripts). Private servers keep nothing on
disk and are stopped by the fixture that started them.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

SHARED_HOST, SHARED_PORT = "127.0.0.1", 6379


def redis_binary() -> str | None:
    return shutil.which("redis-server")


def answers_ping(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too and below 65536."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 45000)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def session_prefix() -> str:
    """A key prefix no other test session uses: this session deletes only keys under it."""
    return f"fctest-{uuid.uuid4().hex[:12]}"


@dataclass
class PrivateRedis:
    """A ``redis-server`` of our own: ours to flush scripts, restart, or configure ACLs on."""

    port: int
    extra: tuple[str, ...] = ()
    config: Path | None = None  # a redis.conf read first; the arguments below override it
    process: subprocess.Popen[bytes] | None = None
    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="fc-redis-")))

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = redis_binary()
        assert binary is not None
        self.process = subprocess.Popen(
            [binary, *([str(self.config)] if self.config else []), "--port", str(self.port),
             "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory), *self.extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not answers_ping("127.0.0.1", self.port, timeout=0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


@dataclass
class PrivateCluster:
    """Three primaries on 127.0.0.1, joined with ``redis-cli --cluster create``."""

    nodes: list[PrivateRedis] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}/0"

    def start(self) -> None:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is missing")
        for _ in range(3):
            node = PrivateRedis(free_cluster_port(), extra=(
                "--cluster-enabled", "yes", "--cluster-node-timeout", "5000",
                "--cluster-config-file", f"nodes-{uuid.uuid4().hex[:8]}.conf"))
            self.nodes.append(node)
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            info = subprocess.run(
                [cli, "-p", str(self.nodes[0].port), "cluster", "info"],
                check=False, capture_output=True, text=True, timeout=10,
            ).stdout
            if "cluster_state:ok" in info:
                return
            time.sleep(0.2)
        raise RuntimeError("the private Redis Cluster did not reach cluster_state:ok")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
