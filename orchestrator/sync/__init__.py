"""Weight-sync strategies by name (``rollout.weight_sync``); see ``base.WeightSync``.

Registry lines: each import below registers one strategy.
"""

from __future__ import annotations

from typing import Any

from . import collective, lora_adapter, object_store  # noqa: F401  (registry lines)
from .base import WEIGHT_SYNCS, WeightSync, register_weight_sync


def make_weight_sync(name: str, *args: Any, **kwargs: Any) -> WeightSync:
    """The strategy registered as ``name``; an unknown name names the config key and the choices."""
    if name not in WEIGHT_SYNCS:
        raise ValueError(f"rollout.weight_sync: {name!r} is not one of {tuple(sorted(WEIGHT_SYNCS))}")
    return WEIGHT_SYNCS[name](*args, **kwargs)


__all__ = ["WEIGHT_SYNCS", "WeightSync", "make_weight_sync", "register_weight_sync"]
