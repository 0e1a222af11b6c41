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


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """The scheme registry, restored after the test."""
    copy = dict(stores_module._REGISTRY)
    monkeypatch.setattr(stores_module, "_REGISTRY", copy)
    return copy


@pytest.mark.parametrize("call", [
    {"scheme": "my store", "target": "my_package.store:MyStore"},
    {"scheme": "my:store", "target": "my_package.store:MyStore"},
    {"scheme": "1store", "target": "my_package.store:MyStore"},
    {"scheme": "st\ud800re", "target": "my_package.store:MyStore"},
    {"scheme": 5, "target": "my_package.store:MyStore"},
    {"scheme": "mystore", "target": ":"},
    {"scheme": "mystore", "target": "my package.store:MyStore"},
    {"scheme": "mystore", "target": "my_package.store:"},
    {"scheme": "mystore", "target": "my_package..store:MyStore"},
    {"scheme": "mystore", "target": "my_package.store:MyStore", "extra": 5},
    {"scheme": "mystore", "target": "my_package.store:MyStore", "extra": "a b\n"},
    {"scheme": "mystore", "target": "my_package.store:MyStore", "remote": "no"},
    {"scheme": "mystore", "target": "my_package.store:MyStore", "replace": 1},
], ids=lambda call: repr(call)[:60])
def test_register_store_refuses_what_no_url_could_open(
    registry: dict[str, object], call: dict[str, object]
) -> None:
    """A scheme no URL can carry, a target that names no class, an extra that is no extra's
    name or a flag that is no bool is a ``ConfigurationError`` at once, nothing registered
    (before, most were registered: ``open_store`` then failed with a misleading message or
    a ``ValueError`` from the import, or never reached the scheme)."""
    before = dict(registry)
    with pytest.raises(ConfigurationError):
        register_store(**call)  # type: ignore[arg-type]
    assert registry == before


def test_register_store_takes_str_subclasses_as_their_text(registry: dict[str, object]) -> None:
    class Named(str):
        def lower(self) -> str:
            raise RuntimeError("a subclass's own methods never run")

    register_store(Named("MyStore"), Named("my_package.store:MyStore"), Named("my-extra"))
    assert "mystore" in available_schemes()
    with pytest.raises(ConfigurationError, match=r"fastcheckpoint\[my-extra\]"):
        open_store("mystore://x")


def test_open_store_types_what_a_third_party_store_raises(
    registry: dict[str, object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store module that fails to import with something else than ``ImportError``, and a
    ``from_url`` that raises its own error, are ``ConfigurationError`` naming the store (the
    password of the URL left out): ``open_store`` raises nothing else."""
    (tmp_path / "fc_broken_import.py").write_text("raise RuntimeError('broken at import')\n")
    (tmp_path / "fc_broken_open.py").write_text(
        "class Store:\n"
        "    @classmethod\n"
        "    def from_url(cls, url, **options):\n"
        "        raise ValueError('cannot parse ' + url)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    register_store("brokenimport", "fc_broken_import:Store")
    register_store("brokenopen", "fc_broken_open:Store")
    try:
        with pytest.raises(ConfigurationError, match="could not be imported: RuntimeError"):
            open_store("brokenimport://x")
        with pytest.raises(ConfigurationError, match="could not open") as raised:
            open_store("brokenopen://user:hunter2@host/x")
    finally:
        for name in ("fc_broken_import", "fc_broken_open"):
            sys.modules.pop(name, None)
    assert "hunter2" not in str(raised.value)
    assert isinstance(raised.value.__cause__, ValueError)
