"""The benchmark harness's LangGraph graph workload (G1) and its SQLite and PostgreSQL
subjects, on tiny sizes. Asserts what is counted and checked, never timings."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not installed; plain `pytest` may not see it
    sys.path.insert(0, str(ROOT))

from benchmarks import Sizes, run_suite  # noqa: E402
from benchmarks.report import targets, to_markdown  # noqa: E402
from benchmarks.services import _tcp_answers  # noqa: E402

pytest.importorskip("langgraph.graph")

TINY = Sizes.tiny()
POSTGRES = "postgresql://postgres@127.0.0.1:5432/FRESH"


def _machine() -> dict[str, object]:
    return {"command": "python -m benchmarks", "machine": "x", "cpu_count": 2,
            "python": "CPython", "platform": "test", "date_utc": "now",
            "versions": {"fastcheckpoint": "0", "msgspec": "0"}}


def test_the_graph_runs_on_our_saver_and_langgraphs_with_counts_and_bytes(
    tmp_path: Path,
) -> None:
    report = run_suite(["memory://", f"file://{tmp_path / 'files'}?fsync=false"], ["G1"],
                       TINY, compare=True)

    by_subject = {result.subject: result for result in report.results}
    assert "LangGraph InMemorySaver" in by_subject
    assert not any(r.system == "fastagentic" for r in report.results)  # G1 is LangGraph's
    for result in report.results:
        assert result.error is None, (result.subject, result.error)
        assert result.checks["all_messages"] is True
        assert result.checks["all_checkpoints"] is True  # input + one per step
        assert result.checks["latest_is_last"] is True
        assert result.phases["step"].ops == TINY.graph_steps * TINY.graph_threads
        assert result.phases["aput"].ops == (TINY.graph_steps + 2) * TINY.graph_threads
        per_step = result.footprint["per_step"]
        # Each step: one checkpoint and the node's writes; plus the input's and first read.
        assert per_step["saver_calls"] >= 2
        assert result.footprint["bytes_per_thread"] > 0
        assert result.footprint["records_per_thread"] > 0
    ours = by_subject["memory"].footprint["per_step"]
    assert ours["store_calls"] == ours["saver_calls"]  # one store call per saver call
    assert ours["requests"] == 0
    files = by_subject["file (no fsync)"].footprint["per_step"]
    assert files["thread_hops"] == files["store_calls"]  # one hop per store call
    assert files["fsyncs"] == 0
    markdown = to_markdown(report, _machine())
    assert "| FastCheckpointSaver on memory |" in markdown
    assert "| LangGraph InMemorySaver |" in markdown
    names = [row["target"] for row in targets(report)]
    assert "memory G1 step >= 1x langgraph memory" in names


def test_the_graph_workload_needs_asyncio() -> None:
    with pytest.raises(ValueError, match="G1 needs the asyncio backend"):
        run_suite(["memory://"], ["G1"], TINY, backend="trio")


def test_graph_workload_is_only_run_when_named() -> None:
    report = run_suite(["memory://"], ["W4"], TINY)

    assert [r.workload for r in report.results] == ["W4"]


def test_a_sqlite_store_is_measured_with_one_hop_per_operation(tmp_path: Path) -> None:
    pytest.importorskip("aiosqlite")
    pytest.importorskip("langgraph.checkpoint.sqlite.aio")
    report = run_suite([f"sqlite:///{tmp_path / 'bench.sqlite'}"], ["W1"], TINY, compare=True)

    ours = next(r for r in report.results if r.system == "fastcheckpoint")
    assert ours.kind == "sqlite"
    assert ours.error is None, ours.error
    assert ours.footprint["per_op"]["create"] == {
        "store_calls": 1, "thread_hops": 1, "fsyncs": 0, "requests": 0}
    assert ours.footprint["per_op"]["restore"]["thread_hops"] == 1
    assert "LangGraph AsyncSqliteSaver ran with journal_mode=wal, synchronous=FULL" \
        in report.notes
    [floor] = report.network
    assert floor["operations"].startswith("INSERT + COMMIT / SELECT of a BLOB row (WAL, "
                                          "synchronous=FULL)")
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".floor-")]
    rows = {row["target"]: row for row in targets(report)}
    assert rows["sqlite W1 create >= 1.5x langgraph sqlite"]["met"] is not None


def test_a_postgres_store_makes_one_round_trip_per_create_and_restore() -> None:
    pytest.importorskip("asyncpg")
    if not _tcp_answers(POSTGRES, 5432):
        pytest.skip("no PostgreSQL at 127.0.0.1:5432")
    report = run_suite([POSTGRES], ["W1"], TINY)

    [result] = report.results
    assert result.kind == "postgres"
    assert result.error is None, result.error
    assert "fcbench_" in (result.url or "")  # FRESH: a database made for the run
    per_op = result.footprint["per_op"]
    assert per_op["create"]["requests"] == 1
    assert per_op["restore"]["requests"] == 1
    [floor] = report.network
    assert floor["operations"] == "INSERT / SELECT of a bytea row (autocommit)"


def test_round_trips_are_counted_where_asyncpg_writes() -> None:
    asyncpg = pytest.importorskip("asyncpg")
    import anyio

    from benchmarks.footprint import counting_syscalls

    url = "postgresql://postgres@127.0.0.1:5432/postgres"
    if not _tcp_answers(url, 5432):
        pytest.skip("no PostgreSQL at 127.0.0.1:5432")

    async def trips() -> tuple[int, int]:
        connection = await asyncpg.connect(url)
        try:
            statement = await connection.prepare("SELECT $1::int")
            with counting_syscalls() as counts:
                await statement.fetchval(1)
                await statement.fetchval(2)
            first = counts["requests"]
            with counting_syscalls() as counts:
                await connection.fetchval("SELECT 3")  # not prepared yet: prepare, then run
            return first, counts["requests"]
        finally:
            await connection.close()

    assert anyio.run(trips, backend="asyncio") == (2, 2)


def test_the_delta_history_benchmark_compares_ours_with_the_default_walk(
    tmp_path: Path,
) -> None:
    import anyio

    from benchmarks.delta_history import run

    rows = anyio.run(run, ["memory://", f"file://{tmp_path / 'files'}?fsync=false"], 9, 5, 20,
                     2, backend="asyncio")
    calls = {row.split(" | ")[0].lstrip("| "): row.rstrip(" |").split(" | ")[-1]
             for row in rows[2:]}
    assert list(calls)[-1] == "LangGraph InMemorySaver"
    for url in ("memory://", f"file://{tmp_path / 'files'}?fsync=false"):
        ours, default = int(calls[f"ours, {url}"]), int(calls[f"default walk, {url}"])
        assert 0 < ours < default


def test_the_log_threshold_benchmark_counts_bytes_and_items_read() -> None:
    import anyio

    from benchmarks.log_threshold import _thread

    early = anyio.run(_thread, 2, 12, backend="asyncio")
    late = anyio.run(_thread, 32, 12, backend="asyncio")
    assert early[0] < late[0]  # a log from 2 entries writes each message once
    assert early[1] > late[1] > 0  # and a read fetches its pieces


def test_the_saver_cost_benchmark_times_each_saver_against_a_null_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from benchmarks.saver_cost import SAVERS, main

    main(["--steps", "3", "--threads", "1", "--rounds", "1"])
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].startswith("G1, 3 steps, 1 threads x 1 rounds")
    timed = {row.split(" | ")[0].lstrip("| "): row.split(" | ") for row in rows[3:]}
    assert list(timed) == list(SAVERS)
    assert all(float(row[1].replace(",", "")) > 0 for row in timed.values())
    assert timed["null"][2] == "+0"
    assert timed["InMemorySaver"][3] == "1.00x |"


def test_the_saver_cost_replay_times_one_threads_calls_on_each_memory_saver(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import anyio

    from benchmarks.saver_cost import _captured, main

    calls = anyio.run(_captured, Sizes(graph_steps=3), backend="asyncio")
    # The input's checkpoint and one per step, each step's writes before its checkpoint.
    assert [name for name, _ in calls] == ["aput", *["aput_writes", "aput"] * 4]
    main(["--replay", "--steps", "3", "--threads", "2", "--rounds", "1"])
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].startswith("G1's saver calls replayed, 3 steps, 2 threads x 1 rounds")
    timed = {row.split(" | ")[0].lstrip("| "): row.split(" | ") for row in rows[3:]}
    assert list(timed) == ["InMemorySaver", "ours"]
    assert all(float(row[1].replace(",", "")) > 0 for row in timed.values())
    assert timed["InMemorySaver"][3] == "1.00x |"


def test_the_saver_cost_benchmark_times_the_disk_savers_against_sqlite_and_the_floor(
    capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:
    pytest.importorskip("aiosqlite")
    pytest.importorskip("langgraph.checkpoint.sqlite.aio")  # the benchmark extra
    from benchmarks.saver_cost import DISK_SAVERS, main

    main(["--steps", "3", "--threads", "1", "--rounds", "1", "--disk", str(tmp_path)])
    rows = capsys.readouterr().out.splitlines()
    assert rows[1].endswith("ratio to AsyncSqliteSaver |")
    timed = {row.split(" | ")[0].lstrip("| "): row.split(" | ") for row in rows[3:-1]}
    assert list(timed) == list(DISK_SAVERS)
    assert timed["AsyncSqliteSaver"][3] == "1.00x |"
    assert rows[-1].startswith("2x AsyncSqliteSaver is ")
    # Each saver kept its thread in a directory of its own: the floor's log grew by one
    # record per call, ours made a run directory.
    made = {entry.name.split("-")[0]: entry for entry in tmp_path.iterdir()}
    assert set(made) == {"floor", "sqlite", "file"}
    assert (made["floor"] / "log").stat().st_size % 512 == 0
    assert (made["floor"] / "log").stat().st_size >= 2 * 512 * 3
    assert any((made["file"] / "runs").iterdir())
