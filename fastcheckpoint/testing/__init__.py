"""The store contract suite, for this package's stores and for third-party ones.

Subclass :class:`StoreContract` once in a test module, providing a ``store`` fixture that
yields a fresh store and closes it; every clause of
:class:`~fastcheckpoint.stores.CheckpointStore` is then tested against that store::

    import pytest
    from fastcheckpoint.testing import StoreContract

    class TestMyStore(StoreContract):
        @pytest.fixture
        async def store(self):
            store = MyStore()
            yield store
            await store.aclose()

The contract is also six classes by concern, each usable on its own with the same ``store``
fixture, whose sum is :class:`StoreContract`: :class:`AppendContract`, :class:`ReadContract`,
:class:`DeleteContract`, :class:`RunsContract`, :class:`ItemsContract` and
:class:`PurgeContract`. Subclass some of them to run part of the contract, e.g. while a store is
being written (every one of them creates runs with ``append`` and reads them back with
``get_run``, ``get``, ``latest`` and ``headers``)::

    from fastcheckpoint.testing import AppendContract, ReadContract

    class TestMyStore(AppendContract, ReadContract):
        ...  # the same ``store`` fixture

Stores offering the adapter capabilities (``SupportsLabels``, ``SupportsSharedItems``,
``SupportsNestedItems``) also subclass :class:`LabelsContract`, :class:`SharedItemsContract`
and :class:`NestedItemsContract`; stores whose appends can take the run's next sequence
(``SupportsAppendNext``) subclass :class:`AppendNextContract`; stores whose run updates
take ``latest_sequence=`` (``SupportsSequenceGuard``) subclass
:class:`SequenceGuardContract`. Stores that rebuild damaged
run records (``SupportsRepair``) also subclass :class:`RepairContract`, adding a
``damage_run_record`` fixture that corrupts a run's record in place.

The tests need pytest and anyio's pytest plugin; they run on every backend the
``anyio_backend`` fixture names. The builders (``make_run``, ``make_checkpoint``,
``make_item``...) make the values a store is handed, for backend-specific tests beside it.
"""

from __future__ import annotations

import pytest

# Plain asserts in the contract report their operands like those in a test module.
pytest.register_assert_rewrite(
    "fastcheckpoint.testing._contract",
    "fastcheckpoint.testing._append",
    "fastcheckpoint.testing._read",
    "fastcheckpoint.testing._delete",
    "fastcheckpoint.testing._runs",
    "fastcheckpoint.testing._items",
    "fastcheckpoint.testing._purge",
    "fastcheckpoint.testing._repair",
    "fastcheckpoint.testing._guard",
    "fastcheckpoint.testing._adapter",
)

from fastcheckpoint.testing._adapter import (  # noqa: E402
    LabelsContract,
    NestedItemsContract,
    SharedItemsContract,
)
from fastcheckpoint.testing._append import AppendContract, AppendNextContract  # noqa: E402
from fastcheckpoint.testing._builders import (  # noqa: E402
    T0,
    checkpoint_id_of,
    header_of,
    key_of,
    make_checkpoint,
    make_item,
    make_run,
    without_key,
)
from fastcheckpoint.testing._delete import DeleteContract  # noqa: E402
from fastcheckpoint.testing._guard import SequenceGuardContract  # noqa: E402
from fastcheckpoint.testing._items import ItemsContract  # noqa: E402
from fastcheckpoint.testing._purge import PurgeContract  # noqa: E402
from fastcheckpoint.testing._read import ReadContract  # noqa: E402
from fastcheckpoint.testing._repair import DamageRunRecord, RepairContract  # noqa: E402
from fastcheckpoint.testing._runs import RunsContract  # noqa: E402
from fastcheckpoint.testing._store import StoreContract  # noqa: E402

__all__ = [
    "T0",
    "AppendContract",
    "AppendNextContract",
    "DamageRunRecord",
    "DeleteContract",
    "ItemsContract",
    "LabelsContract",
    "NestedItemsContract",
    "PurgeContract",
    "ReadContract",
    "RepairContract",
    "RunsContract",
    "SequenceGuardContract",
    "SharedItemsContract",
    "StoreContract",
    "checkpoint_id_of",
    "header_of",
    "key_of",
    "make_checkpoint",
    "make_item",
    "make_run",
    "without_key",
]
