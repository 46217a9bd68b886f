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

from rime_model.choices import ADV_NORMS


def group_advantages(
    rewards: torch.Tensor,
    group_ids: list,
    response_lengths: list[int],
    estimator: str = "grpo",
    adv_norm: str = "group",
    tasks: list[str] | None = None,
    **kwargs,
) -> torch.Tensor:
    """Per-rewrite advantages [N] from scalar rewards [N], rewrites of one query sharing a group id.

    ``adv_norm`` (GRPO): ``group`` divides each group's centred rewards by the group's std (GRPO);
    ``none`` only centres them (Dr. GRPO, verl's ``norm_adv_by_std_in_grpo: false``), so a group whose
    rewrites barely differ gets a small signal rather than one blown up to unit scale; ``task`` centres
    per group, then divides by the std of the centred rewards over the batch's rewrites of the same task
    (``tasks``, one per rewrite), so tasks whose rewards live on different scales weigh alike."""
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn

    if adv_norm not in ADV_NORMS:
        raise ValueError(f"refine_rl.adv_norm: {adv_norm!r}; use one of {', '.join(ADV_NORMS)}")
    if adv_norm != "group":
        if estimator != "grpo":
            raise ValueError(
                f"refine_rl.adv_norm: {adv_norm!r} applies to the grpo estimator, not {estimator!r}; "
                "set refine_rl.estimator: grpo or refine_rl.adv_norm: group"
            )
        kwargs["norm_adv_by_std_in_grpo"] = False
    if adv_norm == "task" and (tasks is None or len(tasks) != rewards.shape[0]):
        raise ValueError("group_advantages: adv_norm 'task' needs one task per rewrite")

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
    adv = adv[:, 0]
    if adv_norm == "task":
        adv = adv.clone()
        for task in set(tasks):
            rows = torch.tensor([i for i, t in enumerate(tasks) if t == task])
            adv[rows] = adv[rows] / (adv[rows].std(unbiased=False) + 1e-6)
    return adv


def check_estimator(estimator: str, adv_norm: str = "group") -> None:
    """Run ``estimator`` on two hand-made groups, so a name verl lists but rime cannot feed (gae needs a
    critic, remax a greedy baseline) fails with the key named before any actor starts, not at step 0."""
    if adv_norm != "group":  # its own refusal (the estimator's name and the fix), not the one below
        group_advantages(torch.tensor([1.0, 0.0]), [0, 0], [1, 1], estimator, adv_norm, ["t", "t"])
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
