"""``rollout.weight_sync: object_store``: one export in Ray's object store, fetched by every worker.

Learner rank 0 packs its state dict as byte arrays (``actors.weight_sync.ObjectStoreWeights``) that Ray maps
zero-copy into every reader on a node; each worker loads them into its model. The ref is also the token
every rollout call carries, so a worker Ray restarted (back at version 0) loads the current weights itself
before sampling: no group to rebuild, no retry needed. The CPU default.
"""

from __future__ import annotations

import time
from typing import Any

from .base import WeightSync, register_weight_sync


@register_weight_sync("object_store")
class ObjectStoreSync(WeightSync):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.ref: Any = None  # rank 0's export of ``version``, kept alive while workers may need it

    def push(self, version: int) -> dict[str, float]:
        import ray

        t = time.perf_counter()
        self.ref = self._export_refs()[0]
        t_export = time.perf_counter() - t
        loads = ray.get([w.update_weights.remote(version, [self.ref]) for w in self.rollout])
        self._update_reward_encoders(version, self.ref)
        self.version = version
        return {
            "sync/time_s": time.perf_counter() - t,
            "sync/export_s": t_export,
            "sync/bytes": float(loads[0]["bytes"]),
            "sync/load_s_max": max(x["load_s"] for x in loads),
            "sync/version": float(version),
        }

    def token(self) -> dict | None:
        return {"version": self.version, "ref": [self.ref]} if self.ref is not None else None
