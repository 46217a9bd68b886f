"""Losses of the CMA stage: bidirectional InfoNCE across learners, CE on rewrite tokens.

InfoNCE gathers the other learners' embeddings as extra negatives without gradient; the local
slice is put back with its graph, so each learner's gradient flows only through its own shard
and the usual data-parallel gradient averaging completes the picture (as in CLIP/VLM2Vec).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_with_local_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All-gather rows of ``x`` from every rank; returns (gathered, offset of the local rows)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    return torch.cat(parts), rank * x.shape[0]


def gather_ids(ids: Sequence[int]) -> list[int]:
    """All-gather a list of ints of equal length per rank (candidate ids for duplicate masking)."""
    t = torch.tensor(list(ids), dtype=torch.long)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t.tolist()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts).tolist()


def info_nce(
    q: torch.Tensor,
    t: torch.Tensor,
    temperature: float = 0.02,
    target_ids: Sequence[int] | None = None,
    gather: bool = True,
) -> torch.Tensor:
    """Bidirectional InfoNCE between paired rows of ``q`` and ``t`` (L2-normalised), in-batch negatives.

    ``target_ids`` (one per row) marks rows whose targets are the same item (e.g. two queries of
    one class label): such pairs are not used as negatives of each other.
    """
    if q.shape != t.shape:
        raise ValueError(f"info_nce: q {tuple(q.shape)} and t {tuple(t.shape)} must have the same shape")
    all_q, off = gather_with_local_grad(q) if gather else (q, 0)
    all_t, _ = gather_with_local_grad(t) if gather else (t, 0)
    n = q.shape[0]
    rows = torch.arange(n, device=q.device) + off
    logits_qt = q @ all_t.T / temperature  # local queries vs every target
    logits_tq = t @ all_q.T / temperature  # local targets vs every query
    if target_ids is not None:
        ids = torch.tensor(gather_ids(target_ids) if gather else list(target_ids), device=q.device)
        dup = ids[rows].unsqueeze(1) == ids.unsqueeze(0)
        dup[torch.arange(n), rows] = False
        logits_qt = logits_qt.masked_fill(dup, float("-inf"))
        logits_tq = logits_tq.masked_fill(dup, float("-inf"))
    return 0.5 * (F.cross_entropy(logits_qt, rows) + F.cross_entropy(logits_tq, rows))


def completion_ce(hidden: torch.Tensor, labels: torch.Tensor, lm_head: torch.nn.Module) -> torch.Tensor:
    """Next-token CE on labelled positions only (the lm head runs on those rows, not the full vocab grid)."""
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100
    if not bool(mask.any()):
        return hidden.sum() * 0.0
    logits = lm_head(hidden[:, :-1][mask])
    return F.cross_entropy(logits.float(), shift_labels[mask])


def cma_loss(
    d_q: torch.Tensor,
    d_t: torch.Tensor,
    g_q: torch.Tensor,
    g_t: torch.Tensor,
    ce: torch.Tensor,
    lambda_cma: float = 1.0,
    temperature: float = 0.02,
    ce_weight: float = 1.0,
    target_ids: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """``CE + NCE(d_q,d_t) + NCE(g_q,g_t) + λ·[NCE(g_q,d_t) + NCE(d_q,g_t)]``; every term returned for logging."""
    terms = {
        "ce": ce,
        "nce_disc": info_nce(d_q, d_t, temperature, target_ids),
        "nce_gen": info_nce(g_q, g_t, temperature, target_ids),
        "nce_gen_disc": info_nce(g_q, d_t, temperature, target_ids),
        "nce_disc_gen": info_nce(d_q, g_t, temperature, target_ids),
    }
    terms["loss"] = (
        ce_weight * ce + terms["nce_disc"] + terms["nce_gen"] + lambda_cma * (terms["nce_gen_disc"] + terms["nce_disc_gen"])
    )
    return terms
