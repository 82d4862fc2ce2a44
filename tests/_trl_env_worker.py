"""torchrun worker: environment-owned tasks (``environment_factory`` without ``train_dataset``) on two processes.

``torchrun --standalone --nproc_per_node 2 tests/_trl_env_worker.py OUT_DIR``; every process dumps what it saw to
``OUT_DIR/env.rank<r>.json``. Run by ``tests/test_trl_environments.py``.

Each process resets its own pooled environments (TRL's pool is per process); instance ``s`` of rank ``r`` serves task
``(2 r + s // 4 + 4 t) % 12`` at its ``t``-th reset, so the 4 copies of a group (one process holds whole groups
here: 2 groups of 4 rows each) share a task and the 4 groups of a batch are 4 tasks.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

sys.path.insert(0, str(Path(__file__).parent))
import _trl_tools_worker as w  # noqa: E402
from _trl_helpers import ScriptedAllocator  # noqa: E402

from vipalloc.integrations.trl import VIPGRPOConfig, VIPGRPOTrainer  # noqa: E402

TASKS = w.sum_prompts()
GROUP = 4
SCRIPT = {0: [4, 2, 0, 2], 1: [2, 2, 4, 0]}  # real rows per process: 6 / 2, then 4 / 4
RESETS: list[int] = []
SCORED: list[int] = []


class RankTaskEnv:
    """Owns the tasks; the rank and the instance's creation order in this process pick the task (see above)."""

    created = 0

    def __init__(self) -> None:
        self.slot = RankTaskEnv.created
        RankTaskEnv.created += 1
        self.rank = int(os.environ.get("RANK", "0"))
        self.t = 0
        self.task = -1

    def reset(self, **kwargs: Any) -> str:
        RESETS.append(self.slot)
        self.task = (2 * self.rank + self.slot // GROUP + 4 * self.t) % len(TASKS)
        self.t += 1
        return TASKS[self.task]["prompt"][0]["content"]

    def add(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: the first addend
            b: the second addend
        """
        return w.add(a, b)


def reward(completions: list, environments: list, **kwargs: Any) -> list[float]:
    out = []
    for comp, env in zip(completions, environments):
        said = comp[-1].get("content") or ""
        out.append(float(TASKS[env.task]["answer"] in said))
        SCORED.append(env.task)
    return out


def main(out: Path) -> None:
    rank = int(os.environ["RANK"])
    tok = w.chat_tokenizer()
    model = w.tiny_chat_llama(len(tok))
    policy = w.ScriptedPolicy(tok)
    policy.bind(model, TASKS)
    args = VIPGRPOConfig(
        output_dir=str(out / "run"),
        use_cpu=True,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        num_generations=2,
        n_max=GROUP,
        n_min=2,
        max_completion_length=400,
        max_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=0,
        dataloader_num_workers=0,
    )
    allocator = ScriptedAllocator(
        lambda step, _: SCRIPT[step], strategy="uniform", predictor="beta", n_min=2, n_max=GROUP, embedder="hashing"
    )
    trainer = VIPGRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=args,
        processing_class=tok,
        allocator=allocator,
        environment_factory=RankTaskEnv,
    )
    trainer.train()
    last = trainer.vip_last
    assert last is not None
    dump = {
        "world": trainer.accelerator.num_processes,
        "ids": last.prompt_ids,
        "counts": last.counts.tolist(),
        "resets": RESETS,
        "scored": SCORED,
        "loss": trainer.state.log_history[-1].get("train_loss"),
    }
    (out / f"env.rank{rank}.json").write_text(json.dumps(dump))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
