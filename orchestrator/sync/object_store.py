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
    adapter = False  # what the export holds: the full (merged) weights; ``lora_adapter``: the adapter alone

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.ref: Any = None  # rank 0's export of ``version``, kept alive while workers may need it

    def _export(self) -> Any:
        """Rank 0's object-store ref of what the workers load."""
        return self._export_refs()[0]

    def push(self, version: int) -> dict[str, float]:
        import ray

        t = time.perf_counter()
        self.ref = self._export()
        t_export = time.perf_counter() - t
        loads = ray.get([w.update_weights.remote(version, [self.ref], adapter=self.adapter) for w in self.rollout])
        self._update_reward_encoders(version, None if self.adapter else self.ref)  # an adapter is no encoder's weights
        self.version = version
        return {
            "sync/time_s": time.perf_counter() - t,
            "sync/export_s": t_export,
            "sync/bytes": float(loads[0]["bytes"]),
            "sync/load_s_max": max(x["load_s"] for x in loads),
            "sync/version": float(version),
        }

    def token(self) -> dict | None:
        if self.ref is None:
            return None
        return {"version": self.version, "ref": [self.ref], **({"adapter": True} if self.adapter else {})}
