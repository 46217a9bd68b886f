"""Metrics against hand-computed cases: ties, graded relevance, k larger than the candidate list."""

from __future__ import annotations

import math

import pytest

from rime_data.metrics import aggregate, query_metrics


def test_simple_ranking():
    m = query_metrics([0.1, 0.9, 0.5], [1, 0, 0])  # positive ranks 3rd
    assert m == {"hit@1": 0.0, "hit@5": 1.0, "ndcg@5": pytest.approx(1 / math.log2(4)), "mrr": pytest.approx(1 / 3)}


def test_ties_are_broken_against_the_positive():
    assert query_metrics([0.5, 0.5, 0.5], [1, 0, 0])["hit@1"] == 0.0  # collapsed model gets no credit
    m = query_metrics([0.5, 0.5, 0.2], [1, 0, 0])
    assert m["mrr"] == 0.5 and m["hit@1"] == 0.0


def test_graded_relevance_ndcg():
    # ranking: c(2) a(0) b(1)  -> DCG = 3/1 + 0 + 1/2 = 3.5 ; ideal: 3/1 + 1/log2(3)
    m = query_metrics([0.5, 0.1, 0.9], [0, 1, 2])
    ideal = 3 + 1 / math.log2(3)
    assert m["ndcg@5"] == pytest.approx(3.5 / ideal)
    assert m["hit@1"] == 1.0 and m["mrr"] == 1.0


def test_k_larger_than_candidates_and_single_candidate():
    assert query_metrics([0.3], [1]) == {"hit@1": 1.0, "hit@5": 1.0, "ndcg@5": 1.0, "mrr": 1.0}
    m = query_metrics([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3], [0, 0, 0, 0, 0, 1, 0])  # 6th of 7
    assert m["hit@5"] == 0.0 and m["ndcg@5"] == 0.0 and m["mrr"] == pytest.approx(1 / 6)


def test_bad_shapes_and_no_positive():
    with pytest.raises(ValueError, match="at least one relevant"):
        query_metrics([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="equal-length"):
        query_metrics([0.1], [1, 0])


def test_mmeb_averaging_is_per_task_then_over_tasks():
    rows = [("a", {"hit@1": 1, "hit@5": 1, "ndcg@5": 1, "mrr": 1})] * 3 + [
        ("b", {"hit@1": 0, "hit@5": 0, "ndcg@5": 0, "mrr": 0.25})
    ]
    out = aggregate(rows, {"a": "image", "b": "video"})
    assert out["tasks"]["a"]["hit@1"] == 1.0 and out["tasks"]["a"]["n"] == 3
    assert out["all"]["hit@1"] == 0.5  # not 0.75: tasks weigh equally, not queries
    assert out["groups"]["video"]["mrr"] == 0.25
