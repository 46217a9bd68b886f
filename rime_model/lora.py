"""LoRA on an embedder's model through peft (``model.lora``): attach, the KL reference with the adapter
off, the merged export, the saved layout.

How the pieces fit (issue #31):

* ``attach_lora`` wraps ``emb.model`` with ``peft.get_peft_model`` and leaves ``emb.model`` the plain
  transformers model, now with LoRA layers injected in place: every rime forward (``hidden_states``,
  ``latent_pass``, ``generate``) runs unchanged, and DeepSpeed trains that module. The ``PeftModel`` is kept
  beside it for ``disable_adapter()`` and ``save_pretrained``. Only ``nn.Linear`` layers are adapted; the
  vision tower only with ``model.lora.vision``.
* rime's special tokens (``<gen_emb>``, ``<rewrite>``, ...) were added by rime, so their embedding rows are
  untrained in a real checkpoint: they train through peft's ``trainable_token_indices`` (peft ties the
  output layer's rows when the embedding is tied), the rest of the embedding stays frozen.
* A stage starts from a merged model and a fresh adapter (``LoraAdapter.restart``, called by
  ``Learner.begin_stage``): the adapter trained so far is merged into the frozen base weights in place,
  then A is redrawn from the run's seed (the same on every rank) and B zeroed. The model with its adapter
  disabled is then exactly the stage's start model, bit for bit equal to the folder the previous stage
  saved: Refine-RL's KL reference is that model (``disabled()``), no second copy on a learner. CMA ->
  Refine-RL in one run: Refine-RL's reference is CMA's result, as without LoRA.
* ``merged_state_dict`` is the state dict of the plain model (its names, the LoRA deltas and token rows
  merged in, tied tensors once): weight sync, checksums and saves take it as they take a full model's.
  That is what the default weight sync sends, and every rollout backend loads it. The ``lora_adapter``
  strategy (``orchestrator.sync.lora_adapter``) sends ``adapter_state_dict()`` instead: HF rollout workers
  hold the stage's start model with the same adapter attached and ``load_adapter_state_dict`` it (vLLM's
  LoRA requests are not wired up yet).
* ``save`` writes the merged model as the usual embedder folder (serving, eval and MLflow load it as any
  other) and the peft adapter beside it in ``<folder>/lora_adapter/``, relative to the stage's start model
  (its ``adapter_config.json`` names that folder as ``base_model_name_or_path``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .choices import LORA_TARGET_MODULES
from .latent import ADAPTER_ATTR

if TYPE_CHECKING:
    from .embedder import Embedder

ADAPTER_DIR = "lora_adapter"  # beside the merged model in a saved embedder folder
ADAPTER_NAME = "default"  # peft's adapter name; one adapter per model
VISION_PARTS = ("visual", "vision_tower")  # module path components of a vision tower (as model.freeze_vision)
_PEFT_INFIX = re.compile(r"\.(?:base_layer|token_adapter)(?=\.)")  # what peft's wrappers add to a name


@dataclass(frozen=True)
class LoraSettings:
    """The ``model.lora`` config section (rank 0 = off)."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = LORA_TARGET_MODULES
    vision: bool = False


def plain_name(key: str) -> str:
    """A state-dict key of the wrapped model as the plain model names it (peft's ``base_layer`` and
    ``token_adapter`` path parts removed)."""
    return _PEFT_INFIX.sub("", key)


def _in_vision(name: str) -> bool:
    return any(part in VISION_PARTS for part in name.split("."))


