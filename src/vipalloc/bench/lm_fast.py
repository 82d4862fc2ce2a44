"""The cheap real-LM RL step on SmolLM2-135M-Instruct (issue 27 item 1): what makes a GRPO step affordable on 2 CPU
cores, and the policy that the league (:mod:`vipalloc.bench.lm_league`) and the snapshot variance part use.

Where a step's time went before (``LMPolicy`` of :mod:`vipalloc.bench.lm_pool`, peft LoRA on every layer):
backward through all 30 layers, logits over every position of every row (a ``(B, T, 49152)`` tensor), HF
``generate`` re-processing each prompt once per rollout, replies of a sentence (~20 tokens). Here:

* **LoRA on the top ``k`` layers only** (``top_layers``; ``None`` = every layer, kept as an option). The frozen
  lower layers run once under ``torch.no_grad`` (no activations kept for backward), then the top layers with grad.
* **Each prompt once for its whole group, in the backward pass too** (:meth:`FastPolicy.group_logprobs`): the
  distinct prompts run through the model once, their keys/values are copied to every rollout of the group
  (``index_select``, differentiable), and only the completion tokens run per rollout. With ~50-token prompts and
  ~5-token answers this removes most of the forward work.
* **Logits only at completion positions**: the final hidden states are gathered at the positions that predict a
  completion token before the LM head, so the head costs ``(completion tokens, 576) x (576, 49152)``, not the whole
  padded rectangle.
* **A short answer format** (``short=True``): the assistant turn is pre-filled with "The answer is", so the reply
  is the number (" 7." then ``<|im_end|>``, ~5 tokens) and ``max_new_tokens`` can be 8. (Tried on 16 chain_sum
  prompts x 8 at temperature 1: success 0.20 with 9 of 16 prompts mixed, 5.7 tokens a reply; a system line asking
  for the number alone left the sentences in place, 0.09; the plain prompt 0.10 at 18.5 tokens.)
* **Prompt-once sampling for the whole step**: the distinct prompts of a step run once (left-padded, logits of the
  last position only), their KV cache is copied to every rollout row (``Cache.reorder_cache``), and all rows decode
  together; the adapters are merged into the weights while sampling (no extra matmuls).

Adapters are ``A (r, in)`` / ``B (out, r)`` per q/k/v/o projection, ``W x + (alpha / r) B A x`` (peft's
initialisation: ``A`` Kaiming-uniform, ``B = 0``, so the initial policy is the pretrained model).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

from vipalloc.bench.lm_model import answer_reward, load_smollm2

__all__ = ["SHORT_PREFILL", "FastPolicy", "grpo_update", "rewards_of", "set_threads"]

SHORT_PREFILL = "The answer is"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def set_threads(threads: int) -> None:
    """Torch intra-op threads for this process, set so that a shared machine does not collapse: OpenMP workers
    sleep instead of spinning when idle (``OMP_WAIT_POLICY=PASSIVE``, only effective before torch starts its pool,
    so callers set it in the environment of new processes too) and ``threads`` (>= 1) intra-op threads."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(threads)


def _make_lora(linear: Any, rank: int, alpha: float) -> tuple[Any, Any]:
    """Attach LoRA to ``linear`` (an ``nn.Linear``, frozen): returns its ``(A, B)`` parameters."""
    import torch

    a = torch.nn.Parameter(torch.empty(rank, linear.in_features))
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    b = torch.nn.Parameter(torch.zeros(linear.out_features, rank))
    scale = alpha / rank
    linear.lora_A, linear.lora_B, linear.lora_scale, linear.lora_merged = a, b, scale, False
    base_forward = linear.forward

    def forward(x: Any) -> Any:
        out = base_forward(x)
        if linear.lora_merged:
            return out
        return out + (x @ linear.lora_A.t()) @ linear.lora_B.t() * linear.lora_scale

    linear.forward = forward
    return a, b


