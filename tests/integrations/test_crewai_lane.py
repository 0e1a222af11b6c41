"""The CrewAI tests, run in a virtualenv of their own.

CrewAI's current release pins openai 2.x, mcp 1.x and pydantic 2.12, which the other
framework adapters' releases in the dev environment conflict with, so
``tests/integrations/crewai/`` cannot run here. This test builds (once, outside the checkout)
a virtualenv with the checkout, CrewAI and pytest, and runs that directory there:

    ${XDG_CACHE_HOME:-~/.cache}/fastcheckpoint-tests/venv-crewai-<hash of what it holds>

A file lock keeps two test sessions from building it at once; a build that did not finish is
removed and started again. When the package index cannot be reached the test is skipped,
saying so.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastcheckpoint.errors import ConfigurationError

CREWAI = "crewai==1.15.30"
"""CrewAI's current release, the one the adapter is tested against."""
CHECKOUT = Path(__file__).resolve().parents[2]
REQUIREMENTS = (CREWAI, "pytest>=8", "hypothesis>=6.100", "-e", f"{CHECKOUT}[redis]")
"""What ``pip install`` gets: the checkout in editable mode (with the redis extra, for the
Redis store tests), CrewAI, pytest, and hypothesis (the differential test against CrewAI's
SQLite backend); the CrewAI tests need nothing else."""
BUILD_SECONDS = 1800
RUN_SECONDS = 900
COMPLETE = "fastcheckpoint-lane-complete"
"""Written into the venv after its install succeeded; a venv without it is rebuilt."""
_UNREACHABLE = re.compile(
    r"NewConnectionError|Failed to establish a new connection|Temporary failure in name "
    r"resolution|Name or service not known|Network is unreachable|ConnectTimeoutError|"
    r"Read timed out|ProxyError|No route to host|Connection refused")
_PASSTHROUGH_DROPPED = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTEST_ADDOPTS")


@pytest.mark.skipif(importlib.util.find_spec("crewai") is not None,
                    reason="CrewAI is installed here")
def test_without_crewai_the_adapter_names_the_extra_to_install() -> None:
    with pytest.raises(ConfigurationError, match=re.escape("pip install 'fastcheckpoint[crewai]'")):
        importlib.import_module("fastcheckpoint.integrations.crewai")


def test_crewai_tests_pass_in_their_own_venv() -> None:
    python = _lane_python()
    env = {name: value for name, value in os.environ.items()
           if name not in _PASSTHROUGH_DROPPED}
    try:
        done = subprocess.run(
            [str(python), "-m", "pytest", "tests/integrations/crewai", "-q",
             "-p", "no:cacheprovider"],
            cwd=CHECKOUT, env=env, capture_output=True, text=True, timeout=RUN_SECONDS,
            check=False)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the CrewAI tests did not finish in {RUN_SECONDS}s:\n{_text(exc.stdout)}"
                    f"\n{_text(exc.stderr)}")
    output = f"{done.stdout}\n{done.stderr}"
    # 0: tests ran and passed (no test collected is 5: CrewAI missing from the venv)
    assert done.returncode == 0, f"the CrewAI tests failed in {python.parent.parent}:\n{output}"


def lane_venv() -> Path:
    """Where the venv for this checkout, interpreter and requirement list lives."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    listed = "\n".join((f"python {sys.version_info.major}.{sys.version_info.minor}",
                        *REQUIREMENTS, _project_dependencies()))
    digest = hashlib.sha256(listed.encode()).hexdigest()[:16]
    return Path(cache) / "fastcheckpoint-tests" / f"venv-crewai-{digest}"


def _lane_python() -> Path:
    venv = lane_venv()
    python = venv / "bin" / "python"
    if (venv / COMPLETE).exists():
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    with _locked(venv.with_name(venv.name + ".lock")):
        if not (venv / COMPLETE).exists():  # another session may have built it meanwhile
            _build(venv)
    return python


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(venv: Path) -> None:
    if venv.exists():
        shutil.rmtree(venv)  # a build that did not finish
    _step([sys.executable, "-m", "venv", str(venv)], "python -m venv")
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
         "--retries", "2", *REQUIREMENTS],
        capture_output=True, text=True, timeout=BUILD_SECONDS, check=False)
    if done.returncode != 0:
        output = f"{done.stdout}\n{done.stderr}"
        shutil.rmtree(venv, ignore_errors=True)
        if _UNREACHABLE.search(output):
            pytest.skip("the CrewAI lane needs the package index to build its venv, which "
                        f"cannot be reached:\n{output[-1500:]}")
        pytest.fail(f"pip install for the CrewAI lane failed:\n{output[-6000:]}")
    (venv / COMPLETE).write_text("\n".join(REQUIREMENTS) + "\n")


def _step(command: list[str], what: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_SECONDS,
                          check=False)
    if done.returncode != 0:
        pytest.fail(f"{what} failed:\n{done.stdout}\n{done.stderr}")


def _project_dependencies() -> str:
    """The checkout's runtime dependencies as pyproject.toml lists them: an editable install
    does not follow their changes, so a change builds a new venv."""
    text = (CHECKOUT / "pyproject.toml").read_text()
    found = re.search(r"^dependencies = \[(.*?)\]", text, re.MULTILINE | re.DOTALL)
    return "" if found is None else " ".join(found.group(1).split())


def _text(value: str | bytes | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value
