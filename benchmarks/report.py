"""Results: machine info, comparison ratios, the speed targets (issues 6, 13 and 15); JSON,
Markdown and a PNG chart."""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.baseline import NETWORK_KINDS
from benchmarks.measure import Phase
from benchmarks.settings import Sizes
from benchmarks.suite import Report, WorkloadResult

__all__ = [
    "from_json", "machine_info", "ratios", "render", "targets", "to_json", "to_markdown",
    "write_outputs",
]

_PACKAGES = (
    "fastcheckpoint", "msgspec", "anyio", "trio", "fastagentic", "langgraph",
    "langgraph-checkpoint", "langgraph-checkpoint-sqlite", "aiosqlite", "redis", "aiobotocore",
    "botocore", "moto", "asyncpg", "langgraph-checkpoint-postgres", "psycopg",
    "langgraph-checkpoint-aws", "boto3",
)

# (our kind, workload, phase, their system, their kind, minimum ratio of ops/s)
_RATIO_TARGETS = (
    ("memory", "W1", "create", "fastagentic", "memory", 1.0),
    ("memory", "W1", "create", "langgraph", "memory", 3.0),
    ("memory", "W1", "restore", "langgraph", "memory", 3.0),
    ("file", "W1", "create", "fastagentic", "file", 20.0),
    ("file", "W1", "restore", "fastagentic", "file", 20.0),
    ("file", "W1", "create", "langgraph", "sqlite", 2.0),
    ("file", "W1", "restore", "langgraph", "sqlite", 2.0),
    ("redis", "W1", "create", "fastagentic", "redis", 50.0),
    ("redis", "W1", "restore", "fastagentic", "redis", 1.0),
    ("s3", "W1", "create", "fastagentic", "s3", 20.0),
    # issue 15: the SQLite store (same durability: synchronous=FULL on both) and PostgreSQL
    ("sqlite", "W1", "create", "langgraph", "sqlite", 1.5),
    ("sqlite", "W1", "restore", "langgraph", "sqlite", 1.5),
    ("postgres", "W1", "create", "langgraph", "postgres", 2.0),
    ("postgres", "W1", "restore", "langgraph", "postgres", 2.0),
    # issue 13: the LangGraph saver in a graph, steps per second
    ("memory", "G1", "step", "langgraph", "memory", 1.0),
    ("file", "G1", "step", "langgraph", "sqlite", 2.0),
    ("dynamodb", "G1", "step", "langgraph", "dynamodb", 3.0),
)
# issue 13: fewer backend trips per graph step than the saver compared with. A network
# store's trips are requests (round trips, HTTP requests); a local one's, worker-thread hops
# (each carries one piece of disk work: a file store operation, an aiosqlite call).
_REQUEST_TARGETS = (
    ("memory", "langgraph", "memory", None),
    ("file", "langgraph", "sqlite", "thread_hops"),
    ("dynamodb", "langgraph", "dynamodb", "requests"),
)
# Which comparison subjects each of our store kinds is set against.
_COUNTERPARTS = {
    "memory": (("fastagentic", "memory"), ("langgraph", "memory")),
    "file": (("fastagentic", "file"), ("langgraph", "sqlite")),
    "file-nofsync": (("fastagentic", "file"), ("langgraph", "sqlite")),
    "redis": (("fastagentic", "redis"),),
    "s3": (("fastagentic", "s3"),),
    "sqlite": (("langgraph", "sqlite"),),
    "sqlite-normal": (("langgraph", "sqlite-normal"), ("langgraph", "sqlite")),
    "postgres": (("langgraph", "postgres"),),
    "dynamodb": (("langgraph", "dynamodb"),),
}


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks", *sys.argv[1:]]),
    }
    if hasattr(os, "sched_getaffinity"):
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    info.update(_proc_info())
    info["versions"] = {name: _version(name) for name in _PACKAGES}
    info.update(_source_info())
    return info


