"""Group advantages through verl's estimator registry (grpo, rloo, reinforce_plus_plus, …).

rime's rewards are one scalar per rewrite; verl's estimators take token-level rewards with a
response mask. This adapter puts each scalar on the rewrite's last token, calls the registered
estimator by name, and returns one advantage per rewrite (outcome estimators broadcast it over
the response).
"""

from __future__ import annotations

import inspect

import numpy as np
import torch


def group_advantages(
    rewards: torch.Tensor, group_ids: list, response_lengths: list[int], estimator: str = "grpo", **kwargs
) -> torch.Tensor:
    """Per-rewrite advantages [N] from scalar rewards [N], rewrites of one query sharing a group id."""
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn

    n = rewards.shape[0]
    if len(group_ids) != n or len(response_lengths) != n:
        raise ValueError(f"group_advantages: {n} rewards, {len(group_ids)} group ids, {len(response_lengths)} lengths")
    width = max(1, max(response_lengths))
    mask = torch.zeros(n, width)
    token_rewards = torch.zeros(n, width)
    for i, length in enumerate(response_lengths):
        length = max(1, length)
        mask[i, :length] = 1.0
        token_rewards[i, length - 1] = rewards[i]
    try:
        fn = get_adv_estimator_fn(estimator)
    except (ValueError, KeyError) as e:
        raise ValueError(f"advantage estimator {estimator!r} is not registered in verl ({e})") from e
    if "config" in inspect.signature(fn).parameters and "config" not in kwargs:
        # estimators that read verl's AlgoConfig (reinforce_plus_plus: gamma; grpo_passk: std norm) get
        # its defaults with gamma = 1: one outcome reward per rewrite, nothing to discount
        from verl.trainer.config import AlgoConfig

        kwargs["config"] = AlgoConfig(gamma=1.0, lam=1.0)
    adv, _ = fn(token_level_rewards=token_rewards, response_mask=mask, index=np.asarray(group_ids, dtype=object), **kwargs)
    return adv[:, 0]


def check_estimator(estimator: str) -> None:
    """Run ``estimator`` on two hand-made groups, so a name verl lists but rime cannot feed (gae needs a
    critic, remax a greedy baseline) fails with the key named before any actor starts, not at step 0."""
    try:
        adv = group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.2]), [0, 0, 1, 1], [2, 3, 1, 2], estimator)
    except Exception as e:  # noqa: BLE001 - verl raises TypeError/AssertionError for inputs it needs
        raise ValueError(
            f"refine_rl.estimator: {estimator!r} cannot run on rime's one-reward-per-rewrite groups "
            f"({type(e).__name__}: {str(e)[:120]}); use grpo, rloo, opo, gpg, reinforce_plus_plus, "
            "reinforce_plus_plus_baseline, grpo_passk or gdpo"
        ) from e
    if not bool(torch.isfinite(adv).all()):
        raise ValueError(f"refine_rl.estimator: {estimator!r} gave non-finite advantages on a hand-made batch")
