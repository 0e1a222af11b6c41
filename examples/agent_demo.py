"""Crash and resume: an agent checkpoints every step, is killed with SIGKILL, and resumes.

    make demo                       # or: python examples/agent_demo.py [--step-delay 0.3]

1. This script starts itself again as a subprocess (``--agent``): a fake research agent that
   runs six steps and checkpoints after each one into a ``FileStore``.
2. Once the agent has reported three checkpoints, this process kills it with SIGKILL: no
   cleanup, no flush, no ``finally`` -- like the OOM killer or a pulled plug.
3. This process then opens the same directory, restores the run's newest checkpoint, runs the
   remaining steps from there, marks the run completed and prints its history.

The demo checks its own story and exits non-zero, saying what differed, if the agent was not
actually killed, a reported checkpoint was lost, or the resumed run skipped or repeated a step.
POSIX only (it needs SIGKILL).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import anyio
from anyio.streams.buffered import BufferedByteReceiveStream

from fastcheckpoint import (
    Checkpoint,
    CheckpointConfig,
    CheckpointManager,
    CheckpointStatus,
    FileStore,
)

DEFAULT_DIR = Path(__file__).resolve().parent.parent / ".fastcheckpoint-demo"
MARKER = "CREATED_BY_FASTCHECKPOINT_DEMO"
RUN_ID = "research-agent/run-1"  # any string is a valid run id, slashes and all
QUESTION = "Which checkpoint store should a serverless agent platform use?"
STEPS = [  # (step name, what the agent "found" in that step)
    ("plan", "Split the question into latency, durability and cost."),
    ("search", "Found 4 sources: two benchmarks, a pricing page, a postmortem."),
    ("read", "Extracted 9 facts; two sources disagree on p99 latency."),
    ("draft", "Wrote a 300-word answer recommending DynamoDB+S3."),
    ("review", "Removed one claim no source supports."),
    ("publish", "Delivered the answer."),
]
STEP_NAMES = [name for name, _ in STEPS]


class DemoError(Exception):
    """The demo's story did not happen as told; the message says what differed."""


class Reported(NamedTuple):
    """A checkpoint the agent process said it had written."""

    sequence: int
    step_name: str
    checkpoint_id: str


# --------------------------------------------------------------------------- the agent


def open_manager(demo_dir: Path) -> CheckpointManager:
    store = FileStore(demo_dir / "store")
    return CheckpointManager(store, config=CheckpointConfig(max_checkpoints_per_run=50))


async def run_steps(
    manager: CheckpointManager,
    state: dict[str, Any],
    messages: list[Any],
    *,
    step_delay: float,
    report: Callable[[str], None],
) -> None:
    """Run every step not yet in ``state["completed_steps"]``, checkpointing after each."""
    for name, finding in STEPS[len(state["completed_steps"]) :]:
        await anyio.sleep(step_delay)  # the real work: an LLM call, a tool call...
        state["completed_steps"].append(name)
        state["findings"][name] = finding
        messages.append({"role": "assistant", "content": f"[{name}] {finding}"})
        ckpt = await manager.create(RUN_ID, state=state, messages=messages, step_name=name)
        if ckpt is None:  # only a create throttled by checkpoint_interval returns None
            raise DemoError(f"create() returned None for step {name!r}")
        report(f"checkpoint seq={ckpt.metadata.sequence} step={name} id={ckpt.checkpoint_id}")


def print_now(line: str) -> None:
    print(line, flush=True)  # the parent reads our stdout line by line, as it happens


async def agent_main(demo_dir: Path, step_delay: float) -> None:
    """The agent process: start the run from scratch; the parent kills it part way."""
    state: dict[str, Any] = {"question": QUESTION, "completed_steps": [], "findings": {}}
    messages: list[Any] = [{"role": "user", "content": QUESTION}]
    async with open_manager(demo_dir) as manager:
        await run_steps(manager, state, messages, step_delay=step_delay, report=print_now)
    print("finished all steps", flush=True)


