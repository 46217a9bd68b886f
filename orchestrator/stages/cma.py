"""Stage ``cma``: Cross-Mode Alignment (CE on the rewrites + NCE within and across the two modes)."""

from __future__ import annotations

from ..config import Config
from .base import StageSettings, register_stage
from .supervised import SupervisedStage


@register_stage("cma")
class CMAStage(SupervisedStage):
    def __init__(self, ctx):
        super().__init__(ctx)
        self.by_task = self.cfg.data.batch_by_task

    @classmethod
    def settings(cls, cfg: Config) -> StageSettings:
        c = cfg.cma
        return StageSettings(
            {"lambda_cma": c.lambda_cma, "temperature": c.temperature, "ce_weight": c.ce_weight},
            cfg.learners.lr,
            cfg.learners.warmup_steps,
            c.steps,
            c.embedding_lr,
        )

    def log_line(self, i: int, m: dict[str, float]) -> str:
        return (
            f"cma step {i}/{self.cfg.cma.steps} loss {m['train/loss']:.3f} (nce_disc {m['train/nce_disc']:.3f}, "
            f"nce_gen {m['train/nce_gen']:.3f}, ce {m['train/ce']:.3f}) {m['perf/samples_per_s']:.1f} pairs/s"
        )
