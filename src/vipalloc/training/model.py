"""A tiny character-level GPT-2 policy built from a ``transformers`` config (no weights are downloaded)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

VOCAB = list("0123456789+-*()= ")
PAD, BOS, EOS = 0, 1, 2
_OFFSET = 3


class CharTokenizer:
    """Maps the arithmetic alphabet to ids; 0 = PAD, 1 = BOS, 2 = EOS."""

    def __init__(self) -> None:
        self.stoi = {c: i + _OFFSET for i, c in enumerate(VOCAB)}
        self.itos = {i: c for c, i in self.stoi.items()}
        self.vocab_size = len(VOCAB) + _OFFSET

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as exc:
            raise ValueError(f"character {exc.args[0]!r} is not in the policy's alphabet {''.join(VOCAB)!r}") from None

    def decode(self, ids: Sequence[int]) -> str:
        """Text up to the first EOS (PAD/BOS skipped)."""
        out = []
        for i in ids:
            if i == EOS:
                break
            if i >= _OFFSET:
                out.append(self.itos[int(i)])
        return "".join(out)

    def left_pad(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """BOS + prompt, left-padded: ``(input_ids, attention_mask)``, both ``(N, L)`` int64."""
        seqs = [[BOS, *self.encode(p)] for p in prompts]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), PAD, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, width - len(s) :] = torch.tensor(s)
            mask[r, width - len(s) :] = 1
        return ids, mask


def build_policy(n_layer: int = 4, n_embd: int = 128, n_head: int = 4, n_positions: int = 48) -> torch.nn.Module:
    """GPT2LMHeadModel with the char vocabulary (about 0.8 M parameters at the defaults)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=CharTokenizer().vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg)
