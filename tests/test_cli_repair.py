"""``fastcheckpoint doctor --repair``: damaged run records found, rebuilt and reported."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest

import fastcheckpoint.stores as stores_module
from fastcheckpoint import CheckpointManager, open_store
from fastcheckpoint._ids import run_key
from fastcheckpoint.cli import EXIT_DAMAGED, EXIT_OK, EXIT_USAGE, main
from fastcheckpoint.errors import (
    CheckpointNotFound,
    ConflictError,
    CorruptCheckpointError,
    ValidationError,
)
from fastcheckpoint.stores import RunDamage, RunRecord, register_store
from fastcheckpoint.stores.memory import MemoryStore
from tests._file_records import run_record
from tests._helpers import ForwardingStore

GHOST = "g" * 24
"""A run key whose record is damaged and whose log holds no checkpoint: nothing to rebuild."""


class RepairableStore(MemoryStore):
    """A memory store with run records marked damaged by the test; one instance shared by
    every CLI call."""

    shared: RepairableStore | None = None

    def __init__(self) -> None:
        super().__init__()
        self.damage: dict[str, str] = {}

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RepairableStore:
        assert cls.shared is not None
        return cls.shared

    async def damaged_runs(self, *, run_key: str | None = None, now: float) -> list[RunDamage]:
        found = []
        for key, problem in self.damage.items():
            if run_key not in (None, key):
                continue
            page, _ = await self.headers(key, before=None, limit=10_000, now=now)
            found.append(RunDamage(run_key=key, key=f"runs/{key}/run.rec", problem=problem,
                                   checkpoints=len(page), newest=page[0] if page else None))
        return found

    async def rebuild_run(self, run_key: str, seed: RunRecord, *, now: float) -> RunRecord:
        if run_key not in self.damage:
            raise ConflictError(f"runs/{run_key}/run.rec is not damaged")
        record = await self.get_run(run_key, now=now)
        if record is None:
            raise CheckpointNotFound(f"runs/{run_key} holds no intact checkpoint")
        del self.damage[run_key]
        return await self.update_run(run_key, incarnation=record.incarnation,
                                     version=record.version, status=seed.status,
                                     data=seed.data, now=now)


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> RepairableStore:
    """order-1 (3 checkpoints, paused) and order-2 (1 checkpoint), order-1's record damaged."""
    monkeypatch.setattr(stores_module, "_REGISTRY", dict(stores_module._REGISTRY))
    register_store("repairable", f"{__name__}:RepairableStore")
    shared = RepairableStore()
    monkeypatch.setattr(RepairableStore, "shared", shared)

    async def seed() -> None:
        manager = CheckpointManager(shared)
        for step in range(3):
            await manager.create("order-1", {"step": step}, force=True)
        await manager.pause("order-1", request={"amount": 12})
        await manager.create("order-2", {"step": 0})

    anyio.run(seed)
    shared.damage[run_key("order-1")] = "fails its checksum"
    return shared


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_repair_rebuilds_a_damaged_run_and_says_what_was_lost(
    store: RepairableStore, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(capsys, "doctor", "--repair", "repairable://x")
    again, second, _ = run_cli(capsys, "doctor", "--repair", "repairable://x")
    _, runs, _ = run_cli(capsys, "runs", "--url", "repairable://x", "--json")

    assert code == EXIT_OK
    lines = out.splitlines()
    assert lines[0] == "repairable://x: 1 damaged run record(s), 1 rebuilt, 0 not rebuilt"
    assert lines[1].split() == ["RUN", "RESULT", "CHECKPOINTS", "PROBLEM", "RECORD"]
    assert lines[2].split()[:3] == ["order-1", "rebuilt", "3"]
    assert "fails its checksum" in lines[2]
    assert lines[3].startswith("order-1: rebuilt, every intact checkpoint restorable; lost "
                               "with the damaged record: ")
    assert "status history" in lines[3]
    assert len(lines) == 4
    assert (again, second) == (EXIT_OK, "repairable://x: nothing damaged\n")
    statuses = {run["run_id"]: run["status"] for run in json.loads(runs)["runs"]}
    assert statuses == {"order-1": "active", "order-2": "active"}


def test_repair_exits_5_when_damage_could_not_be_repaired(
    store: RepairableStore, capsys: pytest.CaptureFixture[str]
) -> None:
    store.damage[GHOST] = "unreadable"

    code, out, _ = run_cli(capsys, "doctor", "--repair", "repairable://x", "--json")

    assert code == EXIT_DAMAGED
    report = json.loads(out)
    assert (report["damaged"], report["rebuilt"], report["run_id"]) == (2, 1, None)
    by_key = {entry["key"]: entry for entry in report["reports"]}
    ghost = by_key[f"runs/{GHOST}/run.rec"]
    assert (ghost["run_id"], ghost["outcome"], ghost["checkpoints"]) == (None, "unrecoverable", 0)
    assert "nothing to rebuild from" in ghost["detail"]
    rebuilt = by_key[f"runs/{run_key('order-1')}/run.rec"]
    assert (rebuilt["run_id"], rebuilt["outcome"]) == ("order-1", "rebuilt")
    assert "approval requests and decisions" in rebuilt["lost"]


def test_a_record_repaired_meanwhile_by_another_process_is_not_a_failure(
    store: RepairableStore, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    found = RepairableStore.damaged_runs

    async def found_then_repaired_elsewhere(
        self: RepairableStore, *, run_key: str | None = None, now: float
    ) -> list[RunDamage]:
        damaged = await found(self, run_key=run_key, now=now)
        self.damage.clear()  # another process rebuilds the record before this one does
        return damaged

    monkeypatch.setattr(RepairableStore, "damaged_runs", found_then_repaired_elsewhere)
    code, out, _ = run_cli(capsys, "doctor", "--repair", "repairable://x", "--json")

    assert code == EXIT_OK
    [entry] = json.loads(out)["reports"]
    assert (entry["run_id"], entry["outcome"]) == ("order-1", "not damaged")
    assert "another process" in entry["detail"]


@pytest.mark.parametrize("refusal", [
    CorruptCheckpointError("a label is not text", key="runs/x/run.rec"),
    ValidationError("a label must be a non-empty str, got b'beta'"),
])
def test_a_run_the_store_cannot_rebuild_is_reported_and_the_others_are_repaired(
    store: RepairableStore, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    refusal: Exception,
) -> None:
    # One run damaged beyond what the store can rebuild ended the whole repair with its
    # error: the runs after it stayed damaged and the reports of those before were lost.
    rebuild = RepairableStore.rebuild_run
    order_3 = run_key("order-3")
    anyio.run(CheckpointManager(store).create, "order-3", {"step": 0})
    store.damage = {order_3: "fails its checksum", run_key("order-2"): "unreadable",
                    run_key("order-1"): "fails its checksum"}

    async def refuse_order_2(
        self: RepairableStore, run_key_: str, seed: RunRecord, *, now: float
    ) -> RunRecord:
        if run_key_ == run_key("order-2"):
            raise refusal
        return await rebuild(self, run_key_, seed, now=now)

    monkeypatch.setattr(RepairableStore, "rebuild_run", refuse_order_2)
    code, out, _ = run_cli(capsys, "doctor", "--repair", "repairable://x", "--json")

    assert code == EXIT_DAMAGED
    outcomes = {entry["run_id"]: (entry["outcome"], entry["detail"])
                for entry in json.loads(out)["reports"]}
    assert {run: outcome for run, (outcome, _) in outcomes.items()} == {
        "order-1": "rebuilt", "order-2": "unrecoverable", "order-3": "rebuilt"}
    assert str(refusal) in outcomes["order-2"][1]
    assert list(store.damage) == [run_key("order-2")]


def test_repair_of_one_run_leaves_the_others(
    store: RepairableStore, capsys: pytest.CaptureFixture[str]
) -> None:
    store.damage[GHOST] = "unreadable"

    fine, out, _ = run_cli(capsys, "doctor", "--repair", "repairable://x", "order-2")
    code, _, _ = run_cli(capsys, "doctor", "--repair", "--url", "repairable://x", "order-1")

    assert (fine, out) == (EXIT_OK, "repairable://x, run order-2: nothing damaged\n")
    assert code == EXIT_OK
    assert list(store.damage) == [GHOST]


@pytest.mark.parametrize("argv", [
    ["doctor", "memory://x", "order-1"],  # a run without --repair
    ["doctor", "--repair", "repairable://x", "order-1", "--url", "repairable://y"],
])
def test_repair_arguments_that_do_not_fit_are_usage_errors(
    store: RepairableStore, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    code, out, err = run_cli(capsys, *argv)

    assert (code, out) == (EXIT_USAGE, "")
    assert err.startswith("error: ")
    assert list(store.damage) == [run_key("order-1")]


class WithoutRepair(ForwardingStore):
    """A store that does not offer ``SupportsRepair``."""

    @classmethod
    def from_url(cls, url: str, **options: Any) -> WithoutRepair:
        return cls(MemoryStore())


def test_repair_on_a_store_that_cannot_says_so(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stores_module, "_REGISTRY", dict(stores_module._REGISTRY))
    register_store("norepair", f"{__name__}:WithoutRepair")

    code, out, err = run_cli(capsys, "doctor", "--repair", "norepair://x")

    assert (code, out) == (EXIT_USAGE, "")
    assert "WithoutRepair cannot rebuild damaged run records" in err


def test_repair_of_a_memory_store_finds_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "doctor", "--repair", "memory://")

    assert (code, out) == (EXIT_OK, "memory://: nothing damaged\n")


def test_repair_does_not_create_a_file_store_that_is_not_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(capsys, "doctor", "--repair", f"file://{tmp_path / 'typo'}")

    assert code == EXIT_USAGE
    assert "no file store at" in err
    assert not (tmp_path / "typo").exists()


def test_repair_rebuilds_a_corrupt_file_store_run_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"file://{tmp_path / 'store'}"

    async def seed() -> None:
        manager = CheckpointManager(open_store(url))
        for step in range(10):
            await manager.create("order-1", {"step": step}, force=True)
        await manager.aclose()

    anyio.run(seed)
    record = run_record(tmp_path / "store", run_key("order-1"))
    damaged = bytearray(record.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    record.write_bytes(bytes(damaged))

    code, out, _ = run_cli(capsys, "doctor", "--repair", url, "--json")
    shown, latest, _ = run_cli(capsys, "show", "order-1", "--url", url, "--json")

    assert code == EXIT_OK, out
    report = json.loads(out)
    assert (report["damaged"], report["rebuilt"]) == (1, 1)
    [entry] = report["reports"]
    assert (entry["run_id"], entry["outcome"], entry["checkpoints"]) == ("order-1", "rebuilt", 10)
    assert shown == EXIT_OK
    assert json.loads(latest)["state"] == {"step": 9}


def test_repair_of_one_run_of_the_store_the_environment_names(
    store: RepairableStore, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    # "doctor --repair RUN" with FASTCHECKPOINT_URL set: RUN is no URL and no path there is.
    monkeypatch.setenv("FASTCHECKPOINT_URL", "repairable://x")
    monkeypatch.chdir(tmp_path)

    code, out, err = run_cli(capsys, "doctor", "--repair", "order-1", "--json")

    assert code == EXIT_OK, err
    report = json.loads(out)
    assert (report["store"], report["run_id"], report["rebuilt"]) == (
        "repairable://x", "order-1", 1)
    assert list(store.damage) == []
