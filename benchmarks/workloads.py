"""The workloads W1-W6 (docs/benchmarks.md). Each ``run_once`` is one repetition on a fresh session.

W1 and W4 (and W7, in :mod:`benchmarks.longrun`) speak only the
:class:`~benchmarks.subjects.Driver` interface, so they run on the
comparison subjects too; W2, W3, W5 and W6 use fastcheckpoint's manager directly.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import anyio
import anyio.to_thread

import fastcheckpoint
from benchmarks.content import Content, make_content
from benchmarks.measure import Sample, time_one
from benchmarks.settings import DEFAULT_KEEP, Sizes
from benchmarks.subjects import StoreTarget, Subject, unique_run_id

__all__ = ["WORKLOADS", "Outcome", "Workload"]


@dataclass
class Outcome:
    """One repetition: a sample per phase, and what was verified."""

    samples: dict[str, Sample]
    checks: dict[str, Any] = field(default_factory=dict)


class Workload:
    name: ClassVar[str]
    title: ClassVar[str]
    comparable: ClassVar[bool] = False
    """Whether it runs on FastAgentic and LangGraph with ``--compare``."""
    compared_systems: ClassVar[tuple[str, ...]] = ("fastagentic", "langgraph")
    """Which comparison systems it runs on, when ``comparable``."""

    def keep(self, sizes: Sizes) -> int | None:
        """``max_checkpoints_per_run`` of the workload."""
        return DEFAULT_KEEP

    def content(self, sizes: Sizes) -> Content:
        return make_content(sizes.state_bytes, sizes.messages)

    def skip_reason(self, subject: Subject) -> str | None:
        """Why this workload does not apply to ``subject`` (``None``: it does)."""
        return None

    async def run_once(self, subject: Subject, sizes: Sizes, content: Content) -> Outcome:
        raise NotImplementedError


class Sequential(Workload):
    name = "W1"
    title = "sequential: one run, creates, restores of the latest, lists"
    comparable = True

    async def run_once(self, subject: Subject, sizes: Sizes, content: Content) -> Outcome:
        run_id = unique_run_id(self.name)
        async with subject.session(self.keep(sizes)) as driver:
            created: list[int] = []
            for step in range(sizes.w1_creates):
                content.state["step"] = step
                await time_one(driver.prepare_create(run_id, content), created)
            restore = driver.prepare_restore(run_id)
            restored: list[int] = []
            latest = None
            for _ in range(sizes.w1_restores):
                latest = await time_one(restore, restored)
            listing = driver.prepare_list(run_id)
            listed: list[int] = []
            page: Any = []
            for _ in range(sizes.w1_lists):
                page = await time_one(listing, listed)
            held = await driver.held(run_id)
        return Outcome(
            {"create": Sample(created, sum(created)), "restore": Sample(restored, sum(restored)),
             "list": Sample(listed, sum(listed))},
            {"restored_latest": latest is not None, "listed": len(page), "held": held},
        )


class Concurrent(Workload):
    name = "W2"
    title = "concurrent: many runs created in parallel, then each restored"

    async def run_once(self, subject: Subject, sizes: Sizes, content: Content) -> Outcome:
        assert isinstance(subject, StoreTarget)
        runs = [unique_run_id(self.name) for _ in range(sizes.w2_runs)]
        created: list[int] = []
        restored: list[int] = []
        last: dict[str, int] = {}
        async with subject.session(self.keep(sizes)) as driver:

            async def write(run_id: str) -> None:
                own = Content(dict(content.state), content.messages)  # steps must not race
                for step in range(sizes.w2_creates):
                    own.state["step"] = step
                    await time_one(driver.prepare_create(run_id, own), created)

            async def read(run_id: str) -> None:
                checkpoint = await time_one(driver.prepare_restore(run_id), restored)
                last[run_id] = -1 if checkpoint is None else checkpoint.state["step"]

            create_ns = await _in_parallel(write, runs)
            restore_ns = await _in_parallel(read, runs)
        final = sizes.w2_creates - 1
        return Outcome(
            {"create": Sample(created, create_ns), "restore": Sample(restored, restore_ns)},
            {"runs_restored_latest": sum(1 for run in runs if last.get(run) == final),
             "runs": len(runs)},
        )


async def _in_parallel(task: Callable[[str], Any], runs: list[str]) -> int:
    """Wall time of running ``task(run)`` for every run at once."""
    start = time.perf_counter_ns()
    async with anyio.create_task_group() as group:
        for run_id in runs:
            group.start_soon(task, run_id)
    return time.perf_counter_ns() - start


class Large(Workload):
    name = "W3"
    title = "large: 1 MB states, created, then each restored by id"

    def content(self, sizes: Sizes) -> Content:
        return make_content(sizes.w3_state_bytes, sizes.messages)

    async def run_once(self, subject: Subject, sizes: Sizes, content: Content) -> Outcome:
        assert isinstance(subject, StoreTarget)
        run_id = unique_run_id(self.name)
        async with subject.session(self.keep(sizes)) as driver:
            manager = driver.manager
            created: list[int] = []
            ids: list[str] = []
            for step in range(sizes.w3_checkpoints):
                content.state["step"] = step
                checkpoint = await time_one(driver.prepare_create(run_id, content), created)
                ids.append(checkpoint.checkpoint_id)
            restored: list[int] = []
            matched = 0
            for step, checkpoint_id in enumerate(ids):
                operation = functools.partial(manager.restore_from, checkpoint_id)
                checkpoint = await time_one(operation, restored)
                matched += checkpoint is not None and checkpoint.state["step"] == step
        return Outcome(
            {"create": Sample(created, sum(created)), "restore": Sample(restored, sum(restored))},
            {"restored_by_id": matched, "checkpoints": len(ids)},
        )


class Pruning(Workload):
    name = "W4"
    title = "pruning: keep the newest few while creating many on one run"
    comparable = True

    def keep(self, sizes: Sizes) -> int | None:
        return sizes.w4_keep

    def skip_reason(self, subject: Subject) -> str | None:
        if subject.system == "langgraph":
            return "LangGraph savers have no per-thread retention limit, so W4 does not apply"
        return None

    async def run_once(self, subject: Subject, sizes: Sizes, content: Content) -> Outcome:
        run_id = unique_run_id(self.name)
        async with subject.session(self.keep(sizes)) as driver:
            created: list[int] = []
            for step in range(sizes.w4_creates):
                content.state["step"] = step
                await time_one(driver.prepare_create(run_id, content), created)
            held = await driver.held(run_id)
        return Outcome(
            {"create": Sample(created, sum(created))},
            {"held": held, "pruned_to_limit": held == min(sizes.w4_keep, sizes.w4_creates)},
        )


class Scaling(Workload):
    name = "W5"
    title = "scaling: create and restore-latest cost as a run grows (no pruning)"

    def keep(self, sizes: Sizes) -> int | None:
        return None

    async def run_once(self, subject: Subject, sizes: Sizes, content: Content) -> Outcome:
        assert isinstance(subject, StoreTarget)
        run_id = unique_run_id(self.name)
        samples: dict[str, Sample] = {}
        held = 0
        async with subject.session(self.keep(sizes)) as driver:
            manager = driver.manager
            driver.runs.add(run_id)
            restore = driver.prepare_restore(run_id)
            for level in sizes.w5_levels:
                # Filling is untimed and uses a tiny state (only the count matters), except
                # for the newest checkpoint: restores read one of the real size.
                while held < level - 1:
                    await manager.create(run_id, {"fill": held})
                    held += 1
                if held < level:
                    await manager.create(run_id, content.state, messages=content.messages)
                    held += 1
                restored: list[int] = []
                for _ in range(sizes.w5_ops):
                    await time_one(restore, restored)
                created: list[int] = []
                for step in range(sizes.w5_ops):
                    content.state["step"] = step
                    await time_one(driver.prepare_create(run_id, content), created)
                held += sizes.w5_ops
                samples[f"restore@{level}"] = Sample(restored, sum(restored))
                samples[f"create@{level}"] = Sample(created, sum(created))
            info = await manager.get_run(run_id)
        return Outcome(samples, {"held": 0 if info is None else info.checkpoint_count,
                                 "expected_held": held})


class MultiProcess(Workload):
    name = "W6"
    title = "multi-process: several OS processes append to the same run"

    def skip_reason(self, subject: Subject) -> str | None:
        if isinstance(subject, StoreTarget) and not subject.shared_across_processes:
            return f"{subject.url} lives inside one process; W6 needs a store processes share"
        return None

    async def run_once(self, subject: Subject, sizes: Sizes, content: Content) -> Outcome:
        assert isinstance(subject, StoreTarget)
        run_id = unique_run_id(self.name)
        async with subject.session(self.keep(sizes)) as driver:
            driver.runs.add(run_id)
            reports = await anyio.to_thread.run_sync(
                functools.partial(_run_workers, subject.url, run_id, sizes)
            )
            info = await driver.manager.get_run(run_id)
        sequences = sorted(seq for report in reports for seq in report["sequences"])
        latencies = [ns for report in reports for ns in report["latencies_ns"]]
        wall = max(r["end_ns"] for r in reports) - min(r["start_ns"] for r in reports)
        total = len(sequences)
        expected = sizes.w6_processes * sizes.w6_creates
        return Outcome(
            {"create": Sample(latencies, wall)},
            {
                "processes": len(reports),
                "creates": total,
                "errors": sum(report["errors"] for report in reports),
                "sequences_unique": len(set(sequences)) == total,
                "sequences_gap_free": sequences == list(range(total)) and total == expected,
                "latest_sequence_matches": info is not None and info.latest_sequence == total - 1,
            },
        )


def _run_workers(url: str, run_id: str, sizes: Sizes) -> list[dict[str, Any]]:
    """Start the writer processes, release them at once, and collect their reports."""
    # Workers import the same fastcheckpoint as this process (the working directory comes
    # first on their path) and the same benchmarks package (PYTHONPATH).
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    library = os.path.dirname(os.path.dirname(os.path.abspath(fastcheckpoint.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [root, os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "benchmarks.worker", url, run_id, str(sizes.w6_creates),
               str(sizes.state_bytes), str(sizes.messages)]
    workers = [
        subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env, cwd=library)
        for _ in range(sizes.w6_processes)
    ]
    try:
        for worker in workers:
            assert worker.stdout is not None
            line = worker.stdout.readline().strip()
            if line != "ready":
                _, err = worker.communicate(timeout=30)
                raise RuntimeError(f"W6 writer failed to start: {line}{err}")
        for worker in workers:  # the barrier: every writer is loaded before any starts
            assert worker.stdin is not None
            worker.stdin.write("go\n")
            worker.stdin.flush()
        reports = []
        for worker in workers:
            out, err = worker.communicate(timeout=600)
            if worker.returncode != 0:
                raise RuntimeError(f"W6 writer exited with {worker.returncode}: {err.strip()}")
            reports.append(json.loads(out))
        return reports
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()


WORKLOADS: dict[str, Workload] = {
    workload.name: workload
    for workload in (Sequential(), Concurrent(), Large(), Pruning(), Scaling(), MultiProcess())
}
