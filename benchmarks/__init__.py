"""fastcheckpoint's benchmark suite: ``python -m benchmarks --help``.

From Python::

    from benchmarks import Sizes, run_suite
    report = run_suite(["memory://"], ["W1"], Sizes.quick())

Stores are given by URL, so every store :func:`fastcheckpoint.open_store` knows can be
benchmarked; matplotlib (chart) and tqdm (progress bar) are optional.
"""

from __future__ import annotations

from benchmarks.measure import Phase, Sample
from benchmarks.settings import Sizes
from benchmarks.suite import Report, WorkloadResult, run_suite
from benchmarks.workloads import WORKLOADS

__all__ = ["WORKLOADS", "Phase", "Report", "Sample", "Sizes", "WorkloadResult", "run_suite"]
