"""``vipalloc replay``: what a finished run spent on zero-variance groups, and what allocation would have changed.

* :mod:`vipalloc.replay.readers`: format detection and :func:`read_logs` over the streaming readers for TRL's
  completion logs (:mod:`~vipalloc.replay.read_trl`), verl's rollout dumps, Tinker's rollout summaries and
  vipalloc's ``history.jsonl`` (:mod:`~vipalloc.replay.read_jsonl`), folded while reading into the groups the
  trainer formed (:mod:`~vipalloc.replay.table`);
* :mod:`vipalloc.replay.analysis`: waste figures (zero variance on the success reward, zero advantage as trained),
  predictor scoring and model-based counterfactual plans, all through :class:`vipalloc.Allocator`;
* :mod:`vipalloc.replay.report`: ``replay.json``, ``replay.md`` and the PNG plots;
* :mod:`vipalloc.replay.cli`: the command.
"""

from vipalloc.replay.readers import FORMATS, GroupTable, ReadOptions, ReplayInputError, read_logs

__all__ = ["FORMATS", "GroupTable", "ReadOptions", "ReplayInputError", "read_logs"]