class FastPolicy:
    """SmolLM2-135M-Instruct with LoRA (rank ``rank``, q/k/v/o) on the top ``top_layers`` layers (``None``: all 30),
    seeded; ``short``: the one-number answer format."""

    def __init__(
        self,
        seed: int,
        device: str = "cpu",
        *,
        rank: int = 8,
        top_layers: int | None = 4,
        short: bool = True,
    ) -> None:
        import torch

        torch.manual_seed(seed)
        self.model, self.tok = load_smollm2(device=device)
        self.model.requires_grad_(False)
        layers = self.model.model.layers
        n_layers = len(layers)
        if top_layers is not None and not 1 <= top_layers <= n_layers:
            raise ValueError(f"top_layers must be in [1, {n_layers}] or None (every layer), got {top_layers}")
        self.first = 0 if top_layers is None else n_layers - top_layers
        self.device, self.short, self.rank = device, short, rank
        self.adapted: list[tuple[str, Any]] = []
        self.params: list[Any] = []
        for li in range(self.first, n_layers):
            attn = layers[li].self_attn
            for name in LORA_TARGETS:
                lin = getattr(attn, name)
                a, b = _make_lora(lin, rank, 2.0 * rank)
                a.data, b.data = a.data.to(device), b.data.to(device)
                self.adapted.append((f"{li}.{name}", lin))
                self.params += [a, b]
        self._prompt_cache: dict[str, list[int]] = {}
        self._merged = False

    # ------------------------------------------------------------------------------------------------ prompts
    def prompt_ids(self, question: str) -> list[int]:
        """Token ids of the chat prompt of ``question``; with ``short`` the assistant turn is pre-filled with
        :data:`SHORT_PREFILL`, so the reply starts with the number (" 7.", about 4 tokens)."""
        if question not in self._prompt_cache:
            msgs = [{"role": "user", "content": question}]
            text = self.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            if self.short:
                text += SHORT_PREFILL
            self._prompt_cache[question] = list(self.tok(text, add_special_tokens=False)["input_ids"])
        return self._prompt_cache[question]

    # ------------------------------------------------------------------------------------------------ adapters
    def _merge(self, on: bool) -> None:
        import torch

        if on == self._merged:
            return
        with torch.no_grad():
            for _, lin in self.adapted:
                delta = (lin.lora_B @ lin.lora_A) * lin.lora_scale
                lin.weight.add_(delta if on else -delta)
                lin.lora_merged = on
        self._merged = on

    def adapter_state(self) -> dict[str, Any]:
        """The adapters as CPU tensors, ``{"<layer>.<proj>.A": (r, in), ...B: (out, r)}`` plus the settings."""
        state: dict[str, Any] = {"rank": self.rank, "first_layer": self.first, "short": self.short}
        for name, lin in self.adapted:
            state[f"{name}.A"] = lin.lora_A.detach().cpu().clone()
            state[f"{name}.B"] = lin.lora_B.detach().cpu().clone()
        return state

    def save_adapters(self, path: Path) -> None:
        """Write :meth:`adapter_state` to ``path`` (``torch.save``, written to a temporary name then renamed)."""
        import torch

        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(self.adapter_state(), tmp)
        os.replace(tmp, path)

    def load_adapters(self, path: Path) -> None:
        """Load adapters saved by :meth:`save_adapters`; refuses a file whose rank or layers differ from this
        policy's (build the policy with the snapshot's ``top_layers`` and ``rank``)."""
        import torch

        state = torch.load(path, map_location="cpu")
        if state.get("rank") != self.rank or state.get("first_layer") != self.first:
            raise ValueError(
                f"{path}: adapters of rank {state.get('rank')} from layer {state.get('first_layer')}, but this "
                f"policy has rank {self.rank} from layer {self.first}: build FastPolicy with the same rank and "
                "top_layers as the run that saved it"
            )
        self._merge(False)
        with torch.no_grad():
            for name, lin in self.adapted:
                lin.lora_A.copy_(state[f"{name}.A"])
                lin.lora_B.copy_(state[f"{name}.B"])

    # ------------------------------------------------------------------------------------------------ sampling
    def sample(
        self,
        questions: Sequence[str],
        counts: Sequence[int],
        max_new_tokens: int,
        temperature: float = 1.0,
        generator: Any = None,
    ) -> list[list[list[int]]]:
        """``counts[i]`` sampled replies to ``questions[i]`` (0 allowed), each prompt processed once; returns per
        prompt a list of completion token lists, each ending at (and including) ``<|im_end|>`` when produced within
        ``max_new_tokens``."""
        import torch

        out: list[list[list[int]]] = [[] for _ in questions]
        rows = [i for i, c in enumerate(counts) for _ in range(int(c))]
        if not rows:
            return out
        keep = sorted(set(rows))
        eos, pad = int(self.tok.eos_token_id), int(self.tok.pad_token_id)
        prompts = [self.prompt_ids(questions[i]) for i in keep]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for j, p in enumerate(prompts):  # left padding
            ids[j, width - len(p) :] = torch.tensor(p)
            mask[j, width - len(p) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        where = {i: j for j, i in enumerate(keep)}
        sel = torch.tensor([where[i] for i in rows], device=self.device)
        self.model.eval()
        self._merge(True)
        try:
            with torch.no_grad():
                res = self.model(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    position_ids=pos.to(self.device),
                    use_cache=True,
                    logits_to_keep=1,
                )
                cache = res.past_key_values
                cache.reorder_cache(sel)
                logits = res.logits[:, -1, :].index_select(0, sel)
                mask = mask.to(self.device).index_select(0, sel)
                nxt_pos = pos[:, -1:].to(self.device).index_select(0, sel) + 1
                n = len(rows)
                done = torch.zeros(n, dtype=torch.bool, device=self.device)
                seqs: list[list[int]] = [[] for _ in range(n)]
                for _ in range(max_new_tokens):
                    probs = torch.softmax(logits.float() / temperature, dim=-1)
                    tok = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                    tok = torch.where(done, torch.full_like(tok, pad), tok)
                    for j, t in enumerate(tok.tolist()):
                        if not done[j]:
                            seqs[j].append(t)
                    done = done | (tok == eos)
                    if bool(done.all()):
                        break
                    mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=self.device)], dim=1)
                    res = self.model(
                        input_ids=tok[:, None],
                        attention_mask=mask,
                        position_ids=nxt_pos,
                        past_key_values=cache,
                        use_cache=True,
                    )
                    cache = res.past_key_values
                    logits = res.logits[:, -1, :]
                    nxt_pos = nxt_pos + 1
        finally:
            self._merge(False)
        for i, s in zip(rows, seqs):
            out[i].append(s)
        return out

    def decode(self, completion: Sequence[int]) -> str:
        """The reply's text (``<|im_end|>`` removed)."""
        eos = int(self.tok.eos_token_id)
        return str(self.tok.decode([t for t in completion if t != eos], skip_special_tokens=True))

    # ------------------------------------------------------------------------------------------------ training
    def logprobs(self, prompts: Sequence[list[int]], completions: Sequence[list[int]]) -> Any:
        """``log pi(completion | prompt)`` per row (sum over completion tokens), differentiable in the adapters:
        a float tensor ``(B,)``. Lower layers run without grad; logits only at completion positions."""
        import torch
        from transformers.masking_utils import create_causal_mask

        self._merge(False)
        lens = [len(p) + len(c) for p, c in zip(prompts, completions)]
        width = max(lens)
        pad = int(self.tok.pad_token_id)
        ids = torch.full((len(lens), width), pad, dtype=torch.long)
        mask = torch.zeros((len(lens), width), dtype=torch.long)
        row_idx, pos_idx, tgt = [], [], []
        for r, (p, c) in enumerate(zip(prompts, completions)):
            ids[r, : lens[r]] = torch.tensor(p + c)
            mask[r, : lens[r]] = 1
            for t in range(len(p), lens[r]):  # hidden state at t - 1 predicts token t
                row_idx.append(r)
                pos_idx.append(t - 1)
                tgt.append(ids[r, t].item())
        ids, mask = ids.to(self.device), mask.to(self.device)
        body = self.model.model
        position_ids = torch.arange(width, device=self.device)[None].expand(len(lens), -1)
        with torch.no_grad():
            hidden = body.embed_tokens(ids)
            causal = create_causal_mask(
                config=body.config,
                inputs_embeds=hidden,
                attention_mask=mask,
                past_key_values=None,
                position_ids=position_ids,
            )
            pe = body.rotary_emb(hidden, position_ids=position_ids)
            for layer in body.layers[: self.first]:
                hidden = layer(hidden, attention_mask=causal, position_embeddings=pe, position_ids=position_ids)
        for layer in body.layers[self.first :]:
            hidden = layer(hidden, attention_mask=causal, position_embeddings=pe, position_ids=position_ids)
        hidden = body.norm(hidden)
        ri = torch.tensor(row_idx, device=self.device)
        picked = hidden[ri, torch.tensor(pos_idx, device=self.device)]
        logits = self.model.lm_head(picked).float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(tgt, device=self.device)[:, None])[:, 0]
        return torch.zeros(len(lens), device=self.device, dtype=logp.dtype).index_add(0, ri, logp)

    def group_logprobs(self, prompts: Sequence[list[int]], rows: Sequence[tuple[int, list[int]]]) -> Any:
        """``log pi(completion | prompts[i])`` for every ``(i, completion)`` row, each prompt processed ONCE for
        its whole group: a float tensor ``(R,)``, differentiable in the adapters.

        Pass 1 runs the distinct prompts (right-padded) through every layer -- the lower ``first`` layers under
        ``torch.no_grad``, the adapted ones with grad -- keeping their keys and values; pass 2 copies each prompt's
        keys/values to its rows (``index_select``, differentiable) and runs only the completion tokens. The first
        completion token is scored from the prompt's last hidden state, the others from the completion's own."""
        import torch
        from transformers import DynamicCache
        from transformers.masking_utils import create_causal_mask

        self._merge(False)
        body = self.model.model
        dev = self.device
        pad = int(self.tok.pad_token_id)
        plen = torch.tensor([len(p) for p in prompts], device=dev)
        width = int(plen.max())
        p_ids = torch.full((len(prompts), width), pad, dtype=torch.long, device=dev)
        p_mask = torch.zeros((len(prompts), width), dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):
            p_ids[i, : len(p)] = torch.tensor(p)
            p_mask[i, : len(p)] = 1
        cache = DynamicCache(config=body.config)

        def run(hidden: Any, mask: Any, pos: Any) -> Any:
            causal = create_causal_mask(
                config=body.config, inputs_embeds=hidden, attention_mask=mask, past_key_values=cache, position_ids=pos
            )
            pe = body.rotary_emb(hidden, position_ids=pos)
            with torch.no_grad():
                for layer in body.layers[: self.first]:
                    hidden = layer(
                        hidden,
                        attention_mask=causal,
                        position_embeddings=pe,
                        position_ids=pos,
                        past_key_values=cache,
                        use_cache=True,
                    )
            for layer in body.layers[self.first :]:
                hidden = layer(
                    hidden,
                    attention_mask=causal,
                    position_embeddings=pe,
                    position_ids=pos,
                    past_key_values=cache,
                    use_cache=True,
                )
            return body.norm(hidden)

        p_pos = torch.arange(width, device=dev)[None].expand(len(prompts), -1)
        with torch.no_grad():
            p_emb = body.embed_tokens(p_ids)
        h_prompt = run(p_emb, p_mask, p_pos)  # (M, W, D)
        sel = torch.tensor([i for i, _ in rows], device=dev, dtype=torch.long)
        cache.reorder_cache(cast("torch.LongTensor", sel))
        clen = [len(c) for _, c in rows]
        cw = max(clen)
        c_ids = torch.full((len(rows), cw), pad, dtype=torch.long, device=dev)
        c_mask = torch.zeros((len(rows), cw), dtype=torch.long, device=dev)
        for r, (_, c) in enumerate(rows):
            c_ids[r, : len(c)] = torch.tensor(c)
            c_mask[r, : len(c)] = 1
        c_pos = plen.index_select(0, sel)[:, None] + torch.arange(cw, device=dev)[None]
        with torch.no_grad():
            c_emb = body.embed_tokens(c_ids)
        h_comp = run(c_emb, torch.cat([p_mask.index_select(0, sel), c_mask], dim=1), c_pos)  # (R, C, D)
        # predictors of each completion token: the prompt's last position, then completion positions 0..len-2
        first_h = h_prompt[sel, plen.index_select(0, sel) - 1]  # (R, D)
        r_idx = [r for r, n in enumerate(clen) for _ in range(n - 1)]
        t_idx = [t for n in clen for t in range(n - 1)]
        rest_h = h_comp[
            torch.tensor(r_idx, device=dev, dtype=torch.long), torch.tensor(t_idx, device=dev, dtype=torch.long)
        ]
        hid = torch.cat([first_h, rest_h], dim=0)
        tgt = torch.cat(
            [
                c_ids[:, 0],
                c_ids[
                    torch.tensor(r_idx, device=dev, dtype=torch.long),
                    torch.tensor(t_idx, device=dev, dtype=torch.long) + 1,
                ],
            ]
        )
        owner = torch.cat([torch.arange(len(rows), device=dev), torch.tensor(r_idx, device=dev, dtype=torch.long)])
        logits = self.model.lm_head(hid).float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, tgt[:, None])[:, 0]
        return torch.zeros(len(rows), device=dev, dtype=logp.dtype).index_add(0, owner, logp)


