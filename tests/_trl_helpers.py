"""Shared pieces of the TRL plug-in tests: tiny offline models, datasets, a scripted allocator, a vLLM stand-in.

Imported by ``tests/test_trl*.py`` and by the torchrun worker ``tests/_trl_mp_worker.py``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from vipalloc import Allocator

CHARS = "0123456789+-=*? "
N_PROMPTS = 40
TRUE_P = [((i * 7) % 10) / 9 for i in range(N_PROMPTS)]  # oracle success rates in [0, 1], some exactly 0 or 1


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )


def tiny_llama(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    return LlamaForCausalLM(cfg)


def tiny_gpt2(vocab: int) -> GPT2LMHeadModel:
    """Absolute position embeddings: a row's log-probs change if its tokens move to other columns."""
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=vocab,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,  # no dropout: at learning rate 0 the policy is then exactly the reference
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():  # large position embeddings make a position shift visible in every log-prob
        model.transformer.wpe.weight.normal_(0.0, 1.0)
    return model


def sums(n: int = N_PROMPTS, varied: bool = False, with_ids: bool = True) -> Dataset:
    """``a+b=`` prompts; ``varied``: operands of 1 to 3 digits, so prompt lengths differ (left padding varies)."""
    rng = np.random.default_rng(0)
    hi = 10 ** rng.integers(1, 5, n) if varied else np.full(n, 5)  # 1 to 4 digits when varied
    a, b = rng.integers(0, hi), rng.integers(0, 5, n)
    data: dict[str, list[Any]] = {
        "prompt": [f"{x}+{y}=" for x, y in zip(a, b)],
        "answer": [str(x + y) for x, y in zip(a, b)],
    }
    if with_ids:
        data["prompt_id"] = [f"q{i}" for i in range(n)]
    return Dataset.from_dict(data)


class DigitReward:
    """Verifiable reward in [0, 1] (share of digits in the completion); records every call; logs an extra column."""

    __name__ = "digit_share"

    def __init__(self, log_extra: bool = False) -> None:
        self.calls: list[list[tuple[str, str, float]]] = []
        self.pairs: list[list[tuple[str, str]]] = []  # (prompt, completion) of every scored row, per call
        self.log_extra = log_extra

    def __call__(self, prompts, completions, prompt_id=None, log_extra=None, **kwargs):
        out = [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]
        ids = prompt_id if prompt_id is not None else list(prompts)
        self.calls.append(list(zip(ids, completions, out)))
        self.pairs.append(list(zip(prompts, completions)))
        if self.log_extra and log_extra is not None:
            log_extra("digit_count", [sum(ch.isdigit() for ch in c) for c in completions])
        return out


