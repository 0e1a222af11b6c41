"""A moto server that behaves like AWS where the stores depend on it: for tests and benchmarks.

* Conditional writes are atomic. moto's server checks a condition (S3 ``IfNoneMatch``,
  DynamoDB ``attribute_not_exists``) and then writes, without a lock, so two concurrent
  conditional writes can both succeed; AWS evaluates each atomically. Serving one request at
  a time restores that, which every sequencing test of an S3 or DynamoDB store depends on.
* A DynamoDB transaction costs what its items cost. To undo a cancelled
  ``TransactWriteItems``, moto deep-copies every table the transaction touches before it
  starts, so a transaction's latency grows with the size of the tables (16 to 40 ms for one
  item in a table of 1,600 small items in two measurements, and seconds with large ones),
  where AWS's does not. This server keeps a copy of the items the transaction names
  instead, and puts them back when moto cancels it: the outcome is the same (all of the
  transaction's writes, or none).
  Tables with a stream keep moto's own copy (the stream's records would not be undone).

Needs ``moto[server]``.

``python -m fastcheckpoint.testing.moto PORT`` serves on 127.0.0.1 until interrupted.
"""

from __future__ import annotations

import contextvars
import copy
import sys
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["serialized_moto_server"]

_ITEMS_KEPT = contextvars.ContextVar("fastcheckpoint_moto_items_kept", default=False)
"""Set while a transaction runs whose touched items are kept: its tables are not copied."""


class _Serialized:
    """WSGI middleware answering one request at a time."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ: Any, start_response: Any) -> Any:
        with self.lock:
            return list(self.app(environ, start_response))


class _TablesUncopied:
    """The ``copy`` module as moto's DynamoDB backend sees it: a deep copy of a table, asked
    for while a transaction keeps its items (:data:`_ITEMS_KEPT`), is the table itself. The
    transaction's own rollback then puts back the same table, and the kept items undo it."""

    def __init__(self, table_type: type) -> None:
        self._table_type = table_type

    def __getattr__(self, name: str) -> Any:
        return getattr(copy, name)

    def deepcopy(self, value: Any, memo: dict[int, Any] | None = None) -> Any:
        if _ITEMS_KEPT.get() and isinstance(value, self._table_type):
            return value
        return copy.deepcopy(value, memo)


def _item_rollback() -> None:
    """Make moto's ``TransactWriteItems`` keep a copy of the items it names instead of every
    table it touches (once per process)."""
    from moto.dynamodb import models
    from moto.dynamodb.models.table import Table

    backend = models.DynamoDBBackend
    original: Callable[..., Any] = backend.transact_write_items
    if getattr(original, "_keeps_items", False):
        return

    def transact_write_items(self: Any, transact_items: list[dict[str, Any]]) -> Any:
        kept = _kept_items(self, transact_items)
        if kept is None:  # a table with a stream, or one moto does not know: its own way
            return original(self, transact_items)
        token = _ITEMS_KEPT.set(True)
        try:
            return original(self, transact_items)
        except BaseException:
            for table, hash_key, range_key, item in kept:
                _put_back(table, hash_key, range_key, item)
            raise
        finally:
            _ITEMS_KEPT.reset(token)

    transact_write_items._keeps_items = True  # type: ignore[attr-defined]
    backend.transact_write_items = transact_write_items  # type: ignore[method-assign]
    setattr(models, "copy", _TablesUncopied(Table))  # noqa: B010 - the module's own name


def _kept_items(backend: Any, transact_items: list[dict[str, Any]]) -> list[Any] | None:
    """``(table, hash key, range key, copy of the item or None)`` for each item the
    transaction names; ``None`` when moto must copy the tables itself. An operation whose
    key moto cannot read keeps nothing: moto refuses it before it writes anything for it."""
    kept: list[Any] = []
    for entry in transact_items:
        if not isinstance(entry, dict) or len(entry) != 1:
            continue
        op_type, op = next(iter(entry.items()))
        if not isinstance(op, dict):
            continue
        table = backend.tables.get(op.get("TableName"))
        if table is None or table.stream_shard is not None:
            return None
        keys = op.get("Item") if op_type == "Put" else op.get("Key")
        try:
            hash_key, range_key = backend.get_keys_value(table, keys)
            current = table.get_item(hash_key, range_key)
        except Exception:  # moto's own validation reports it
            continue
        kept.append((table, hash_key, range_key, copy.deepcopy(current)))
    return kept


def _put_back(table: Any, hash_key: Any, range_key: Any, item: Any) -> None:
    if range_key is None:
        if item is None:
            table.items.pop(hash_key, None)
        else:
            table.items[hash_key] = item
    elif item is None:
        table.items.get(hash_key, {}).pop(range_key, None)
    else:
        table.items[hash_key][range_key] = item


def serialized_moto_server(host: str = "127.0.0.1", port: int = 0) -> Any:
    """A ``ThreadedMotoServer`` (call ``start()``, ``get_host_and_port()``, ``stop()``)
    whose transactions keep copies of their items, not of their tables."""
    _item_rollback()
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
