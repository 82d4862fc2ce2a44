"""A small, readable online RL trainer (CleanRL style) for verifiable-reward arithmetic on CPU.

Per step::

    prompts = sample M from the training pool
    plan    = allocator.plan(ids, prompts, budget = M * n_mean, step)       # how many rollouts each prompt gets
    rollouts: counts[i] samples of prompt i (temperature 1); reward = exact match (0/1)
    allocator.observe(ids, rewards, step, lengths)                          # lengths: generated tokens
    advantages per prompt group (any size; grouped by prompt id) -> one policy-gradient update

Loss normalisation: each rollout's summed completion log-probability is weighted by its advantage and by
``1 / (n_i * M_kept)``, i.e. the mean over a prompt's rollouts, then the mean over kept prompts, divided by the
constant ``max_new_tokens`` (Dr.GRPO's length-unbiased constant normaliser). A prompt's gradient is thus the
estimator's per-prompt average whatever its group size, which is the quantity whose variance VIP models.

DAPO dynamic sampling (``strategy="dapo"``): generate uniform groups for the step's prompts and further fresh
batches (at most ``dapo_max_batches``), keep only mixed groups (0 < successes < n) up to M of them; EVERY generated
rollout counts toward the cumulative budget, so DAPO is compared at equal cumulative rollouts.

Token mode (``token_budget``): the plan spends at most ``T`` generated tokens a step (``sum_i n_i c_i <= T``, ``c_i``
the allocator's expected tokens per rollout, learnt from the lengths observed), the rollout budget kept as a cap.
Every step logs its generated tokens (``tokens_used``, ``cum_tokens``), its wall-clock (``cum_seconds``) and the
``vip/tokens_*`` telemetry.

Determinism and resume: all randomness comes from seeded generators whose states are checkpointed with the model,
optimizer, allocator and metrics; a resumed run reproduces the uninterrupted run's metrics exactly.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vipalloc import Allocator, Plan
from vipalloc._io import atomic_write_text
from vipalloc.telemetry import COUNTS_TAG
from vipalloc.training.config import TrainConfig
from vipalloc.training.evaluation import eval_metrics
from vipalloc.training.losses import group_advantages
from vipalloc.training.model import BOS, EOS, PAD, CharTokenizer, build_policy
from vipalloc.training.tasks import Problem, corrupt, corrupt_target, final_answer, make_problems, reward, target
from vipalloc.training.two_phase import two_phase_round

CKPT_NAME = "checkpoint.pt"
TWO_PHASE = ("vip_two_phase", "pilot_commit")  # strategies with two generation rounds a step
METRICS_NAME = "metrics.jsonl"


# ----------------------------------------------------------------------------------------------- device
def resolve_device(name: str) -> torch.device:
    """``"cpu"``, ``"cuda"`` or ``"auto"`` (cuda when torch sees a GPU, else cpu) as a ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device='cuda' but torch sees no GPU (CPU-only build or no driver); use device='cpu' or 'auto'"
        )
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; choose cpu, cuda or auto")
    return torch.device(name)


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# ----------------------------------------------------------------------------------------------- generation
@torch.no_grad()
def sample(
    model: torch.nn.Module,
    tok: CharTokenizer,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float,
    generator: torch.Generator,
    greedy: bool = False,
) -> list[list[int]]:
    """Sample one completion per prompt (token ids, EOS included if produced). KV-cached, left-padded batch.

    The model may live on any device; the draws are made on the CPU ``generator`` (probabilities are copied to
    the CPU, ``(N, vocab)`` float64 a token), so the seeding is the same on every device."""
    if not prompts:
        return []
    dev = _device_of(model)
    ids, mask = (t.to(dev) for t in tok.left_pad(prompts))
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    past, logits = out.past_key_values, out.logits[:, -1]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=dev)
    cur_pos = pos[:, -1]
    gen: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        if greedy:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(logits.double() / temperature, -1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(dev)
        nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
        gen.append(nxt)
        done |= nxt == EOS
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype, device=dev)], 1)
        cur_pos = cur_pos + 1
        out = model(
            input_ids=nxt[:, None],
            attention_mask=mask,
            position_ids=cur_pos[:, None],
            past_key_values=past,
            use_cache=True,
        )
        past, logits = out.past_key_values, out.logits[:, -1]
    seqs = torch.stack(gen, 1).tolist()
    result = []
    for s in seqs:
        cut = s.index(EOS) + 1 if EOS in s else len(s)
        result.append([t for t in s[:cut] if t != PAD])
    return result


