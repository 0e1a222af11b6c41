"""A third-party store, ``examples/dict_store.py``, passes the shipped contract and plugs in by
URL: what ``docs/store-protocol.md`` tells store authors to do, done here on the example."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import pytest

import fastcheckpoint.stores as stores_module
from fastcheckpoint import CheckpointConfig, CheckpointManager, ConfigurationError
from fastcheckpoint.stores import CheckpointStore, available_schemes, open_store, register_store
from fastcheckpoint.testing import (
    AppendContract,
    DeleteContract,
    ItemsContract,
    PurgeContract,
    ReadContract,
    RunsContract,
    SequenceGuardContract,
    StoreContract,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "dict_store.py"
T0 = 1_700_000_000.0


def _load_example() -> ModuleType:
    """The example as the module ``dict_store``, the name its ``register_store`` call uses."""
    spec = importlib.util.spec_from_file_location("dict_store", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


dict_store = _load_example()


class TestDictStore(StoreContract, SequenceGuardContract):
    @pytest.fixture
    async def store(self) -> AsyncIterator[CheckpointStore]:
        store: CheckpointStore = dict_store.DictStore()
        yield store
        await store.aclose()


@pytest.fixture
def dict_scheme(monkeypatch: pytest.MonkeyPatch) -> None:
    """``dict://`` registered for one test: the registry and ``sys.modules`` are restored."""
    monkeypatch.setattr(stores_module, "_REGISTRY", dict(stores_module._REGISTRY))
    monkeypatch.setitem(sys.modules, "dict_store", dict_store)
    register_store("dict", "dict_store:DictStore")


@pytest.mark.anyio
@pytest.mark.usefixtures("dict_scheme")
async def test_a_manager_creates_and_restores_on_the_store_opened_by_url() -> None:
    now = [T0]
    store = open_store("dict://")
    assert isinstance(store, dict_store.DictStore)
    assert "dict" in available_schemes()
    manager = CheckpointManager(store, CheckpointConfig(clock=lambda: now[0]))
    try:
        first = await manager.create("run-1", {"step": 1}, step_name="plan")
        second = await manager.create("run-1", {"step": 2}, step_name="act", ttl_seconds=10)
        assert first is not None
        assert second is not None

        restored = await manager.restore("run-1")
        assert restored is not None
        assert (restored.checkpoint_id, restored.state) == (second.checkpoint_id, {"step": 2})
        assert restored.metadata.parent_id == first.checkpoint_id
        before = await manager.restore_from(first.checkpoint_id)
        assert before is not None
        assert before.state == {"step": 1}

        now[0] = T0 + 10  # the second checkpoint expires; the first never does
        restored = await manager.restore("run-1")
        assert restored is not None
        assert restored.checkpoint_id == first.checkpoint_id
        assert await manager.cleanup_expired() == 1
        assert await manager.delete_run("run-1") == 1
        assert await manager.restore("run-1") is None
    finally:
        await manager.aclose()


@pytest.mark.usefixtures("dict_scheme")
def test_the_store_refuses_options_it_does_not_know() -> None:
    with pytest.raises(ConfigurationError, match="unknown option 'size'"):
        open_store("dict://?size=10")
    with pytest.raises(ConfigurationError, match="unknown option 'size'"):
        open_store("dict://", size=10)


def test_the_example_imports_only_public_names() -> None:
    tree = ast.parse(EXAMPLE.read_text(encoding="utf-8"))
    imported = [
        f"{node.module}.{alias.name}"
        for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
        for alias in node.names
    ] + [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
         for alias in node.names]
    ours = [name for name in imported if name.split(".")[0] == "fastcheckpoint"]

    assert ours
    assert [name for name in ours if any(part.startswith("_") for part in name.split("."))] == []
    assert {name.rsplit(".", 1)[0] for name in ours} <= {"fastcheckpoint", "fastcheckpoint.stores"}


def test_the_example_runs_as_a_script() -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "restored {'step': 2} from DictStore\n"


def test_store_contract_is_the_sum_of_its_mixins() -> None:
    """Each test of the contract is in exactly one mixin, so running some mixins runs part of
    the contract and running all of them runs all of it."""
    mixins = [AppendContract, ReadContract, DeleteContract, RunsContract, ItemsContract,
              PurgeContract]
    per_mixin = [{name for name in vars(mixin) if name.startswith("test_")} for mixin in mixins]
    every = {name for name in dir(StoreContract) if name.startswith("test_")}

    assert all(per_mixin)
    assert sum(len(names) for names in per_mixin) == len(every)
    assert set().union(*per_mixin) == every
