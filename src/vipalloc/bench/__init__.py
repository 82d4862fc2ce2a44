"""Benchmarks behind ``vipalloc bench``: one module per benchmark, each with its runner, report writer and
private helpers.

* :mod:`vipalloc.bench.simulate`: league table of strategies on the policy-gradient simulator, sigma sweep
  (:func:`run_simulate`, :func:`simulate_run`, :class:`RowSpec`, :func:`parse_rows`).
* :mod:`vipalloc.bench.predictors`: next-step calibration of the predictors (:func:`run_predictors`).
* :mod:`vipalloc.bench.overhead`: ``plan()`` cost by stage, peers' solvers side by side (:func:`run_overhead`).
* :mod:`vipalloc.bench.train`: real CPU training at equal cumulative rollouts (:func:`run_train`).
* :mod:`vipalloc.bench.simulator`: the learning-dynamics simulator the first two run on.
* :mod:`vipalloc.bench.peers`: re-implementations of the peers' solvers, for comparison only.
* :mod:`vipalloc.bench.progress`: the ``progress(kind, info)`` events every runner emits.
* :mod:`vipalloc.bench.cli`: the ``vipalloc bench`` commands (the only CLI surface).

The statistics and report helpers (``mean_ci``, ``fmt_ci``, ``md_table``, plots, provenance) live one layer
down, in :mod:`vipalloc.reporting`, shared with the trainer. The runners are imported on first use, so
``import vipalloc.bench`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vipalloc.bench.overhead import run_overhead
    from vipalloc.bench.predictors import run_predictors
    from vipalloc.bench.simulate import RowSpec, SimRun, parse_rows, run_simulate, simulate_run
    from vipalloc.bench.train import run_train

__all__ = [
    "RowSpec",
    "SimRun",
    "parse_rows",
    "run_overhead",
    "run_predictors",
    "run_simulate",
    "run_train",
    "simulate_run",
]

_WHERE = {
    "RowSpec": "simulate",
    "SimRun": "simulate",
    "parse_rows": "simulate",
    "run_simulate": "simulate",
    "simulate_run": "simulate",
    "run_predictors": "predictors",
    "run_overhead": "overhead",
    "run_train": "train",
}


def __getattr__(name: str) -> Any:
    """Lazy exports: ``vipalloc.bench.run_simulate`` imports :mod:`vipalloc.bench.simulate` on first access."""
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'vipalloc.bench' has no attribute {name!r}")
    return getattr(importlib.import_module(f"vipalloc.bench.{mod}"), name)
