"""``rollout.weight_sync: collective``: learner rank 0 broadcasts in a process group of its own with the
rollout workers (NCCL when both sides have GPUs, as OpenRLHF and verl do; gloo otherwise).

The group is built from a TCPStore hosted by rank 0, beside the learners' DeepSpeed group, and carries an
epoch. A worker Ray restarted is not a member of the current epoch: its next rollout call fails with
``StaleWeightsError``, ``recover`` rebuilds the group under a new epoch and re-broadcasts, and the caller
re-issues the call. A broadcast that fails mid-way (a member died) is rebuilt and retried once. Names and
shapes are checked against every worker before the first group is built, so learners and workers started
from different models fail at once instead of in a retry loop.
"""

from __future__ import annotations

import time
from typing import Any

from .base import WeightSync, register_weight_sync


@register_weight_sync("collective")
class CollectiveSync(WeightSync):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.epoch = 0  # the current group's epoch (0 = none built yet)
        self.rebuilds = 0
        self.meta = None  # (name, shape, dtype) of rank 0's export, checked once against every worker

    @property
    def backend(self) -> str:
        both_gpu = self.cfg.learners.gpus_per_actor > 0 and self.cfg.rollout.gpus_per_actor > 0
        return "nccl" if both_gpu else "gloo"

    def _build_group(self) -> None:
        """A new broadcast group (epoch + 1): learner rank 0 + every rollout worker, current members only."""
        import ray

        ro = self.cfg.rollout
        self.epoch += 1
        self.rebuilds += 1
        world = 1 + len(self.rollout)
        src = self.learners.actors[0]
        host, port = ray.get(src.open_weight_sync.remote(world, self.epoch, self.backend, ro.sync_timeout_s))
        ray.get(
            [src.join_weight_sync.remote()]
            + [
                w.join_weight_sync.remote(host, port, i + 1, world, self.epoch, self.backend, ro.sync_timeout_s)
                for i, w in enumerate(self.rollout)
            ]
        )

    def push(self, version: int, retry: bool = True) -> dict[str, float]:
        import ray

        t = time.perf_counter()
        ro = self.cfg.rollout
        bucket = ro.sync_bucket_mb << 20
        if self.meta is None:
            meta = self.learners.call("weight_meta")[0]
            # An export the workers cannot load fails the run here, from its metadata, before a group is built.
            ray.get([w.check_weight_meta.remote(meta) for w in self.rollout])
            self.meta = meta
        if ray.get([w.sync_epoch.remote() for w in self.rollout]) != [self.epoch] * len(self.rollout):
            self._build_group()
        sends = [a.broadcast_weights.remote(self.epoch, bucket) for a in self.learners.actors]
        loads = [w.receive_weights.remote(version, self.epoch, self.meta, bucket) for w in self.rollout]
        try:
            sent = ray.get(sends)[0]
            loads = ray.get(loads)
        except ray.exceptions.RayError:
            if not retry:
                raise
            ray.wait(sends + loads, num_returns=len(sends + loads), timeout=ro.sync_timeout_s)
            self._build_group()
            return self.push(version, retry=False)
        self._update_reward_encoders(version)
        self.version = version
        return {
            "sync/time_s": time.perf_counter() - t,
            "sync/bytes": float(sent["bytes"]),
            "sync/broadcast_s": sent["time_s"],
            "sync/load_s_max": max(x["load_s"] for x in loads),
            "sync/version": float(version),
            "sync/group_rebuilds": float(self.rebuilds),
        }

    def token(self) -> dict | None:
        """No ref: a worker holding another version refuses the call (``StaleWeightsError``)."""
        return {"version": self.version, "ref": None} if self.epoch else None

    def recover(self, err: BaseException) -> bool:
        """A restarted worker refused a call for stale weights: rebuild the group and re-broadcast."""
        from actors.weight_sync import StaleWeightsError

        cause = getattr(err, "cause", err)
        if not isinstance(cause, StaleWeightsError):
            return False
        self.push(self.version)
        return True
