"""Retrieval metrics of the MMEB-V2 protocol: Hit@k, NDCG@k (graded), MRR; per task, then averaged.

Ties are broken *against* the relevant candidates (a relevant item tied with an irrelevant one
ranks after it). That keeps every metric deterministic and stops a collapsed model (all scores
equal) from scoring well by luck of candidate order.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

METRICS = ("hit@1", "hit@5", "ndcg@5", "mrr")


def pessimistic_order(scores: np.ndarray, relevance: np.ndarray) -> np.ndarray:
    """Candidate indices by descending score; within equal scores, less relevant first."""
    return np.lexsort((relevance, -scores))


def query_metrics(scores: Sequence[float], relevance: Sequence[float]) -> dict[str, float]:
    """Metrics of one query given its candidates' scores and graded relevance (0 = irrelevant)."""
    s = np.asarray(scores, dtype=np.float64)
    rel = np.asarray(relevance, dtype=np.float64)
    if s.shape != rel.shape or s.ndim != 1 or len(s) == 0:
        raise ValueError(f"scores and relevance must be equal-length non-empty vectors, got {s.shape} and {rel.shape}")
    if not (rel > 0).any():
        raise ValueError("relevance: a query needs at least one relevant candidate (grade > 0)")
    order = pessimistic_order(s, rel)
    ranked = rel[order]
    first = int(np.argmax(ranked > 0))  # 0-based rank of the first relevant candidate
    return {
        "hit@1": float(first < 1),
        "hit@5": float(first < 5),
        "ndcg@5": ndcg_at_k(ranked, np.sort(rel)[::-1], 5),
        "mrr": 1.0 / (first + 1),
    }


def ndcg_at_k(ranked_rel: np.ndarray, ideal_rel: np.ndarray, k: int) -> float:
    """DCG with gain (2^rel - 1) and log2 discount, normalised by the ideal order; k may exceed the list."""

    def dcg(r: np.ndarray) -> float:
        r = r[:k]
        return float(np.sum((np.power(2.0, r) - 1.0) / np.log2(np.arange(2, len(r) + 2))))

    ideal = dcg(ideal_rel)
    return dcg(ranked_rel) / ideal if ideal > 0 else 0.0


@dataclass
class TaskScores:
    """Per-query metric rows of one task, averaged on demand."""

    rows: list[dict[str, float]]

    def mean(self) -> dict[str, float]:
        return {m: float(np.mean([r[m] for r in self.rows])) for m in METRICS}


def aggregate(per_query: Iterable[tuple[str, dict[str, float]]], task_groups: Mapping[str, str] | None = None) -> dict:
    """MMEB averaging: mean per task, then the unweighted mean over tasks (per group and overall).

    ``task_groups`` maps task -> group (e.g. "image", "video", "visdoc"); groups are averaged over
    their tasks, and "all" over every task.
    """
    by_task: dict[str, list[dict[str, float]]] = defaultdict(list)
    for task, m in per_query:
        by_task[task].append(m)
    tasks = {t: TaskScores(rows).mean() | {"n": len(rows)} for t, rows in sorted(by_task.items())}
    groups: dict[str, list[str]] = defaultdict(list)
    for t in tasks:
        groups[(task_groups or {}).get(t, "all")].append(t)
    out = {"tasks": tasks, "groups": {}}
    for g, ts in sorted(groups.items()):
        out["groups"][g] = {m: float(np.mean([tasks[t][m] for t in ts])) for m in METRICS}
    out["all"] = {m: float(np.mean([tasks[t][m] for t in tasks])) if tasks else math.nan for m in METRICS}
    return out
