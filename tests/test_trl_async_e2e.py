"""``VIPAsyncGRPOTrainer`` end to end through TRL 1.16's own ``AsyncGRPOTrainer`` code, on CPU.

What runs as in production: TRL's ``__init__`` (with VIP's worker substituted for ``AsyncRolloutWorker``), its
``train`` loop, ``AsyncRolloutWorker.start`` spawning the rollout child process that runs ``VIPRolloutLoop`` (TRL's
``_AsyncRolloutLoop`` with three methods overridden), the child's aiohttp requests to the generation server, TRL's
scoring, rollout queue, tree packing, loss and optimizer, its ``_sync_weight`` after every step, checkpoints and
``resume_from_checkpoint``.

What is substituted, and why (each needs vLLM or a GPU):

* the vLLM server: :class:`~_trl_async_server.StandInServer`, an HTTP server in the test process serving the same
  tiny model with the endpoints TRL calls (``/health``, ``/v1/models``, ``/v1/completions``, ``/pause``,
  ``/resume``); replies to one prompt level are 0.4 s late, so groups arrive out of order;
* the weight transport: TRL's ``WeightTransferClient`` sends over NCCL through vLLM's engine; the test injects
  ``weight_transfer=HTTPWeightTransfer`` (TRL's ``WeightTransferProtocol``), which TRL's ``_sync_weight`` drives
  exactly as it drives the NCCL client (pause, every parameter under its vLLM name, resume, version bump);
* the attention kernel of TRL's tree packing (FlashAttention-3 from the kernels hub, GPU only): a plain-PyTorch
  ``flash_attn_varlen_func``;
* ``is_vllm_available`` (checked by ``AsyncRolloutWorker.__init__``) reads True, and the MFU metric's peak-FLOPs
  lookup (``torch.cuda.get_device_name``) answers None, TRL's own "unknown device" value.
"""

from __future__ import annotations

import itertools
import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("trl")
pytest.importorskip("aiohttp")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import _trl_async_server as srv  # noqa: E402
import torch  # noqa: E402
from _trl_tools_worker import chat_tokenizer, tiny_chat_llama  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from vipalloc import Allocator  # noqa: E402
from vipalloc.integrations.trl.async_trainer import VIPAsyncRolloutWorker, VIPRolloutLoop  # noqa: E402

G = 4  # num_generations: the budget per prompt; the allocator's n_max (8) is the group width
STEP_SAMPLES = 8  # per_device_train_batch_size: samples per optimizer step, so chunks of 2 prompts, 8 rollouts


class Watch(TrainerCallback):
    """Records, at each step end, the rollout child's pid and the policy version the worker requests."""

    def __init__(self, trainer_ref: list) -> None:
        self.ref = trainer_ref
        self.pids: list[int] = []
        self.versions: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        worker = self.ref[0].rollout_worker
        if worker is not None and worker._process is not None:
            self.pids.append(int(worker._process.pid))
        self.versions.append(int(self.ref[0].model_version))


@pytest.fixture()
def cpu_async(monkeypatch):
    import trl.experimental.async_grpo.async_grpo_trainer as trainer_module
    import trl.experimental.async_grpo.async_rollout_worker as worker_module
    import trl.experimental.async_grpo.packing as packing

    monkeypatch.setattr(worker_module, "is_vllm_available", lambda *a, **k: True)
    monkeypatch.setattr(packing, "_flash_attn", srv.cpu_flash_attn)
    # TRL's MFU metric reads torch.cuda.get_device_name; None is its own "peak FLOPs unknown" answer
    monkeypatch.setattr(trainer_module, "get_peak_flops_per_device", lambda *a, **k: None)
    torch.set_num_threads(1)


def _args(out: Path, url: str, max_steps: int):
    from trl.experimental.async_grpo import AsyncGRPOConfig

    return AsyncGRPOConfig(
        output_dir=str(out),
        max_steps=max_steps,
        num_generations=G,
        per_device_train_batch_size=STEP_SAMPLES,
        gradient_accumulation_steps=1,
        max_completion_length=6,
        learning_rate=0.05,
        use_cpu=True,
        bf16=False,
        vllm_server_base_url=url,
        weight_sync_steps=1,
        max_inflight_tasks=8,
        max_staleness=100,  # late groups are trained, not dropped as stale
        heartbeat_stale_after_s=120.0,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        report_to=[],
        seed=0,
        dataloader_num_workers=0,
    )


def _trainer(out: Path, model_dir: Path, tok, server, transfer, max_steps: int, allocator=None):
    from vipalloc.integrations.trl import VIPAsyncGRPOTrainer

    ref: list = []
    watch = Watch(ref)
    trainer = VIPAsyncGRPOTrainer(
        str(model_dir),
        srv.level_reward,
        _args(out, server.url, max_steps),
        srv.tasks(),
        processing_class=tok,
        callbacks=[watch],
        weight_transfer=transfer,
        allocator=allocator,
    )
    ref.append(trainer)
    return trainer, watch


def _steps(state_file: Path) -> dict[int, dict[int, int]]:
    """Observed rollouts per (step, prompt index) in a saved allocator."""
    history = Allocator.load(str(state_file)).history
    rows = history.rows()
    out: dict[int, dict[int, int]] = defaultdict(dict)
    for s, p, n in zip(rows["step"], rows["prompt_index"], rows["trials"]):
        out[int(s)][int(p)] = int(n)
    return out


