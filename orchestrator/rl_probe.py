"""Refine-RL's probe: the reward of a fixed query set, so the training signal can be seen to move.

A step's reward comes from the few queries that step sampled, from whichever tasks, so its curve is
noise. Every ``refine_rl.probe_every`` steps (and before the first) the rollout workers sample G
rewrites for a fixed, seeded set of training queries (``probe_queries_per_task`` per task) with the
current weights and a fixed sampling seed, and the reward actors score them exactly as in training; one
greedy rewrite per query is scored too (its ``acc`` is Hit@``reward.top_k`` against the query's
candidates). Same actors and code path as a training step; only the queries and the seed are fixed.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import TYPE_CHECKING

import pandas as pd
import pyarrow.dataset as ds

from rime_data.pipeline import ERROR_COL, validate_and_normalise

from .pairs import PairStream, negatives, to_pair

if TYPE_CHECKING:
    from actors.batches import Pair, RewardResult

    from .refine_rl import RefineRL

PROBE_SAMPLING_SEED = 7_000_003  # the same every probe: what changes between probes is the weights


def probe_pairs(stream: PairStream, per_task: int, seed: int) -> list[Pair]:
    """``per_task`` usable training queries of each task, in an order seeded by ``seed`` alone: the same data
    and seed give the same set, at every probe and after a resume. Rows the stream would refuse are
    passed over (the stream counts and logs them)."""
    table = ds.dataset([str(p) for p in stream.q_paths], format="parquet")
    tasks = table.to_table(columns=["task"]).column("task").to_pylist()
    order = list(range(len(tasks)))
    random.Random(f"rl-probe:{seed}").shuffle(order)
    chosen: dict[str, list[Pair]] = defaultdict(list)
    all_tasks = set(tasks)
    for start in range(0, len(order), 64):
        if all(len(chosen[t]) >= per_task for t in all_tasks):
            break
        idx = [i for i in order[start : start + 64] if len(chosen[tasks[i]]) < per_task]
        if not idx:
            continue
        raw = table.take(idx).to_pylist()
        checked = validate_and_normalise(pd.DataFrame(raw), stream.pipeline)
        images = [c for c in stream.pipeline.image_columns if c in checked.columns]
        for k, q in enumerate(raw):
            # the pyarrow row itself (pandas turns None into NaN), with the checked image and the verdict
            if isinstance(checked[ERROR_COL].iloc[k], str) or len(chosen[q["task"]]) >= per_task:
                continue
            q = {**q, **{c: checked[c].iloc[k] for c in images if q.get(c) is not None}}
            cand = stream.cands.get(q["positive_ids"][0])
            if cand is None:
                continue
            negs = negatives(q, stream.cands, stream.target_ids, 0)
            if isinstance(negs, str):
                continue
            chosen[q["task"]].append(to_pair(q, cand, stream.target_ids[cand["cand_id"]], negs))
    return [p for t in sorted(chosen) for p in chosen[t]]


def _summary(prefix: str, pairs: list[Pair], results: list[RewardResult], n: int) -> dict[str, float]:
    """Mean reward and acc, and the share of groups whose n rewards are all equal, overall and per task."""
    out: dict[str, float] = {}
    by_task: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(pairs):
        by_task[p.task].append(i)
    for task, rows in [("", list(range(len(pairs)))), *sorted(by_task.items())]:
        key = f"{prefix}/{task + '/' if task else ''}"
        rewards = [r for i in rows for r in results[i].terms["reward"]]
        accs = [a for i in rows for a in results[i].terms["acc"]]
        out[f"{key}reward_mean"] = sum(rewards) / len(rewards)
        out[f"{key}acc"] = sum(accs) / len(accs)
        if n > 1:
            flat = [max(results[i].terms["reward"]) - min(results[i].terms["reward"]) < 1e-6 for i in rows]
            out[f"{key}zero_variance_groups"] = sum(flat) / len(flat)
    return out


class RLProbe:
    """The probe of one refine-rl stage, on that stage's rollout workers and reward actors."""

    def __init__(self, rl: RefineRL, pairs: list[Pair]):
        if not pairs:
            raise ValueError("refine_rl.probe_queries_per_task: no usable training query to probe; set it to 0")
        self.rl, self.pairs = rl, pairs

    def run(self) -> dict[str, float]:
        """``probe/*`` (G sampled rewrites per query, as training samples them) and ``probe_greedy/*`` (one
        greedy rewrite per query) for the current weights."""
        sampled = self.rl.sampling(PROBE_SAMPLING_SEED)
        out: dict[str, float] = {}
        for prefix, n, sampling in (
            ("probe", self.rl.cfg.rollout.group_size, sampled),
            ("probe_greedy", 1, {**sampled, "temperature": 0.0}),
        ):
            rollouts = self.rl.generate(self.pairs, n, sampling)
            results = self.rl.score(self.pairs, rollouts, n)
            out.update(_summary(prefix, self.pairs, results, n))
        out["probe/queries"] = float(len(self.pairs))
        return out
