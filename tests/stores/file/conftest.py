"""Fixtures of the file store's own tests: a store over a directory inside the test's own."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastcheckpoint.stores.file import FileStore


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """The store directory: created by the store itself, inside the test's own directory."""
    return tmp_path / "store"


@pytest.fixture
def store(root: Path) -> FileStore:
    return FileStore(root)
