"""Shared fixtures: every async test runs on asyncio and on trio. The session's closing
lines (tests/_summary.py) are gathered here, from pytest-xdist's workers too."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests import _summary, _sweeps
from tests.reliability._audit import FIGURES, SEED_VARIABLE, scale


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):  # the process that starts the session
        os.environ[SEED_VARIABLE] = str(FIGURES.seed)  # xdist workers inherit it


def pytest_report_header() -> str:
    return _sweeps.header()


def pytest_sessionfinish(session: pytest.Session) -> None:
    output = getattr(session.config, "workeroutput", None)
    if output is not None:  # an xdist worker: hand the lines to the controller
        output[_summary.WORKER_OUTPUT_KEY] = _summary.export()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: object, error: object) -> None:
    """pytest-xdist: a worker finished."""
    _summary.merge(getattr(node, "workeroutput", {}).get(_summary.WORKER_OUTPUT_KEY))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in _summary.lines():
        terminalreporter.write_line(line)
    figures = FIGURES.lines()
    if figures:
        terminalreporter.section("reliability figures")
        terminalreporter.write_line(f"seed {FIGURES.seed}, scale {scale():g}")
        for line in figures:
            terminalreporter.write_line(line)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


@pytest.fixture(autouse=True, scope="session")
def lifecycle_rules_read_back_at_once() -> Iterator[None]:
    """S3 provisioning reads the lifecycle rules it wrote back at once, not a second later
    (most tests provision a new prefix, so each would wait): moto serves one request at a
    time, and the tests of provisioning runs racing order their requests themselves."""
    try:
        from fastcheckpoint.stores import _s3_provision
    except ImportError:  # installed without the AWS extras
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_s3_provision, "_SETTLE", 0.0)
        yield