def grpo_update(
    policy: Any,
    opt: Any,
    prompts: Sequence[list[int]],
    comps: Sequence[Sequence[list[int]]],
    rewards: Sequence[np.ndarray],
    micro: int = 16,
) -> int:
    """One Dr.GRPO step ``-(1/M) sum_i (1/n_i) sum_j A_ij log pi(y_ij | x_i)`` (``A = r - mean r``): backward
    over micro-batches of ``micro`` groups, then one optimiser step. ``policy`` is a :class:`FastPolicy` (each
    prompt processed once for its group, :meth:`FastPolicy.group_logprobs`) or the old ``LMPolicy`` (one row per
    rollout, ``seq_logprobs``); ``prompts[i]`` token ids, ``comps[i]`` the group's completions, ``rewards[i]`` float
    ``(n_i,)``. Returns the rollouts trained on (0: every group had equal rewards, no step taken)."""
    import torch

    m = len(prompts)
    groups = [i for i, r in enumerate(rewards) if r.size >= 2 and r.min() != r.max()]
    if not groups:
        return 0
    opt.zero_grad()
    n_rows = 0
    for k in range(0, len(groups), micro):
        part = groups[k : k + micro]
        adv = np.concatenate([(rewards[i] - rewards[i].mean()) / (rewards[i].size * m) for i in part])
        if isinstance(policy, FastPolicy):
            rows = [(j, c) for j, i in enumerate(part) for c in comps[i]]
            lp = policy.group_logprobs([prompts[i] for i in part], rows)
        else:
            lp = policy.seq_logprobs([prompts[i] for i in part for _ in comps[i]], [c for i in part for c in comps[i]])
        w = torch.tensor(adv, device=lp.device, dtype=lp.dtype)
        (-(w * lp).sum()).backward()
        n_rows += len(adv)
    opt.step()
    return n_rows


def rewards_of(policy: FastPolicy, comps: Sequence[Sequence[list[int]]], answers: Sequence[str]) -> list[np.ndarray]:
    """0/1 rewards of every completion (last integer of the reply equals the gold answer), float ``(n_i,)`` each."""
    return [np.array([answer_reward(policy.decode(c), a) for c in cs], np.float64) for cs, a in zip(comps, answers)]
