"""The benchmark harness on tiny sizes, so it cannot rot. Needs neither matplotlib nor tqdm."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not installed; plain `pytest` may not see it
    sys.path.insert(0, str(ROOT))

from benchmarks import WORKLOADS, Report, Sizes, WorkloadResult, run_suite  # noqa: E402
from benchmarks.cli import main  # noqa: E402
from benchmarks.report import from_json, targets, to_json, to_markdown  # noqa: E402

TINY = Sizes.tiny()


def _result(report: Report, workload: str) -> WorkloadResult:
    [result] = [r for r in report.results if r.workload == workload]
    return result


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_every_workload_runs_on_the_memory_store(backend: str) -> None:
    report = run_suite(["memory://"], None, TINY, backend=backend)

    by_workload = {result.workload: result for result in report.results}
    assert set(by_workload) == set(WORKLOADS)
    for name in ("W1", "W2", "W3", "W4", "W5"):
        result = by_workload[name]
        assert result.error is None, result.error
        assert result.skipped is None
        assert result.phases, name
        for phase in result.phases.values():
            assert phase.ops > 0
            assert phase.ops_per_s > 0
            assert 0 < phase.p50_us <= phase.p99_us
            assert len(phase.repetitions) == TINY.repetitions
        assert result.footprint["payload_header_bytes"] > 0
        assert result.footprint["per_op"]["create"]["store_calls"] == 1
    assert set(by_workload["W1"].phases) == {"create", "restore", "list"}
    assert by_workload["W1"].checks == {"restored_latest": True, "listed": TINY.w1_creates,
                                        "held": TINY.w1_creates}
    assert by_workload["W2"].checks["runs_restored_latest"] == TINY.w2_runs
    assert by_workload["W3"].checks["restored_by_id"] == TINY.w3_checkpoints
    assert by_workload["W4"].checks == {"held": TINY.w4_keep, "pruned_to_limit": True}
    assert set(by_workload["W5"].phases) == {
        f"{operation}@{level}" for level in TINY.w5_levels for operation in ("create", "restore")
    }
    assert by_workload["W5"].checks["held"] == by_workload["W5"].checks["expected_held"]
    assert by_workload["W6"].skipped is not None  # memory:// is not shared by processes
    assert set(report.floor) == {"W1", "W3"}
    assert report.floor["W1"]["total_us"] > 0


def test_the_long_conversation_reports_creates_restores_and_bytes_stored() -> None:
    report = run_suite(["memory://"], ["W7"], TINY)

    result = _result(report, "W7")
    assert result.error is None, result.error
    assert set(result.phases) == {"create@10", "create@40", "restore"}
    assert result.checks == {"held": TINY.w7_steps, "all_held": True, "restored_exactly": True}
    footprint = result.footprint
    assert footprint["stored_bytes"] > footprint["conversation_bytes"] > 0
    assert footprint["stored_ratio"] == footprint["stored_bytes"] / footprint["conversation_bytes"]
    rendered = to_markdown(report, {"command": "x", "machine": "m", "cpu_count": 2,
                                    "python": "3", "platform": "p", "date_utc": "d",
                                    "versions": {"fastcheckpoint": "0", "msgspec": "0"}})
    assert "## W7: a long conversation" in rendered
    names = [row["target"] for row in targets(report)]
    assert "memory W7 bytes stored <= 2x the conversation" in names
    assert "memory W7 create p50 at 40 <= 1.5x at 10" in names


def test_multi_process_writers_get_unique_gap_free_sequences(tmp_path: Path) -> None:
    report = run_suite([f"file://{tmp_path / 'store'}?fsync=false"], ["W6"], TINY)

    result = _result(report, "W6")
    assert result.error is None, result.error
    assert result.checks == {
        "processes": 2, "creates": 6, "errors": 0, "sequences_unique": True,
        "sequences_gap_free": True, "latest_sequence_matches": True,
    }
    assert result.phases["create"].ops == 6


@pytest.mark.parametrize(("query", "operations"), [
    ("", "append + fdatasync / pread, in a worker thread"),
    ("?fsync=false", "append / pread, in a worker thread"),
])
def test_a_file_store_reports_the_disk_floor_in_its_own_directory(
    tmp_path: Path, query: str, operations: str
) -> None:
    report = run_suite([f"file://{tmp_path / 'store'}{query}"], ["W1"], TINY)

    [result] = report.results
    assert result.error is None, result.error
    [floor] = report.network
    assert floor["operations"] == operations
    assert floor["bytes"] == int(result.footprint["payload_header_bytes"])
    assert floor["write"]["p50_us"] > 0
    assert floor["read"]["p50_us"] > 0
    assert not [p.name for p in (tmp_path / "store").iterdir() if p.name.startswith(".floor-")]


def _machine() -> dict[str, object]:
    return {"command": "python -m benchmarks", "machine": "x", "cpu_count": 2,
            "python": "CPython", "platform": "test", "date_utc": "now",
            "versions": {"fastcheckpoint": "0", "msgspec": "0"}}


def test_reports_render_and_targets_are_evaluated() -> None:
    report = run_suite(["memory://"], ["W1", "W5"], TINY)
    machine = _machine()

    document = json.loads(json.dumps(to_json(report, machine)))
    markdown = to_markdown(report, machine)

    assert [r["workload"] for r in document["results"]] == ["W1", "W5"]
    assert document["results"][0]["phases"]["create"]["ops"] == TINY.w1_creates
    assert "| W1 | memory | create |" in markdown
    assert from_json(document) == (report, machine)  # --render rebuilds the same report
    names = [row["target"] for row in targets(report)]
    assert "memory W1 create+restore <= 1.5x bare msgspec encode+decode" in names
    assert "memory W5 create p50 at 5 <= 1.5x at 2" in names
    unmeasured = [row for row in targets(report) if row["note"] == "not measured"]
    assert unmeasured  # no --compare: the ratio targets are reported as not measured


def test_command_line_writes_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--quick", "--store", "memory://", "--workload", "W4", "--repetitions", "1",
                 "--no-progress", "--out", str(tmp_path), "--name", "smoke"])

    assert code == 0
    assert json.loads((tmp_path / "smoke.json").read_text())["results"][0]["workload"] == "W4"
    assert "| W4 | memory | create |" in (tmp_path / "smoke.md").read_text()
    assert "wrote" in capsys.readouterr().out


def test_graph_steps_sets_g1s_thread_length(tmp_path: Path) -> None:
    code = main(["--quick", "--store", "memory://", "--workload", "G1", "--repetitions", "1",
                 "--graph-steps", "4", "--no-progress", "--out", str(tmp_path), "--name", "g1"])

    assert code == 0
    # the input's message and one per step; the input's checkpoint and one per step
    assert "messages=5, all_messages=True, checkpoints=6" in (tmp_path / "g1.md").read_text()
    assert main(["--graph-steps", "0", "--no-progress"]) == 2


def test_unknown_workload_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown workloads"):
        run_suite(["memory://"], ["W9"], TINY)


def test_a_store_that_cannot_be_opened_fails_before_anything_runs() -> None:
    with pytest.raises(ValueError, match="cannot open store 'nosuch://x'"):
        run_suite(["nosuch://x"], ["W1"], TINY)


def test_moto_placeholder_is_resolved_and_redis_prefixes_remembered() -> None:
    from benchmarks.services import Services

    services = Services(moto_url="http://127.0.0.1:4567")
    resolved = services.resolve("s3://b/p?region=us-east-1&endpoint_url=moto")
    services.resolve("redis://127.0.0.1:6379/0?prefix=fcbench-x")

    assert "endpoint_url=http%3A%2F%2F127.0.0.1%3A4567" in resolved
    assert services.redis_prefixes == {"fcbench-x"}
    with pytest.raises(ValueError, match="moto"):
        Services().resolve("s3://b/p?endpoint_url=moto")


def test_requests_are_counted_where_drivers_send() -> None:
    import anyio
    import redis.asyncio

    from benchmarks.footprint import counting_syscalls
    from benchmarks.services import _redis_answers

    if not _redis_answers("redis://127.0.0.1:6379/0"):
        pytest.skip("no Redis at 127.0.0.1:6379")

    async def three_round_trips() -> int:
        client = redis.asyncio.Redis(host="127.0.0.1", port=6379)
        try:
            await client.ping()  # connects: the handshake's own commands are not counted
            with counting_syscalls() as counts:
                await client.ping()
                await client.ping()
                async with client.pipeline(transaction=False) as pipe:
                    await pipe.ping().ping().execute()  # one round trip for both
            return counts["requests"]
        finally:
            await client.aclose()

    assert anyio.run(three_round_trips) == 3


def test_a_redis_store_reports_round_trips_and_the_backend_floor() -> None:
    from benchmarks.services import _redis_answers

    if not _redis_answers("redis://127.0.0.1:6379/0"):
        pytest.skip("no Redis at 127.0.0.1:6379")
    report = run_suite(["redis://127.0.0.1:6379/0?prefix=fctest-bench-smoke"], ["W1"], TINY)

    [result] = report.results
    assert result.error is None, result.error
    per_op = result.footprint["per_op"]
    assert per_op["create"]["requests"] == 1  # one script call per create...
    assert per_op["restore"]["requests"] == 1  # ...and per restore
    [floor] = report.network
    assert floor["operations"] == "SET / GET"
    assert floor["bytes"] == int(result.footprint["payload_header_bytes"])
    assert floor["write"]["p50_us"] > 0
    assert "Backend floor" in to_markdown(report, _machine())
