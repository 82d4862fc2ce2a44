"""TRL plug-in: VIP's per-prompt rollout counts inside TRL's ``GRPOTrainer`` (supported TRL: ``>=1.16,<2``).

Route (justified in ``docs/trl.md``): the trainer samples every prompt ``n_max`` times (rectangular groups, TRL's
``RepeatSampler`` layout), asks ``Allocator.plan`` for per-prompt counts ``n_i`` summing to the budget and marks
the first ``n_i`` rows of group ``i`` real. Only real rows are generated and scored; unused rows carry a one-token
placeholder and a NaN reward, which TRL's NaN-aware group statistics ignore. After TRL has computed the advantages
the unused rows are removed and the real rows are dealt out so that every process trains on the same number
(``per_device_train_batch_size`` per micro-batch), at the token positions of TRL's log-prob passes. Each prompt's
binarised rewards then go to ``Allocator.observe`` (main process), and ``vip/*`` metrics to TRL's logs.

Two-phase strategies (``two_phase=True``) run the pilot round with TRL's own ``_generate`` / ``_calculate_rewards``
before TRL's method, which then reuses the pilot rows and generates only the committed ones.

Multi-turn tool rollouts (``tools=[...]``, ``environment_factory``): only the first turn is restricted to the planned
rows; TRL's ``_tool_call_loop`` then continues exactly those episodes (``tools.py``), so a prompt planned ``n_i``
rows gets ``n_i`` whole episodes, scored at the end, with TRL's ``tool_mask`` kept through the training layout.

Tasks the environment chooses (``environment_factory`` without ``train_dataset``, or rows without a ``prompt``):
the step's environments are reset before the plan and each group is keyed by its observation
(``environments.py``).

Scope: TRL's transformers generation path (plain ``generate`` or continuous batching), vLLM colocate and server
mode, text prompts, no ``rollout_func``. Unsupported settings raise at construction with the reason.

Package layout: ``config`` (``VIPGRPOConfig``, its checks, the step's token budget), ``trainer``
(``VIPGRPOTrainer``), ``planning`` (a batch's groups and layout, two-phase rounds, the allocator check),
``environments``, ``layout`` (the training layout), ``logs``, ``tools``, ``async_trainer`` (``VIPAsyncGRPOTrainer``).
"""

from __future__ import annotations

import warnings
from typing import Any

try:
    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import torch  # noqa: F401
    import trl
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        f'vipalloc.integrations.trl needs TRL and PyTorch ({exc}); install them with: pip install "vipalloc[trl]"'
    ) from exc

from packaging.version import Version

from vipalloc.integrations.trl.config import ALLOCATOR_FILE, VIPGRPOConfig
from vipalloc.integrations.trl.planning import VIPBatchRecord
from vipalloc.integrations.trl.trainer import VIPGRPOTrainer

__all__ = [
    "ALLOCATOR_FILE",
    "SUPPORTED_TRL",
    "VIPAsyncGRPOTrainer",
    "VIPBatchRecord",
    "VIPGRPOConfig",
    "VIPGRPOTrainer",
]

SUPPORTED_TRL = ">=1.16,<2"
_TRL_RANGE = (Version("1.16"), Version("2"))


def _trl_version_supported(found: str) -> bool:
    return _TRL_RANGE[0] <= Version(found) < _TRL_RANGE[1]


if not _trl_version_supported(trl.__version__):  # pragma: no cover - depends on the installed TRL
    warnings.warn(
        f"vipalloc's TRL plug-in supports trl{SUPPORTED_TRL} (it overrides TRL internals); found trl "
        f"{trl.__version__}. Install a supported version or expect breakage.",
        RuntimeWarning,
        stacklevel=2,
    )


def __getattr__(name: str) -> Any:
    # VIPAsyncGRPOTrainer (TRL's experimental AsyncGRPOTrainer with VIP's rollout worker, async_trainer.py) is built
    # on first access, so importing this package does not import trl.experimental.
    if name == "VIPAsyncGRPOTrainer":
        from vipalloc.integrations.trl.async_trainer import build_async_trainer_class

        cls = build_async_trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
