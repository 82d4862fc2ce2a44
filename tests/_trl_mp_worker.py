"""torchrun worker of ``tests/test_trl_multiprocess.py``: real VIPGRPOTrainer runs on 2 CPU processes (gloo).

Usage: ``torchrun --standalone --nproc_per_node 2 tests/_trl_mp_worker.py OUT_DIR SCENARIO[,SCENARIO...]``. Each
scenario trains a few steps and every process dumps what it saw to ``OUT_DIR/<scenario>.rank<r>.json``.

Scenarios ``loss-<type>``: GPT-2 (absolute positions) with prompts of different lengths, learning rate 0, KL
penalty on, and scripted plans that leave the processes unequal, the first one with no real row on process 1.
``vllm-tp1`` / ``vllm-tp2``: vLLM colocate mode through the stand-in (tensor parallel 1 or 2).
``tokens``: token mode (``token_budget="uniform"``) with a stand-in policy of uneven completion lengths
(``UnevenPolicy``) and the oracle predictor, whose skewed plans leave the processes uneven rows.
``tokens-two-phase``: the same with ``vip_two_phase`` (pilot of 2 per prompt, then the commit under the tokens left).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _trl_helpers import (  # noqa: E402
    TRUE_P,
    DigitReward,
    ScriptedAllocator,
    StandInClient,
    StandInLLM,
    UnevenPolicy,
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


def run_tokens(out: Path, scenario: str = "tokens") -> None:
    """Token mode on two processes: per step, the plan, what observe received (main process), the completion-mask
    counts of this process's scored slice, the rows of every micro-batch, TRL's logs. ``tokens-two-phase``: also
    the pilot and the commit plans (main process), each phase's observed lengths."""
    rank = int(os.environ["RANK"])
    two_phase = scenario == "tokens-two-phase"
    strategy = "vip_two_phase" if two_phase else "vip"
    tok = tiny_tokenizer()
    data = sums(n=8)
    UnevenPolicy(tok, data, max_len=8, seed=rank).install()
    g, n_max = 4, 8
    args = VIPGRPOConfig(
        output_dir=str(out / f"run-{scenario}"),
        use_cpu=True,
        per_device_train_batch_size=4,  # budget 16 = 2 processes x 4 rows x 2 micro-batches; 4 prompts x 8 sampled
        gradient_accumulation_steps=2,
        num_generations=g,
        n_max=n_max,
        n_min=2,
        max_completion_length=8,
        max_steps=5,
        learning_rate=1e-3,
        beta=0.0,
        loss_type="dapo",
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=0,
        dataloader_num_workers=0,
        strategy=strategy,
        two_phase=two_phase,
        pilot_n=2,
        predictor="oracle",
        token_budget="uniform",
    )
    steps: list[dict] = []
    observed: list[tuple[list, list]] = []
    pending: dict = {}
    phases: list[dict] = []  # two-phase steps (main process): pilot and commit plans, observe calls before the commit

    class Spy(Allocator):
        def plan(self, prompt_ids, prompts=None, budget=None, step=None, **kwargs):
            pending["uniform"] = self.uniform_tokens(prompt_ids, g, prompts=prompts)
            pending["budget"] = budget
            return super().plan(prompt_ids, prompts=prompts, budget=budget, step=step, **kwargs)

        def plan_pilot(self, prompt_ids, prompts=None, budget=None, step=None, pilot_n=2, **kwargs):
            pending["uniform"] = self.uniform_tokens(prompt_ids, g, prompts=prompts)
            pending["budget"] = budget
            pilot = super().plan_pilot(prompt_ids, prompts=prompts, budget=budget, step=step, pilot_n=pilot_n, **kwargs)
            tokens = kwargs.get("token_budget")
            phases.append({"pilot": pilot.counts.tolist(), "pilot_token_budget": tokens})
            return pilot

        def plan_commit(self, step=None):
            commit = super().plan_commit(step)
            phases[-1].update(
                commit=commit.counts.tolist(),
                commit_token_budget=commit.token_budget,
                commit_lengths=None if commit.expected_lengths is None else commit.expected_lengths.tolist(),
                observed_before=len(observed),
            )
            return commit

        def observe(self, prompt_ids, rewards, step, lengths=None):
            observed.append((list(prompt_ids), [[int(x) for x in ln] for ln in lengths]))
            return super().observe(prompt_ids, rewards, step, lengths=lengths)

    allocator = Spy(strategy=strategy, predictor="oracle", n_min=2, n_max=n_max, embedder="hashing")
    allocator.predictor.set_true_p([f"q{i}" for i in range(8)], TRUE_P[:8])
    trained: list[dict] = []
    masks: list[list[int]] = []
    base_loss, base_score = GRPOTrainer.compute_loss, GRPOTrainer._generate_and_score_completions

    def loss(self, model, inputs, *a, **kw):
        value = base_loss(self, model, inputs, *a, **kw)
        trained.append({"rows": int(inputs["completion_mask"].size(0)), "loss": float(value.detach())})
        return value

    def score(self, inputs):
        output = base_score(self, inputs)
        masks.append([int(x) for x in output["completion_mask"].sum(1)])
        return output

    class Recording(VIPGRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            rec = self.vip_last
            assert rec is not None
            ids, lens = observed[-1] if observed and rank == 0 else ([], [])
            phase = phases[-1] if phases and rank == 0 else {}
            steps.append(
                {
                    **phase,
                    "pilot_observed": list(observed[-2]) if two_phase and rank == 0 else None,
                    "n_max": n_max,
                    "prompt_ids": rec.prompt_ids,
                    "counts": rec.counts.tolist(),
                    "real_rows": rec.real_rows.tolist(),
                    "lengths": [ln.tolist() for ln in rec.lengths],
                    "mask": masks[-1],
                    "observed_ids": ids,
                    "observed_lengths": lens,
                    "token_budget": rec.plan.token_budget,
                    "expected_tokens": rec.plan.expected_tokens,
                    "uniform_tokens": pending.get("uniform"),
                    "budget_rollouts": pending.get("budget"),
                }
            )
            return output

    GRPOTrainer.compute_loss = loss
    GRPOTrainer._generate_and_score_completions = score
    try:
        trainer = Recording(
            model=tiny_llama(len(tok)),
            reward_funcs=DigitReward(),
            args=args,
            train_dataset=data,
            processing_class=tok,
            allocator=allocator,
        )
        trainer.train()
    finally:
        GRPOTrainer.compute_loss, GRPOTrainer._generate_and_score_completions = base_loss, base_score
    logs = [h for h in trainer.state.log_history if "loss" in h]
    dump = {"steps": steps, "trained": trained, "logs": logs}
    (out / f"{scenario}.rank{rank}.json").write_text(json.dumps(dump))


def run(out: Path, scenario: str) -> None:
    if scenario in ("tokens", "tokens-two-phase"):
        run_tokens(out, scenario)
        return
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
        extra["strategy"] = "vip_two_phase"
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