class ScriptedAllocator(Allocator):
    """An ``Allocator`` whose counts follow ``script(step, prompt_texts) -> counts`` (for layouts tests need).

    Everything else (predictions, history, observe's checks) is the real allocator's.
    """

    def __init__(self, script: Callable[[int, list[str]], Sequence[int]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.script = script

    def plan(self, prompt_ids, prompts=None, budget=None, step=None):  # type: ignore[override]
        base = super().plan(prompt_ids, prompts=prompts, budget=budget, step=step)
        counts = np.asarray(self.script(base.step, list(prompts or base.prompt_ids)), np.int64)
        assert counts.sum() == base.budget, (counts, base.budget)
        self._pending[base.step] = dict(zip(base.prompt_ids, counts.tolist()))
        return dataclasses.replace(base, counts=counts)


# ---------------------------------------------------------------------- vLLM stand-in
class _SamplingParams:
    """The fields of ``vllm.SamplingParams`` TRL sets."""

    def __init__(self, **kwargs: Any) -> None:
        self.n = kwargs.pop("n", 1)
        self.temperature = kwargs.pop("temperature", 1.0)
        self.max_tokens = kwargs.pop("max_tokens", 16)
        self.logprobs = kwargs.pop("logprobs", None)
        self.rest = kwargs


class StandInLLM:
    """Implements the ``vllm.LLM`` surface TRL 1.16's colocate mode calls, over a transformers model.

    ``generate`` samples ``n`` completions per prompt token list (temperature sampling, stops after EOS, which is
    kept as vLLM keeps it) and returns processed log-probs of the sampled tokens; ``load_weights`` copies TRL's
    weight sync into the model. ``calls`` records the prompt lists it was given.
    """

    instances: list[StandInLLM] = []

    def __init__(self, model: str, seed: int = 0, **kwargs: Any) -> None:
        self.hf = AutoModelForCausalLM.from_pretrained(model).eval()
        self.eos = int(self.hf.config.eos_token_id)
        self.gen = torch.Generator().manual_seed(1000 + int(seed))
        self.calls: list[list[list[int]]] = []
        self.synced: set[str] = set()
        params = dict(self.hf.named_parameters())

        def load_weights(weights: list[tuple[str, torch.Tensor]]) -> None:
            for name, tensor in weights:
                params[name].data.copy_(tensor.detach().to(params[name].dtype))
                self.synced.add(name)

        runner = SimpleNamespace(model=SimpleNamespace(load_weights=load_weights))
        self.llm_engine = SimpleNamespace(
            model_executor=SimpleNamespace(driver_worker=SimpleNamespace(model_runner=runner))
        )
        StandInLLM.instances.append(self)

    def reset_prefix_cache(self) -> None:
        pass

    def sleep(self, level: int = 1) -> None:
        pass

    def wake_up(self, tags: list[str] | None = None) -> None:
        pass

    @torch.no_grad()
    def generate(self, prompts: list[dict[str, Any]], sampling_params: _SamplingParams, use_tqdm: bool = False):
        self.calls.append([list(p["prompt_token_ids"]) for p in prompts])
        outputs = []
        temp = max(float(sampling_params.temperature), 1e-6)
        for p in prompts:
            ids = list(p["prompt_token_ids"])
            samples = []
            for _ in range(sampling_params.n):
                seq, toks, lps = list(ids), [], []
                for _ in range(int(sampling_params.max_tokens)):
                    logits = self.hf(torch.tensor([seq])).logits[0, -1].float() / temp
                    logp = torch.log_softmax(logits, -1)
                    tok = int(torch.multinomial(logp.exp(), 1, generator=self.gen))
                    toks.append(tok)
                    lps.append({tok: SimpleNamespace(logprob=float(logp[tok]), rank=1)})
                    seq.append(tok)
                    if tok == self.eos:
                        break
                keep_lp = lps if sampling_params.logprobs is not None else None
                samples.append(SimpleNamespace(token_ids=toks, logprobs=keep_lp))
            outputs.append(SimpleNamespace(prompt_token_ids=ids, outputs=samples))
        return outputs


class StandInClient:
    """Implements the ``trl.generation.vllm_client.VLLMClient`` surface TRL 1.16's server mode calls, over a
    :class:`StandInLLM` loaded from ``StandInClient.model_path`` (set it before building the trainer).

    ``generate`` returns what the server's ``/generate/`` endpoint returns: ``n`` completions per prompt, in order;
    ``update_named_params`` consumes TRL's weight stream into the engine. ``calls``: prompt counts per request.
    """

    model_path = ""
    instances: list[StandInClient] = []

    def __init__(self, base_url: str | None = None, group_port: int = 0, connection_timeout: float = 0.0, **kw: Any):
        self.engine = StandInLLM(StandInClient.model_path)
        self.calls: list[int] = []
        self.synced = self.engine.synced
        StandInClient.instances.append(self)

    def init_communicator(self, device: Any = 0) -> None:
        pass

    def get_server_info(self) -> dict:
        return {"model_config": {"logprobs_mode": "processed_logprobs"}}  # the stand-in's log-probs are processed

    def update_named_params(self, metadata: list, named_params: Any) -> None:
        self.engine.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(list(named_params))

    def reset_prefix_cache(self) -> None:
        pass

    def generate(self, prompts: list[list[int]], features: Any = None, n: int = 1, **kwargs: Any) -> dict:
        self.calls.append(len(prompts))
        params = _SamplingParams(
            n=n, temperature=kwargs.get("temperature", 1.0), max_tokens=kwargs.get("max_tokens", 16), logprobs=0
        )
        outputs = self.engine.generate([{"prompt_token_ids": p} for p in prompts], params)
        seqs = [o for out in outputs for o in out.outputs]
        return {
            "prompt_ids": [list(out.prompt_token_ids) for out in outputs],
            "completion_ids": [list(o.token_ids) for o in seqs],
            "logprobs": [[[next(iter(lp.values())).logprob] for lp in o.logprobs] for o in seqs],
            "logprob_token_ids": [[[next(iter(lp))] for lp in o.logprobs] for o in seqs],
        }


def install_vllm_standin(monkeypatch: Any | None = None) -> None:
    """Make TRL's vLLM backend use :class:`StandInLLM` / :class:`StandInClient` (``monkeypatch``: a pytest
    MonkeyPatch, else set for good)."""
    import trl.generation.vllm_generation as vg

    values = {
        "is_vllm_available": lambda: True,
        "LLM": StandInLLM,
        "SamplingParams": _SamplingParams,
        "StructuredOutputsParams": lambda **kw: kw,
        "VLLMClient": StandInClient,
    }
    for name, value in values.items():
        if monkeypatch is not None:
            monkeypatch.setattr(vg, name, value, raising=False)
        else:
            setattr(vg, name, value)


def finite(values: Sequence[float]) -> bool:
    return all(math.isfinite(v) for v in values)


# ---------------------------------------------------------------------- a policy with uneven completion lengths
class UnevenPolicy:
    """Stands in for TRL's generation (``GRPOTrainer._generate_single_turn``) with deliberately uneven lengths.

    Prompt ``k`` of ``dataset`` answers with ``lengths[k % len(lengths)]`` tokens: that many characters ``"7"``
    (success, with probability ``TRUE_P[k]``) or ``"?"`` (failure) with the last one replaced by EOS; a length of
    ``max_len`` or more is cut there with no EOS (truncated, as TRL's ``max_completion_length`` cuts). So some
    prompts answer short, some long and some hit the maximum. ``generated[i]``: the rows of each call, as
    ``(prompt text, tokens)``. Install with :meth:`install` (a pytest MonkeyPatch or None: set for good).
    """

    def __init__(self, tok: Any, dataset: Any, max_len: int, lengths: Sequence[int] = (2, 3, 5, 8), seed: int = 0):
        self.tok = tok
        self.max_len = int(max_len)
        self.plan = {p: (int(lengths[k % len(lengths)]), TRUE_P[k]) for k, p in enumerate(dataset["prompt"])}
        self.rng = np.random.default_rng(seed)
        self.generated: list[list[tuple[str, int]]] = []
        self.yes, self.no = tok.convert_tokens_to_ids("7"), tok.convert_tokens_to_ids("?")

    def tokens_of(self, prompt: str) -> int:
        """Tokens every completion of ``prompt`` has (EOS included)."""
        return min(self.plan[prompt][0], self.max_len)

    def __call__(self, trainer, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        out, rows = [], []
        for ids in prompt_ids:
            text = self.tok.decode(ids, skip_special_tokens=True)
            n, p = self.plan[text]
            for _ in range(int(num_generations)):
                char = self.yes if self.rng.random() < p else self.no
                completion = [char] * self.max_len if n >= self.max_len else [char] * (n - 1) + [self.tok.eos_token_id]
                out.append(completion)
                rows.append((text, len(completion)))
        self.generated.append(rows)
        return out, None

    def install(self, monkeypatch: Any | None = None) -> None:
        from trl import GRPOTrainer

        policy = self

        def generate(trainer, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
            return policy(trainer, prompt_ids, images, multimodal_fields, num_generations, has_tool_images)

        if monkeypatch is not None:
            monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", generate)
        else:
            GRPOTrainer._generate_single_turn = generate  # type: ignore[method-assign]
