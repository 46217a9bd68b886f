"""DeepSpeed learner actors: K Ray actors, one torch.distributed group, one engine each.

Every stage runs on the same actor API: ``train_step(micro_batches)`` with the stage's loss,
``export_weights()`` for rollout sync, ``save_checkpoint`` / ``load_checkpoint`` (DeepSpeed's own,
so ZeRO-partitioned optimizer state round-trips), ``save_embedder`` for eval and serving. On CPU
the group uses gloo and a plain torch AdamW (no JIT-compiled optimizer); optimizer offload
switches to DeepSpeed's CPU Adam, which JIT-compiles once (~80 s, cached).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import torch

from rime_model import Embedder
from rime_model.choices import PRECISION_DTYPE
from rime_model.latent import AdapterConfig
from rime_model.lora import LoraAdapter, LoraSettings, attach_lora

from .memory_options import enable_gradient_checkpointing
from .stage_losses import LEARNER_LOSSES


def deepspeed_config(lc: dict, world_size: int) -> dict:
    """DeepSpeed JSON config from the learner section of the run config."""
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": lc["micro_batch_size"],
        "gradient_accumulation_steps": lc["grad_accum_steps"],
        "gradient_clipping": lc["grad_clip"],
        "zero_optimization": {"stage": lc["zero_stage"]},
        "bf16": {"enabled": lc["precision"] == "bf16"},
        "fp16": {"enabled": lc["precision"] == "fp16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # rime owns the boundary: any number of backward calls (micro-batches, GradCache chunks), then one step
        "managed_gradient_accumulation": False,
    }
    if lc["offload_optimizer"]:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": lc["lr"], "weight_decay": lc["weight_decay"]}}
    return cfg


def param_groups(model: torch.nn.Module, embedding: list[torch.nn.Parameter] | None = None) -> list[dict]:
    """Two optimizer groups over the trainable parameters: the token embedding (tied to the lm head; its own
    learning rate, since a freshly initialised 150k-row table moves too slowly at the body's rate) and
    everything else. ``embedding``: the embedding's trainable parameters when they are not the input
    embedding's weight (LoRA: rime's special token rows). The names survive ZeRO's flattening, which keeps
    the groups' order and keys."""
    emb = [model.get_input_embeddings().weight] if embedding is None else embedding
    ids = {id(p) for p in emb}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": body, "name": "body"}]
    if any(p.requires_grad for p in emb):
        groups.append({"params": [p for p in emb if p.requires_grad], "name": "embeddings"})
    return groups


