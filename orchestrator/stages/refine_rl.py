"""Stage ``refine-rl``: GRPO over the rewrites with rollout workers, the frozen anchor reward service and the
learners (one step: ``orchestrator.refine_rl.RefineRL``)."""

from __future__ import annotations

import logging
from typing import Any

from ..config import Config, ConfigError
from ..placement import DATA_TASK_CPUS, RoleRequest
from .base import Stage, StageSettings, register_stage

log = logging.getLogger(__name__)


@register_stage("refine-rl")
class RefineRLStage(Stage):
    log_every = 5

    @classmethod
    def settings(cls, cfg: Config) -> StageSettings:
        from ..refine_rl import stage_config

        rl = cfg.refine_rl
        return StageSettings(stage_config(cfg), rl.lr, rl.warmup_steps, rl.steps, rl.embedding_lr)

    @classmethod
    def roles(cls, cfg: Config) -> list[RoleRequest]:
        from ..rl_actors import rl_requests

        return rl_requests(cfg)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        rl, ro, lc = cfg.refine_rl, cfg.rollout, cfg.learners
        shards = lc.num_actors * lc.grad_accum_steps
        if (rl.queries_per_step * ro.group_size) % shards:
            raise ConfigError(
                f"refine_rl.queries_per_step: {rl.queries_per_step} queries x rollout.group_size "
                f"{ro.group_size} must split evenly over learners.num_actors x grad_accum_steps = {shards}"
            )
        if rl.estimator in ("grpo", "rloo") and ro.group_size < 2:
            raise ConfigError(f"rollout.group_size: {rl.estimator} compares rewrites within a group; use >= 2")
        shared = [f"{s}.gpus_per_actor" for s, role in (("learners", lc), ("rollout", ro)) if 0 < role.gpus_per_actor < 1]
        if ro.weight_sync == "collective" and shared and lc.gpus_per_actor > 0 and ro.gpus_per_actor > 0:
            raise ConfigError(
                f"rollout.weight_sync: collective broadcasts over NCCL, which refuses two members on one "
                f"GPU, and {shared[0]} is a fraction; use rollout.weight_sync=object_store when roles share GPUs"
            )

    @classmethod
    def preflight(cls, cfg: Config) -> None:
        check_rl_objective(cfg)

    def start(self) -> None:
        from ..refine_rl import RefineRL

        self.stream = self.ctx.open_stream(self.cfg.refine_rl.batch_by_task)
        self.rl = RefineRL(self.cfg, self.ctx.learners, self.stream, self.ctx.start_model, reserve_cpus=DATA_TASK_CPUS)
        self.history: list[float] = []
        self.rl.sync_weights(self.ctx.state.stage_step)  # a resumed stage starts from the learners' weights, not the folder's
        rl = self.cfg.refine_rl
        self.probe = None
        if rl.probe_every and rl.probe_queries_per_task:
            from ..rl_probe import RLProbe, probe_pairs

            self.probe = RLProbe(self.rl, probe_pairs(self.stream, rl.probe_queries_per_task, self.cfg.run.seed))
            if self.ctx.state.stage_step == 0:  # the curve starts at the stage's start model
                self.ctx.log_metrics(self._probe(), self.ctx.state.step)

    def _probe(self) -> dict[str, float]:
        m = self.probe.run()
        log.info(
            f"refine-rl probe ({int(m['probe/queries'])} queries): reward {m['probe/reward_mean']:.3f}, acc "
            f"{m['probe/acc']:.2f}, zero-variance groups {m.get('probe/zero_variance_groups', 0.0):.2f}, greedy acc "
            f"{m['probe_greedy/acc']:.2f}"
        )
        return m

    def step(self, i: int) -> dict[str, float]:
        metrics = self.rl.step(i)
        self.history.append(metrics["reward/reward_mean"])
        done = i + 1
        if self.probe is not None and (done % self.cfg.refine_rl.probe_every == 0 or done == self.cfg.refine_rl.steps):
            metrics.update(self._probe())
        return metrics

    @property
    def position(self):
        return self.rl.trained_position

    def log_line(self, i: int, m: dict[str, float]) -> str:
        return (
            f"refine-rl step {i}/{self.cfg.refine_rl.steps} reward {m['reward/reward_mean']:.3f} "
            f"(acc {m['reward/acc_mean']:.2f}, well-formed {m['rollout/well_formed_frac']:.2f}, "
            f"len {m['rollout/rewrite_tokens_mean']:.1f}) kl {m.get('train/kl', 0.0):.4f} "
            f"time roll/rew/learn/sync {m['time/rollout_s']:.1f}/{m['time/reward_s']:.1f}/"
            f"{m['time/learn_s']:.1f}/{m['time/sync_s']:.2f}s"
        )

    def postfix(self, m: dict[str, float]) -> dict[str, str]:
        return {"reward": f"{m['reward/reward_mean']:.3f}", "acc": f"{m['reward/acc_mean']:.2f}"}

    def end(self) -> dict[str, Any]:
        return {"rl_reward_history": self.history, "bad_rows": self.stream.bad_rows}

    def close(self) -> None:
        rl = getattr(self, "rl", None)
        if rl is not None:
            rl.shutdown()
        stream = getattr(self, "stream", None)
        if stream is not None:
            stream.close()


def check_rl_objective(cfg: Config) -> None:
    """Run the configured verl estimator and policy loss on hand-made inputs (verl is too slow to import
    in config validation): a name verl lists but rime cannot feed fails here with its key, not after
    every rollout and reward actor has started and the first batch is scored."""
    import torch

    from rewards.advantages import check_estimator
    from rime_model.policy_loss import PolicyLossConfig, policy_loss

    rl = cfg.refine_rl
    try:
        check_estimator(rl.estimator, rl.adv_norm)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    lp = torch.zeros(2, 3)
    try:
        policy_loss(
            lp,
            lp,
            lp,
            torch.tensor([1.0, -1.0]),
            torch.ones(2, 3),
            PolicyLossConfig(
                policy_loss=rl.policy_loss,
                loss_agg_mode=rl.loss_agg_mode,
                kl_type=rl.kl_type,
                kl_coef=rl.kl_coef,
                loss_scale_factor=cfg.rollout.max_new_tokens + 2,
            ),
        )
    except Exception as e:  # noqa: BLE001 - verl raises ValueError/NotImplementedError/TypeError by name
        raise ConfigError(
            f"refine_rl.policy_loss/kl_type: {rl.policy_loss!r} with kl_type {rl.kl_type!r} fails in verl "
            f"({type(e).__name__}: {str(e)[:160]}); vanilla, gspo, clip_cov, kl_cov, gpg are verl's "
            "common policy losses, low_var_kl, kl, abs, mse its KL estimators"
        ) from None
