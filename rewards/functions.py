"""Pure Refine-RL reward functions (no Ray, no model): anchor outcome reward, format, length.

The outcome reward follows METHOD.md (Embed-RL's form): with ``g`` a rewrite's gen embedding and
the candidates' frozen disc embeddings as anchors,
``r = acc@k · (cos(g, d+) − Σ_j softmax_τ(cos(g, d_j−)) · cos(g, d_j−))``: a rewrite earns reward
only if it already retrieves the positive in the top k, and then by its margin over the hard
negatives, weighted towards the hardest ones (``outcome="gated_margin"``).

Gated, a group whose G rewrites all miss the top k gets the same outcome (0) for each: no advantage,
no gradient. Two denser outcomes separate such rewrites: ``margin`` (the margin without the gate: a
near miss earns more than a far one) and ``rank`` (``1 / rank`` of the positive among all candidates,
MRR's per-query term: bounded in (0, 1], blind to how far apart the scores are).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rime_model.choices import REWARD_OUTCOMES as OUTCOMES


@dataclass(frozen=True)
class RewardConfig:
    """Every weight of the reward; defaults as in METHOD.md, inferred parts configurable."""

    top_k: int = 1
    neg_temperature: float = 0.05  # τ of the softmax over negatives
    format_weight: float = 0.1  # bonus for a well-formed `<rewrite>…</rewrite><gen_emb>`
    length_weight: float = 0.0  # 0 = no length penalty
    length_target: int = 24  # tokens; only the excess is penalised
    outcome: str = "gated_margin"  # gated_margin (METHOD.md) | margin | rank: see the module docstring


def anchor_outcome_reward(
    g: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    top_k: int = 1,
    neg_temperature: float = 0.05,
    outcome: str = "gated_margin",
) -> dict[str, torch.Tensor]:
    """Per-rewrite outcome reward terms.

    g: [N, D] L2-normalised gen embeddings (N rewrites of one query); positive: [D] the positive's
    disc anchor; negatives: [M, D] the other candidates' disc anchors (M may be 0).
    Returns ``acc`` (positive in top-k), ``margin``, ``rank`` (of the positive, 1 = first) and ``reward``
    (acc · margin, the margin, or 1 / rank, by ``outcome``), each [N].
    """
    if outcome not in OUTCOMES:
        raise ValueError(f"reward.outcome: {outcome!r} is not one of {', '.join(OUTCOMES)}")
    if g.dim() != 2 or positive.dim() != 1 or g.shape[1] != positive.shape[0]:
        raise ValueError(f"anchor_outcome_reward: g {tuple(g.shape)} and positive {tuple(positive.shape)} do not match")
    pos = g @ positive  # [N]
    if negatives.numel() == 0:
        zero, one = torch.zeros_like(pos), torch.ones_like(pos)
        reward = one if outcome == "rank" else pos
        return {"acc": one, "margin": pos, "rank": one, "reward": reward, "pos_sim": pos, "neg_sim": zero}
    neg = g @ negatives.T  # [N, M]
    rank = 1 + (neg > pos.unsqueeze(1)).sum(dim=1)  # ties count for the rewrite
    acc = (rank <= top_k).to(g.dtype)
    weights = torch.softmax(neg / neg_temperature, dim=1)
    neg_term = (weights * neg).sum(dim=1)
    margin = pos - neg_term
    rank_f = rank.to(g.dtype)
    reward = {"gated_margin": acc * margin, "margin": margin, "rank": 1.0 / rank_f}[outcome]
    return {"acc": acc, "margin": margin, "rank": rank_f, "reward": reward, "pos_sim": pos, "neg_sim": neg_term}


def format_reward(well_formed: torch.Tensor, weight: float) -> torch.Tensor:
    """``weight`` for a rewrite closed by ``</rewrite><gen_emb>``, 0 otherwise."""
    return well_formed.to(torch.float32) * weight


def length_penalty(num_tokens: torch.Tensor, weight: float, target: int) -> torch.Tensor:
    """``-weight`` × relative excess over ``target`` tokens (METHOD.md: RIME reports shorter rewrites)."""
    if weight == 0.0:
        return torch.zeros_like(num_tokens, dtype=torch.float32)
    excess = (num_tokens.to(torch.float32) - target).clamp(min=0) / max(target, 1)
    return -weight * excess


def total_reward(
    g: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    well_formed: torch.Tensor,
    num_tokens: torch.Tensor,
    cfg: RewardConfig,
) -> dict[str, torch.Tensor]:
    """All terms plus ``reward`` = outcome + format + length, per rewrite."""
    terms = anchor_outcome_reward(g, positive, negatives, cfg.top_k, cfg.neg_temperature, cfg.outcome)
    terms["outcome"] = terms.pop("reward")
    terms["format"] = format_reward(well_formed, cfg.format_weight)
    terms["length"] = length_penalty(num_tokens, cfg.length_weight, cfg.length_target)
    terms["reward"] = terms["outcome"] + terms["format"] + terms["length"]
    return terms
