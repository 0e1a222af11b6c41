"""examples/agent_demo.py is documentation that must keep working: run it as ``make demo`` does."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "agent_demo.py"

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="the demo needs SIGKILL")


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(DEMO), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def make_demo(venv: Path, *demo_args: str) -> subprocess.CompletedProcess[str]:
    """``make demo`` from nothing, with its venv and data moved out of the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env.pop("VIRTUAL_ENV", None)
    command = ["make", "-C", str(ROOT), "demo", f"PYTHON={sys.executable}",
               f"DEMO_VENV={venv}", f"DEMO_ARGS={' '.join(demo_args)}"]
    return subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=600, check=False
    )


@pytest.mark.slow  # about 12 s on an idle machine: a fresh venv and an editable install
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_survives_sigkill_and_resumes_with_only_the_library(tmp_path: Path) -> None:
    venv, demo_dir = tmp_path / "venv", tmp_path / "demo"
    # 0.2 s per step leaves the parent ample time to kill the agent between two checkpoints.
    result = make_demo(venv, "--dir", str(demo_dir), "--step-delay", "0.2")

    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "sent SIGKILL to agent pid" in out
    assert "is dead (SIGKILL)" in out
    assert "parent: restored seq=" in out
    assert "  resumed | checkpoint seq=5 step=publish" in out
    assert "run status: completed" in out.lower()
    assert "demo OK" in out
    assert (demo_dir / "store").is_dir()
    # The demo's venv holds the library and its dependencies, none of [dev] or of the extras.
    (site,) = venv.glob("lib/python3*/site-packages")
    installed = {p.name.split("-")[0].lower() for p in site.glob("*.dist-info")}
    assert {"fastcheckpoint", "anyio", "msgspec"} <= installed
    assert not installed & {"pytest", "trio", "redis", "aiobotocore", "moto", "mypy"}, installed


def test_demo_refuses_to_wipe_a_directory_it_did_not_create(tmp_path: Path) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")

    result = run_demo("--dir", str(tmp_path), "--step-delay", "0")

    assert result.returncode == 1
    assert "not wiping it" in result.stderr
    assert precious.read_text() == "keep me"
