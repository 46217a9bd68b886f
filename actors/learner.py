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
from typing import Any

import torch

from rime_model import Embedder
from rime_model.losses import cma_loss, completion_ce

Pair = dict[str, Any]  # {"q": item, "t": item, "q_rewrite": str, "t_rewrite": str, "target_id": int}


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
    }
    if lc["offload_optimizer"]:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": lc["lr"], "weight_decay": lc["weight_decay"]}}
    return cfg


class Learner:
    """One data-parallel rank. Created by ``orchestrator.learner_group.LearnerGroup``."""

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, model_path: str,
                 learner_cfg: dict, stage_cfg: dict, seed: int = 0, freeze_vision: bool = False):
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                          LOCAL_RANK="0", WORLD_SIZE=str(world_size))
        torch.set_num_threads(learner_cfg["torch_threads"])
        torch.manual_seed(seed + rank)
        import deepspeed

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
        self.rank, self.world_size, self.lc, self.stage_cfg = rank, world_size, learner_cfg, stage_cfg
        self.emb = Embedder.load(model_path)
        if freeze_vision:
            for name, p in self.emb.model.named_parameters():
                if "visual" in name or "vision_tower" in name:
                    p.requires_grad_(False)
        self.emb.model.train()
        params = [p for p in self.emb.model.parameters() if p.requires_grad]
        ds_cfg = deepspeed_config(learner_cfg, world_size)
        warmup = max(1, learner_cfg["warmup_steps"])
        if learner_cfg["offload_optimizer"]:
            optimizer = None
        else:
            optimizer = torch.optim.AdamW(params, lr=learner_cfg["lr"], weight_decay=learner_cfg["weight_decay"])
        # Linear warm-up; DeepSpeed steps it at each accumulation boundary and checkpoints it.
        schedule = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))  # noqa: E731
        self.engine, _, _, _ = deepspeed.initialize(model=self.emb.model, model_parameters=params, optimizer=optimizer,
                                                    lr_scheduler=schedule, config=ds_cfg)
        self.emb.model = self.engine.module
        self.step = 0

    # ------------------------------------------------------------------ training
    def train_step(self, micro_batches: list[list[Pair]]) -> dict[str, float]:
        """One optimizer step over ``grad_accum_steps`` micro-batches; returns mean loss terms."""
        if len(micro_batches) != self.lc["grad_accum_steps"]:
            raise ValueError(f"train_step: got {len(micro_batches)} micro-batches, expected grad_accum_steps={self.lc['grad_accum_steps']}")
        sums: dict[str, float] = {}
        for mb in micro_batches:
            terms = self._cma_terms(mb)
            self.engine.backward(terms["loss"])
            self.engine.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
        self.step += 1
        out = {k: v / len(micro_batches) for k, v in sums.items()}
        gn = self.engine.get_global_grad_norm()
        out["grad_norm"] = float(gn) if gn is not None and math.isfinite(float(gn)) else float("nan")
        out["lr"] = float(self.engine.get_lr()[0])
        out["pairs"] = float(sum(len(mb) for mb in micro_batches))
        return out

    def _cma_terms(self, pairs: list[Pair]) -> dict[str, torch.Tensor]:
        emb, cfg = self.emb, self.stage_cfg
        q_items = emb.prepare([p["q"] for p in pairs])
        t_items = emb.prepare([p["t"] for p in pairs])
        disc = emb.build_disc_batch(q_items + t_items)
        d = emb.encode(disc)
        gen = emb.build_gen_batch(q_items + t_items, [p["q_rewrite"] for p in pairs] + [p["t_rewrite"] for p in pairs])
        h = emb.hidden_states(gen)
        g = emb.encode(gen, hidden=h)
        ce = completion_ce(h, gen.labels, emb.model.get_output_embeddings())
        n = len(pairs)
        return cma_loss(d[:n], d[n:], g[:n], g[n:], ce, lambda_cma=cfg["lambda_cma"], temperature=cfg["temperature"],
                        ce_weight=cfg["ce_weight"], target_ids=[p["target_id"] for p in pairs])

    # ------------------------------------------------------------------ state
    def param_checksum(self) -> float:
        """Sum of all parameters in float64 (identical across ranks after every synced step)."""
        with torch.no_grad():
            return float(sum(p.detach().double().sum() for p in self._full_params()))

    def _full_params(self):
        if self.lc["zero_stage"] == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.engine.module.parameters())):
                return [p.detach().clone() for p in self.engine.module.parameters()]
        return list(self.engine.module.parameters())

    def export_weights(self) -> dict[str, torch.Tensor] | None:
        """Full state dict on rank 0 (None elsewhere); collective under ZeRO-3, call on every rank."""
        if self.lc["zero_stage"] == 3:
            sd = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            sd = self.engine.module.state_dict()
        return {k: v.detach().cpu().clone() for k, v in sd.items()} if self.rank == 0 else None

    def save_embedder(self, path: str) -> str | None:
        """Write a loadable embedder folder from rank 0 (collective under ZeRO-3)."""
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
