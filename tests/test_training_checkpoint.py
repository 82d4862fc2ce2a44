"""The CPU trainer's checkpoints load without executing code: tensors and plain data only (weights_only=True); a
checkpoint written the old way (the same payload through torch.save) still loads; anything else is refused with a
message naming the file and the fix."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from vipalloc.training.checkpoint import CKPT_NAME, CheckpointError, read_checkpoint, write_checkpoint
from vipalloc.training.config import TrainConfig
from vipalloc.training.trainer import checkpoint_config


class _Payload:
    """Unpickling this object would create a marker file: what a malicious checkpoint could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.makedirs, (str(self.marker),))


def _old_style_payload() -> dict:
    """The payload the trainer has always written: model and AdamW state dicts, generator states, JSON strings."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return {
        "step": 3,
        "cum_rollouts": 96,
        "cum_tokens": 410,
        "model": model.state_dict(),
        "opt": opt.state_dict(),
        "allocator": json.dumps({"format": "vipalloc.allocator"}),
        "np_rng": json.dumps({"bit_generator": "PCG64"}),
        "torch_gen": torch.Generator().manual_seed(1).get_state(),
        "torch_rng": torch.get_rng_state(),
        "metrics": "[]",
        "plans": "[]",
        "config": TrainConfig(steps=3).model_dump_json(),
    }


def test_old_checkpoint_loads_with_weights_only(tmp_path: Path) -> None:
    payload = _old_style_payload()
    torch.save(payload, tmp_path / CKPT_NAME)  # exactly how earlier versions wrote it
    back = read_checkpoint(tmp_path / CKPT_NAME)
    assert back["step"] == 3 and back["config"] == payload["config"]
    assert torch.equal(back["model"]["weight"], payload["model"]["weight"])
    assert back["opt"]["param_groups"][0]["betas"] == payload["opt"]["param_groups"][0]["betas"]
    assert torch.equal(back["torch_gen"], payload["torch_gen"])
    cfg = checkpoint_config(tmp_path)
    assert cfg is not None and cfg.steps == 3


def test_write_then_read_round_trip(tmp_path: Path) -> None:
    payload = _old_style_payload()
    write_checkpoint(tmp_path / "run", payload)
    back = read_checkpoint(tmp_path / "run" / CKPT_NAME)
    assert back["cum_tokens"] == 410 and torch.equal(back["torch_rng"], payload["torch_rng"])
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [CKPT_NAME]  # no temporary left behind


def test_code_in_a_checkpoint_is_refused_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    payload = _old_style_payload()
    payload["metrics"] = _Payload(marker)
    torch.save(payload, tmp_path / CKPT_NAME)
    with pytest.raises(CheckpointError, match="objects other than tensors and plain data.*move it away"):
        read_checkpoint(tmp_path / CKPT_NAME)
    assert not marker.exists()
    assert checkpoint_config(tmp_path) is None  # the demo restarts such a run instead of loading it


def test_truncated_or_foreign_files_are_refused(tmp_path: Path) -> None:
    torch.save(_old_style_payload(), tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt is not a readable checkpoint"):
        read_checkpoint(tmp_path / "cut.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a trainer checkpoint"):
        read_checkpoint(tmp_path / "other.pt")
