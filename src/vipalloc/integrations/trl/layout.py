"""Training layout of a VIP generation batch in TRL: which rows each process trains on, at which token positions.

TRL scores a rectangular batch (``n_max`` rows per prompt, an equal slice per process) and VIP generates only the
planned rows. Before training, :func:`training_layout` turns every process's scored slice into the same number of
real rows per process (``budget / processes``, a multiple of ``steps_per_generation``), so that TRL's per-row
gathers in ``_compute_loss`` (``accelerator.gather(masked_seq_mean(...))``) see equal shapes and every loss type is
TRL's own loss over a plain batch of that size. Rows move between processes when the plan left them uneven.

Token positions. The reference / old-policy log-prob passes ran inside TRL's method on each process's own padded
layout, and transformers numbers positions by column (``arange``), so a row's positions depend on its left padding.
Moving rows to another process (a different prompt width) or trimming padding shifts them, which changes the
log-probs of absolute-position models (GPT-2) and, slightly, of RoPE models. Each row therefore carries
``vip_position_shift`` (pass-time prompt width minus training prompt width); :func:`install_position_hook` adds
``position_ids = column + shift`` to the training forward, so training sees exactly the positions of the passes.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

SHIFT_KEY = "vip_position_shift"
# Per-row tensors of TRL 1.16's scored batch, by alignment: prompt-aligned ones are left-padded, completion-aligned
# ones right-padded (value: the padding value; None = the tokenizer's pad id).
_PROMPT_KEYS: dict[str, float | None] = {"prompt_ids": None, "prompt_mask": 0}
_COMPLETION_KEYS: dict[str, float | None] = {
    "completion_ids": None,
    "completion_mask": 0,
    "old_per_token_logps": 0.0,
    "ref_per_token_logps": 0.0,
    "sampling_per_token_logps": 0.0,
    "importance_sampling_ratio": 1.0,
    "tool_mask": 1,  # multi-turn tool episodes: 0 on tool-output tokens (TRL pads it with 1; completion_mask masks)
}
_ROW_KEYS = ("advantages",)


def rows_per_process(total_real: int, world: int, chunks: int) -> int:
    """Rows every process trains on: the real rows shared equally, rounded up to a multiple of ``chunks``.

    ``chunks`` is TRL's ``steps_per_generation`` (it splits each process's rows into that many equal micro-batches).
    At least ``chunks`` so that every process runs the same number of forward/backward passes.
    """
    per = -(-total_real // (world * chunks)) * chunks
    return max(chunks, per)


def accepts_position_ids(model: torch.nn.Module) -> bool:
    """Whether ``model.forward`` takes ``position_ids`` (explicitly or through ``**kwargs``)."""
    params = inspect.signature(model.forward).parameters
    return "position_ids" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def install_position_hook(model: torch.nn.Module, get_shift: Callable[[], torch.Tensor | None]) -> Any:
    """Give ``model``'s forward ``position_ids = column index + shift[row]`` while ``get_shift()`` is not None.

    Only when the call has ``input_ids`` with as many rows as the shift and no ``position_ids`` of its own. Positions
    of left-padding columns would go negative; they are clamped to 0 (those columns are masked out).
    """

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        shift = get_shift()
        ids = kwargs.get("input_ids", args[0] if args else None)
        if shift is None or ids is None or kwargs.get("position_ids") is not None or ids.size(0) != shift.numel():
            return None
        pos = torch.arange(ids.size(1), device=ids.device).unsqueeze(0) + shift.to(ids.device).unsqueeze(1)
        kwargs["position_ids"] = pos.clamp(min=0)
        return args, kwargs

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def _pad_width(t: torch.Tensor, width: int, value: float, left: bool) -> torch.Tensor:
    extra = width - t.size(1)
    if extra <= 0:
        return t
    fill = t.new_full((t.size(0), extra, *t.shape[2:]), value)
    return torch.cat([fill, t] if left else [t, fill], dim=1)


def training_layout(
    output: dict[str, Any],
    real_global: np.ndarray,
    *,
    rank: int,
    world: int,
    chunks: int,
    pad_token_id: int,
    trim: bool,
    gather: Callable[[torch.Tensor], torch.Tensor],
    sequence_level_ratio: bool = False,
) -> tuple[dict[str, Any], np.ndarray]:
    """This process's training rows, taken from the scored slices of all processes.

    ``output``: TRL's scored batch of this process's slice (``L`` rows, equal on every process). ``real_global``:
    bool ``(world * L,)``, the generated rows of the gathered batch in process order. ``gather``: concatenates a
    tensor of equal shape from every process along dim 0 (``accelerator.gather``; identity with one process).

    Real rows are dealt out in global order, ``rows_per_process(R, world, chunks)`` per process; any shortfall is
    filled with inert rows (copies of a scored row with loss mask and advantage 0). With ``trim``, padding columns
    that no training row of this process needs are dropped (positions are preserved through ``SHIFT_KEY``).
    Returns the new batch (same keys plus ``SHIFT_KEY``: int64 ``(T,)``) and the global row index of each training
    row (``-1 - index`` for an inert row).
    """
    n_local = int(output["prompt_ids"].size(0))
    if real_global.shape != (world * n_local,):
        raise RuntimeError(f"plan covers {real_global.size} rows but the processes scored {world} x {n_local}")
    device = output["prompt_ids"].device
    real_idx = np.flatnonzero(real_global)
    total = int(real_idx.size)
    per = rows_per_process(total, world, chunks)
    mine = real_idx[rank * per : (rank + 1) * per]
    # Inert rows: copies of a scored row (any will do: they are fully masked); the first real row if there is one.
    filler = int(real_idx[0]) if total else 0
    n_inert = per - mine.size
    rows = np.concatenate([mine, np.full(n_inert, filler, dtype=np.int64)]).astype(np.int64)
    live = np.concatenate([np.ones(mine.size, bool), np.zeros(n_inert, bool)])

    local_widths = torch.tensor([output["prompt_ids"].size(1), output["completion_ids"].size(1)], device=device)
    widths = gather(local_widths).view(world, 2).cpu().numpy()  # (world, 2): prompt and completion width
    p_max, c_max = int(widths[:, 0].max()), int(widths[:, 1].max())
    idx = torch.as_tensor(rows, device=device)

    out: dict[str, Any] = {}
    for key, value in output.items():
        if not (isinstance(value, torch.Tensor) and value.ndim >= 1 and value.size(0) == n_local):
            if isinstance(value, list) and len(value) == n_local:
                raise RuntimeError(f"TRL returned a per-row list {key!r}; this TRL version is not supported")
            out[key] = value
            continue
        if key in _PROMPT_KEYS:
            fill = _PROMPT_KEYS[key]
            full = _pad_width(value, p_max, pad_token_id if fill is None else fill, left=True)
        elif key in _COMPLETION_KEYS and not (key == "importance_sampling_ratio" and sequence_level_ratio):
            fill = _COMPLETION_KEYS[key]
            full = _pad_width(value, c_max, pad_token_id if fill is None else fill, left=False)
        elif key in _ROW_KEYS or key == "importance_sampling_ratio":
            full = value
        else:
            raise RuntimeError(f"TRL returned an unknown per-row field {key!r}; this TRL version is not supported")
        gathered = gather(full.contiguous()) if world > 1 else full
        out[key] = gathered.index_select(0, idx)

    live_t = torch.as_tensor(live, device=device)
    if n_inert:
        out["completion_mask"] = out["completion_mask"] * live_t.unsqueeze(1).to(out["completion_mask"].dtype)
        out["advantages"] = torch.where(live_t, out["advantages"], torch.zeros_like(out["advantages"]))
        if "tool_mask" in out:
            out["tool_mask"] = out["tool_mask"] * live_t.unsqueeze(1).to(out["tool_mask"].dtype)

    origin_width = torch.as_tensor(widths[rows // n_local, 0], device=device, dtype=torch.long)
    if trim:
        first = int(out["prompt_mask"].any(dim=0).float().argmax()) if out["prompt_mask"].any() else 0
        used = out["completion_mask"].any(dim=0)
        last = int(used.nonzero().max()) + 1 if used.any() else 1
        for key in _PROMPT_KEYS:
            out[key] = out[key][:, first:]
        for key in _COMPLETION_KEYS:
            if key in out and not (key == "importance_sampling_ratio" and sequence_level_ratio):
                out[key] = out[key][:, :last]
    # Row r's tokens sat origin_width[r] - (final prompt width) columns further right in the pass-time layout.
    out[SHIFT_KEY] = origin_width - int(out["prompt_ids"].size(1))
    # dapo/cispo/vespo normalise by the global token count: the real tokens of every process's training rows
    # (TRL's loss mask: completion_mask x tool_mask, so tool output is not counted).
    loss_mask = out["completion_mask"] if "tool_mask" not in out else out["completion_mask"] * out["tool_mask"]
    tokens = loss_mask.sum().to(torch.float32)
    out["num_items_in_batch"] = (gather(tokens.reshape(1)).sum() if world > 1 else tokens).to(
        output["num_items_in_batch"].dtype
    )
    origin = np.where(live, rows, -1 - rows)
    return out, origin
