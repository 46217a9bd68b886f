"""Refine-RL's policy objective through verl: clipped surrogate (asymmetric clip) + KL to the reference.

verl's registry provides the surrogate variants (``vanilla`` = PPO/GRPO clip, ``gspo``, …) and the
KL estimators; this module only adapts rime's per-rewrite advantages and token masks to them, so
a verl user finds the same knobs (clip_ratio_low/high, loss_agg_mode, kl_loss_type) with the same
meaning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PolicyLossConfig:
    policy_loss: str = "vanilla"
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28
    loss_agg_mode: str = "token-mean"
    kl_coef: float = 0.04
    kl_type: str = "low_var_kl"
    pg_weight: float = 1.0  # 0 removes the policy gradient and keeps the KL term (refine_rl.pg_weight)
    # seq-mean-token-sum-norm (Dr.GRPO) divides by a CONSTANT horizon; verl falls back to the micro-batch's
    # longest response, which weights a sample by its neighbours' lengths. The stage sets the rewrite
    # budget (rollout.max_new_tokens + the forced end markers).
    loss_scale_factor: int | None = None


def _verl_actor_config(cfg: PolicyLossConfig):
    from verl.workers.config.actor import ActorConfig

    return ActorConfig(
        strategy="fsdp",
        clip_ratio=cfg.clip_ratio_low,
        clip_ratio_low=cfg.clip_ratio_low,
        clip_ratio_high=cfg.clip_ratio_high,
        loss_agg_mode=cfg.loss_agg_mode,
        ppo_mini_batch_size=1,
        ppo_micro_batch_size_per_gpu=1,
        rollout_n=1,
        loss_scale_factor=cfg.loss_scale_factor,
        global_batch_info={"loss_scale_factor": cfg.loss_scale_factor},
    )


def policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    ref_log_prob: torch.Tensor | None,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    cfg: PolicyLossConfig,
) -> tuple[torch.Tensor, dict]:
    """Loss and metrics for rewrites [N, T] with one advantage per rewrite [N] (broadcast over its tokens):
    ``pg_weight`` x the surrogate + ``kl_coef`` x KL (each term off at 0; ``actor/pg_loss`` is the unweighted
    surrogate)."""
    from verl.trainer.ppo.core_algos import agg_loss, get_policy_loss_fn, kl_penalty

    adv = advantages.unsqueeze(1).expand_as(log_prob) * response_mask
    pg, metrics = get_policy_loss_fn(cfg.policy_loss)(
        old_log_prob=old_log_prob,
        log_prob=log_prob,
        advantages=adv,
        response_mask=response_mask,
        loss_agg_mode=cfg.loss_agg_mode,
        config=_verl_actor_config(cfg),
    )
    metrics = {k: float(v) for k, v in metrics.items()}
    loss = pg if cfg.pg_weight == 1.0 else cfg.pg_weight * pg
    if ref_log_prob is not None and cfg.kl_coef > 0:
        kl = agg_loss(
            kl_penalty(log_prob, ref_log_prob, cfg.kl_type),
            response_mask,
            cfg.loss_agg_mode,
            loss_scale_factor=cfg.loss_scale_factor,
        )
        loss = loss + cfg.kl_coef * kl
        metrics["actor/kl"] = float(kl)
    metrics["actor/pg_loss"] = float(pg)
    return loss, metrics
