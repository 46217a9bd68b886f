"""Losses of the CMA stage: bidirectional InfoNCE across learners, CE on rewrite tokens.

InfoNCE gathers the other learners' embeddings without gradient; the local slice is put back
with its graph, so each learner's gradient flows only through its own shard, and the
data-parallel gradient average reassembles the exact full-batch gradient (see ``info_nce``).
With Matryoshka prefix sizes (``cma.matryoshka_dims``) every InfoNCE term is also scored on the
re-normalised leading components, so truncated embeddings stay usable. Hard negatives
(``cma.hard_negatives``) are extra target rows, gathered the same way, that only the query->target
direction scores.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def gather_ids(ids: Sequence[int], device: torch.device | str | None = None) -> list[int]:
    """All-gather a list of ints of equal length per rank (candidate ids for duplicate masking). ``device``:
    the embeddings' (NCCL gathers CUDA tensors only)."""
    t = torch.tensor(list(ids), dtype=torch.long, device=device)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t.tolist()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts).tolist()


def _all_gather_uneven(x: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's rows of ``x`` (detached) when ranks hold different row counts: counts first, then rows
    padded to the largest count and trimmed back (``all_gather`` needs equal shapes)."""
    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    counts = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(counts, n)
    sizes = [int(c) for c in counts]
    most = max(sizes)
    if most == 0:  # every rank agrees: nothing to send
        return [x.detach()[:0] for _ in range(world)]
    padded = torch.cat([x.detach(), x.new_zeros((most - x.shape[0], *x.shape[1:]))]).contiguous()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return [p[:k] for p, k in zip(parts, sizes)]


def gather_uneven_with_local_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather rows of ``x`` whose count differs per rank (hard negatives: queries list fewer than the
    cap); the local rows keep their graph, as in ``gather_with_local_grad``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = _all_gather_uneven(x)
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def gather_uneven_ids(ids: Sequence[int], device: torch.device | str | None = None) -> list[int]:
    """All-gather a list of ints whose length differs per rank (the hard negatives' candidate ids)."""
    t = torch.tensor(list(ids), dtype=torch.long, device=device)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t.tolist()
    return torch.cat(_all_gather_uneven(t)).tolist()


def check_prefix_dims(dims: Sequence[int], size: int, key: str = "dims") -> tuple[int, ...]:
    """``dims`` as a tuple after checking each is a distinct prefix size in 1..size-1 (the full size is
    always scored, so listing it would only count it twice); ValueError names ``key`` and the range."""
    dims = tuple(int(d) for d in dims)
    bad = [d for d in dims if not 1 <= d < size]
    if bad or len(set(dims)) != len(dims):
        why = f"out of range: {bad}" if bad else "a size is listed twice"
        raise ValueError(
            f"{key}: {list(dims)}: {why}; give distinct prefix sizes in 1..{size - 1} "
            f"(below the embedding size {size}, which is always scored)"
        )
    return dims


def _nce_from_gathered(
    all_q: torch.Tensor,
    all_t: torch.Tensor,
    temperature: float,
    dup: torch.Tensor | None,
    neg: torch.Tensor | None = None,
    neg_dup: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bidirectional InfoNCE of already-gathered, L2-normalised rows (row i of each side is a pair). ``neg``:
    extra target rows appended as columns of the query->target logits only (a target is still scored
    against the batch's queries alone); ``neg_dup`` [queries, negatives] masks a negative that is the
    row's own target item."""
    labels = torch.arange(all_q.shape[0], device=all_q.device)
    logits = all_q @ all_t.T / temperature
    if dup is not None:
        logits = logits.masked_fill(dup, float("-inf"))
    q_logits = logits
    if neg is not None and neg.shape[0]:
        neg_logits = all_q @ neg.T / temperature
        if neg_dup is not None:
            neg_logits = neg_logits.masked_fill(neg_dup, float("-inf"))
        q_logits = torch.cat([logits, neg_logits], dim=1)
    return 0.5 * (F.cross_entropy(q_logits, labels) + F.cross_entropy(logits.T, labels))


def info_nce(
    q: torch.Tensor,
    t: torch.Tensor,
    temperature: float = 0.02,
    target_ids: Sequence[int] | None = None,
    gather: bool = True,
    dims: Sequence[int] = (),
    neg: torch.Tensor | None = None,
    neg_ids: Sequence[int] | None = None,
) -> torch.Tensor:
    """Bidirectional InfoNCE between paired rows of ``q`` and ``t`` (L2-normalised), in-batch negatives.

    Across W learners, every rank computes the loss of the WHOLE gathered batch; only its own rows
    carry gradient, so rank r's parameter gradient is the full-batch gradient's share from its rows.
    The full-batch gradient is the SUM of those shares, while data parallelism AVERAGES gradients
    over ranks, so the gradient (not the value) is scaled by W here: after the average it is exactly
    the full-batch gradient, whatever the number of learners, and its balance against per-rank means
    such as CE does not change when learners are added (OpenCLIP's scheme, without a gradient
    all-gather). ``target_ids`` (one per row) marks rows whose targets are the same item (two queries
    of one class label): they are not each other's negatives.

    ``dims`` (Matryoshka representation learning): prefix sizes below the full one. The loss is then
    the MEAN of the InfoNCE on the full vectors and on each re-normalised prefix ``x[:, :d]``, so the
    first d components alone already retrieve. A mean, not sentence-transformers' weighted sum: turning
    it on keeps the term's scale, hence its balance against CE and the other terms. The full vectors
    are gathered once and truncated after, so the collectives do not grow with the number of dims.

    ``neg`` (hard negatives, any number of rows per rank, ``neg_ids`` their candidate ids): extra target
    rows gathered from every rank like the in-batch targets, local rows with their graph, so the W-scaled
    gradient stays the full-batch one. They add columns to the query->target logits of EVERY query; the
    target->query direction is unchanged (a negative is no target of its own). A negative column is masked
    only for the queries whose own target has its id: a hard negative that is another row's positive stays
    a negative of every other query (and, as an in-batch target too, counts twice there, as duplicate
    in-batch targets do). Every rank must pass ``neg`` (possibly 0 rows) or none: it joins collectives.
    """
    if q.shape != t.shape:
        raise ValueError(f"info_nce: q {tuple(q.shape)} and t {tuple(t.shape)} must have the same shape")
    if neg is not None and (neg.dim() != 2 or neg.shape[1] != q.shape[-1]):
        raise ValueError(f"info_nce: neg {tuple(neg.shape)} must be [rows, {q.shape[-1]}] like q and t")
    if neg is not None and target_ids is not None and (neg_ids is None or len(neg_ids) != neg.shape[0]):
        raise ValueError(
            f"info_nce: neg_ids: give one candidate id per hard-negative row ({neg.shape[0]}) when target_ids is given"
        )
    dims = check_prefix_dims(dims, q.shape[-1]) if dims else ()
    all_q, _ = gather_with_local_grad(q) if gather else (q, 0)
    all_t, _ = gather_with_local_grad(t) if gather else (t, 0)
    all_neg = None if neg is None else gather_uneven_with_local_grad(neg) if gather else neg
    dup = neg_dup = None
    if target_ids is not None:
        ids = torch.tensor(gather_ids(target_ids, q.device) if gather else list(target_ids), device=q.device)
        dup = ids.unsqueeze(1) == ids.unsqueeze(0)
        dup.fill_diagonal_(False)
        if neg is not None:
            nids = gather_uneven_ids(neg_ids, q.device) if gather else list(neg_ids)  # type: ignore[arg-type]
            neg_dup = ids.unsqueeze(1) == torch.tensor(nids, dtype=torch.long, device=q.device).unsqueeze(0)
    losses = [_nce_from_gathered(all_q, all_t, temperature, dup, all_neg, neg_dup)]
    for d in dims:
        prefix_q, prefix_t = F.normalize(all_q[:, :d], dim=-1), F.normalize(all_t[:, :d], dim=-1)
        prefix_neg = None if all_neg is None else F.normalize(all_neg[:, :d], dim=-1)
        losses.append(_nce_from_gathered(prefix_q, prefix_t, temperature, dup, prefix_neg, neg_dup))
    loss = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
    world = dist.get_world_size() if gather and dist.is_available() and dist.is_initialized() else 1
    return loss * world - loss.detach() * (world - 1) if world > 1 else loss  # value unchanged, gradient x W


def labelled_tokens(labels: torch.Tensor) -> int:
    """The tokens ``completion_ce`` averages over (next-token labels not -100): GradCache weights each
    chunk's CE by its share of these, so the chunked loss equals the full batch's token mean."""
    return int((labels[:, 1:] != -100).sum())


def completion_ce(hidden: torch.Tensor, labels: torch.Tensor, lm_head: torch.nn.Module) -> torch.Tensor:
    """Next-token CE on labelled positions only (the lm head runs on those rows, not the full vocab grid)."""
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100
    if not bool(mask.any()):  # zero, but through the lm head: ranks must produce the same set of gradients
        return lm_head(hidden[:, :1]).float().sum() * 0.0
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
    dims: Sequence[int] = (),
    d_neg: torch.Tensor | None = None,
    g_neg: torch.Tensor | None = None,
    neg_ids: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """``CE + NCE(d_q,d_t) + NCE(g_q,g_t) + λ·[NCE(g_q,d_t) + NCE(d_q,g_t)]``; every term returned for logging.
    ``dims``: Matryoshka prefix sizes, each NCE term averaged over them and the full size (``info_nce``).
    ``d_neg``/``g_neg``: the hard negatives embedded as the targets are (disc, gen), each joining the terms
    whose target side is in that mode; ``neg_ids`` their candidate ids."""
    nce = dict(temperature=temperature, target_ids=target_ids, dims=dims, neg_ids=neg_ids)
    terms = {
        "ce": ce,
        "nce_disc": info_nce(d_q, d_t, neg=d_neg, **nce),
        "nce_gen": info_nce(g_q, g_t, neg=g_neg, **nce),
        "nce_gen_disc": info_nce(g_q, d_t, neg=d_neg, **nce),
        "nce_disc_gen": info_nce(d_q, g_t, neg=g_neg, **nce),
    }
    terms["loss"] = (
        ce_weight * ce + terms["nce_disc"] + terms["nce_gen"] + lambda_cma * (terms["nce_gen_disc"] + terms["nce_disc_gen"])
    )
    return terms


def plume_loss(
    g_q: torch.Tensor,
    g_t: torch.Tensor,
    c_q: torch.Tensor,
    c_t: torch.Tensor,
    ce: torch.Tensor,
    balance: torch.Tensor | None,
    temperature: float = 0.02,
    ce_weight: float = 1.0,
    disc_weight: float = 1.0,
    lambda_bal: float = 0.1,
    target_ids: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """PLUME's ``CE(remaining text) + NCE(g_q,g_t) + NCE(c_q,c_t) + λ_bal·L_bal``: gen embeddings after
    the latent steps and the disc anchors ``c = h(<disc_emb>)`` of the same prefix pass."""
    terms = {
        "ce": ce,
        "nce_gen": info_nce(g_q, g_t, temperature, target_ids),
        "nce_disc": info_nce(c_q, c_t, temperature, target_ids),
        "balance": balance if balance is not None else ce.new_zeros(()),
    }
    terms["loss"] = ce_weight * ce + terms["nce_gen"] + disc_weight * terms["nce_disc"] + lambda_bal * terms["balance"]
    return terms
