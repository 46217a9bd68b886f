"""One Refine-RL step (GRPO over rewrites), driven verl-style from the driver.

A batch of queries from Ray Data → rollout workers sample G rewrites each (``RolloutBatch``: exact token
ids + behaviour log-probs) → the frozen anchor reward service scores them (``RewardRequest`` →
``RewardResult``) → verl's estimator turns rewards into group advantages → the DeepSpeed learners take
one update on a ``ScoredBatch`` (clipped surrogate + KL to the reference + λ·InfoNCE to the anchors) →
the weight-sync strategy (``orchestrator.sync``) sends learner rank 0's weights to the rollout workers
under a new version. With ``max_staleness: 1`` the next batch's rollouts are issued before the update, so
generation overlaps learning (one-step-stale, corrected by the clipped importance ratio against the
behaviour log-probs).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from actors.batches import Pair, RewardRequest, RewardResult, RolloutBatch, ScoredBatch, chunk_bounds, shard
from rewards.advantages import group_advantages

from .config import Config
from .pairs import PairStream, StreamPosition
from .rl_actors import RLActors
from .sync import WeightSync, make_weight_sync


@dataclass
class Pending:
    """Rollouts in flight for one batch of queries, and the stream position before that batch."""

    queries: list[Pair]
    refs: list[Any]
    chunks: list[tuple[int, int]]
    pos_before: StreamPosition
    version: int
    calls: list[tuple]  # per worker: the generate() args, to re-issue one


def stage_config(cfg: Config) -> dict:
    """What the learners need for the refine-rl loss."""
    rl = cfg.refine_rl
    return {
        "policy": {
            "policy_loss": rl.policy_loss,
            "clip_ratio_low": rl.clip_ratio_low,
            "clip_ratio_high": rl.clip_ratio_high,
            "loss_agg_mode": rl.loss_agg_mode,
            "kl_coef": rl.kl_coef,
            "kl_type": rl.kl_type,
            "pg_weight": rl.pg_weight,
            "loss_scale_factor": cfg.rollout.max_new_tokens + 2,
        },  # + the forced </rewrite><gen_emb>
        "lambda_nce": rl.lambda_nce,
        "nce_temperature": rl.nce_temperature,
    }


def reward_requests(queries: list[Pair], rollouts: RolloutBatch, group: int) -> list[RewardRequest]:
    """One request per query: its G rewrites (rows q*G .. q*G+G-1 of the step's ordered rollouts)."""
    return [
        RewardRequest(
            q.q,
            rollouts.token_ids[i * group : (i + 1) * group],
            rollouts.well_formed[i * group : (i + 1) * group],
            q.positive_ids,
            q.cand_ids,
            q.task,
            q.query_id,
        )
        for i, q in enumerate(queries)
    ]


def reward_terms(results: list[RewardResult]) -> dict[str, torch.Tensor]:
    """Each reward term over every rewrite of the step, in rollout order."""
    return {k: torch.tensor([v for r in results for v in r.terms[k]]) for k in results[0].terms}


def step_metrics(
    terms: dict[str, torch.Tensor], rollouts: RolloutBatch, adv: torch.Tensor, n_queries: int, version: int
) -> dict[str, float]:
    """The step's reward/rollout/advantage metrics (MLflow ``reward/*``, ``rollout/*``, ``advantage/*``)."""
    rewards = terms["reward"]
    grouped = rewards.view(n_queries, -1)
    m = {f"reward/{k}_mean": float(v.float().mean()) for k, v in terms.items()}
    m.update(
        {
            "reward/std": float(rewards.std()),
            "reward/group_std_mean": float(grouped.std(dim=1).mean()),
            "reward/zero_variance_groups": float((grouped.std(dim=1) < 1e-6).float().mean()),
            "rollout/rewrite_tokens_mean": float(np.mean(rollouts.lengths)),
            "rollout/well_formed_frac": float(np.mean(rollouts.well_formed)),
            "rollout/tokens_per_s": rollouts.tokens / max(rollouts.time_s, 1e-9),
            "rollout/staleness_mean": float(np.mean([version - 1 - v for v in rollouts.version])),
            "advantage/abs_mean": float(adv.abs().mean()),
        }
    )
    return m


class RefineRL:
    """Owns the rollout/reward actors and the weight-sync strategy of one refine-rl stage."""

    def __init__(self, cfg: Config, group, stream: PairStream, start_model: str, reserve_cpus: float):
        self.cfg, self.group, self.stream = cfg, group, stream
        self.actors = RLActors(cfg, start_model, list(stream.cands.values()), reserve_cpus=reserve_cpus)
        self.sync: WeightSync = make_weight_sync(cfg.rollout.weight_sync, cfg, group, self.actors.rollout, self.actors.reward)
        self.pending: Pending | None = None
        self.on_rollouts_submitted: Callable[[RefineRL, Pending], None] | None = None  # test/monitoring hook

    @property
    def version(self) -> int:
        return self.sync.version

    def sync_weights(self, version: int) -> dict[str, float]:
        """Learner rank 0 → every rollout worker (and a policy-side reward encoder), by the configured strategy."""
        return self.sync.push(version)

    # ------------------------------------------------------------------ rollouts
    def sampling(self, seed: int) -> dict:
        """The rollout config's sampling settings with ``seed`` (worker w of a call samples with seed + w)."""
        ro = self.cfg.rollout
        return {
            "max_new_tokens": ro.max_new_tokens,
            "temperature": ro.temperature,
            "top_p": ro.top_p,
            "top_k": ro.top_k,
            "seed": seed,
        }

    def _dispatch(self, queries: list[Pair], n: int, sampling: dict, pos_before: StreamPosition) -> Pending:
        """``n`` rewrites of each query, in contiguous chunks over the rollout workers (worker w: seed + w)."""
        chunks = chunk_bounds(len(queries), len(self.actors.rollout))
        calls = [
            ([q.q for q in queries[a:b]], n, {**sampling, "seed": (sampling["seed"] + w) % (2**31)})
            for w, (a, b) in enumerate(chunks)
        ]
        refs = [self.actors.rollout[w].generate.remote(*args, self.sync.token()) for w, args in enumerate(calls)]
        return Pending(queries, refs, chunks, pos_before, self.version, calls)

    def _submit(self, step: int) -> Pending:
        pos_before = StreamPosition(**asdict(self.stream.pos))
        queries = self.stream.next_batch(self.cfg.refine_rl.queries_per_step)
        seed = self.cfg.run.seed * 1_000_003 + step * 101
        pending = self._dispatch(queries, self.cfg.rollout.group_size, self.sampling(seed), pos_before)
        if self.on_rollouts_submitted is not None:
            self.on_rollouts_submitted(self, pending)
        return pending

    def _collect(self, pending: Pending) -> RolloutBatch:
        """The step's rollouts, ordered by (query, sample); a call the sync strategy can repair (a worker
        restarted under collective sync holds stale weights) is repaired and re-issued."""
        import ray

        outs = []
        for w, ref in enumerate(pending.refs):
            try:
                outs.append(ray.get(ref))
            except ray.exceptions.RayTaskError as e:
                if not self.sync.recover(e):
                    raise
                outs.append(ray.get(self.actors.rollout[w].generate.remote(*pending.calls[w], self.sync.token())))
        return RolloutBatch.concat(outs, [a for a, _ in pending.chunks])

    def generate(self, queries: list[Pair], n: int, sampling: dict) -> RolloutBatch:
        """``n`` rewrites of each query with the current weights, outside the training stream (the probe): the
        same workers, chunking and repair as a step's rollouts."""
        return self._collect(self._dispatch(queries, n, sampling, StreamPosition(**asdict(self.stream.pos))))

    def score(self, queries: list[Pair], rollouts: RolloutBatch, group: int | None = None) -> list[RewardResult]:
        """One request per query (its ``group`` rewrites, default rollout.group_size), spread over the reward
        actors in contiguous chunks."""
        import ray

        requests = reward_requests(queries, rollouts, group or self.cfg.rollout.group_size)
        chunks = chunk_bounds(len(requests), len(self.actors.reward))
        scored = ray.get([self.actors.reward[i].score.remote(requests[a:b]) for i, (a, b) in enumerate(chunks)])
        return [r for part in scored for r in part]

    @property
    def trained_position(self) -> StreamPosition:
        """Where a resume must restart the stream: before any batch fetched but not yet trained on."""
        return self.pending.pos_before if self.pending is not None else self.stream.pos

    # ------------------------------------------------------------------ one step
    def step(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        pending = self.pending or self._submit(step)
        self.pending = None
        rollouts = self._collect(pending)
        t_roll = time.perf_counter() - t0
        if cfg.refine_rl.max_staleness >= 1:
            self.pending = self._submit(step + 1)  # generated with weights v while the learners make v+1

        t = time.perf_counter()
        results = self.score(pending.queries, rollouts)
        t_reward = time.perf_counter() - t
        terms = reward_terms(results)
        rl = cfg.refine_rl
        tasks = [pending.queries[q].task for q in rollouts.query_index]
        adv = group_advantages(terms["reward"], rollouts.query_index, rollouts.lengths, rl.estimator, rl.adv_norm, tasks)
        batch = ScoredBatch.build(pending.queries, rollouts, results, adv.tolist())

        # learners: equal shards (InfoNCE all-gathers equal row counts), grad_accum micro-batches each
        t = time.perf_counter()
        shards = shard(batch.shuffled(cfg.run.seed * 7919 + step), self.group.size, cfg.learners.grad_accum_steps)
        learner_terms = self.group.call("train_step", per_rank=[(mbs,) for mbs in shards])
        t_learn = time.perf_counter() - t

        sync = self.sync.push(self.version + 1)
        dt = time.perf_counter() - t0
        metrics = {f"train/{k}": float(np.mean([lt[k] for lt in learner_terms])) for k in learner_terms[0] if k != "pairs"}
        metrics.update(step_metrics(terms, rollouts, adv, len(pending.queries), self.version))
        metrics.update(
            {
                "time/rollout_s": t_roll,
                "time/reward_s": t_reward,
                "time/learn_s": t_learn,
                "time/sync_s": sync["sync/time_s"],
                "perf/step_time_s": dt,
                "perf/samples_per_s": len(batch) / dt,
                "data/bad_rows": self.stream.bad_rows,
                "data/epoch": self.stream.pos.epoch,
                **self.stream.mix_metrics(),
            }
        )
        metrics.update(sync)
        return metrics

    def shutdown(self) -> None:
        if self.pending is not None:
            import ray

            ray.wait(self.pending.refs, num_returns=len(self.pending.refs), timeout=60)
            self.pending = None
        self.actors.shutdown()
