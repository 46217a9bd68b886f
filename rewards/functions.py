"""Pure Refine-RL reward functions (no Ray, no model): anchor outcome reward, format, length.

The outcome reward follows METHOD.md (Embed-RL's form): with ``g`` a rewrite's gen embedding and
the candidates' frozen disc embeddings as anchors,
``r = acc@k · (cos(g, d+) − Σ_j softmax_τ(cos(g, d_j−)) · cos(g, d_j−))``: a rewrite earns reward
only if it already retrieves the positive in the top k, and then by its margin over the hard
negatives, weighted towards the hardest ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RewardConfig:
    """Every weight of the reward; defaults as in METHOD.md, inferred parts configurable."""

    top_k: int = 1
    neg_temperature: float = 0.05  # τ of the softmax over negatives
    format_weight: float = 0.1  # bonus for a well-formed `<rewrite>…</rewrite><gen_emb>`
    length_weight: float = 0.0  # 0 = no length penalty
    length_target: int = 24  # tokens; only the excess is penalised


def anchor_outcome_reward(
    g: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, top_k: int = 1, neg_temperature: float = 0.05
) -> dict[str, torch.Tensor]:
    """Per-rewrite outcome reward terms.

    g: [N, D] L2-normalised gen embeddings (N rewrites of one query); positive: [D] the positive's
    disc anchor; negatives: [M, D] the other candidates' disc anchors (M may be 0).
    Returns ``acc`` (positive in top-k), ``margin`` and ``reward`` = acc · margin, each [N].
    """
    if g.dim() != 2 or positive.dim() != 1 or g.shape[1] != positive.shape[0]:
        raise ValueError(f"anchor_outcome_reward: g {tuple(g.shape)} and positive {tuple(positive.shape)} do not match")
    pos = g @ positive  # [N]
    if negatives.numel() == 0:
        zero = torch.zeros_like(pos)
        return {"acc": torch.ones_like(pos), "margin": pos, "reward": pos, "pos_sim": pos, "neg_sim": zero}
    neg = g @ negatives.T  # [N, M]
    rank = 1 + (neg > pos.unsqueeze(1)).sum(dim=1)  # ties count for the rewrite
    acc = (rank <= top_k).to(g.dtype)
    weights = torch.softmax(neg / neg_temperature, dim=1)
    neg_term = (weights * neg).sum(dim=1)
    margin = pos - neg_term
    return {"acc": acc, "margin": margin, "reward": acc * margin, "pos_sim": pos, "neg_sim": neg_term}


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
    terms = anchor_outcome_reward(g, positive, negatives, cfg.top_k, cfg.neg_temperature)
    terms["outcome"] = terms.pop("reward")
    terms["format"] = format_reward(well_formed, cfg.format_weight)
    terms["length"] = length_penalty(num_tokens, cfg.length_weight, cfg.length_target)
    terms["reward"] = terms["outcome"] + terms["format"] + terms["length"]
    return terms
