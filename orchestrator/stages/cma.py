"""Stage ``cma``: Cross-Mode Alignment (CE on the rewrites + NCE within and across the two modes)."""

from __future__ import annotations

from ..config import Config, ConfigError
from .base import StageSettings, register_stage
from .supervised import SupervisedStage, check_grad_cache


@register_stage("cma")
class CMAStage(SupervisedStage):
    def __init__(self, ctx):
        super().__init__(ctx)
        self.by_task = self.cfg.data.batch_by_task

    def start(self) -> None:
        """The pair stream, attaching up to ``cma.hard_negatives`` of each query's hard negatives."""
        super().start()
        self.stream.hard_negatives = self.cfg.cma.hard_negatives

    @classmethod
    def settings(cls, cfg: Config) -> StageSettings:
        c = cfg.cma
        return StageSettings(
            {
                "lambda_cma": c.lambda_cma,
                "temperature": c.temperature,
                "ce_weight": c.ce_weight,
                "matryoshka_dims": list(c.matryoshka_dims),
                "hard_negatives": c.hard_negatives,
                "grad_cache_chunk": c.grad_cache_chunk,
            },
            cfg.learners.lr,
            cfg.learners.warmup_steps,
            c.steps,
            c.embedding_lr,
        )

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Prefix sizes that mean something whatever the model: >= 1 and distinct (each must also be below
        the model's embedding size: ``check_start_model``, once the start model is known)."""
        check_grad_cache(cfg, "cma", cfg.cma.grad_cache_chunk)
        dims = cfg.cma.matryoshka_dims
        bad = [d for d in dims if d < 1]
        twice = sorted({d for d in dims if dims.count(d) > 1})
        if bad or twice:
            why = f"{bad} not >= 1" if bad else f"{twice} listed twice"
            raise ConfigError(
                f"cma.matryoshka_dims: {list(dims)}: {why}; give distinct prefix sizes >= 1, each below the model's "
                "embedding size, e.g. [32, 64] ([] = off)"
            )

    @classmethod
    def check_start_model(cls, cfg: Config, model_path: str) -> None:
        """Matryoshka prefix sizes must be below the model's embedding size: known only now (read from the
        saved model's config, no weights), and a bad one fails here, before Ray and the learners start."""
        if not cfg.cma.matryoshka_dims:
            return
        from rime_model import Embedder
        from rime_model.losses import check_prefix_dims

        try:
            check_prefix_dims(cfg.cma.matryoshka_dims, Embedder.saved_dim(model_path), key="cma.matryoshka_dims")
        except ValueError as e:
            raise ConfigError(f"{e}; start model: {model_path}") from None

    def log_line(self, i: int, m: dict[str, float]) -> str:
        return (
            f"cma step {i}/{self.cfg.cma.steps} loss {m['train/loss']:.3f} (nce_disc {m['train/nce_disc']:.3f}, "
            f"nce_gen {m['train/nce_gen']:.3f}, ce {m['train/ce']:.3f}) {m['perf/samples_per_s']:.1f} pairs/s"
        )