def target_linears(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Full names of the linear layers ``settings.target_modules`` selects: a name matches its last parts
    (``q_proj``, ``self_attn.q_proj``); the vision tower only with ``vision``; never the (tied) output layer
    or PLUME's transition adapter. ValueError naming ``model.lora.target_modules`` when nothing matches."""
    out_emb = model.get_output_embeddings()
    candidates = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and m is not out_emb
        and ADAPTER_ATTR not in name.split(".")
        and (settings.vision or not _in_vision(name))
    ]
    wanted = [t.strip(".") for t in settings.target_modules]
    hits = [n for n in candidates if any(n == t or n.endswith("." + t) for t in wanted)]
    if not hits:
        scope = "the model" if settings.vision else "the language model (model.lora.vision is false)"
        leaves = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        raise ValueError(
            f"model.lora.target_modules: {list(settings.target_modules)} match no linear layer of {scope}; "
            f"its linear layers are named {leaves}: list some of those"
        )
    return hits


@dataclass
class LoraAdapter:
    """The LoRA adapter on an embedder's model (``emb.model`` keeps the plain model's class)."""

    peft: nn.Module  # the PeftModel around emb.model
    settings: LoraSettings
    seed: int
    token_ids: list[int] = field(default_factory=list)

    # ------------------------------------------------------------------ layers
    def lora_layers(self) -> Iterator[tuple[str, nn.Module]]:
        """(name, peft LoRA layer) of every adapted linear layer."""
        from peft.tuners.lora import LoraLayer

        for name, m in self.model.named_modules():
            if isinstance(m, LoraLayer):
                yield name, m

    def token_layers(self) -> Iterator[tuple[str, nn.Module]]:
        """Trainable-token layers that own their rows (a tied output layer shares the embedding's)."""
        from peft.tuners.trainable_tokens import TrainableTokensLayer

        for name, m in self.model.named_modules():
            if isinstance(m, TrainableTokensLayer) and m.tied_adapter is None:
                yield name, m

    @property
    def model(self) -> nn.Module:
        """The wrapped transformers model (what ``emb.model`` is)."""
        return self.peft.get_base_model()

    def embedding_params(self) -> list[nn.Parameter]:
        """The trainable token rows: the learner's "embeddings" optimizer group (``embedding_lr``)."""
        return [p for _, m in self.token_layers() for p in m.trainable_tokens_delta.values()]

    # ------------------------------------------------------------------ reference and stage starts
    @contextmanager
    def disabled(self) -> Iterator[None]:
        """The base model: the stage's start model (see ``restart``), i.e. Refine-RL's KL reference."""
        with self.peft.disable_adapter():
            yield

    @torch.no_grad()
    def restart(self) -> None:
        """Merge the adapter into the frozen base weights in place, then start a fresh one (A redrawn from
        ``seed``, B = 0): the model is unchanged, and with the adapter disabled it is now that same model.
        In place, so DeepSpeed's (ZeRO-1/2) flat buffers see it; the caller refreshes any fp32 master copy."""
        gen = torch.Generator().manual_seed(self.seed)
        for _, layer in self.lora_layers():
            for name in layer.active_adapters:
                base = layer.get_base_layer().weight
                base.add_(layer.get_delta_weight(name).to(base.dtype))
                a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
                bound = 1 / math.sqrt(a.shape[1])  # peft's default: kaiming_uniform_(a=sqrt(5))
                a.copy_(torch.empty(a.shape).uniform_(-bound, bound, generator=gen))
                b.zero_()
        for _, layer in self.token_layers():
            for name in layer.active_adapters:
                idx = torch.tensor(layer.token_indices[name], device=layer.base_layer.weight.device)
                rows = layer.trainable_tokens_delta[name]  # peft keeps the rows' values, not differences
                layer.base_layer.weight.index_copy_(0, idx, rows.to(layer.base_layer.weight.dtype))
                layer.trainable_tokens_original[name].copy_(rows)

    # ------------------------------------------------------------------ export and save
    @torch.no_grad()
    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The plain model's state dict: LoRA layers as W + B·A·alpha/r, the trained token rows in the
        embedding, adapter tensors left out, names as the plain model has them, a tensor tied to an earlier
        one (lm_head = embed_tokens) once, as ``Learner.export_weights`` sends it. Unmerged tensors are the
        model's own (no copy)."""
        merged: dict[str, torch.Tensor] = {}
        skip: set[str] = set()
        for prefix, layer in self.lora_layers():
            base = layer.get_base_layer().weight
            w = base
            for name in layer.active_adapters:
                w = w + layer.get_delta_weight(name).to(base.dtype)
            merged[f"{prefix}.base_layer.weight"] = w
        for prefix, layer in self.token_layers():
            merged[f"{prefix}.base_layer.weight"] = layer.get_merged_weights(layer.active_adapters)
        from peft.tuners.tuners_utils import BaseTunerLayer

        for prefix, layer in self.model.named_modules():
            if isinstance(layer, BaseTunerLayer):
                for attr in layer.adapter_layer_names + layer.other_param_names:
                    sub = getattr(layer, attr, None)
                    if isinstance(sub, nn.Module):
                        skip.update(f"{prefix}.{attr}.{k}" for k in sub.state_dict())
        out, seen = {}, set()
        for k, v in self.model.state_dict().items():
            if k in skip or v.data_ptr() in seen:
                continue
            seen.add(v.data_ptr())
            out[plain_name(k)] = merged.get(k, v)
        return out

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter alone (LoRA A and B, rime's token rows) in peft's format: what the ``lora_adapter``
        weight sync sends, a few MB where the merged model is GBs."""
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.peft)

    @torch.no_grad()
    def load_adapter_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load an ``adapter_state_dict`` of a learner with the same ``model.lora`` settings (a rollout worker
        under ``rollout.weight_sync: lora_adapter``): the model is then the learner's merged model, with the
        adapter applied at each forward. ValueError naming the keys when the two adapters differ, before any
        tensor is loaded."""
        from peft import set_peft_model_state_dict

        mine = self.adapter_state_dict()
        missing, extra = sorted(set(mine) - set(state_dict)), sorted(set(state_dict) - set(mine))
        shapes = [k for k in mine.keys() & state_dict.keys() if mine[k].shape != state_dict[k].shape]
        if missing or extra or shapes:
            raise ValueError(
                f"LoRA adapter: the sent adapter does not fit this model's (missing {missing[:3]}, unexpected "
                f"{extra[:3]}, other shapes {shapes[:3]}); learners and rollout workers need the same model.lora"
            )
        set_peft_model_state_dict(self.peft, state_dict)

    def save(self, emb: Embedder, path: str | Path, start_model: str | None = None) -> Path:
        """The merged model as an ordinary embedder folder, and the adapter in ``<path>/lora_adapter/``
        (relative to ``start_model``, the stage's start model)."""
        path = emb.save(path, state_dict=self.merged_state_dict())
        cfg = self.peft.peft_config[ADAPTER_NAME]
        cfg.base_model_name_or_path = start_model
        self.peft.save_pretrained(str(path / ADAPTER_DIR), save_embedding_layers=False)
        return path


def attach_lora(emb: Embedder, settings: LoraSettings, seed: int = 0) -> LoraAdapter:
    """Wrap ``emb.model`` with a fresh LoRA adapter (identical on every rank for one ``seed``): only the
    adapter, rime's special token rows and PLUME's transition adapter (if any) train."""
    from peft import LoraConfig, get_peft_model

    if settings.rank < 1:
        raise ValueError(f"model.lora.rank: {settings.rank} turns LoRA off; attach_lora needs a rank >= 1")
    model = emb.model
    token_ids = sorted(set(emb.token_id.values()))
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=target_linears(model, settings),
        trainable_token_indices=token_ids,
        bias="none",
    )
    peft_model = get_peft_model(model, config)
    for name, p in model.named_parameters():  # peft freezes everything not its own
        if ADAPTER_ATTR in name.split("."):
            p.requires_grad_(True)
    lora = LoraAdapter(peft_model, settings, seed, token_ids)
    lora.restart()  # peft drew A from each rank's own RNG state: redraw it from the shared seed
    return lora
