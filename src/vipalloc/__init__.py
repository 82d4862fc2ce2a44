"""vipalloc: variance-informed per-prompt rollout allocation (VIP) for online RL with verifiable rewards.

The public entry point is :class:`vipalloc.Allocator`; see ``docs/architecture.md`` for the module map.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vipalloc")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+local"

__all__ = ["Allocator", "Plan", "RolloutHistory", "__version__"]


def __getattr__(name: str):  # lazy: `import vipalloc` stays cheap for the CLI's --help
    if name in ("Allocator", "Plan"):
        from vipalloc import allocator

        return getattr(allocator, name)
    if name == "RolloutHistory":
        from vipalloc.history import RolloutHistory

        return RolloutHistory
    raise AttributeError(f"module 'vipalloc' has no attribute {name!r}")
