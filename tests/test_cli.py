"""The ``fastcheckpoint`` command line: init and bench."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import fastcheckpoint.stores as stores_module
from fastcheckpoint.cli import EXIT_OK, EXIT_STORE, EXIT_USAGE, main
from fastcheckpoint.errors import StoreUnavailableError
from fastcheckpoint.stores import register_store
from fastcheckpoint.stores.memory import MemoryStore

PROVISIONED: list[str] = []


class ProvisionedStore(MemoryStore):
    """A store with a backend to set up: records each provision() call."""

    @classmethod
    def from_url(cls, url: str, **options: Any) -> ProvisionedStore:
        return cls()

    async def provision(self) -> None:
        PROVISIONED.append("provisioned")


class BrokenStore(ProvisionedStore):
    async def provision(self) -> None:
        raise StoreUnavailableError("cannot reach the endpoint")


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stores_module, "_REGISTRY", dict(stores_module._REGISTRY))
    register_store("provisioned", f"{__name__}:ProvisionedStore")
    register_store("broken", f"{__name__}:BrokenStore")
    PROVISIONED.clear()


@pytest.mark.usefixtures("registry")
def test_init_provisions_a_store_that_needs_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", "provisioned://x"]) == EXIT_OK
    assert main(["init", "provisioned://x"]) == EXIT_OK  # idempotent from the caller's side

    assert PROVISIONED == ["provisioned", "provisioned"]
    assert "provisioned" in capsys.readouterr().out


def test_init_of_a_store_without_provisioning_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["init", f"file://{tmp_path / 'ckpt'}"]) == EXIT_OK
    assert "nothing to provision" in capsys.readouterr().out


def test_init_with_a_bad_url_exits_with_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", "nosuch://x"]) == EXIT_USAGE
    assert "unknown store URL scheme" in capsys.readouterr().err


@pytest.mark.usefixtures("registry")
def test_init_when_the_backend_fails_exits_with_store_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["init", "broken://x"]) == EXIT_STORE
    assert "cannot reach" in capsys.readouterr().err


def test_bench_passes_its_arguments_to_the_suite(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def fake_main(argv: list[str]) -> int:
        seen.append(argv)
        return 0

    monkeypatch.setattr("benchmarks.cli.main", fake_main)
    assert main(["bench", "--quick", "--store", "memory://"]) == EXIT_OK
    assert seen == [["--quick", "--store", "memory://"]]


def test_a_missing_command_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as caught:
        main([])
    assert caught.value.code == 2