# --------------------------------------------------------------------------- the parent


async def read_line(stream: BufferedByteReceiveStream) -> str | None:
    """The next line the agent printed, or ``None`` once its stdout is closed."""
    try:
        return (await stream.receive_until(b"\n", 65536)).decode()
    except anyio.IncompleteRead:
        return None


def relay(line: str, reported: list[Reported]) -> None:
    """Show an agent line, and remember it if it reports a checkpoint."""
    print(f"  agent | {line}")
    words = line.split()
    if words[:1] == ["checkpoint"]:
        fields = dict(word.split("=", 1) for word in words[1:])
        reported.append(Reported(int(fields["seq"]), fields["step"], fields["id"]))


async def run_and_kill_agent(demo_dir: Path, step_delay: float, kill_after: int) -> list[Reported]:
    """Start the agent, SIGKILL it after ``kill_after`` checkpoints; return what it reported."""
    command = [sys.executable, __file__, "--agent", "--dir", str(demo_dir)]
    command += ["--step-delay", str(step_delay)]
    reported: list[Reported] = []
    async with await anyio.open_process(command, stdin=subprocess.DEVNULL, stderr=None) as process:
        assert process.stdout is not None
        lines = BufferedByteReceiveStream(process.stdout)
        print(f"parent: started agent pid {process.pid}; kill due after {kill_after} checkpoints")
        try:
            with anyio.fail_after(60):
                while len(reported) < kill_after and (line := await read_line(lines)) is not None:
                    relay(line, reported)
            if len(reported) < kill_after:
                code = await process.wait()
                raise DemoError(f"the agent exited (code {code}) after {len(reported)} checkpoints")
            try:
                os.kill(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # it already exited: the return code check below says how
            else:
                print(f"parent: sent SIGKILL to agent pid {process.pid}")
            while (line := await read_line(lines)) is not None:  # what it printed before dying
                relay(line, reported)
            code = await process.wait()
        except TimeoutError:
            raise DemoError(f"the agent reported {len(reported)} checkpoints in 60 s") from None
        finally:
            if process.returncode is None:
                process.kill()
    if code != -signal.SIGKILL:
        raise DemoError(
            f"the agent exited with code {code} instead of being killed by SIGKILL "
            "(did it finish first? try a larger --step-delay)"
        )
    print(f"parent: agent pid {process.pid} is dead (SIGKILL) after {len(reported)} checkpoints")
    return reported


async def resume_run(demo_dir: Path, step_delay: float, reported: list[Reported]) -> None:
    """What a new worker does after a crash: restore the newest checkpoint and carry on."""
    async with open_manager(demo_dir) as manager:
        latest = await manager.restore(RUN_ID)
        if latest is None:
            raise DemoError(f"restore({RUN_ID!r}) found no checkpoint after the kill")
        check_restored(latest, reported)
        next_step = STEP_NAMES[len(latest.state["completed_steps"])]
        print(
            f"parent: restored seq={latest.metadata.sequence} step={latest.metadata.step_name} "
            f"({len(latest.messages)} messages); resuming at step {next_step!r}"
        )
        await run_steps(
            manager,
            latest.state,
            latest.messages,
            step_delay=step_delay,
            report=lambda line: print(f"  resumed | {line}"),
        )
        await manager.mark_completed(RUN_ID)
        history = list(reversed(await manager.list_checkpoints(RUN_ID)))
        run = await manager.get_run(RUN_ID)

    print(f"\nhistory of run {RUN_ID!r}, oldest first:")
    for meta in history:
        writer = "agent (killed)" if meta.sequence <= latest.metadata.sequence else "resumed"
        when = format_time(meta.created_at)
        print(f"  seq {meta.sequence} {meta.step_name:<8} {writer:<15}{when}  {meta.checkpoint_id}")
    if run is None:
        raise DemoError(f"get_run({RUN_ID!r}) found no run record")
    status = run.status.value
    print(f"run status: {status} (latest seq {run.latest_sequence}, {run.checkpoint_count} saved)")

    steps = [meta.step_name for meta in history]
    if steps != STEP_NAMES or [meta.sequence for meta in history] != list(range(len(STEPS))):
        raise DemoError(f"the run skipped or repeated a step: its history is {steps}")
    if run.status != CheckpointStatus.COMPLETED:
        raise DemoError(f"run status is {status!r}, wanted completed")
    if (run.latest_sequence, run.checkpoint_count) != (len(STEPS) - 1, len(STEPS)):
        raise DemoError("the run record disagrees with the history")


def check_restored(latest: Checkpoint, reported: list[Reported]) -> None:
    """The restored checkpoint must be the last one the agent reported, or the next one (if the
    agent was killed after writing it but before printing)."""
    sequence, step_name = latest.metadata.sequence, latest.metadata.step_name
    last = reported[-1]
    if sequence < last.sequence:
        raise DemoError(f"restore returned seq {sequence}; the agent had written {last.sequence}")
    if sequence > last.sequence + 1:
        raise DemoError(f"restore returned seq {sequence}; the agent cannot have written it")
    if sequence == last.sequence and latest.checkpoint_id != last.checkpoint_id:
        raise DemoError(f"restore returned {latest.checkpoint_id}; expected {last.checkpoint_id}")
    done = latest.state["completed_steps"]
    if done != STEP_NAMES[: sequence + 1] or step_name != STEP_NAMES[sequence]:
        raise DemoError(f"restored seq {sequence} ({step_name!r}) holds steps {done}")
    if len(latest.messages) != len(done) + 1:
        raise DemoError(f"restored {len(latest.messages)} messages after {len(done)} steps")


def format_time(epoch_seconds: float) -> str:
    return datetime.fromtimestamp(epoch_seconds, tz=timezone.utc).isoformat(timespec="milliseconds")


def prepare_demo_dir(demo_dir: Path) -> None:
    """Wipe what an earlier demo left, but never a directory the demo did not create."""
    if demo_dir.exists():
        if any(demo_dir.iterdir()) and not (demo_dir / MARKER).exists():
            raise DemoError(f"{demo_dir} is not empty and was not made by this demo; not wiping it")
        shutil.rmtree(demo_dir)
    demo_dir.mkdir(parents=True)
    (demo_dir / MARKER).touch()


async def demo_main(demo_dir: Path, step_delay: float, kill_after: int) -> None:
    print("fastcheckpoint demo: kill an agent with SIGKILL mid-run, then resume it")
    print(f"  store: FileStore at {demo_dir / 'store'}")
    print(f"  run:   {RUN_ID!r}, steps {' -> '.join(STEP_NAMES)} ({step_delay} s each)\n")
    reported = await run_and_kill_agent(demo_dir, step_delay, kill_after)
    print()
    await resume_run(demo_dir, step_delay, reported)
    print(f"\ndemo OK: the run survived SIGKILL and completed all {len(STEPS)} steps exactly once")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="demo data (wiped first)")
    parser.add_argument("--step-delay", type=float, default=0.3, help="seconds of work per step")
    parser.add_argument("--kill-after", type=int, default=3, help="checkpoints before SIGKILL")
    parser.add_argument("--agent", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 1 <= args.kill_after < len(STEPS):
        parser.error(f"--kill-after must be between 1 and {len(STEPS) - 1}")
    if args.step_delay < 0:
        parser.error("--step-delay must not be negative")

    if args.agent:
        anyio.run(agent_main, args.dir, args.step_delay)
        return 0
    try:
        if not hasattr(signal, "SIGKILL"):
            raise DemoError("this demo needs SIGKILL, which this platform lacks (POSIX only)")
        prepare_demo_dir(args.dir)
        anyio.run(demo_main, args.dir, args.step_delay, args.kill_after)
    except DemoError as exc:
        print(f"\ndemo FAILED: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
