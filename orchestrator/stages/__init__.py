"""Stages by name (``run.stages``); see ``base.Stage``.

Registry lines: each import below registers one stage.
"""

from __future__ import annotations

from . import cma, plume, refine_rl  # noqa: F401  (registry lines)
from .base import STAGES, Stage, StageContext, StageSettings, register_stage

__all__ = ["STAGES", "Stage", "StageContext", "StageSettings", "register_stage"]