def token_logprobs(
    model: torch.nn.Module, tok: CharTokenizer, prompts: list[str], completions: list[list[int]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of each completion given its prompt (one right-padded forward pass).

    Returns ``(logp, mask, entropy)``, each float32 ``(R, T)`` with ``T`` the longest completion: ``logp[r, t]`` is
    the (differentiable) log-probability of completion token ``t`` of row ``r``, ``mask`` is 1 on real tokens and
    0 on padding, ``entropy`` the policy's entropy (nats, detached) at that position.
    """
    plen = [len(tok.encode(p)) + 1 for p in prompts]  # BOS + prompt
    seqs = [[BOS, *tok.encode(p)] + c for p, c in zip(prompts, completions)]
    width = max(len(s) for s in seqs)
    t_max = max(max(len(c) for c in completions), 1)
    ids = torch.full((len(seqs), width), PAD, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s)
        attn[r, : len(s)] = 1
    dev = _device_of(model)
    ids, attn = ids.to(dev), attn.to(dev)
    logits = model(input_ids=ids, attention_mask=attn).logits.float()
    # completion token t of row r sits at position plen[r] + t and is predicted by the logits at plen[r] + t - 1
    rows = torch.arange(len(seqs), device=dev)[:, None]
    cols = torch.tensor(plen, device=dev)[:, None] - 1 + torch.arange(t_max, device=dev)[None, :]
    lens = torch.tensor([len(c) for c in completions], device=dev)
    mask = (torch.arange(t_max, device=dev)[None, :] < lens[:, None]).float()
    cols = cols.clamp(max=width - 2)  # padded positions are masked out; keep their index in range
    logprobs = torch.log_softmax(logits[rows, cols], -1)
    targets = ids[rows, cols + 1]
    logp = logprobs.gather(-1, targets[..., None]).squeeze(-1) * mask
    entropy = -(logprobs.detach().exp() * logprobs.detach()).sum(-1) * mask
    return logp, mask, entropy


def sequence_logprobs(
    model: torch.nn.Module, tok: CharTokenizer, prompts: list[str], completions: list[list[int]]
) -> torch.Tensor:
    """Summed log-probability of each completion given its prompt: float (R,), differentiable."""
    logp, _, _ = token_logprobs(model, tok, prompts, completions)
    return logp.sum(1)


# ----------------------------------------------------------------------------------------------- warm-up
def warmup_policy(cfg: TrainConfig, progress: Callable[[int, int], None] | None = None) -> dict[str, torch.Tensor]:
    """Supervised warm-up on fresh problems of the task generator (cached by config hash under warmup_cache)."""
    device = resolve_device(cfg.device)
    cache = Path(cfg.warmup_cache) / f"warmup-{cfg.warmup_key(device.type)}.pt"
    if cache.exists():
        return torch.load(cache, weights_only=True, map_location="cpu")
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.warmup.threads)
    try:
        return _warmup(cfg, cache, progress, device)
    finally:
        torch.set_num_threads(prev_threads)


def _warmup(
    cfg: TrainConfig, cache: Path, progress: Callable[[int, int], None] | None, device: torch.device
) -> dict[str, torch.Tensor]:
    torch.manual_seed(cfg.warmup.seed)
    noise_rng = random.Random(cfg.warmup.seed)
    model = build_policy(cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head).to(device)
    tok = CharTokenizer()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.warmup.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / max(cfg.warmup.steps, 1))
    chunk = max(cfg.warmup.batch_size * 50, 1)
    problems: list[Problem] = []
    for step in range(cfg.warmup.steps):
        lo = (step * cfg.warmup.batch_size) % chunk
        if lo == 0:
            problems = make_problems(chunk, seed=cfg.warmup.seed + step, levels=cfg.level_tuples, tag="w")
            random.Random(step).shuffle(problems)
        batch = problems[lo : lo + cfg.warmup.batch_size]
        noise = cfg.level_noise
        if cfg.task == "chain_sum":  # the original draws, kept as they were: cached warm-ups stay valid
            answers = [corrupt(p.answer, noise_rng) if noise_rng.random() < noise[p.level] else p.answer for p in batch]
        else:
            answers = [
                corrupt_target(p, cfg.task, noise_rng) if noise_rng.random() < noise[p.level] else target(p, cfg.task)
                for p in batch
            ]
        comps = [[*tok.encode(a), EOS] for a in answers]
        loss = -sequence_logprobs(model, tok, [p.prompt for p in batch], comps).sum() / sum(len(c) for c in comps)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if progress is not None:
            progress(step + 1, cfg.warmup.steps)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}  # CPU: shippable to workers
    cache.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".tmp")
    os.close(fd)
    torch.save(state, tmp)
    os.replace(tmp, cache)
    return state


# ----------------------------------------------------------------------------------------------- RL loop
#: options that may differ between a killed run and its resumption (they do not change what is computed)
RESUME_FREE = frozenset({"steps", "threads", "tensorboard", "ckpt_every", "run_dir"})


def same_run(a: TrainConfig, b: TrainConfig) -> bool:
    """Whether a checkpoint written under config ``a`` may be resumed under config ``b``."""
    return a.model_dump(exclude=set(RESUME_FREE)) == b.model_dump(exclude=set(RESUME_FREE))


def checkpoint_config(run_dir: str | Path) -> TrainConfig | None:
    """The config stored in ``run_dir``'s checkpoint, or None when there is none (or it cannot be read)."""
    path = Path(run_dir) / CKPT_NAME
    if not path.exists():
        return None
    try:
        return TrainConfig.model_validate_json(torch.load(path, weights_only=False)["config"])
    except Exception:  # a corrupt checkpoint: the caller decides (the demo restarts that run)
        return None


@dataclass
class RunResult:
    """Paths and summary of a finished run."""

    run_dir: Path
    metrics: list[dict[str, Any]]
    plans: list[dict[str, Any]]


def evaluate(
    model: torch.nn.Module, tok: CharTokenizer, problems: list[Problem], samples: int, cfg: TrainConfig, seed: int
) -> dict[str, float]:
    """``samples`` temperature-1 samples of every held-out prompt, scored as the papers do
    (:func:`vipalloc.training.evaluation.eval_metrics`): ``eval_acc`` (mean@k), pass@k, maj@k, overall and per
    level, with their standard errors. ``seed`` fixes the sampling (and maj@k's subsets)."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [p.prompt for p in problems for _ in range(samples)]
    comps = sample(model, tok, prompts, cfg.max_new_tokens, cfg.temperature, gen)
    texts = [final_answer(tok.decode(c), cfg.task) for c in comps]
    answers = [texts[i * samples : (i + 1) * samples] for i in range(len(problems))]
    return eval_metrics(answers, [p.answer for p in problems], [p.level for p in problems], seed=seed)


class Trainer:
    """Holds the policy, optimizer, allocator, data and RNGs of one run; :meth:`run` trains to ``cfg.steps``."""

    def __init__(self, cfg: TrainConfig, warm_state: dict[str, torch.Tensor] | None = None) -> None:
        self.cfg = cfg
        torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.tok = CharTokenizer()
        self.device = resolve_device(cfg.device)
        self.model = build_policy(cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head).to(self.device)
        warm = warm_state if warm_state is not None else warmup_policy(cfg)
        self.model.load_state_dict(warm)
        self.ref_model: torch.nn.Module | None = None
        if cfg.kl_coef > 0:  # frozen copy of the warm-up policy, the KL anchor
            self.ref_model = build_policy(cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head).to(self.device)
            self.ref_model.load_state_dict(warm)
            self.ref_model.requires_grad_(False)
        self.opt: torch.optim.Optimizer
        if cfg.optimizer == "sgd":
            self.opt = torch.optim.SGD(
                self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            )
        else:
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.pool = make_problems(cfg.pool_size, seed=cfg.pool_seed, levels=cfg.level_tuples, tag="t")
        self.eval_set = make_problems(cfg.eval_size, seed=cfg.pool_seed + 7919, levels=cfg.level_tuples, tag="e")
        by_id = {p.prompt_id: p for p in self.pool}
        assert len(by_id) == len(self.pool)
        alloc_strategy = "uniform" if cfg.strategy == "dapo" else cfg.strategy
        # uniform plans ignore predictions: give them the cheap empirical predictor so that their wall time is not
        # charged for a GP they do not use (their logged predictor error is then the empirical predictor's)
        predictor = "empirical" if alloc_strategy == "uniform" else cfg.predictor
        self.alloc = Allocator(
            strategy=alloc_strategy,
            predictor=predictor,
            estimator="rloo" if cfg.loss == "rloo" else "drgrpo",
            n_min=cfg.n_min,
            n_max=cfg.n_max,
            seed=cfg.seed,
            embedder=cfg.embedder,
            predictor_kwargs=cfg.predictor_kwargs if predictor == cfg.predictor else None,
            strategy_kwargs={"pool_factor": cfg.pilot_pool_factor} if cfg.strategy == "pilot_commit" else None,
        )
        self.rng = np.random.default_rng(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.cum_rollouts = 0
        self.cum_tokens = 0
        self.metrics: list[dict[str, Any]] = []
        self.plans: list[dict[str, Any]] = []
        self.run_dir = Path(cfg.run_dir)

    # -------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> None:
        """Everything needed to continue identically, in one file written atomically."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.run_dir) as tmpdir:
            apath = Path(tmpdir) / "allocator.json"
            self.alloc.save(apath)
            payload = {
                "step": self.step,
                "cum_rollouts": self.cum_rollouts,
                "cum_tokens": self.cum_tokens,
                "model": self.model.state_dict(),
                "opt": self.opt.state_dict(),
                "allocator": apath.read_text(),
                "np_rng": json.dumps(self.rng.bit_generator.state),
                "torch_gen": self.gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "metrics": json.dumps(self.metrics),
                "plans": json.dumps(self.plans),
                "config": self.cfg.model_dump_json(),
            }
            tmp = Path(tmpdir) / CKPT_NAME
            torch.save(payload, tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, self.run_dir / CKPT_NAME)

    def load_checkpoint(self) -> bool:
        """Restore the last checkpoint of ``run_dir`` if there is one; returns whether it did."""
        path = self.run_dir / CKPT_NAME
        if not path.exists():
            return False
        payload = torch.load(path, weights_only=False, map_location="cpu")  # load_state_dict moves to the device
        if not same_run(TrainConfig.model_validate_json(payload["config"]), self.cfg):
            raise ValueError(f"{path} was written by a different configuration; use another run_dir or the same config")
        self.step = int(payload["step"])
        self.cum_rollouts = int(payload["cum_rollouts"])
        self.cum_tokens = int(payload.get("cum_tokens", 0))  # checkpoints before token counting have none
        self.model.load_state_dict(payload["model"])
        self.opt.load_state_dict(payload["opt"])
        with tempfile.TemporaryDirectory() as tmpdir:
            apath = Path(tmpdir) / "allocator.json"
            apath.write_text(payload["allocator"])
            self.alloc = Allocator.load(apath)
        self.rng.bit_generator.state = json.loads(payload["np_rng"])
        self.gen.set_state(payload["torch_gen"])
        torch.set_rng_state(payload["torch_rng"])
        self.metrics = json.loads(payload["metrics"])
        self.plans = json.loads(payload["plans"])
        return True

    def _write_metrics(self) -> None:
        # Rewritten from the checkpointed list: after a resume the file holds exactly the uninterrupted run's lines.
        atomic_write_text(self.run_dir / METRICS_NAME, "".join(json.dumps(m) + "\n" for m in self.metrics))

    # -------------------------------------------------------------- one step
    def _rollouts(self, problems: list[Problem], counts: np.ndarray) -> tuple[list[int], list[list[int]], list[float]]:
        """``counts[i]`` samples of ``problems[i]``: ``(owners, completions, rewards)``, one entry per rollout; a
        completion's length (``len``) is its generated tokens, end-of-sequence included, at most max_new_tokens."""
        owners = [i for i, c in enumerate(counts) for _ in range(int(c))]
        comps = sample(
            self.model,
            self.tok,
            [problems[i].prompt for i in owners],
            self.cfg.max_new_tokens,
            self.cfg.temperature,
            self.gen,
        )
        rewards = [reward(self.tok.decode(c), problems[i].answer, self.cfg.task) for c, i in zip(comps, owners)]
        return owners, comps, rewards

    def _token_args(self, ids: list[str], texts: list[str]) -> tuple[float | None, list[float] | None]:
        """This step's ``(token_budget, expected_lengths)`` for the allocator: ``(None, None)`` plans by rollouts.
        Token mode's first step has no observed lengths: 'uniform' plans it by rollouts, a fixed budget predicts
        ``max_new_tokens`` a rollout (so the step cannot overspend)."""
        cfg = self.cfg
        if cfg.token_budget is None:
            return None, None
        if cfg.token_budget == "uniform":
            return self.alloc.uniform_tokens(ids, cfg.n_mean, step=self.step, prompts=texts), None
        first = self.alloc.uniform_tokens(ids, 1, step=self.step, prompts=texts) is None
        return float(cfg.token_budget), ([float(cfg.max_new_tokens)] * len(ids) if first else None)

    def _plan(self, ids: list[str], problems: list[Problem]) -> Plan:
        """This step's plan: by rollouts (``budget``), or by tokens (``token_budget``) with the rollout budget as
        a cap (:meth:`_token_args`)."""
        texts = [p.prompt for p in problems]
        tokens, given = self._token_args(ids, texts)
        if tokens is None:  # the default path is exactly the rollout-budget call it always was
            return self.alloc.plan(ids, prompts=texts, budget=self.cfg.budget, step=self.step)
        cap = self.cfg.token_rollout_cap
        return self.alloc.plan(
            ids,
            prompts=texts,
            budget=None if cap is None else int(round(self.cfg.budget * cap)),
            step=self.step,
            token_budget=tokens,
            expected_lengths=given,
        )

    def train_step(self) -> dict[str, Any]:
        cfg = self.cfg
        t0 = time.perf_counter()
        m = cfg.candidate_prompts  # prompts_per_step; pilot_commit: its candidate pool, pool_factor x that
        # linear lr ramp over the first lr_warmup_steps training steps (a function of the step: nothing to checkpoint)
        for group in self.opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (self.step + 1) / max(cfg.lr_warmup_steps, 1))
        idx = self.rng.choice(len(self.pool), size=m, replace=False)
        problems = [self.pool[i] for i in idx]
        ids = [p.prompt_id for p in problems]
        tp = None
        if cfg.strategy in TWO_PHASE:  # pilot round, commit round (vipalloc.training.two_phase)
            ta = time.perf_counter()
            tokens, given = self._token_args(ids, [p.prompt for p in problems])
            t_tok = time.perf_counter() - ta
            tp = two_phase_round(
                self.alloc,
                problems,
                self._rollouts,
                budget=cfg.budget,
                step=self.step,
                pilot_n=cfg.pilot_n,
                token_budget=tokens,
                expected_lengths=given,
            )  # both rounds observe their lengths; in token mode the pilot's tokens come off the step's budget
            plan, t_alloc = tp.pilot, tp.alloc_seconds + t_tok  # plan = the prediction made before generating
            counts, owners, comps, rewards, per_prompt = (
                tp.commit.group_sizes,
                tp.owners,
                tp.comps,
                tp.rewards,
                tp.per_prompt,
            )
            used = len(owners)
        else:
            ta = time.perf_counter()
            plan = self._plan(ids, problems)
            t_alloc = time.perf_counter() - ta
            counts = plan.counts.copy()
            owners, comps, rewards = self._rollouts(problems, counts)
            used = len(owners)
            per_prompt = [[r for o, r in zip(owners, rewards) if o == i] for i in range(m)]
            ta = time.perf_counter()
            self.alloc.observe(ids, per_prompt, step=self.step, lengths=_group_lengths(owners, comps, m))
            t_alloc += time.perf_counter() - ta
        lengths = _group_lengths(owners, comps, m)  # generated tokens of each rollout, grouped like per_prompt
        tokens = sum(len(c) for c in comps)
        train_probs, train_owners, train_comps, train_rewards = problems, owners, comps, rewards
        if tp is not None:  # each trained prompt's whole group (pilot + commit); pilot_commit: committed prompts only
            train_probs, train_owners, train_comps, train_rewards = (
                tp.train_probs,
                tp.train_owners,
                tp.train_comps,
                tp.train_rewards,
            )
        if cfg.strategy == "dapo":
            train_probs, train_owners, train_comps, train_rewards, used, tokens = self._dapo_fill(
                problems, per_prompt, comps, owners
            )
        # groups by prompt (index into train_probs); advantages for any group size
        owners_t = torch.tensor(train_owners, dtype=torch.long)
        rewards_t = torch.tensor(train_rewards, dtype=torch.float64)
        adv = group_advantages(rewards_t, owners_t, cfg.loss) if len(train_owners) else torch.zeros(0)
        upd: Mapping[str, float | None] = {
            "loss": 0.0,
            "kl": 0.0,
            "clip_frac": 0.0,
            "entropy": None,
            "grad_norm": 0.0,
        }
        if len(train_owners) and float(adv.abs().sum()) > 0:
            upd = self._update([p.prompt for p in train_probs], train_owners, train_comps, adv)
        self.cum_rollouts += used
        self.cum_tokens += tokens
        succ = np.array([sum(g) for g in per_prompt])
        n_arr = np.array([len(g) for g in per_prompt])
        gen_mask = n_arr > 0
        rate = np.where(gen_mask, succ / np.maximum(n_arr, 1), np.nan)
        # where the budget went, under the names every trainer and plug-in logs (vipalloc.telemetry): the plan's
        # vip/mean_n, vip/num_dropped, vip/expected_var_ratio_vs_uniform, ...; the outcome's vip/rollout_accuracy
        # (the mean training reward), vip/frac_zero_var_groups, vip/pred_abs_err (against the pre-generation p)
        rec: dict[str, Any] = {
            "step": self.step,
            **_finite_token_metrics((tp.commit if tp else plan).metrics()),
            **_finite_token_metrics(
                self.alloc.outcome_metrics(per_prompt, plan, lengths=lengths, max_length=cfg.max_new_tokens)
            ),
            "rollouts_used": int(used),
            "cum_rollouts": int(self.cum_rollouts),
            "tokens_used": int(tokens),  # every generated token of the step (DAPO's extra batches included)
            "cum_tokens": int(self.cum_tokens),
            "frac_all_correct": float(np.mean(succ[gen_mask] == n_arr[gen_mask])),
            "frac_all_wrong": float(np.mean(succ[gen_mask] == 0)),
            "expected_variance": float((tp.commit if tp else plan).expected_variance),
            "uniform_variance": float((tp.commit if tp else plan).uniform_variance),
            **upd,
            "alloc_seconds": t_alloc,
            "step_seconds": time.perf_counter() - t0,
        }
        # training wall-clock so far (evaluations excluded), from the records: correct across kills and resumes
        rec["cum_seconds"] = sum(float(r.get("step_seconds", 0.0)) for r in self.metrics) + rec["step_seconds"]
        if tp is not None:  # two rounds: where the budget went, what trained, each round's generation time
            rec.update(
                pilot_rollouts=int(tp.pilot.counts.sum()),
                commit_rollouts=int(tp.commit.counts.sum()),
                pilot_tokens=int(sum(len(c) for c in tp.comps[: int(tp.pilot.counts.sum())])),
                trained_prompts=int(tp.commit.train_mask.sum()),
                pilot_gen_seconds=tp.gen_seconds[0],
                commit_gen_seconds=tp.gen_seconds[1],
            )
            if tp.commit.expected_lengths is not None:  # the commit's extra rollouts at their expected lengths
                rec["commit_tokens_planned"] = float(tp.commit.counts @ tp.commit.expected_lengths)
        if not (np.isfinite(rec["loss"]) and np.isfinite(rec["grad_norm"])):
            raise FloatingPointError(f"non-finite loss at step {self.step}")
        self.plans.append(
            {
                "step": self.step,
                "counts": counts.tolist(),
                "p_mean": plan.p_mean.round(5).tolist(),
                "rate": rate.tolist(),
                **({"pilot": tp.pilot.counts.tolist()} if tp is not None else {}),
            }
        )
        return rec

    def _update(
        self, prompts: list[str], owners: list[int], comps: list[list[int]], adv: torch.Tensor
    ) -> dict[str, float]:
        """Policy-gradient update on one step's rollouts; returns loss/KL/clip/entropy/grad-norm diagnostics.

        ``prompts[g]`` is group g's text, ``owners[r]`` the group of rollout r, ``adv`` (R,) its advantage.
        Per-token clipped surrogate ``-min(rho A, clip(rho, 1-eps, 1+eps) A)`` with ``rho = pi/pi_old`` (plain
        policy gradient when each batch is used once: rho = 1). Rollout r of group g has weight
        ``1 / (n_g * G_mb * max_new_tokens)``: mean over a prompt's rollouts, mean over the minibatch's prompts,
        Dr.GRPO's constant token normaliser (no per-sequence length division, which would bias towards short
        wrong answers). Groups are split across minibatches whole, never by reshaping to a fixed width.
        """
        cfg = self.cfg
        dev = self.device
        adv = adv.to(dev)
        owners_t = torch.tensor(owners, dtype=torch.long, device=dev)
        n_groups = len(prompts)
        n_per = torch.zeros(n_groups, device=dev).index_add_(0, owners_t, torch.ones(len(owners), device=dev))
        row_prompts = [prompts[g] for g in owners]
        need_old = cfg.ppo_epochs * cfg.minibatches > 1
        with torch.no_grad():
            old = token_logprobs(self.model, self.tok, row_prompts, comps)[0] if need_old else None
            ref = None
            if cfg.kl_coef > 0:
                assert self.ref_model is not None  # built in __init__ whenever kl_coef > 0
                ref = token_logprobs(self.ref_model, self.tok, row_prompts, comps)[0]
        active = sorted(set(owners))  # groups with at least one rollout, ascending
        stats = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "entropy": 0.0, "grad_norm": 0.0}
        n_updates = 0
        for _ in range(cfg.ppo_epochs):
            order = [active[i] for i in self.rng.permutation(len(active))] if cfg.minibatches > 1 else active
            for chunk in np.array_split(np.array(order, dtype=np.int64), min(cfg.minibatches, len(order))):
                in_mb = torch.zeros(n_groups, dtype=torch.bool, device=dev)
                in_mb[torch.from_numpy(chunk).to(dev)] = True
                rows = torch.nonzero(in_mb[owners_t]).squeeze(1)
                rows_l = rows.tolist()
                logp, mask, ent = token_logprobs(
                    self.model, self.tok, [row_prompts[r] for r in rows_l], [comps[r] for r in rows_l]
                )
                t = logp.shape[1]
                a = adv[rows].float()[:, None]
                w = (1.0 / (n_per[owners_t[rows]] * len(chunk) * cfg.max_new_tokens))[:, None] * mask
                if old is not None:
                    ratio = torch.exp(logp - old[rows, :t])
                    surr = torch.minimum(ratio * a, ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps) * a)
                    clipped = ((ratio - 1).abs() > cfg.clip_eps).float()
                else:
                    surr = torch.exp(logp - logp.detach()) * a  # value = A, gradient = A * grad log pi
                    clipped = torch.zeros_like(logp)
                loss = -(w * surr).sum()
                kl = torch.zeros((), device=dev)
                if ref is not None:
                    d = ref[rows, :t] - logp
                    kl = (w * (torch.exp(d) - d - 1)).sum()  # k3 estimator of KL(pi || pi_ref), >= 0
                    loss = loss + cfg.kl_coef * kl
                self.opt.zero_grad()
                loss.backward()
                gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                self.opt.step()
                tokens = float(mask.sum())
                stats["loss"] += float(loss.detach())
                stats["kl"] += float(kl.detach())
                stats["clip_frac"] += float((clipped * mask).sum()) / max(tokens, 1.0)
                stats["entropy"] += float(ent.sum()) / max(tokens, 1.0)
                stats["grad_norm"] += float(gn)
                n_updates += 1
        return {k: v / max(n_updates, 1) for k, v in stats.items()}

    def _dapo_fill(self, problems, per_prompt, comps, owners):
        """Keep mixed groups; draw fresh uniform batches until M mixed groups or the batch cap (all counted).
        Returns the kept groups' problems, owners, completions, rewards, and the rollouts and tokens generated."""
        cfg = self.cfg
        kept_probs, kept_owners, kept_comps, kept_rewards = [], [], [], []
        used = len(owners)
        tokens = sum(len(c) for c in comps)

        def take(probs, groups, comps_, owners_):
            for i, g in enumerate(groups):
                if len(kept_probs) >= cfg.prompts_per_step:
                    return
                if 0 < sum(g) < len(g):
                    j = len(kept_probs)
                    kept_probs.append(probs[i])
                    rows = [k for k, o in enumerate(owners_) if o == i]
                    kept_owners.extend([j] * len(rows))
                    kept_comps.extend(comps_[k] for k in rows)
                    kept_rewards.extend(g)

        take(problems, per_prompt, comps, owners)
        for _ in range(cfg.dapo_max_batches - 1):
            if len(kept_probs) >= cfg.prompts_per_step:
                break
            idx = self.rng.choice(len(self.pool), size=cfg.prompts_per_step, replace=False)
            extra = [self.pool[i] for i in idx]
            counts = np.full(len(extra), cfg.n_mean)
            o2, c2, r2 = self._rollouts(extra, counts)
            used += len(o2)
            tokens += sum(len(c) for c in c2)
            groups = [[r for o, r in zip(o2, r2) if o == i] for i in range(len(extra))]
            take(extra, groups, c2, o2)
        return kept_probs, kept_owners, kept_comps, kept_rewards, used, tokens

    # -------------------------------------------------------------- loop
    def run(
        self, progress: Callable[[int, int, dict[str, Any]], None] | None = None, stop_after: int | None = None
    ) -> RunResult:
        """Train until ``cfg.steps`` (resuming from ``run_dir`` if a checkpoint exists). ``stop_after`` ends early
        after that many steps of this call (used by tests to simulate a kill)."""
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.load_checkpoint():
            self._write_metrics()  # drop lines a killed process wrote after its last checkpoint
        writer = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=self.step)
        done_here = 0
        if self.step == 0 and not self.metrics:
            ev = evaluate(self.model, self.tok, self.eval_set, cfg.eval_samples, cfg, seed=cfg.seed + 10_000)
            self.metrics.append({"step": -1, "cum_rollouts": 0, "cum_tokens": 0, "cum_seconds": 0.0, **ev})
        while self.step < cfg.steps:
            rec = self.train_step()
            self.step += 1
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                te = time.perf_counter()
                rec.update(
                    evaluate(
                        self.model, self.tok, self.eval_set, cfg.eval_samples, cfg, seed=cfg.seed + 10_000 + self.step
                    )
                )
                rec["eval_seconds"] = time.perf_counter() - te
            self.metrics.append(rec)
            if writer is not None:
                for k, v in rec.items():
                    if k != "step" and isinstance(v, (int, float)):
                        writer.add_scalar(k, v, rec["step"])
                writer.add_histogram(COUNTS_TAG, np.asarray(self.plans[-1]["counts"]), rec["step"])
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                self.save_checkpoint()
                self._write_metrics()
            if progress is not None:
                progress(self.step, cfg.steps, rec)
            done_here += 1
            if stop_after is not None and done_here >= stop_after:
                break
        if writer is not None:
            writer.close()
        self._write_metrics()
        return RunResult(self.run_dir, self.metrics, self.plans)


def _finite_token_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """``metrics`` without the token metrics that are NaN (the outcome shares of a step that generated nothing; the
    plan's own token keys are left out by the engine where they do not apply): NaN is not valid JSON and never
    equals itself, so a resumed run's records could not match the uninterrupted run's."""
    return {
        k: v
        for k, v in metrics.items()
        if not (k.startswith(("vip/token", "vip/frac_truncated")) and isinstance(v, float) and v != v)
    }


def _group_lengths(owners: list[int], comps: list[list[int]], m: int) -> list[list[int]]:
    """Generated tokens of each rollout grouped by prompt (``m`` groups, in rollout order): observe's lengths."""
    out: list[list[int]] = [[] for _ in range(m)]
    for o, c in zip(owners, comps):
        out[o].append(len(c))
    return out


def train(cfg: TrainConfig, progress=None, warm_state=None, stop_after: int | None = None) -> RunResult:
    """Build a :class:`Trainer` for ``cfg`` and run it (resumes from ``cfg.run_dir`` when a checkpoint exists)."""
    return Trainer(cfg, warm_state=warm_state).run(progress=progress, stop_after=stop_after)
