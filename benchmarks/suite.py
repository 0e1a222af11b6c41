"""Running the suite: every (subject, workload) pair, repetitions round-robin, then summaries.

Repetitions are the outer loop, so slow drift of a shared machine spreads over every subject
instead of landing on whichever ran last; comparison subjects run in the same process.
"""

from __future__ import annotations

import functools
import logging
import statistics
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio

from benchmarks.baseline import backend_floor
from benchmarks.compare import comparison_subjects
from benchmarks.content import Content
from benchmarks.footprint import floor, measure_footprint
from benchmarks.graph import GRAPH_WORKLOADS
from benchmarks.longrun import LONGRUN_WORKLOADS
from benchmarks.measure import Phase, Sample, summarize
from benchmarks.settings import Sizes
from benchmarks.subjects import StoreTarget, Subject, prepared_targets
from benchmarks.workloads import WORKLOADS, Outcome, Workload

__all__ = ["ALL_WORKLOADS", "Report", "WorkloadResult", "run_suite"]

ALL_WORKLOADS: dict[str, Workload] = {**WORKLOADS, **LONGRUN_WORKLOADS, **GRAPH_WORKLOADS}
"""W1-W6 (the default), and the long conversation W7 and the LangGraph graph workload G1
(only when asked for)."""

ASYNCIO_ONLY = ("redis", "rediss", "s3", "dynamodb", "postgres")
"""Store kinds whose drivers (redis-py, aiobotocore, asyncpg) need asyncio: left out of the
default store list under trio."""

logger = logging.getLogger("benchmarks")

Progress = Callable[[str], None]
"""Called after each repetition of each job with its label; set up by the caller."""


@dataclass
class WorkloadResult:
    workload: str
    subject: str
    system: str
    kind: str
    url: str | None = None
    phases: dict[str, Phase] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)
    """From the last repetition (every repetition is checked; a failure is an error)."""
    footprint: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None
    error: str | None = None


@dataclass
class Report:
    sizes: Sizes
    results: list[WorkloadResult]
    floor: dict[str, dict[str, float]]
    notes: list[str]
    backend: str
    network: list[dict[str, Any]] = field(default_factory=list)
    """Bare write/read latency on each store's server or disk (:mod:`baseline`)."""


@dataclass
class _Job:
    subject: Subject
    workload: Workload
    content: Content
    result: WorkloadResult
    samples: dict[str, list[Sample]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.workload.name} {self.subject.label}"


def _failed_checks(checks: dict[str, Any]) -> list[str]:
    return [name for name, value in checks.items() if value is False]


async def _run_jobs(
    jobs: list[_Job], floors: dict[str, Content], sizes: Sizes, progress: Progress | None
) -> dict[str, dict[str, float]]:
    """Run every job once per repetition; the floor is measured in each repetition too."""
    measured: dict[str, list[dict[str, float]]] = {name: [] for name in floors}
    for _ in range(sizes.repetitions):
        for job in jobs:
            if job.result.error is None:
                await _run_job_once(job, sizes)
            if progress is not None:
                progress(job.label)
        for name, content in floors.items():
            measured[name].append(floor(content, sizes.floor_iterations))
    return {
        name: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        for name, runs in measured.items() if runs
    }


async def _run_job_once(job: _Job, sizes: Sizes) -> None:
    try:
        outcome: Outcome = await job.workload.run_once(job.subject, sizes, job.content)
    except Exception as exc:
        job.result.error = f"{type(exc).__name__}: {exc}"
        logger.error("%s failed:\n%s", job.label, traceback.format_exc())
        return
    for phase, sample in outcome.samples.items():
        job.samples.setdefault(phase, []).append(sample)
    job.result.checks = outcome.checks
    failed = _failed_checks(outcome.checks)
    if failed:
        job.result.error = f"verification failed: {', '.join(failed)} ({outcome.checks})"
        logger.error("%s: %s", job.label, job.result.error)


def _plan(
    subjects: Sequence[Subject], workloads: Sequence[Workload], sizes: Sizes
) -> tuple[list[_Job], list[WorkloadResult]]:
    """Jobs to run, and results of the pairs that are skipped."""
    contents: dict[str, Content] = {}
    jobs: list[_Job] = []
    skipped: list[WorkloadResult] = []
    for subject in subjects:
        for workload in workloads:
            if not isinstance(subject, StoreTarget) and not (
                workload.comparable and subject.system in workload.compared_systems
            ):
                continue  # comparison subjects run only W1, W4 and W7 (LangGraph's also G1)
            only = getattr(subject, "only", None)
            if only is not None and workload.name not in only:
                continue
            result = WorkloadResult(
                workload=workload.name, subject=subject.label, system=subject.system,
                kind=subject.kind, url=subject.url if isinstance(subject, StoreTarget) else None,
            )
            reason = workload.skip_reason(subject)
            if reason is not None:
                result.skipped = reason
                skipped.append(result)
                continue
            if workload.name not in contents:
                contents[workload.name] = workload.content(sizes)
            jobs.append(_Job(subject, workload, contents[workload.name], result))
    return jobs, skipped