class Learner:
    """One data-parallel rank. Created by ``orchestrator.learner_group.LearnerGroup``."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        master_addr: str,
        master_port: int,
        model_path: str,
        learner_cfg: dict,
        stage_cfg: dict,
        seed: int = 0,
        freeze_vision: bool = False,
        latent_adapter: dict | None = None,
        lora: dict | None = None,
    ):
        os.environ.update(
            MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE=str(world_size)
        )
        torch.set_num_threads(learner_cfg["torch_threads"])
        torch.manual_seed(seed + rank)
        import deepspeed

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
        self.rank, self.world_size, self.lc, self.stage_cfg = rank, world_size, learner_cfg, stage_cfg
        self.sync_group = None  # rank 0 under collective weight sync: the BroadcastGroup it sends in
        # loaded in the training precision: a bf16 run never holds an fp32 copy (DeepSpeed keeps fp32 masters
        # of what trains, the optimizer's business)
        self.emb = Embedder.load(model_path, dtype=getattr(torch, PRECISION_DTYPE[learner_cfg["precision"]]))
        if latent_adapter is not None:
            # Before deepspeed.initialize, so ZeRO partitions, trains and checkpoints it with the rest.
            self.emb.use_latent_adapter(AdapterConfig(hidden_size=self.emb.dim, **latent_adapter), seed=seed)
        if freeze_vision:
            for name, p in self.emb.model.named_parameters():
                if "visual" in name or "vision_tower" in name:
                    p.requires_grad_(False)
        # LoRA (model.lora): after the latent adapter, which stays fully trainable; before deepspeed.initialize
        if lora and learner_cfg["zero_stage"] == 3:
            raise ValueError("model.lora: LoRA with learners.zero_stage 3 is not supported yet; use zero_stage 0, 1 or 2")
        self.lora: LoraAdapter | None = attach_lora(self.emb, LoraSettings(**lora), seed=seed) if lora else None
        self.model_path = self.lora_start_model = model_path
        self.emb.model.train()
        if learner_cfg["gradient_checkpointing"]:  # after LoRA, before deepspeed.initialize (actors.memory_options)
            enable_gradient_checkpointing(self.emb.model)
        params = param_groups(self.emb.model, self.lora.embedding_params() if self.lora else None)
        ds_cfg = deepspeed_config(learner_cfg, world_size)
        warmup = max(1, learner_cfg["warmup_steps"])
        if learner_cfg["offload_optimizer"]:
            optimizer = None
        else:
            optimizer = torch.optim.AdamW(params, lr=learner_cfg["lr"], weight_decay=learner_cfg["weight_decay"])
        # Linear warm-up; DeepSpeed steps it at each accumulation boundary and checkpoints it.
        schedule = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))  # noqa: E731
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.emb.model, model_parameters=params, optimizer=optimizer, lr_scheduler=schedule, config=ds_cfg
        )
        self.emb.model = self.engine.module
        self.step = 0
        self.stage = "cma"
        self.ref: Embedder | None = None

    # ------------------------------------------------------------------ stages
    def _torch_optimizer(self) -> torch.optim.Optimizer:
        opt = self.engine.optimizer
        return getattr(opt, "optimizer", opt)  # ZeRO wraps the client optimizer; its state lives inside

    def begin_stage(
        self,
        stage: str,
        stage_cfg: dict,
        lr: float,
        warmup_steps: int,
        ref_path: str | None = None,
        reset_optimizer: bool = True,
        embedding_lr: float = 0.0,
    ) -> None:
        """Switch the loss to ``stage`` (``stage_losses.LEARNER_LOSSES``): new learning rates and warm-up,
        optimizer state reset (METHOD.md: stage changes restart Adam), then the loss's own start (Refine-RL:
        a frozen reference policy from ``ref_path`` for the KL term). With LoRA the adapter trained so far is
        merged into the base weights and a fresh one starts (``rime_model.lora``): the base is then the stage's
        start model, Refine-RL's reference with the adapter disabled; Adam's state is cleared with it."""
        if stage not in LEARNER_LOSSES:
            raise ValueError(f"stage {stage!r} has no learner loss; known: {tuple(LEARNER_LOSSES)}")
        self.stage, self.stage_cfg = stage, stage_cfg
        if self.lora is not None:
            self.lora.restart()
            self._refresh_master_weights()
            self.lora_start_model = ref_path or self.model_path
            reset_optimizer = True  # moments of the previous adapter mean nothing to the fresh one
        self.reset_optimizer(lr, warmup_steps, clear_state=reset_optimizer, embedding_lr=embedding_lr)
        self.ref = None
        # the Matryoshka prefix sizes the saved model will record: CMA's own, else the start model's (also
        # after a resume into a later stage, whose learners were built from the run's first model)
        if stage == "cma":
            self.emb.matryoshka_dims = tuple(stage_cfg.get("matryoshka_dims", ()))
        elif ref_path is not None:
            self.emb.matryoshka_dims = tuple(Embedder.saved_settings(ref_path).get("matryoshka_dims", ()))
        LEARNER_LOSSES[stage].begin(self, ref_path)

    def _refresh_master_weights(self) -> None:
        """After an in-place write to trainable parameters: the optimizer's fp32 master copies (ZeRO-1/2,
        bf16/fp16) take the module's values, or its next step would write the old ones back."""
        refresh = getattr(self.engine.optimizer, "refresh_fp32_params", None)
        if refresh is not None:
            refresh()

    def reset_optimizer(self, lr: float, warmup_steps: int, clear_state: bool = True, embedding_lr: float = 0.0) -> None:
        """Fresh Adam moments (stage and curriculum-stage changes), new learning rates (``embedding_lr``
        for the token embedding, 0 = ``lr``), linear warm-up."""
        opt = self._torch_optimizer()
        if clear_state:
            opt.state.clear()
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] = embedding_lr if group.get("name") == "embeddings" and embedding_lr > 0 else lr
        warm = max(1, warmup_steps)
        self.engine.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))

    # ------------------------------------------------------------------ training
    def train_step(self, micro_batches: list[Any], **step_args: Any) -> dict[str, float]:
        """One optimizer step over ``grad_accum_steps`` micro-batches with the stage's loss; returns mean loss
        terms. ``step_args`` go to the loss (PLUME: ``phase``, the curriculum phase of this step)."""
        if len(micro_batches) != self.lc["grad_accum_steps"]:
            raise ValueError(
                f"train_step: got {len(micro_batches)} micro-batches, expected grad_accum_steps={self.lc['grad_accum_steps']}"
            )
        loss = LEARNER_LOSSES[self.stage]
        sums: dict[str, float] = {}
        for mb in micro_batches:
            terms = loss.backward(self, mb, self.engine.backward, **step_args)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach() if isinstance(v, torch.Tensor) else v)
        self.engine.step()  # the one accumulation boundary (managed_gradient_accumulation off: deepspeed_config)
        self.step += 1
        out = {k: v / len(micro_batches) for k, v in sums.items()}
        gn = self.engine.get_global_grad_norm()
        out["grad_norm"] = float(gn) if gn is not None and math.isfinite(float(gn)) else float("nan")
        lrs = self.engine.get_lr()
        out["lr"] = float(lrs[0])
        if len(lrs) > 1:
            out["lr_embeddings"] = float(lrs[1])
        out["pairs"] = float(sum(len(mb) for mb in micro_batches))
        return out

    # ------------------------------------------------------------------ state
    def param_checksum(self) -> float:
        """Sum of all parameters in float64 (identical across ranks after every synced step); with LoRA of the
        merged weights, what ``export_weights`` sends and a rollout worker then holds."""
        with torch.no_grad():
            if self.lora is not None:
                return float(sum(v.double().sum() for v in self.lora.merged_state_dict().values()))
            return float(sum(p.detach().double().sum() for p in self._full_params()))

    def _full_params(self):
        if self.lc["zero_stage"] == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.engine.module.parameters())):
                return [p.detach().clone() for p in self.engine.module.parameters()]
        return list(self.engine.module.parameters())

    def export_weights(self, to_cpu: bool = True) -> dict[str, torch.Tensor] | None:
        """Full state dict on rank 0 (None elsewhere); collective under ZeRO-3, call on every rank.
        Tied tensors (lm_head = embed_tokens) are sent once: receivers re-tie them on load.
        ``to_cpu=False`` keeps the engine's own tensors (the collective sync broadcasts from them). With LoRA
        the merged weights under the plain model's names (``LoraAdapter.merged_state_dict``), so every
        rollout backend loads them as a full model's (ZeRO-3 is refused with LoRA: no collective here)."""
        if self.lora is not None:
            if self.rank != 0:
                return None
            sd = self.lora.merged_state_dict()
            return {k: v.detach().cpu().clone() if to_cpu else v.detach() for k, v in sd.items()}
        if self.lc["zero_stage"] == 3:
            sd = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            sd = self.engine.module.state_dict()
        if self.rank != 0:
            return None
        out, seen = {}, set()
        for k, v in sd.items():
            if v.data_ptr() in seen:
                continue
            seen.add(v.data_ptr())
            out[k] = v.detach().cpu().clone() if to_cpu else v.detach()
        return out

    def export_to_object_store(self):
        """``export_weights`` packed for the object store (``weight_sync.ObjectStoreWeights``: readers map it
        zero-copy); None off rank 0. Collective under ZeRO-3, call on every rank."""
        from .weight_sync import ObjectStoreWeights

        sd = self.export_weights()
        return None if sd is None else ObjectStoreWeights(sd)

    def export_adapter_to_object_store(self):
        """The LoRA adapter alone (``LoraAdapter.adapter_state_dict``) packed for the object store on rank 0,
        None elsewhere: ``rollout.weight_sync: lora_adapter``."""
        from .weight_sync import ObjectStoreWeights

        if self.lora is None:
            raise ValueError("rollout.weight_sync: lora_adapter sends a LoRA adapter, and model.lora.rank is 0")
        if self.rank != 0:
            return None
        return ObjectStoreWeights({k: v.detach().cpu().clone() for k, v in self.lora.adapter_state_dict().items()})

    # ------------------------------------------------------------------ collective weight sync (rank 0 = source)
    def open_weight_sync(self, world: int, epoch: int, backend: str, timeout_s: float) -> tuple[str, int] | None:
        """Rank 0 hosts the rendezvous store of sync group ``epoch``; returns (host, port)."""
        if self.rank != 0:
            return None
        from .weight_sync import BroadcastGroup

        self.sync_group = None  # the previous epoch's group, if any, is dropped
        store, host, port = BroadcastGroup.open_store(world, timeout_s)
        self._sync_join = (store, world, epoch, backend, timeout_s)
        return host, port

    def join_weight_sync(self) -> int:
        """Rank 0 joins the group it opened (blocks until every rollout worker has joined)."""
        from .weight_sync import BroadcastGroup

        store, world, epoch, backend, timeout_s = self._sync_join
        self.sync_group = BroadcastGroup(store, 0, world, epoch, backend, timeout_s)
        return epoch

    def weight_meta(self):
        """(name, shape, dtype) of what ``broadcast_weights`` sends, in order (rank 0; collective under ZeRO-3)."""
        from .weight_sync import tensor_meta

        sd = self.export_weights(to_cpu=False)
        return tensor_meta(sd) if sd is not None else None

    def broadcast_weights(self, epoch: int, bucket_bytes: int) -> dict | None:
        """Every rank calls (ZeRO-3 gathers collectively); rank 0 broadcasts in sync group ``epoch``."""
        from .weight_sync import check_member

        t = time.perf_counter()
        sd = self.export_weights(to_cpu=False)
        if sd is None:
            return None
        sent = check_member(self.sync_group, epoch).send(sd, bucket_bytes)
        return {"bytes": sent, "time_s": time.perf_counter() - t}

    def save_embedder(self, path: str) -> str | None:
        """Write a loadable embedder folder from rank 0 (collective under ZeRO-3); with LoRA the merged model,
        and the adapter beside it in ``lora_adapter/`` (relative to the stage's start model)."""
        if self.lora is not None:
            if self.rank == 0:
                self.lora.save(self.emb, path, start_model=self.lora_start_model)
            return path if self.rank == 0 else None
        if self.lc["zero_stage"] == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.engine.module.parameters())):
                if self.rank == 0:
                    self.emb.save(path)
        elif self.rank == 0:
            self.emb.save(path)
        return path if self.rank == 0 else None

    def save_checkpoint(self, ckpt_dir: str, tag: str, client_state: dict) -> None:
        self.engine.save_checkpoint(ckpt_dir, tag=tag, client_state={**client_state, "learner_step": self.step})

    def load_checkpoint(self, ckpt_dir: str, tag: str) -> dict:
        _, client = self.engine.load_checkpoint(ckpt_dir, tag=tag)
        if client is None:
            raise FileNotFoundError(f"checkpoint {ckpt_dir}/{tag} could not be loaded")
        self.step = client["learner_step"]
        return client

    def ping(self) -> int:
        return self.rank

    def shutdown(self) -> None:
        """Leave the process group cleanly; the group then ``ray.kill``s the actor, so no interpreter
        teardown runs after distributed work (that teardown is what aborted ~1 run in 6 on CPU)."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
