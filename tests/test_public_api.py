"""What ``fastcheckpoint`` exports: every store class, on any install. A store whose driver is
missing is absent to ``hasattr``, ``dir`` and ``import *``, and named with its install command
to whoever asks for it.

The missing driver is simulated by a ``None`` in ``sys.modules`` (an import of it fails as if
it were not installed); tests/test_install.py checks the same on a real install without extras.
"""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fastcheckpoint
from fastcheckpoint import CheckpointError, ConfigurationError

ROOT = Path(__file__).resolve().parent.parent

STORES = {"MemoryStore", "InMemoryCheckpointStore", "FileStore", "FileCheckpointStore",
          "SQLiteStore", "PostgresStore", "RedisStore", "RedisCheckpointStore", "S3Store",
          "S3CheckpointStore", "DynamoDBStore"}


def test_every_store_and_max_ttl_are_exported() -> None:
    exported = set(fastcheckpoint.__all__)  # this venv has every driver

    assert exported >= STORES | {"MAX_TTL_SECONDS", "open_store", "CheckpointStore"}
    for name in exported:
        assert getattr(fastcheckpoint, name) is not None, name
    assert fastcheckpoint.MAX_TTL_SECONDS == 1e13
    assert fastcheckpoint.SQLiteStore.__module__ == "fastcheckpoint.stores.sqlite"
    assert fastcheckpoint.PostgresStore.__module__ == "fastcheckpoint.stores.postgres"


def test_the_lazy_stores_are_exported_to_type_checkers_too() -> None:
    """Type checkers do not run the ``__all__`` built at import: they read the imports under
    ``TYPE_CHECKING``, which must name every lazy store."""
    tree = ast.parse((ROOT / "fastcheckpoint" / "__init__.py").read_text(encoding="utf-8"))
    (block,) = [node for node in tree.body if isinstance(node, ast.If)
                and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"]
    exported = {alias.asname for node in block.body if isinstance(node, ast.ImportFrom)
                for alias in node.names if alias.asname == alias.name}

    assert exported == set(fastcheckpoint._LAZY)


def test_dir_lists_what_hasattr_finds() -> None:
    listed = set(dir(fastcheckpoint))

    assert set(fastcheckpoint.__all__) <= listed
    assert all(hasattr(fastcheckpoint, name) for name in listed)


@pytest.fixture
def redis_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if the ``redis`` extra were not installed; the store module comes back afterwards."""
    importlib.import_module("fastcheckpoint.stores.redis")
    monkeypatch.delitem(sys.modules, "fastcheckpoint.stores.redis")
    monkeypatch.setitem(sys.modules, "redis", None)


@pytest.mark.usefixtures("redis_missing")
def test_a_store_without_its_driver_is_absent_to_hasattr_and_dir() -> None:
    assert not hasattr(fastcheckpoint, "RedisStore")
    assert getattr(fastcheckpoint, "RedisCheckpointStore", None) is None
    listed = set(dir(fastcheckpoint))
    assert "RedisStore" not in listed
    assert "RedisCheckpointStore" not in listed
    assert {"S3Store", "SQLiteStore"} <= listed
    assert all(hasattr(fastcheckpoint, name) for name in listed)


@pytest.mark.usefixtures("redis_missing")
def test_a_store_without_its_driver_names_the_install_command() -> None:
    with pytest.raises(ConfigurationError) as caught:
        fastcheckpoint.RedisStore

    assert "pip install 'fastcheckpoint[redis]'" in str(caught.value)
    assert isinstance(caught.value, AttributeError)
    assert isinstance(caught.value.__cause__, ImportError)


def _import_redis_store() -> object:
    from fastcheckpoint import RedisStore

    return RedisStore


@pytest.mark.usefixtures("redis_missing")
def test_importing_a_store_without_its_driver_names_the_install_command() -> None:
    """Python would turn an ``AttributeError`` into "cannot import name 'RedisStore'"."""
    with pytest.raises(CheckpointError, match=r"pip install 'fastcheckpoint\[redis\]'"):
        _import_redis_store()
    with pytest.raises(ConfigurationError, match=r"pip install 'fastcheckpoint\[redis\]'"):
        exec("from fastcheckpoint import RedisCheckpointStore", {})


def test_a_python_without_sqlite3_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    importlib.import_module("fastcheckpoint.stores.sqlite")
    monkeypatch.delitem(sys.modules, "fastcheckpoint.stores.sqlite")
    monkeypatch.setitem(sys.modules, "sqlite3", None)
    monkeypatch.setitem(sys.modules, "_sqlite3", None)

    assert not hasattr(fastcheckpoint, "SQLiteStore")
    assert "SQLiteStore" not in dir(fastcheckpoint)
    with pytest.raises(ConfigurationError, match="this Python was built without it"):
        fastcheckpoint.SQLiteStore


STAR_IMPORT = """
import sys
for driver in ("redis", "asyncpg", "aiobotocore"):
    sys.modules[driver] = None  # as if no extra were installed
from fastcheckpoint import *
print(*sorted(name for name in dir() if not name.startswith('_')))
"""


def test_import_star_works_without_the_extras() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", STAR_IMPORT], capture_output=True, text=True,
                            env=env, cwd=ROOT, timeout=60, check=False)

    assert result.returncode == 0, result.stderr
    names = set(result.stdout.split())
    assert {"FileStore", "MemoryStore", "SQLiteStore", "MAX_TTL_SECONDS", "open_store"} <= names
    assert names.isdisjoint({"RedisStore", "S3Store", "DynamoDBStore", "PostgresStore"})