async def _footprints(jobs: list[_Job], sizes: Sizes) -> None:
    for job in jobs:
        subject = job.subject
        if job.result.error is not None:
            continue
        own = getattr(job.workload, "footprint", None)
        if own is not None:  # G1 counts per graph step, on every saver
            try:
                job.result.footprint = await own(subject, sizes, job.content)
            except Exception as exc:
                job.result.error = f"footprint failed: {type(exc).__name__}: {exc}"
                logger.error("%s footprint failed:\n%s", job.label, traceback.format_exc())
            continue
        if not isinstance(subject, StoreTarget) or job.workload.name == "W6":
            continue
        keep = job.workload.keep(sizes)
        creates = 3 if job.workload.name == "W3" else min(keep or 20, 100) + 2
        try:
            job.result.footprint = await measure_footprint(subject, job.content, keep, creates)
        except Exception as exc:
            job.result.error = f"footprint failed: {type(exc).__name__}: {exc}"
            logger.error("%s footprint failed:\n%s", job.label, traceback.format_exc())


async def _backend_floors(jobs: list[_Job], sizes: Sizes) -> list[dict[str, Any]]:
    """For each network or file store that ran W1: the bare driver on the same server (the
    bare filesystem in the same directory), same size."""
    floors: list[dict[str, Any]] = []
    for job in jobs:
        subject = job.subject
        if job.workload.name != "W1" or not isinstance(subject, StoreTarget):
            continue
        size = int(job.result.footprint.get("payload_header_bytes") or 0)
        if not size:
            continue
        try:
            measured = await backend_floor(subject, size, min(200, sizes.w1_restores))
        except Exception:
            logger.error("backend floor of %s failed:\n%s", subject.label, traceback.format_exc())
            continue
        if measured is not None:
            floors.append(measured)
    return floors


async def _suite(
    urls: list[str] | None,
    workloads: Sequence[Workload],
    sizes: Sizes,
    compare: bool,
    progress: Progress | None,
    on_plan: Callable[[int], None] | None,
    backend: str,
    compare_only: str | None = None,
) -> Report:
    notes: list[str] = []
    with prepared_targets(urls) as prepared:
        notes += prepared.services.notes
        if urls is None and backend != "asyncio":  # their drivers need an asyncio loop
            left_out = [target for target in prepared.targets if target.kind in ASYNCIO_ONLY]
            prepared.targets = [target for target in prepared.targets
                                if target.kind not in ASYNCIO_ONLY]
            notes += [f"{target.label} skipped: it runs on asyncio only" for target in left_out]
        for target in prepared.targets:
            await target.prepare()
        subjects: list[Subject] = list(prepared.targets)
        if compare:
            others, missing = comparison_subjects(prepared.scratch, prepared.targets)
            if compare_only is not None:
                others = [other for other in others if other.system == compare_only]
                missing = [note for note in missing if note.lower().startswith(compare_only)]
            subjects += others
            notes += missing
        jobs, skipped = _plan(subjects, workloads, sizes)
        if on_plan is not None:
            on_plan(len(jobs) * sizes.repetitions)
        floor_contents = {job.workload.name: job.content for job in jobs
                          if job.workload.name in ("W1", "W3")}
        floors = await _run_jobs(jobs, floor_contents, sizes, progress)
        await _footprints(jobs, sizes)
        network = await _backend_floors(jobs, sizes)
    for job in jobs:
        job.result.phases = {phase: summarize(samples) for phase, samples in job.samples.items()}
    results = [job.result for job in jobs] + skipped
    order = {name: index for index, name in enumerate(ALL_WORKLOADS)}
    results.sort(key=lambda result: order[result.workload])
    for result in skipped:
        notes.append(f"{result.workload} on {result.subject} skipped: {result.skipped}")
    for subject in subjects:
        if getattr(subject, "settings", ""):
            notes.append(f"{subject.label} ran with {subject.settings}")  # type: ignore[attr-defined]
    return Report(sizes, results, floors, notes, backend, network)


def run_suite(
    stores: list[str] | None = None,
    workloads: Sequence[str] | None = None,
    sizes: Sizes | None = None,
    *,
    compare: bool = False,
    progress: Progress | None = None,
    on_plan: Callable[[int], None] | None = None,
    backend: str = "asyncio",
    compare_only: str | None = None,
) -> Report:
    """Run the suite and return its report (nothing is written; see :mod:`benchmarks.report`).

    ``stores``: store URLs (default: ``memory://``, temporary file stores with fsync on and
    off, a temporary SQLite database, and the network stores reachable here).
    ``workloads``: names such as ``["W1", "W4"]`` (default: W1-W6; W7, the long
    conversation, and G1, the LangGraph graph, only when named). ``compare`` adds FastAgentic
    and LangGraph (W1, W4 and W7, LangGraph's savers also G1; needs ``backend="asyncio"``);
    ``compare_only`` (``"fastagentic"`` or ``"langgraph"``) keeps one of the two.
    """
    names = list(workloads) if workloads else list(WORKLOADS)
    unknown = [name for name in names if name not in ALL_WORKLOADS]
    if unknown:
        raise ValueError(f"unknown workloads {unknown}; known: {', '.join(ALL_WORKLOADS)}")
    if compare and backend != "asyncio":
        raise ValueError("--compare needs the asyncio backend (aiosqlite, FastAgentic)")
    if "G1" in names and backend != "asyncio":
        raise ValueError("G1 needs the asyncio backend (LangGraph runs on asyncio)")
    chosen = [ALL_WORKLOADS[name] for name in names]
    run = functools.partial(
        _suite, stores, chosen, sizes or Sizes.full(), compare, progress, on_plan, backend,
        compare_only,
    )
    return anyio.run(run, backend=backend)