def test_async_trainer_end_to_end_with_checkpoint_and_resume(tmp_path, cpu_async) -> None:
    tok = chat_tokenizer()
    model_dir = tmp_path / "policy"
    tiny_chat_llama(len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "run"
    with srv.StandInServer(str(model_dir), tok) as server:
        transfer = srv.HTTPWeightTransfer(server.url)
        allocator = Allocator(strategy="vip", predictor="beta", n_min=2, n_max=2 * G, embedder="hashing", seed=0)
        trainer, watch = _trainer(out, model_dir, tok, server, transfer, 4, allocator)
        assert isinstance(trainer.rollout_worker, VIPAsyncRolloutWorker)
        assert trainer.rollout_worker._loop_cls is VIPRolloutLoop
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()

        # TRL's rollout child process ran VIP's loop (a separate process) and trained 4 steps
        assert watch.pids and all(pid != os.getpid() for pid in watch.pids)
        assert trainer.state.global_step == 4 and trainer.state.log_history[-1]["train_loss"] is not None
        assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
        # weight sync at train begin (TRL's cold sync) and after every step: paused, every parameter sent, resumed;
        # the server now holds the trained policy, and the worker requested each new version
        assert transfer.sent == 5 and server.weight_versions == 5 and server.pauses == [5, 5]
        assert transfer.names == sorted(n for n, _ in trainer.model.named_parameters())
        served = dict(server.model.named_parameters())
        assert all(torch.equal(served[n], p.detach()) for n, p in trainer.model.named_parameters())
        assert watch.versions == [1, 2, 3, 4] and trainer.model_version == 5  # seen at step end, before its sync
        assert len({version for _, version, _ in server.requests}) >= 2  # rollouts under several policies

        # plans: the child's allocator (saved after each fully observed chunk) holds uneven, budget-exact chunks
        steps = _steps(out / "vip_allocator.json")
        complete = [s for s, by in steps.items() if sum(by.values()) == 2 * G]
        assert len(complete) >= 3 and all(sum(by.values()) <= 2 * G for by in steps.values())
        assert all(2 <= n <= 2 * G for by in steps.values() for n in by.values())
        assert any(len(set(steps[s].values())) > 1 or len(steps[s]) < 2 for s in complete)  # uneven or a drop
        # child metrics reached TRL's logs: plans by chunk, groups observed late (policy moved since dispatch)
        logs = trainer.state.log_history
        assert [h["vip/budget"] for h in logs if "vip/budget" in h] and all(
            h["vip/budget"] == 2 * G for h in logs if "vip/budget" in h
        )
        assert max(h.get("vip/observe_staleness", 0.0) for h in logs) > 0
        # every served conversation belongs to a planned row (skip rows never reach the server)
        per_prompt = defaultdict(int)
        for text, _, _ in server.requests:
            per_prompt[int(text.rsplit("task ", 1)[1].split("<")[0])] += 1
        observed = defaultdict(int)
        for by in steps.values():
            for p, n in by.items():
                observed[p] += n
        history_ids = Allocator.load(str(out / "vip_allocator.json")).history.prompt_ids
        assert all(per_prompt[int(history_ids[p][1:])] >= n for p, n in observed.items())

        # checkpoints carry the allocator and a resume position that skips dropped prompts
        ckpt = out / "checkpoint-4"
        assert (ckpt / "vip_allocator.json").exists() and (out / "checkpoint-2" / "vip_allocator.json").exists()
        saved_steps = _steps(ckpt / "vip_allocator.json")
        rollout_state = json.loads((ckpt / "rollout_state.json").read_text())
        trained = set(trainer._trained_groups)  # group ids = stream positions (dataset_start_index was 0)
        skipped = {int(x) for x in (out / "vip_skipped_positions.txt").read_text().split()}
        assert skipped  # the plans dropped prompts (the always-solved / never-solved levels)
        index = rollout_state["prompt_index"]
        assert all(k in trained | skipped for k in range(index)) and index not in trained
        assert index >= next(k for k in itertools.count() if k not in trained)  # TRL's own count, drops unskipped
        assert rollout_state["model_version"] == 5

        # resume: the allocator comes back into the worker, step numbering continues, training goes on to step 6
        resumed, watch2 = _trainer(out, model_dir, tok, server, srv.HTTPWeightTransfer(server.url), 6)
        resumed.train(resume_from_checkpoint=str(ckpt))
        worker = resumed.rollout_worker
        assert worker._loop_kwargs["dataset_start_index"] == rollout_state["prompt_index"]
        handed = worker._loop_kwargs["vip_allocator"]
        assert len(handed.history) == len(Allocator.load(str(ckpt / "vip_allocator.json")).history)
        assert resumed.state.global_step == 6 and watch2.versions == [6, 7]  # numbering continues after 5
        after = _steps(out / "vip_allocator.json")
        new_steps = set(after) - set(saved_steps)
        assert new_steps and min(new_steps) > max(saved_steps)  # no step of the first run is planned again
        assert all(after[s] == saved_steps[s] for s in saved_steps)  # the restored history is kept as it was
    assert np.isfinite([h["loss"] for h in resumed.state.log_history if "loss" in h]).all()
