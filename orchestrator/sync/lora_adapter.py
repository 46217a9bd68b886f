"""``rollout.weight_sync: lora_adapter``: only the LoRA adapter travels, through the object store.

With ``model.lora`` a learner trains a few million adapter parameters on top of frozen base weights, and the
base is the stage's start model (``rime_model.lora``: each stage merges the previous adapter and starts a fresh
one). The HF rollout workers load that same start model and attach the same adapter, so a sync only has to
send the adapter (and rime's trained token rows): megabytes where the merged model is gigabytes (verl and TRL
sync a LoRA policy to vLLM the same way). Every worker then holds the learners' merged model, applied at each
forward instead of merged in place. As with ``object_store``, the ref is the token each rollout call carries,
so a worker Ray restarted (back at the start model) loads the current adapter itself.

HF rollout workers only (vLLM's LoRA requests are not wired up yet; ``object_store`` sends vLLM the merged
weights). ``reward.query_encoder: policy`` still receives the merged weights: its encoder has no adapter.
"""

from __future__ import annotations

import time
from typing import Any

from .base import WeightSync, register_weight_sync


@register_weight_sync("lora_adapter")
class LoraAdapterSync(WeightSync):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.ref: Any = None  # rank 0's adapter export of ``version``, kept alive while workers may need it

    def push(self, version: int) -> dict[str, float]:
        import ray

        t = time.perf_counter()
        refs = [a.export_adapter_to_object_store.remote() for a in self.learners.actors]
        ray.wait(refs, num_returns=len(refs))
        self.ref = refs[0]
        t_export = time.perf_counter() - t
        loads = ray.get([w.update_weights.remote(version, [self.ref], adapter=True) for w in self.rollout])
        self._update_reward_encoders(version)
        self.version = version
        return {
            "sync/time_s": time.perf_counter() - t,
            "sync/export_s": t_export,
            "sync/bytes": float(loads[0]["bytes"]),
            "sync/load_s_max": max(x["load_s"] for x in loads),
            "sync/version": float(version),
        }

    def token(self) -> dict | None:
        return {"version": self.version, "ref": [self.ref], "adapter": True} if self.ref is not None else None
