"""A store that counts the calls the persistence makes, for the cost tests."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

from fastcheckpoint.stores import offers_sequence_guard


class CountingStore:
    """Forwards every call of the store protocol to ``inner`` and counts them by method."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()

    @property
    def sequence_guard(self) -> bool:
        """Whether ``inner`` takes ``update_run(..., latest_sequence=)``, which the
        forwarding ``update_run`` passes on."""
        return offers_sequence_guard(self.inner)

    def take(self) -> dict[str, int]:
        """The calls counted since the last ``take``."""
        counted = dict(self.calls)
        self.calls.clear()
        return counted


def _forwarding(name: str) -> Callable[..., Coroutine[Any, Any, Any]]:
    async def forward(self: CountingStore, *args: Any, **kwargs: Any) -> Any:
        self.calls[name] += 1
        return await getattr(self.inner, name)(*args, **kwargs)

    forward.__name__ = name
    return forward


for _name in ("append", "get", "latest", "headers", "delete", "delete_run", "get_run",
              "update_run", "list_runs", "count_runs", "put_items", "get_items", "scan_items",
              "delete_items", "purge_expired", "aclose"):
    setattr(CountingStore, _name, _forwarding(_name))
