"""The policy's forward passes for the CPU trainer: sampling completions (KV-cached, seeded on the CPU) and the
per-token log-probabilities of given completions, plus the device choice. Used by the trainer, the warm-up and the
diagnostics."""

from __future__ import annotations

import torch

from vipalloc.training.model import BOS, EOS, PAD, CharTokenizer

__all__ = ["device_of", "resolve_device", "sample", "sequence_logprobs", "token_logprobs"]


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


def device_of(model: torch.nn.Module) -> torch.device:
    """The device of the model's (first) parameters."""
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
    dev = device_of(model)
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
    dev = device_of(model)
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
