"""A moto server whose conditional writes are atomic, as on AWS: for tests and benchmarks.

moto's server checks a condition (S3 ``IfNoneMatch``, DynamoDB ``attribute_not_exists``) and
then writes, without a lock, so two concurrent conditional writes can both succeed; AWS
evaluates each atomically. Serving one request at a time restores that, which every
sequencing test of an S3 or DynamoDB store depends on. Needs ``moto[server]``.

``python -m fastcheckpoint.testing.moto PORT`` serves on 127.0.0.1 until interrupted.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

__all__ = ["serialized_moto_server"]


class _Serialized:
    """WSGI middleware answering one request at a time."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ: Any, start_response: Any) -> Any:
        with self.lock:
            return list(self.app(environ, start_response))


def serialized_moto_server(host: str = "127.0.0.1", port: int = 0) -> Any:
    """A ``ThreadedMotoServer`` (call ``start()``, ``get_host_and_port()``, ``stop()``)."""
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    class QuietHandler(MotoRequestHandler):
        def log_request(self, *args: Any, **kwargs: Any) -> None:
            pass  # one line per request drowns test and benchmark output

    class SerializedMotoServer(ThreadedMotoServer):
        def _server_entry(self) -> None:
            app = _Serialized(DomainDispatcherApplication(create_backend_app))
            self._server = make_server(
                self._ip_address, self._port, app, True, request_handler=QuietHandler
            )
            self._server_ready_event.set()
            self._server.serve_forever()

    return SerializedMotoServer(ip_address=host, port=port, verbose=False)


def main(argv: list[str]) -> int:
    server = serialized_moto_server(port=int(argv[0]) if argv else 0)
    server.start()
    host, port = server.get_host_and_port()
    print(f"http://{host}:{port}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