def _source_info() -> dict[str, Any]:
    """Which fastcheckpoint was measured: its directory, git commit, uncommitted changes."""
    import fastcheckpoint

    package = Path(fastcheckpoint.__file__).resolve().parent
    found: dict[str, Any] = {"fastcheckpoint_path": str(package)}
    try:
        commit = subprocess.run(["git", "-C", str(package), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True, timeout=10)
        changes = subprocess.run(["git", "-C", str(package), "status", "--porcelain", "."],
                                 capture_output=True, text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return found  # not a git checkout (an installed package): the version says enough
    found["fastcheckpoint_commit"] = commit.stdout.strip()
    found["fastcheckpoint_uncommitted_changes"] = bool(changes.stdout.strip())
    return found


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _proc_info() -> dict[str, Any]:
    found: dict[str, Any] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                found["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                found["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
                break
    except OSError:
        pass  # not Linux: these fields are optional
    return found


def _find(
    report: Report, workload: str, system: str, kind: str
) -> WorkloadResult | None:
    for result in report.results:
        usable = result.error is None and result.skipped is None
        if usable and (result.workload, result.system, result.kind) == (workload, system, kind):
            return result
    return None


def ratios(report: Report) -> list[dict[str, Any]]:
    """ops/s of each fastcheckpoint store over each comparison subject, per phase."""
    rows: list[dict[str, Any]] = []
    for ours in report.results:
        if ours.system != "fastcheckpoint" or ours.error or ours.skipped:
            continue
        for system, kind in _COUNTERPARTS.get(ours.kind, ()):
            theirs = _find(report, ours.workload, system, kind)
            if theirs is None:
                continue
            for phase, mine in ours.phases.items():
                other = theirs.phases.get(phase)
                if other is None or not other.ops_per_s:
                    continue
                rows.append({
                    "workload": ours.workload, "phase": phase, "store": ours.subject,
                    "versus": theirs.subject, "ratio": mine.ops_per_s / other.ops_per_s,
                    "p50_ratio": other.p50_us / mine.p50_us if mine.p50_us else None,
                })
    return rows


def targets(report: Report) -> list[dict[str, Any]]:
    """Issue 6's speed targets that this report can decide: met, not met, or unmeasured."""
    rows: list[dict[str, Any]] = []
    for our_kind, workload, phase, system, kind, minimum in _RATIO_TARGETS:
        ours = _find(report, workload, "fastcheckpoint", our_kind)
        theirs = _find(report, workload, system, kind)
        label = f"{our_kind} {workload} {phase} >= {minimum:g}x {system} {kind}"
        if ours is None or theirs is None or phase not in ours.phases:
            rows.append({"target": label, "value": None, "met": None, "note": "not measured"})
            continue
        value = ours.phases[phase].ops_per_s / theirs.phases[phase].ops_per_s
        rows.append({"target": label, "value": value, "met": value >= minimum,
                     "note": f"{ours.subject} vs {theirs.subject}"})
    rows += _request_targets(report)
    rows += _floor_targets(report)
    rows += _scaling_targets(report)
    rows += _concurrency_targets(report)
    rows += _long_run_targets(report)
    return rows


def _request_targets(report: Report) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for our_kind, system, kind, metric in _REQUEST_TARGETS:
        ours = _find(report, "G1", "fastcheckpoint", our_kind)
        theirs = _find(report, "G1", system, kind)
        label = f"{our_kind} G1 fewer backend trips per step than {system} {kind}"
        if ours is None or theirs is None:
            continue
        if metric is None:
            rows.append({"target": label, "value": None, "met": None,
                         "note": "no backend: neither makes requests"})
            continue
        mine = ours.footprint.get("per_step", {}).get(metric)
        other = theirs.footprint.get("per_step", {}).get(metric)
        if mine is None or other is None:
            rows.append({"target": label, "value": None, "met": None, "note": "not measured"})
            continue
        rows.append({"target": label, "value": mine, "met": mine < other,
                     "note": f"{metric.replace('_', ' ')} per step: {mine:.2f} vs {other:.2f} "
                             f"({theirs.subject})"})
    return rows


def _floor_targets(report: Report) -> list[dict[str, Any]]:
    ours = _find(report, "W1", "fastcheckpoint", "memory")
    floor = report.floor.get("W1")
    if ours is None or floor is None or not {"create", "restore"} <= set(ours.phases):
        return []
    spent = ours.phases["create"].mean_us + ours.phases["restore"].mean_us
    value = spent / floor["total_us"]
    return [{
        "target": "memory W1 create+restore <= 1.5x bare msgspec encode+decode",
        "value": value, "met": value <= 1.5,
        "note": f"{spent:.1f} µs vs floor {floor['total_us']:.1f} µs (means)",
    }]


def _scaling_targets(report: Report) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for result in report.results:
        if result.workload != "W5" or result.error or result.skipped:
            continue
        levels = sorted({int(name.split("@")[1]) for name in result.phases})
        if len(levels) < 2:
            continue
        low, high = levels[0], levels[-1]
        for operation in ("restore", "create"):
            base = result.phases[f"{operation}@{low}"].p50_us
            top = result.phases[f"{operation}@{high}"].p50_us
            value = top / base if base else float("inf")
            rows.append({
                "target": f"{result.subject} W5 {operation} p50 at {high} <= 1.5x at {low}",
                "value": value, "met": value <= 1.5,
                "note": f"{top:.1f} µs vs {base:.1f} µs",
            })
    return rows


def _concurrency_targets(report: Report) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for result in report.results:
        if result.workload != "W2" or result.error or result.skipped:
            continue
        sequential = _find(report, "W1", "fastcheckpoint", result.kind)
        if sequential is None or "create" not in sequential.phases:
            continue
        value = result.phases["create"].ops_per_s / sequential.phases["create"].ops_per_s
        network = result.kind in NETWORK_KINDS
        rows.append({
            "target": f"{result.subject} W2 create ops/s >= W1 create ops/s",
            "value": value, "met": value >= 1.0 if network else None,
            "note": "applies to network stores" if not network else "",
        })
    return rows


def to_json(report: Report, machine: dict[str, Any]) -> dict[str, Any]:
    return {
        "machine": machine,
        "backend": report.backend,
        "sizes": dataclasses.asdict(report.sizes),
        "floor": report.floor,
        "results": [dataclasses.asdict(result) for result in report.results],
        "ratios": ratios(report),
        "targets": targets(report),
        "notes": report.notes,
        "network": report.network,
    }


def _commit_note(machine: dict[str, Any]) -> str:
    commit = machine.get("fastcheckpoint_commit")
    if not commit:
        return ""
    dirty = " + uncommitted changes" if machine.get("fastcheckpoint_uncommitted_changes") else ""
    return f" (commit {commit}{dirty})"


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _footprint_cells(result: WorkloadResult, phase: str) -> list[str]:
    per_op = result.footprint.get("per_op", {}).get(phase.split("@", maxsplit=1)[0], {})
    stored = result.footprint.get("payload_header_bytes")
    disk = result.footprint.get("disk_allocated_bytes")
    counts = "/".join(
        _num(per_op.get(name), 0 if float(per_op.get(name, 0)).is_integer() else 2)
        for name in ("store_calls", "thread_hops", "fsyncs", "requests")
    ) if per_op else "-"
    return [_num(stored), _num(disk), counts]


def _results_table(report: Report) -> list[str]:
    lines = [
        "| workload | store | phase | ops/s | p50 µs | p99 µs | max µs | bytes/ckpt | disk/ckpt "
        "| calls/hops/fsyncs/requests per op |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for result in report.results:
        if result.skipped:
            lines.append(f"| {result.workload} | {result.subject} | skipped | | | | | | | |")
            continue
        if result.error:
            lines.append(f"| {result.workload} | {result.subject} | **error** | | | | | | | |")
            continue
        for phase, stats in result.phases.items():
            lines.append(
                f"| {result.workload} | {result.subject} | {phase} | {_num(stats.ops_per_s)} "
                f"| {_num(stats.p50_us, 1)} | {_num(stats.p99_us, 1)} | {_num(stats.max_us, 1)} | "
                + " | ".join(_footprint_cells(result, phase)) + " |"
            )
    return lines


def to_markdown(report: Report, machine: dict[str, Any]) -> str:
    lines = [
        "# fastcheckpoint benchmark results",
        "",
        f"`{machine['command']}` on {machine.get('cpu_model', machine['machine'])}, "
        f"{machine.get('cpus_usable', machine['cpu_count'])} usable CPUs, "
        f"{machine['python']}, {machine['platform']}, {machine['date_utc']}; "
        f"fastcheckpoint {machine['versions']['fastcheckpoint']}"
        f"{_commit_note(machine)}, "
        f"msgspec {machine['versions']['msgspec']}, backend {report.backend}. "
        f"Every number is the median of {report.sizes.repetitions} repetitions. "
        "bytes/ckpt: payload + header handed to the store; disk/ckpt: allocated disk space "
        "of a file store's run divided by the checkpoints it holds; requests: backend round "
        "trips (Redis, PostgreSQL) or HTTP requests (S3, DynamoDB) per operation.",
        "",
        *_results_table(report),
        "",
    ]
    if report.floor:
        lines += ["## Floor: bare msgspec msgpack encode + decode of the same content", "",
                  "| content | bytes | encode µs | decode µs | total µs |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for name, values in report.floor.items():
            lines.append(f"| {name} | {_num(values['bytes'])} | {_num(values['encode_us'], 1)} "
                         f"| {_num(values['decode_us'], 1)} | {_num(values['total_us'], 1)} |")
        lines.append("")
    if report.network:
        lines += ["## Backend floor: the bare driver or filesystem, same size", "",
                  "One write and one read of the W1 checkpoint's size with the driver alone "
                  "on the same server, or for a file store with one append (+ fdatasync when "
                  "fsync is on) and one pread on a file in the same directory, in a worker "
                  "thread. Compare with the store's W1 create and restore to see what is the "
                  "server, emulator or disk and what is the library.", "",
                  "| store | operations | bytes | write p50 µs | write p99 µs "
                  "| read p50 µs | read p99 µs |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for row in report.network:
            lines.append(
                f"| {row['store']} | {row['operations']} | {_num(row['bytes'])} "
                f"| {_num(row['write']['p50_us'], 1)} | {_num(row['write']['p99_us'], 1)} "
                f"| {_num(row['read']['p50_us'], 1)} | {_num(row['read']['p99_us'], 1)} |")
        lines.append("")
    lines += _long_run_table(report)
    lines += _graph_table(report)
    rows = ratios(report)
    if rows:
        lines += ["## Side by side (ops/s ratio, fastcheckpoint / other; same process run)", "",
                  "| workload | phase | fastcheckpoint store | versus | ratio | p50 ratio |",
                  "| --- | --- | --- | --- | ---: | ---: |"]
        lines += [f"| {row['workload']} | {row['phase']} | {row['store']} | {row['versus']} | "
                  f"{row['ratio']:.2f}x | {_num(row['p50_ratio'], 2)}x |" for row in rows]
        lines.append("")
    lines += ["## Targets (issues 6, 13, 14, 15)", "", "| target | value | status | note |",
              "| --- | ---: | --- | --- |"]
    for row in targets(report):
        status = {True: "met", False: "**not met**", None: "n/a"}[row["met"]]
        lines.append(f"| {row['target']} | {_num(row['value'], 2)} | {status} | {row['note']} |")
    lines += ["", "## Checks", ""]
    for result in report.results:
        if result.checks or result.error:
            detail = result.error or ", ".join(f"{k}={v}" for k, v in result.checks.items())
            lines.append(f"- {result.workload} {result.subject}: {detail}")
    if report.notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in report.notes]
    return "\n".join(lines) + "\n"


def _long_run_table(report: Report) -> list[str]:
    """W7, one row per subject: create at each level, restore, bytes the run leaves stored."""
    runs = [r for r in report.results if r.workload == "W7" and not r.error and not r.skipped]
    if not runs:
        return []
    levels = sorted({int(name.split("@")[1]) for r in runs for name in r.phases if "@" in name})
    lines = ["## W7: a long conversation (retention off)", "",
             f"{report.sizes.w7_steps} steps of about {report.sizes.w7_message_bytes} bytes of "
             f"messages each, with a state of about {report.sizes.w7_state_bytes} bytes. Create "
             "p50 over the ten steps up to each level; restore p50 of the latest; bytes the whole "
             "run leaves stored (values handed to the backend; FastAgentic's file store: its "
             "directory's size) and that over the final conversation's own msgpack size; a bare "
             "msgpack decode of the final conversation.", "",
             "| subject | " + " | ".join(f"create@{level} p50 µs" for level in levels)
             + " | restore p50 µs | bare decode µs | bytes stored | ÷ conversation |",
             "| --- | " + " | ".join("---:" for _ in levels) + " | ---: | ---: | ---: | ---: |"]
    for result in runs:
        cells = [_num(result.phases[f"create@{level}"].p50_us)
                 if f"create@{level}" in result.phases else "" for level in levels]
        restore = result.phases.get("restore")
        footprint = result.footprint
        lines.append(
            f"| {result.subject} | {' | '.join(cells)} "
            f"| {_num(restore.p50_us if restore else None)} "
            f"| {_num(footprint.get('bare_decode_us'), 1)} "
            f"| {_num(footprint.get('stored_bytes'))} | {_num(footprint.get('stored_ratio'), 2)} |")
    lines.append("")
    return lines


def _long_run_targets(report: Report) -> list[dict[str, Any]]:
    """Issue 14's goals on every store: storage, flat creates, restore near a bare decode."""
    rows: list[dict[str, Any]] = []
    for result in report.results:
        if (result.workload != "W7" or result.system != "fastcheckpoint" or result.error
                or result.skipped):
            continue
        footprint = result.footprint
        ratio = footprint.get("stored_ratio")
        rows.append({"target": f"{result.subject} W7 bytes stored <= 2x the conversation",
                     "value": ratio, "met": None if ratio is None else ratio <= 2.0,
                     "note": f"{_num(footprint.get('stored_bytes'))} bytes"})
        levels = sorted(int(name.split("@")[1]) for name in result.phases if "@" in name)
        if len(levels) >= 2:
            low = result.phases[f"create@{levels[0]}"].p50_us
            high = result.phases[f"create@{levels[-1]}"].p50_us
            value = high / low if low else None
            rows.append({
                "target": f"{result.subject} W7 create p50 at {levels[-1]} <= 1.5x at "
                          f"{levels[0]}",
                "value": value, "met": None if value is None else value <= 1.5,
                "note": f"{high:.1f} µs vs {low:.1f} µs"})
        restore = result.phases.get("restore")
        bare = footprint.get("bare_decode_us")
        if restore is not None and bare:
            value = restore.p50_us / bare
            rows.append({
                "target": f"{result.subject} W7 restore p50 <= 2x a bare decode of the "
                          "conversation",
                "value": value, "met": value <= 2.0,
                "note": f"{restore.p50_us:.1f} µs vs {bare:.1f} µs"})
    return rows


def _graph_table(report: Report) -> list[str]:
    """G1, one row per saver: time per step, saver calls and trips per step, bytes."""
    graph = [r for r in report.results if r.workload == "G1" and not r.error and not r.skipped]
    if not graph:
        return []
    lines = ["## G1: a LangGraph graph (one message per step, durability=\"sync\")", "",
             f"{report.sizes.graph_steps} steps per thread, {report.sizes.graph_threads} "
             "thread(s) per repetition. Per step: mean time (whole `ainvoke` / steps) and p50; "
             "p50 of `aput` and `aput_writes`; saver calls, store calls (ours), worker-thread "
             "hops, fsyncs seen by Python, backend requests; bytes one thread leaves stored "
             "(values handed to the backend) and in how many records (ours: checkpoints + "
             "items; theirs: rows, DynamoDB items or dictionary entries).", "",
             "| saver | steps/s | mean µs/step | p50 µs/step | aput p50 µs "
             "| aput_writes p50 µs | saver calls | store calls | thread hops | fsyncs "
             "| requests | bytes/thread | records/thread |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
             "| ---: | ---: |"]
    for result in graph:
        step = result.phases.get("step")
        put = result.phases.get("aput")
        writes = result.phases.get("aput_writes")
        per = result.footprint.get("per_step", {})
        name = (result.subject if result.system != "fastcheckpoint"
                else f"FastCheckpointSaver on {result.subject}")
        counts = " | ".join(_num(per.get(key), 2) for key in (
            "saver_calls", "store_calls", "thread_hops", "fsyncs", "requests"))
        lines.append(
            f"| {name} | {_num(step.ops_per_s if step else None)} "
            f"| {_num(step.mean_us if step else None)} | {_num(step.p50_us if step else None)} "
            f"| {_num(put.p50_us if put else None)} | {_num(writes.p50_us if writes else None)} "
            f"| {counts} | {_num(result.footprint.get('bytes_per_thread'))} "
            f"| {_num(result.footprint.get('records_per_thread'))} |")
    lines.append("")
    return lines


def write_chart(report: Report, path: Path) -> bool:
    """A PNG of throughput and scaling; ``False`` without matplotlib or without results.

    One colour per store or saver across all three panels, one legend under them.
    """
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    usable = [r for r in report.results if not r.error and not r.skipped]
    if not usable:
        return False
    palette = plt.get_cmap("tab10").colors  # type: ignore[attr-defined]
    colors: dict[str, Any] = {}
    for result in usable:
        colors.setdefault(result.subject, palette[len(colors) % len(palette)])
    figure, (w1_axes, all_axes, w5_axes) = plt.subplots(
        1, 3, figsize=(18, 6.5), gridspec_kw={"width_ratios": [1.2, 1.5, 1]})
    _bars(w1_axes, [r for r in usable if r.workload == "W1"], colors,
          "W1 sequential: ops/s by phase (log)", lambda r, phase: phase)
    ours = [r for r in usable
            if r.system == "fastcheckpoint" and r.workload not in ("W1", "W5", "W7", "G1")]
    _bars(all_axes, ours, colors, "W2-W4, W6: ops/s (log)",
          lambda r, phase: f"{r.workload} {phase}")
    for result in (r for r in usable if r.workload == "W5"):
        for operation, style in (("create", "-o"), ("restore", "--s")):
            points = sorted((int(name.split("@")[1]), stats.p50_us)
                            for name, stats in result.phases.items() if name.startswith(operation))
            if points:
                w5_axes.plot(*zip(*points, strict=True), style, color=colors[result.subject])
    w5_axes.set(xscale="log", yscale="log", xlabel="checkpoints already in the run",
                ylabel="p50 µs", title="W5 scaling, no pruning (solid: create, dashed: restore)")
    handles = [Line2D([], [], color=color, linewidth=8) for color in colors.values()]
    figure.legend(handles, list(colors), loc="lower center", ncol=min(len(colors), 4),
                  fontsize=9, frameon=False)
    figure.suptitle(f"fastcheckpoint benchmarks: median of {report.sizes.repetitions} "
                    f"repetitions on {os.cpu_count()} CPUs (higher bars, lower lines: better)")
    figure.tight_layout(rect=(0, 0.1, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def _bars(axes: Any, results: list[WorkloadResult], colors: dict[str, Any], title: str,
          group: Callable[[WorkloadResult, str], str]) -> None:
    groups: list[str] = []
    names: list[str] = []
    values: dict[tuple[str, str], float] = {}
    for result in results:
        if result.subject not in names:
            names.append(result.subject)
        for phase, stats in result.phases.items():
            key = group(result, phase)
            if key not in groups:
                groups.append(key)
            values[(key, result.subject)] = stats.ops_per_s
    width = 0.8 / max(len(names), 1)
    for index, name in enumerate(names):
        xs = [g + index * width for g in range(len(groups))]
        axes.bar(xs, [values.get((key, name), 0) for key in groups], width, color=colors[name])
    axes.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups,
                    rotation=30, ha="right", fontsize=8)
    axes.set(yscale="log", ylabel="ops/s", title=title)


def from_json(data: dict[str, Any]) -> tuple[Report, dict[str, Any]]:
    """The report and machine info back from what :func:`to_json` wrote."""
    results = []
    for raw in data["results"]:
        phases = {name: Phase(**{"max_us": 0.0, **values})
                  for name, values in raw["phases"].items()}
        results.append(WorkloadResult(**{**raw, "phases": phases}))
    sizes = Sizes(**{key: tuple(value) if isinstance(value, list) else value
                     for key, value in data["sizes"].items()})
    report = Report(sizes, results, data["floor"], data["notes"], data["backend"],
                    data.get("network", []))
    return report, data["machine"]


def render(json_path: Path) -> list[Path]:
    """Rewrite the Markdown and PNG beside a results JSON (after changing how they look)."""
    report, machine = from_json(json.loads(json_path.read_text()))
    markdown_path = json_path.with_suffix(".md")
    markdown_path.write_text(to_markdown(report, machine))
    chart_path = json_path.with_suffix(".png")
    return [markdown_path, chart_path] if write_chart(report, chart_path) else [markdown_path]


def write_outputs(report: Report, directory: Path, stem: str) -> list[Path]:
    """``<stem>.json``, ``<stem>.md`` and (with matplotlib) ``<stem>.png`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    written = []
    json_path = directory / f"{stem}.json"
    json_path.write_text(json.dumps(to_json(report, machine), indent=2) + "\n")
    written.append(json_path)
    markdown_path = directory / f"{stem}.md"
    markdown_path.write_text(to_markdown(report, machine))
    written.append(markdown_path)
    chart_path = directory / f"{stem}.png"
    if write_chart(report, chart_path):
        written.append(chart_path)
    return written
