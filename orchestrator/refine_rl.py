"""The Refine-RL stage loop (GRPO over rewrites), driven verl-style from the driver.

One step: a batch of queries from Ray Data → rollout workers sample G rewrites each (exact token
ids + behaviour log-probs) → the frozen anchor reward service scores them → verl's estimator
turns rewards into group advantages → the DeepSpeed learners take one update (clipped surrogate +
KL to the reference + λ·InfoNCE to the anchors) → learner rank 0's weights go to the rollout
workers through the object store, under a version number. With ``max_staleness: 1`` the next
batch's rollouts are issued before the update, so generation overlaps learning (one-step-stale,
corrected by the clipped importance ratio against the behaviour log-probs).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from rewards.advantages import group_advantages

from .config import Config
from .pairs import PairStream, StreamPosition
from .rl_actors import RLActors


@dataclass
class Pending:
    """Rollouts in flight for one batch of queries, and the stream position before that batch."""

    queries: list[dict]
    refs: list[Any]
    chunks: list[tuple[int, int]]
    pos_before: StreamPosition
    version: int
    calls: list[tuple] = field(default_factory=list)  # per worker: the generate() args, to re-issue one


def stage_config(cfg: Config) -> dict:
    """What the learners need for the refine-rl loss."""
    rl = cfg.refine_rl
    return {"policy": {"policy_loss": rl.policy_loss, "clip_ratio_low": rl.clip_ratio_low, "clip_ratio_high": rl.clip_ratio_high,
                       "loss_agg_mode": rl.loss_agg_mode, "kl_coef": rl.kl_coef, "kl_type": rl.kl_type,
                       "loss_scale_factor": cfg.rollout.max_new_tokens + 2},  # + the forced </rewrite><gen_emb>
            "lambda_nce": rl.lambda_nce, "nce_temperature": rl.nce_temperature}


def _chunks(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal [start, end) slices of n items over ``parts`` workers (empty ones dropped)."""
    bounds = np.linspace(0, n, parts + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


class RefineRL:
    """Owns the rollout/reward actors and the weight version of one refine-rl stage."""

    def __init__(self, cfg: Config, group, stream: PairStream, start_model: str, reserve_cpus: float):
        self.cfg, self.group, self.stream = cfg, group, stream
        self.actors = RLActors(cfg, start_model, list(stream.cands.values()), reserve_cpus=reserve_cpus)
        self.version = 0
        self.weights_ref = None
        self.sync_epoch = 0  # collective sync: the current group's epoch (0 = none built yet)
        self.sync_rebuilds = 0
        self.weight_meta = None
        self.pending: Pending | None = None
        self.on_rollouts_submitted: Callable[["RefineRL", Pending], None] | None = None  # test/monitoring hook
        self.step_index = 0

    # ------------------------------------------------------------------ weights
    def sync_weights(self, version: int) -> dict[str, float]:
        """Learner rank 0 → every rollout worker (object store or collective broadcast), and a
        policy-side reward encoder (object store)."""
        if self.cfg.rollout.weight_sync == "collective":
            return self._sync_collective(version)
        return self._sync_object_store(version)

    def _sync_object_store(self, version: int) -> dict[str, float]:
        import ray

        t = time.perf_counter()
        refs = [a.export_to_object_store.remote() for a in self.group.actors]  # collective under ZeRO-3
        ray.wait(refs, num_returns=len(refs))
        self.weights_ref = refs[0]
        t_export = time.perf_counter() - t
        loads = ray.get([w.update_weights.remote(version, [self.weights_ref]) for w in self.actors.rollout])
        if self.cfg.reward.query_encoder == "policy":
            ray.get([r.update_weights.remote(version, [self.weights_ref]) for r in self.actors.reward])
        self.version = version
        return {"sync/time_s": time.perf_counter() - t, "sync/export_s": t_export, "sync/bytes": float(loads[0]["bytes"]),
                "sync/load_s_max": max(x["load_s"] for x in loads), "sync/version": float(version)}

    def _build_sync_group(self) -> None:
        """A new broadcast group (epoch + 1): learner rank 0 + every rollout worker, current members only."""
        import ray

        ro = self.cfg.rollout
        backend = "nccl" if self.cfg.learners.gpus_per_learner > 0 and ro.gpus_per_worker > 0 else "gloo"
        self.sync_epoch += 1
        self.sync_rebuilds += 1
        world = 1 + len(self.actors.rollout)
        src = self.group.actors[0]
        host, port = ray.get(src.open_weight_sync.remote(world, self.sync_epoch, backend, ro.sync_timeout_s))
        ray.get([src.join_weight_sync.remote()] + [
            w.join_weight_sync.remote(host, port, i + 1, world, self.sync_epoch, backend, ro.sync_timeout_s)
            for i, w in enumerate(self.actors.rollout)])

    def _sync_collective(self, version: int, retry: bool = True) -> dict[str, float]:
        """Broadcast from learner rank 0 in the sync group, rebuilt first when a worker is not a member
        (restarted by Ray); a broadcast that fails (a member died mid-way) is rebuilt and retried once."""
        import ray

        t = time.perf_counter()
        bucket = self.cfg.rollout.sync_bucket_mb << 20
        if self.weight_meta is None:
            meta = self.group.call("weight_meta")[0]
            # An export the workers cannot load fails the run here, from its metadata, before a group is built.
            ray.get([w.check_weight_meta.remote(meta) for w in self.actors.rollout])
            self.weight_meta = meta
        if ray.get([w.sync_epoch.remote() for w in self.actors.rollout]) != [self.sync_epoch] * len(self.actors.rollout):
            self._build_sync_group()
        sends = [a.broadcast_weights.remote(self.sync_epoch, bucket) for a in self.group.actors]
        loads = [w.receive_weights.remote(version, self.sync_epoch, self.weight_meta, bucket) for w in self.actors.rollout]
        try:
            sent = ray.get(sends)[0]
            loads = ray.get(loads)
        except ray.exceptions.RayError:
            if not retry:
                raise
            ray.wait(sends + loads, num_returns=len(sends + loads), timeout=self.cfg.rollout.sync_timeout_s)
            self._build_sync_group()
            return self._sync_collective(version, retry=False)
        out = {"sync/time_s": time.perf_counter() - t, "sync/bytes": float(sent["bytes"]), "sync/broadcast_s": sent["time_s"],
               "sync/load_s_max": max(x["load_s"] for x in loads), "sync/version": float(version),
               "sync/group_rebuilds": float(self.sync_rebuilds)}
        if self.cfg.reward.query_encoder == "policy":  # the reward actors are not in the group
            refs = [a.export_to_object_store.remote() for a in self.group.actors]
            ray.get([r.update_weights.remote(version, [refs[0]]) for r in self.actors.reward])
        self.version = version
        return out

    # ------------------------------------------------------------------ rollouts
    def _submit(self, step: int) -> Pending:
        ro = self.cfg.rollout
        pos_before = StreamPosition(**asdict(self.stream.pos))
        queries = self.stream.next_batch(self.cfg.refine_rl.queries_per_step)
        chunks = _chunks(len(queries), len(self.actors.rollout))
        calls = []
        for w, (a, b) in enumerate(chunks):
            sampling = {"max_new_tokens": ro.max_new_tokens, "temperature": ro.temperature, "top_p": ro.top_p, "top_k": ro.top_k,
                        "seed": (self.cfg.run.seed * 1_000_003 + step * 101 + w) % (2**31)}
            calls.append(([q["q"] for q in queries[a:b]], ro.group_size, sampling))
        refs = [self.actors.rollout[w].generate.remote(*args, self._weights_token()) for w, args in enumerate(calls)]
        pending = Pending(queries, refs, chunks, pos_before, self.version, calls)
        if self.on_rollouts_submitted is not None:
            self.on_rollouts_submitted(self, pending)
        return pending

    def _weights_token(self) -> dict | None:
        """What a rollout call carries so a restarted worker can tell it holds stale weights: the
        version, plus the object-store copy to load (None under collective sync: the driver re-broadcasts)."""
        if self.cfg.rollout.weight_sync == "collective":
            return {"version": self.version, "ref": None} if self.sync_epoch else None
        return {"version": self.version, "ref": [self.weights_ref]} if self.weights_ref is not None else None

    def _collect(self, pending: Pending) -> list[dict]:
        """The rollout results; a call refused for stale weights (a worker restarted under collective
        sync) is answered by re-broadcasting the current weights and re-issuing that call."""
        import ray

        from actors.weight_sync import StaleWeightsError

        outs = []
        for w, ref in enumerate(pending.refs):
            try:
                outs.append(ray.get(ref))
            except ray.exceptions.RayTaskError as e:
                if not isinstance(e.cause, StaleWeightsError):
                    raise
                self._sync_collective(self.version)
                outs.append(ray.get(self.actors.rollout[w].generate.remote(*pending.calls[w], self._weights_token())))
        return outs

    @property
    def trained_position(self) -> StreamPosition:
        """Where a resume must restart the stream: before any batch fetched but not yet trained on."""
        return self.pending.pos_before if self.pending is not None else self.stream.pos

    # ------------------------------------------------------------------ one step
    def step(self, step: int) -> dict[str, float]:
        import ray

        cfg, G = self.cfg, self.cfg.rollout.group_size
        t0 = time.perf_counter()
        pending = self.pending or self._submit(step)
        self.pending = None
        outs = self._collect(pending)
        t_roll = time.perf_counter() - t0
        if cfg.refine_rl.max_staleness >= 1:
            self.pending = self._submit(step + 1)  # generated with weights v while the learners make v+1
        queries = pending.queries
        samples: list[dict] = []
        for (a, _), out in zip(pending.chunks, outs):
            for s in out["samples"]:
                samples.append({**s, "query_index": a + s["query_index"]})
        samples.sort(key=lambda s: (s["query_index"], s["sample_index"]))

        # rewards: one request per query, spread over the reward actors
        t = time.perf_counter()
        requests = []
        for qi, q in enumerate(queries):
            mine = samples[qi * G:(qi + 1) * G]
            requests.append({"query": q["q"], "completions": [s["token_ids"] for s in mine], "well_formed": [s["well_formed"] for s in mine],
                             "positive_ids": q["positive_ids"], "cand_ids": q["cand_ids"], "task": q["task"], "query_id": q["query_id"]})
        rchunks = _chunks(len(requests), len(self.actors.reward))
        scored = ray.get([self.actors.reward[i].score.remote(requests[a:b]) for i, (a, b) in enumerate(rchunks)])
        results = [r for s in scored for r in s["results"]]
        t_reward = time.perf_counter() - t

        terms = {k: torch.tensor([v for r in results for v in r["terms"][k]]) for k in results[0]["terms"]}
        rewards = terms["reward"]
        lengths = [len(s["token_ids"]) for s in samples]
        adv = group_advantages(rewards, [s["query_index"] for s in samples], lengths, cfg.refine_rl.estimator)
        for s, a in zip(samples, adv.tolist()):
            q = queries[s["query_index"]]
            s.update(q=q["q"], advantage=a, anchor=results[s["query_index"]]["anchor"], target_id=q["target_id"])

        # learners: equal shards (InfoNCE all-gathers equal row counts), grad_accum micro-batches each
        t = time.perf_counter()
        lc = cfg.learners
        per_rank = len(samples) // self.group.size
        per_mb = per_rank // lc.grad_accum_steps
        order = np.random.default_rng(cfg.run.seed * 7919 + step).permutation(len(samples))
        shuffled = [samples[i] for i in order]
        shards = [([shuffled[r * per_rank + m * per_mb: r * per_rank + (m + 1) * per_mb] for m in range(lc.grad_accum_steps)],)
                  for r in range(self.group.size)]
        learner_terms = self.group.call("train_step", per_rank=shards)
        t_learn = time.perf_counter() - t

        sync = self.sync_weights(self.version + 1)
        dt = time.perf_counter() - t0
        tokens = sum(o["tokens"] for o in outs)
        gen_time = max(o["time_s"] for o in outs)
        grouped = rewards.view(len(queries), G)
        metrics = {f"train/{k}": float(np.mean([lt[k] for lt in learner_terms])) for k in learner_terms[0] if k != "pairs"}
        metrics.update({f"reward/{k}_mean": float(v.float().mean()) for k, v in terms.items()})
        metrics.update({
            "reward/std": float(rewards.std()), "reward/group_std_mean": float(grouped.std(dim=1).mean()),
            "reward/zero_variance_groups": float((grouped.std(dim=1) < 1e-6).float().mean()),
            "rollout/rewrite_tokens_mean": float(np.mean(lengths)), "rollout/well_formed_frac": float(np.mean([s["well_formed"] for s in samples])),
            "rollout/tokens_per_s": tokens / max(gen_time, 1e-9), "rollout/staleness_mean": float(np.mean([self.version - 1 - s["version"] for s in samples])),
            "advantage/abs_mean": float(adv.abs().mean()),
            "time/rollout_s": t_roll, "time/reward_s": t_reward, "time/learn_s": t_learn, "time/sync_s": sync["sync/time_s"],
            "perf/step_time_s": dt, "perf/samples_per_s": len(samples) / dt,
            "data/bad_rows": self.stream.bad_rows, "data/epoch": self.stream.pos.epoch,
        })
        metrics.update(sync)
        self.step_index = step
        return metrics

    def shutdown(self) -> None:
        if self.pending is not None:
            import ray

            ray.wait(self.pending.refs, num_returns=len(self.pending.refs), timeout=60)
            self.pending = None
        self.actors.shutdown()
