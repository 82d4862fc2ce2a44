"""``vipalloc replay``: what a finished run spent on zero-variance groups, and what allocation would have changed.

* :mod:`vipalloc.replay.readers`: streaming readers for TRL's completion logs, verl's rollout dumps and vipalloc's
  ``history.jsonl``, folded into per-(step, prompt) groups while reading;
* :mod:`vipalloc.replay.analysis`: waste figures, predictor scoring and model-based counterfactual plans, all
  through :class:`vipalloc.Allocator`;
* :mod:`vipalloc.replay.report`: ``replay.json``, ``replay.md`` and the PNG plots;
* :mod:`vipalloc.replay.cli`: the command.
"""

from vipalloc.replay.readers import FORMATS, GroupTable, ReadOptions, ReplayInputError, read_logs

__all__ = ["FORMATS", "GroupTable", "ReadOptions", "ReplayInputError", "read_logs"]
