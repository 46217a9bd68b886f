"""Stage ``plume``: PLUME's explicit-to-latent curriculum on the learners.

The stage owns its schedule (each step's phase comes from the schedule and the stage step, so a resume
lands in the same phase; a new curriculum stage resets the optimizer state and warm-up) and its probe (can
the model write the reasoning the curriculum distils, and does the embedding after it retrieve?).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from actors.batches import Pair

from ..config import Config, ConfigError
from .base import StageSettings, register_stage
from .supervised import SupervisedStage, check_grad_cache

log = logging.getLogger(__name__)


@register_stage("plume")
class PlumeStage(SupervisedStage):
    def __init__(self, ctx):
        super().__init__(ctx)
        self.pc = self.cfg.plume
        self.by_task = self.pc.batch_by_task
        self.schedule = self.pc.schedule()

    @classmethod
    def settings(cls, cfg: Config) -> StageSettings:
        pc = cfg.plume
        return StageSettings(
            {
                "segments": pc.segments,
                "temperature": pc.temperature,
                "ce_weight": pc.ce_weight,
                "disc_weight": pc.disc_weight,
                "lambda_bal": pc.lambda_bal,
                "target_layout": pc.target_layout,
                "latent_steps": pc.latent_steps,
                "grad_cache_chunk": pc.grad_cache_chunk,
            },
            pc.lr,
            pc.warmup_steps,
            pc.schedule().total_steps,
            pc.embedding_lr,
        )

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """The curriculum checks are the schedule's own (``rime_model.curriculum`` is torch-free); the
        adapter's sizes are checked here, by config key."""
        pc = cfg.plume
        check_grad_cache(cfg, "plume", pc.grad_cache_chunk)
        try:
            pc.schedule()
        except ValueError as e:
            raise ConfigError(str(e)) from e
        if pc.latent_steps > pc.max_latent_steps:
            raise ConfigError(
                f"plume.latent_steps: {pc.latent_steps} > plume.max_latent_steps {pc.max_latent_steps}; raise the latter"
            )
        if pc.experts and not 1 <= pc.top_k <= pc.experts:
            raise ConfigError(f"plume.top_k: must be in 1..plume.experts ({pc.experts}), got {pc.top_k}")
        if cfg.learners.gradient_checkpointing:  # checkpointed layers drop the cache: the latent steps would see no prefix
            raise ConfigError(
                "learners.gradient_checkpointing: the plume stage trains its latent steps through the KV cache, which "
                "checkpointed layers do not fill; set learners.gradient_checkpointing=false for runs with plume"
            )

    @classmethod
    def learner_options(cls, cfg: Config) -> dict[str, Any]:
        return {"latent_adapter": cfg.plume.adapter()}

    @classmethod
    def check_start_model(cls, cfg: Config, model_path: str) -> None:
        announce_adapter(cfg, model_path)

    def step_args(self, i: int, pairs: list[Pair]) -> tuple[dict[str, Any], dict[str, float]]:
        from rime_model.curriculum import split_segments

        pc, st = self.pc, self.ctx.state
        phase = self.schedule.at(i)
        if i == 0 and pc.first_stage and pc.probe_queries_per_task:
            self.probe("on the start model")  # stage 0 skipped: probe what it starts from
        if self.schedule.stage_changes_at(i):
            if phase.stage == 1 and pc.probe_queries_per_task:
                self.probe("after stage 0")
            self.ctx.learners.call("reset_optimizer", pc.lr, pc.warmup_steps, embedding_lr=pc.embedding_lr)
            log.info(
                f"plume curriculum stage {phase.stage}: {phase.replaced}/{pc.segments} segments latent "
                f"({phase.latent_steps} latent steps); optimizer state reset"
            )
        st.plume_rows_short_reasoning += sum(not split_segments(p.q_reasoning, pc.segments)[1] for p in pairs)
        return {"phase": phase.to_dict()}, {
            "plume/stage": phase.stage,
            "plume/latent_steps": phase.latent_steps,
            "plume/keep_answer": float(phase.keep_answer),
            "data/rows_short_reasoning": st.plume_rows_short_reasoning,
        }

    def log_line(self, i: int, m: dict[str, float]) -> str:
        return (
            f"plume step {i}/{self.schedule.total_steps} (curriculum stage {int(m['plume/stage'])}, "
            f"{int(m['plume/latent_steps'])} latent, answer {'on' if m['plume/keep_answer'] else 'off'}) "
            f"loss {m['train/loss']:.3f} (ce {m['train/ce']:.3f}, nce_gen {m['train/nce_gen']:.3f}, "
            f"nce_disc {m['train/nce_disc']:.3f}, bal {m['train/balance']:.4f}) {m['perf/samples_per_s']:.1f} pairs/s"
        )

    def end(self) -> dict[str, Any]:
        pc, st = self.pc, self.ctx.state
        if self.schedule.end_stage == 0 and pc.probe_queries_per_task:  # an explicit-reasoning run: probe what it made
            self.probe("after stage 0")
        if st.plume_rows_short_reasoning:
            log.info(
                f"plume: {st.plume_rows_short_reasoning} training row(s) had fewer than {pc.segments} reasoning "
                "segments (padded with empty segments; counted in data/rows_short_reasoning)"
            )
        return super().end()

    def probe(self, after: str) -> dict:
        """End of curriculum stage 0 (or the start, when it is skipped): can the model write the reasoning
        the next stages turn latent, and does the embedding after it retrieve?
        Logs ``plume/explicit_*`` and writes ``eval/plume-explicit.json``."""
        from rime_model import load_embedder

        from ..plume_probe import explicit_reasoning_probe

        ctx, pc, t = self.ctx, self.pc, time.perf_counter()
        model_dir = ctx.run_dir / "stages" / "plume-explicit"
        ctx.learners.call("save_embedder", str(model_dir))
        res = explicit_reasoning_probe(
            load_embedder(str(model_dir)),
            ctx.data_dir,
            self.cfg.data.eval_split,
            pc.probe_queries_per_task,
            pc.segments,
            pc.probe_max_new_tokens,
            self.cfg.eval.batch_size,
            latent_steps=pc.latent_steps,
        )
        path = ctx.run_dir / "eval" / "plume-explicit.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=2))
        if res["metrics"]:
            ctx.log_metrics(res["metrics"], ctx.state.step)
        ctx.log_artifact(str(path), "eval")
        m = res["metrics"]
        segs = " ".join(f"{v:.2f}" for k, v in m.items() if "segment" in k)
        log.info(
            f"plume explicit-reasoning probe {after} ({res['n']} queries, {res['skipped']} skipped, "
            f"{res['no_reasoning']} without reasoning, {time.perf_counter() - t:.0f}s): answer acc "
            f"{m.get('plume/explicit_answer_acc', float('nan')):.3f}, segments exact {segs}, explicit->latent hit@1 "
            f"{m.get('plume/explicit_latent_hit1', float('nan')):.3f}"
        )
        for smp in res["samples"][:2]:
            log.info(f"  {smp['task']}: {smp['reasoning'][:160]!r} => {smp['answer']!r} (ideal {smp['ideal'][:160]!r})")
        return res


def announce_adapter(cfg: Config, model_path: str) -> dict[str, tuple]:
    """Say so when the start model carries a transition adapter whose settings differ from ``plume.*``:
    the learners replace it with a fresh one of the configured shape (an ablation from a CoT model means
    what it says), so its weights do not carry over. Returns the differing settings (saved, configured)."""
    from rime_model import Embedder
    from rime_model.latent import adapter_differences

    saved = Embedder.saved_settings(model_path).get("latent_adapter")
    diff = adapter_differences(saved, cfg.plume.adapter()) if saved else {}
    if diff:
        log.info(
            "plume: the start model's transition adapter differs from the config ("
            + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            + "); the learners start a fresh adapter of the configured shape, its weights do not carry over"
        )
    return diff
