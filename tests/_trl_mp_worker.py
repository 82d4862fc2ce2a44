"""torchrun worker of ``tests/test_trl_multiprocess.py``: real VIPGRPOTrainer runs on 2 CPU processes (gloo).

Usage: ``torchrun --standalone --nproc_per_node 2 tests/_trl_mp_worker.py OUT_DIR SCENARIO[,SCENARIO...]``. Each
scenario trains a few steps and every process dumps what it saw to ``OUT_DIR/<scenario>.rank<r>.json``.

Scenarios ``loss-<type>``: GPT-2 (absolute positions) with prompts of different lengths, learning rate 0, KL
penalty on, and scripted plans that leave the processes unequal, the first one with no real row on process 1.
``vllm-tp1`` / ``vllm-tp2``: vLLM colocate mode through the stand-in (tensor parallel 1 or 2).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _trl_helpers import (  # noqa: E402
    DigitReward,
    ScriptedAllocator,
    StandInClient,
    StandInLLM,
    install_vllm_standin,
    sums,
    tiny_gpt2,
    tiny_llama,
    tiny_tokenizer,
)
from trl import GRPOTrainer  # noqa: E402

from vipalloc import Allocator  # noqa: E402
from vipalloc.integrations.trl import VIPGRPOConfig, VIPGRPOTrainer  # noqa: E402

torch.set_num_threads(1)
# 4 prompts x n_max 4 = 16 sampled rows (8 per process); budget 8 = 2 processes x 2 rows x 2 micro-batches.
SCRIPT = {0: [4, 4, 0, 0], 1: [3, 3, 2, 0]}  # process 1 holds 0 then 2 real rows, process 0 holds 8 then 6
# "span": 3 prompts x n_max 6 = 18 rows (9 per process), budget 12: prompt 1's rows 6-11 sit on both processes.
SPAN_SCRIPT = {0: [6, 6, 0], 1: [2, 4, 6]}  # real rows per process: 9 / 3, then 5 / 7


def script(step: int, prompts: list[str]) -> list[int]:
    return (SPAN_SCRIPT if len(prompts) == 3 else SCRIPT)[step % 2]


def run(out: Path, scenario: str) -> None:
    rank = int(os.environ["RANK"])
    tok = tiny_tokenizer()
    vllm = scenario.startswith("vllm")
    model_dir = out / f"model-{scenario}-rank{rank}"  # same weights on both ranks (seeded); a path for ref / vLLM
    (tiny_llama if vllm else tiny_gpt2)(len(tok)).save_pretrained(model_dir)
    loss_type = "dapo" if vllm or scenario in ("span", "two-phase") else scenario.removeprefix("loss-")
    extra: dict = {}
    if scenario == "span":
        extra = dict(per_device_train_batch_size=3, num_generations=4, n_max=6)
    if scenario == "two-phase":  # budget 12 over 4 prompts: a pilot of 2 each, then 4 committed rollouts
        extra = dict(per_device_train_batch_size=3, num_generations=3, two_phase=True, pilot_n=2)
        extra["allocation_strategy"] = "vip_two_phase"
    if vllm:
        install_vllm_standin()
        StandInLLM.instances.clear()
        StandInClient.instances.clear()
        StandInClient.model_path = str(model_dir)
        if scenario == "vllm-server":
            extra = dict(use_vllm=True, vllm_mode="server")
        else:
            extra = dict(use_vllm=True, vllm_mode="colocate", vllm_tensor_parallel_size=int(scenario[-1]))
    n_max = int(extra.get("n_max", 4))
    args = VIPGRPOConfig(
        output_dir=str(out / f"run-{scenario}"),
        use_cpu=True,
        **{"per_device_train_batch_size": 2, "num_generations": 2, "n_max": 4, **extra},
        gradient_accumulation_steps=2,
        n_min=2,
        max_completion_length=3,
        max_steps=2,
        learning_rate=0.0,  # the policy stays the reference: KL must be 0 unless token positions moved
        beta=0.04,
        loss_type=loss_type,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=0,
        dataloader_num_workers=0,
    )
    reward = DigitReward(log_extra=True)
    allocator = (
        Allocator(strategy="vip_two_phase", predictor="beta", n_min=2, n_max=n_max, embedder="hashing")
        if scenario == "two-phase"
        else ScriptedAllocator(script, strategy="uniform", predictor="beta", n_min=2, n_max=n_max, embedder="hashing")
    )
    trained: list[dict] = []
    base_loss = GRPOTrainer.compute_loss

    def loss(self, model, inputs, *a, **kw):
        value = base_loss(self, model, inputs, *a, **kw)
        mask = inputs["completion_mask"]
        rows = []
        for p, pm, c, cm, adv in zip(
            inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"], mask, inputs["advantages"]
        ):
            if int(cm.sum()):
                text = tok.decode(c[cm.bool()], skip_special_tokens=True)
                rows.append([tok.decode(p[pm.bool()]), text, float(adv)])
        trained.append({"rows": int(mask.size(0)), "real": rows, "loss": float(value.detach())})
        return value

    GRPOTrainer.compute_loss = loss
    try:
        trainer = VIPGRPOTrainer(
            model=str(model_dir),
            reward_funcs=reward,
            args=args,
            train_dataset=sums(varied=not vllm),
            processing_class=tok,
            allocator=allocator,
        )
        trainer.train()
    finally:
        GRPOTrainer.compute_loss = base_loss
    logs = [h for h in trainer.state.log_history if "loss" in h]
    dump = {
        "world": trainer.accelerator.num_processes,
        "trained": trained,
        "reward_pairs": reward.pairs,
        "reward_rows": [len(c) for c in reward.calls],
        "reward_calls": reward.calls,
        "logs": logs,
        "counts": trainer.vip_last.counts.tolist() if trainer.vip_last else None,
        "extra": list(trainer._logs["extra"].get("digit_count", [])),
        "completions": list(trainer._logs["completion"]),
        "llm_calls": [len(c) for inst in StandInLLM.instances for c in inst.calls] if vllm else [],
        "llm_synced": len(StandInLLM.instances[0].synced) if vllm and StandInLLM.instances else 0,
        "server_calls": [c for inst in StandInClient.instances for c in inst.calls],
    }
    if trainer.accelerator.is_main_process:
        dump["history"] = [
            [step, ids, succ.tolist(), trials.tolist()] for step, ids, succ, trials in allocator.history.iter_steps()
        ]
    (out / f"{scenario}.rank{rank}.json").write_text(json.dumps(dump))


if __name__ == "__main__":
    target = Path(sys.argv[1])
    for name in sys.argv[2].split(","):
        run(target, name)
