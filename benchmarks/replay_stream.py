"""Time ``vipalloc replay`` on a synthetic verl rollout dump of ``--rollouts`` rollouts (default 1M), as a whole.

Writes ``<global_step>.jsonl`` files in verl's ``_write_generations`` layout (input, output, gts, score, step,
acc) into a temporary folder, then runs the whole ``run_replay`` (streaming read, waste figures, report) with
``--predictors`` (default beta) and no counterfactual strategies unless ``--strategies`` names some. Prints the
wall time, the rollouts per second and the peak resident memory (which stays far below the log's size: rollouts
are folded into (step, prompt) groups while reading).

    .venv/bin/python benchmarks/replay_stream.py                  # 1M rollouts: 500 steps x 250 prompts x 8
    .venv/bin/python benchmarks/replay_stream.py --rollouts 100000 --strategies vip --predictors gp,beta
    .venv/bin/python benchmarks/replay_stream.py --dump /tmp/dump1m --predictors none   # reuse one dump: compare
                                                                  # two versions of the code on the same files
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np


def write_dump(folder: Path, steps: int, prompts: int, group: int, pool: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    p_true = rng.beta(0.5, 0.5, pool)  # U-shaped difficulty, as RLVR prompt pools are
    words = rng.integers(20, 400, pool)
    n = 0
    for step in range(1, steps + 1):
        batch = rng.choice(pool, prompts, replace=False)
        with (folder / f"{step}.jsonl").open("w") as f:
            for q in batch:
                ok = rng.random(group) < p_true[q]
                for o in ok:
                    row = {
                        "input": f"Question {q}: compute the value of expression number {q}.",
                        "output": "step " * int(words[q]) + ("42" if o else "7"),
                        "gts": "42",
                        "score": float(o),
                        "step": step,
                        "acc": bool(o),
                    }
                    f.write(json.dumps(row) + "\n")
                    n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rollouts", type=int, default=1_000_000)
    ap.add_argument("--prompts", type=int, default=250, help="prompts per step")
    ap.add_argument("--group", type=int, default=8, help="rollouts per prompt")
    ap.add_argument("--pool", type=int, default=5000, help="distinct prompts")
    ap.add_argument("--strategies", default="", help="comma-separated (default: none)")
    ap.add_argument("--predictors", default="beta", help="comma-separated, or 'none'")
    ap.add_argument("--dump", default=None, help="folder to write the dump to and keep (reused when it has files)")
    args = ap.parse_args()
    from vipalloc.replay.cli import run_replay

    steps = max(1, args.rollouts // (args.prompts * args.group))
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(args.dump) if args.dump else Path(tmp) / "dump"
        dump.mkdir(parents=True, exist_ok=True)
        if any(dump.iterdir()):
            print(f"reusing the dump in {dump} ({sum(1 for _ in dump.iterdir())} files)")
        else:
            t0 = time.perf_counter()
            n = write_dump(dump, steps, args.prompts, args.group, args.pool)
            size = sum(f.stat().st_size for f in dump.iterdir())
            print(f"wrote {n:,} rollouts in {steps} files ({size / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        r = run_replay(
            [dump],
            Path(tmp) / "out",
            strategies=[s for s in args.strategies.split(",") if s and s != "none"],
            predictors=[p for p in args.predictors.split(",") if p and p != "none"],
            embedder="hashing",
        )
        wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"replay: {r['rollouts']:,} rollouts, {r['prompt_steps']:,} groups in {wall:.1f} s "
        f"({r['rollouts'] / wall:,.0f} rollouts/s); zero-variance share {r['zero_variance_share']:.3f}; "
        f"peak RSS {peak:.0f} MB"
    )


if __name__ == "__main__":
    main()
