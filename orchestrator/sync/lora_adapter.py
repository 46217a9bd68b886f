"""``rollout.weight_sync: lora_adapter``: only the LoRA adapter travels, through the object store.

With ``model.lora`` a learner trains a few million adapter parameters on top of frozen base weights, and the
base is the stage's start model (``rime_model.lora``: each stage merges the previous adapter and starts a fresh
one). The HF rollout workers load that same start model and attach the same adapter, so a sync only has to
send the adapter (and rime's trained token rows): megabytes where the merged model is gigabytes (verl and TRL
sync a LoRA policy to vLLM the same way). Every worker then holds the learners' merged model, applied at each
forward instead of merged in place. Otherwise it is ``object_store``: the ref is the token each rollout call
carries, so a worker Ray restarted (back at the start model) loads the current adapter itself.

HF rollout workers only (vLLM's LoRA requests are not wired up yet; ``object_store`` sends vLLM the merged
weights). ``reward.query_encoder: policy`` still receives the merged weights: its encoder has no adapter.
"""

from __future__ import annotations

from typing import Any

from .base import register_weight_sync
from .object_store import ObjectStoreSync


@register_weight_sync("lora_adapter")
class LoraAdapterSync(ObjectStoreSync):
    adapter = True

    def _export(self) -> Any:
        import ray

        refs = [a.export_adapter_to_object_store.remote() for a in self.learners.actors]
        ray.wait(refs, num_returns=len(refs))
        return refs[0]
