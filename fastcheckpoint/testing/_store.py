"""The whole store contract: every suite of the ``CheckpointStore`` protocol in one class."""

from __future__ import annotations

from fastcheckpoint.testing._append import AppendContract
from fastcheckpoint.testing._delete import DeleteContract
from fastcheckpoint.testing._items import ItemsContract
from fastcheckpoint.testing._purge import PurgeContract
from fastcheckpoint.testing._read import ReadContract
from fastcheckpoint.testing._runs import RunsContract

__all__ = ["StoreContract"]


class StoreContract(
    AppendContract, ReadContract, DeleteContract, RunsContract, ItemsContract, PurgeContract
):
    """Subclass once per backend, providing a ``store`` fixture; every test then runs on it.

    ``store`` is an async fixture yielding a fresh, empty store and closing it afterwards::

        class TestMyStore(StoreContract):
            @pytest.fixture
            async def store(self, tmp_path) -> AsyncIterator[CheckpointStore]:
                store = MyStore(tmp_path)
                yield store
                await store.aclose()

    Tests are marked ``anyio``; define an ``anyio_backend`` fixture (in ``conftest.py``) to run
    them on trio as well as asyncio. Every ``test_*`` coroutine, including ones a subclass adds,
    fails after ``deadline_seconds``: raise it for a slow remote backend.

    It is the sum of :class:`AppendContract`, :class:`ReadContract`, :class:`DeleteContract`,
    :class:`RunsContract`, :class:`ItemsContract` and :class:`PurgeContract`, each a test class
    of its own with the same ``store`` fixture: subclass some of them to run part of the
    contract, e.g. while a store is being written. Every one of them creates runs with
    ``append`` and reads them back with ``get_run``, ``get``, ``latest`` and ``headers``, so
    those come first.
    """
