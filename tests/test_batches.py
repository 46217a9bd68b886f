"""The typed step data of Refine-RL and the pure parts of one RL step, without Ray or a model."""

from __future__ import annotations

import pytest
import torch

from actors.batches import Pair, RewardResult, RolloutBatch, ScoredBatch, chunk_bounds, shard
from orchestrator.refine_rl import reward_requests, reward_terms, step_metrics


def _rollouts(n_queries: int, group: int, offset: int = 0, version: int = 3) -> RolloutBatch:
    rows = [(q, s) for q in range(n_queries) for s in range(group)]
    return RolloutBatch(
        query_index=[q for q, _ in rows][::-1],
        sample_index=[s for _, s in rows][::-1],
        token_ids=[[100 * (q + offset) + s] * (s + 1) for q, s in rows][::-1],
        logprobs=[[-0.5] * (s + 1) for _, s in rows][::-1],
        text=[f"q{q + offset}s{s}" for q, s in rows][::-1],
        well_formed=[s % 2 == 0 for _, s in rows][::-1],
        version=[version] * len(rows),
        time_s=1.5 + offset,
        tokens=sum(s + 1 for _, s in rows),
    )


def _query(i: int) -> Pair:
    return Pair(
        q={"text": f"query {i}"},
        t={"text": f"c{i}"},
        q_rewrite="",
        t_rewrite="",
        q_reasoning=[],
        target_id=i,
        query_id=f"q{i}",
        task="t2i",
        positive_ids=[f"c{i}"],
        cand_ids=None,
    )


def test_chunk_bounds_cover_every_item_once_in_order():
    for n, parts in [(7, 3), (2, 4), (8, 2), (0, 3)]:
        b = chunk_bounds(n, parts)
        assert [i for a, e in b for i in range(a, e)] == list(range(n))
        assert len(b) == min(n, parts)


def test_concat_shifts_query_indices_and_orders_by_query_then_sample():
    parts = [_rollouts(2, 3), _rollouts(1, 3, offset=2)]
    out = RolloutBatch.concat(parts, [0, 2])
    assert out.query_index == [0, 0, 0, 1, 1, 1, 2, 2, 2] and out.sample_index == [0, 1, 2] * 3
    assert out.text == [f"q{q}s{s}" for q in range(3) for s in range(3)]  # rows travelled with their index
    assert out.time_s == 3.5 and out.tokens == parts[0].tokens + parts[1].tokens  # slowest worker, all tokens
    assert out.lengths == [1, 2, 3] * 3


def test_shard_is_rank_major_then_accumulation_step_and_equal_sized():
    rows = list(range(10))
    assert shard(rows, 2, 2) == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]  # the remainder (8, 9) is left out
    batch = ScoredBatch([{}] * 8, [[i] for i in range(8)], [[0.0]] * 8, list(map(float, range(8))), [[0.0]] * 8, list(range(8)))
    parts = shard(batch, 2, 2)
    assert [[mb.target_id for mb in rank] for rank in parts] == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
    assert all(isinstance(mb, ScoredBatch) and len(mb) == 2 for rank in parts for mb in rank)


def test_one_rl_step_from_rollouts_to_the_learners_batch():
    """Requests group each query's G rewrites; terms, advantages, anchors and targets line up row by row."""
    G, queries = 3, [_query(i) for i in range(2)]
    rollouts = RolloutBatch.concat([_rollouts(2, G)], [0])
    requests = reward_requests(queries, rollouts, G)
    assert [r.query_id for r in requests] == ["q0", "q1"]
    assert requests[1].completions == rollouts.token_ids[3:6] and requests[1].well_formed == [True, False, True]
    results = [
        RewardResult({"reward": [0.1, 0.2, 0.3], "acc": [1.0, 0.0, 1.0]}, [1.0, 0.0]),
        RewardResult({"reward": [0.5, 0.5, 0.5], "acc": [0.0, 0.0, 0.0]}, [0.0, 1.0]),
    ]
    terms = reward_terms(results)
    assert terms["reward"].tolist() == pytest.approx([0.1, 0.2, 0.3, 0.5, 0.5, 0.5])
    adv = torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    batch = ScoredBatch.build(queries, rollouts, results, adv.tolist())
    assert batch.anchor == [[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3 and batch.target_id == [0, 0, 0, 1, 1, 1]
    assert batch.query[4] == {"text": "query 1"} and batch.advantage[2] == 1.0
    shuffled = batch.shuffled(seed=7)
    assert sorted(zip(shuffled.target_id, shuffled.advantage)) == sorted(zip(batch.target_id, batch.advantage))
    assert shuffled.target_id != batch.target_id or shuffled.advantage != batch.advantage  # seed 7 moves rows
    m = step_metrics(terms, rollouts, adv, n_queries=2, version=4)
    assert m["reward/zero_variance_groups"] == 0.5  # query 1's rewards are all equal
    assert m["rollout/staleness_mean"] == 0.0  # sampled with v3, trained into v4
    assert m["rollout/well_formed_frac"] == pytest.approx(4 / 6) and m["reward/acc_mean"] == pytest.approx(1 / 3)
    assert m["rollout/tokens_per_s"] == pytest.approx(rollouts.tokens / 1.5)
