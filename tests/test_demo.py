"""examples/agent_demo.py is documentation that must keep working: run it as ``make demo`` does."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parent.parent / "examples" / "agent_demo.py"

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="the demo needs SIGKILL")


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(DEMO), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_demo_survives_sigkill_and_resumes(tmp_path: Path) -> None:
    demo_dir = tmp_path / "demo"
    # 0.2 s per step leaves the parent ample time to kill the agent between two checkpoints.
    result = run_demo("--dir", str(demo_dir), "--step-delay", "0.2")

    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "sent SIGKILL to agent pid" in out
    assert "is dead (SIGKILL)" in out
    assert "parent: restored seq=" in out
    assert "  resumed | checkpoint seq=5 step=publish" in out
    assert "run status: completed" in out.lower()
    assert "demo OK" in out
    assert (demo_dir / "store").is_dir()


def test_demo_refuses_to_wipe_a_directory_it_did_not_create(tmp_path: Path) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")

    result = run_demo("--dir", str(tmp_path), "--step-delay", "0")

    assert result.returncode == 1
    assert "not wiping it" in result.stderr
    assert precious.read_text() == "keep me"
