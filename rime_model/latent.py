"""PLUME latent reasoning: the semantic-anchor MoE transition adapter and the batched latent pass.

Latent mode (METHOD.md, PLUME): one prefix pass over ``… <disc_emb> … <think><bot>`` gives
``z0 = h(<bot>)`` and the anchor ``c = h(<disc_emb>)``; each of K latent steps feeds
``Adapter(z, k, c)`` back as ``inputs_embeds`` for ONE new position through the KV cache, whose
last hidden state is the next ``z``; then a token continuation (at inference the forced suffix
``<eot></think>\\n<gen_emb>``; in training the curriculum's remaining text) is run on the same
cache and the embedding is read AT ``<gen_emb>``.

Rows are left-padded in the prefix, so every row's latent steps sit in the same columns; positions
are passed explicitly per row (Qwen2-VL's multimodal rotary positions for the prefix, then each
row's next text position), so a batch gives the same vectors as one item at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from .choices import ANCHORS
from .vision_step import vision_in_step

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel

    from .encoding import Item, PromptEncoder

ADAPTER_ATTR = "rime_latent_adapter"  # submodule name on the HF model (so DeepSpeed trains and checkpoints it)
ADAPTER_DIR = "latent_adapter"  # sub-folder of a saved embedder (kept out of the model's *.safetensors)


def is_adapter_key(name: str) -> bool:
    """State-dict keys of the adapter (rollout engines, which never run latent mode, skip them)."""
    return name.startswith(ADAPTER_ATTR + ".")


@dataclass(frozen=True)
class AdapterConfig:
    """Sizes of the transition adapter. ``num_experts=0`` with the shared expert is PLUME's
    "single MLP" ablation; no experts and no shared expert is the identity ("no latent transition")."""

    hidden_size: int
    num_experts: int = 4
    top_k: int = 2
    shared_expert: bool = True
    expert_mult: int = 2  # expert inner width = expert_mult * hidden_size (PLUME: D -> 2D -> D)
    step_embed_dim: int = 0  # 0 = hidden_size
    max_steps: int = 16  # step embeddings available; K may not exceed it
    anchor: str = "disc"  # disc: c = h(<disc_emb>) guides the router; none: c = 0
    default_steps: int = 8  # K used when a caller does not say
    renormalize: bool = False  # renormalise the top-k router weights to sum to 1

    def __post_init__(self) -> None:
        checks = {
            "hidden_size": self.hidden_size >= 1,
            "num_experts": self.num_experts >= 0,
            "expert_mult": self.expert_mult >= 1,
            "step_embed_dim": self.step_embed_dim >= 0,
            "max_steps": self.max_steps >= 1,
            "default_steps": 0 <= self.default_steps <= self.max_steps,
            "top_k": (1 <= self.top_k <= self.num_experts) if self.num_experts else True,
        }
        for key, ok in checks.items():
            if not ok:
                raise ValueError(f"latent adapter {key}: invalid value {getattr(self, key)!r} ({self})")
        if self.anchor not in ANCHORS:
            raise ValueError(f"latent adapter anchor: {self.anchor!r} is not one of {ANCHORS}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AdapterConfig:
        return cls(**d)


class Expert(nn.Module):
    """``Linear(2D→D)(GELU(Linear(D→2D)(x)))``; the output layer starts at zero, so a fresh adapter is
    the identity transition and training starts from the plain continuous-thought loop."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.up = nn.Linear(dim, inner)
        self.down = nn.Linear(inner, dim)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class TransitionAdapter(nn.Module):
    """``z̃ = z + E0(LN(z)) + Σ_topk π_m E_m(LN(z))`` with ``π = softmax(W [z + c ; StepEmbed(k)])``.

    Experts are evaluated densely and weighted by the top-k mask: with 4 experts on one position
    per row this is cheaper than a dispatch, and exact."""

    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        self.cfg = cfg
        d, s = cfg.hidden_size, cfg.step_embed_dim or cfg.hidden_size
        self.norm = nn.LayerNorm(d)
        self.shared = Expert(d, cfg.expert_mult * d) if cfg.shared_expert else None
        self.experts = nn.ModuleList(Expert(d, cfg.expert_mult * d) for _ in range(cfg.num_experts))
        self.step_embed = nn.Embedding(cfg.max_steps, s) if cfg.num_experts else None
        self.router = nn.Linear(d + s, cfg.num_experts) if cfg.num_experts else None

    def route(self, z: torch.Tensor, step: int, anchor: torch.Tensor | None) -> torch.Tensor:
        """Router probabilities ``π`` [B, M] over all experts (before the top-k cut)."""
        guide = z if anchor is None or self.cfg.anchor == "none" else z + anchor
        k = torch.full((z.shape[0],), step, dtype=torch.long, device=z.device)
        return torch.softmax(self.router(torch.cat([guide, self.step_embed(k).to(z.dtype)], dim=-1)), dim=-1)

    def forward(self, z: torch.Tensor, step: int, anchor: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(next input embedding [B, D], router probabilities [B, M] or None without experts)."""
        if not 0 <= step < self.cfg.max_steps:
            raise ValueError(
                f"latent step {step}: the adapter has step embeddings for 0..{self.cfg.max_steps - 1} "
                "(raise plume.max_latent_steps)"
            )
        x = self.norm(z)
        out = z if self.shared is None else z + self.shared(x)
        if not self.experts:
            return out, None
        probs = self.route(z, step, anchor)
        top = probs.topk(self.cfg.top_k, dim=-1)
        weights = torch.zeros_like(probs).scatter(-1, top.indices, top.values)
        if self.cfg.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        expert_out = torch.stack([e(x) for e in self.experts], dim=1)  # [B, M, D]
        return out + (weights.unsqueeze(-1) * expert_out).sum(1), probs


def balance_loss(probs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``mean_m (π̄_m − 1/M)²``, π̄ the router probability averaged over every row and latent step."""
    if not probs:
        raise ValueError("balance_loss: no router probabilities (the adapter has no experts or no step ran)")
    return balance_from_usage(torch.cat(list(probs), dim=0).mean(0))


def balance_from_usage(usage: torch.Tensor) -> torch.Tensor:
    """``mean_m (π̄_m − 1/M)²`` from ``π̄`` [M] itself: GradCache computes π̄ from per-row router sums
    cached chunk by chunk, since the average couples every row of the batch."""
    return ((usage - 1.0 / usage.shape[-1]) ** 2).mean()


# ----------------------------------------------------------------------------- persistence
def adapter_differences(have: dict, want: dict) -> dict[str, tuple]:
    """Adapter settings that differ between a saved adapter and the configured one, ``default_steps``
    aside (K at inference: changing it keeps the weights). Non-empty: the weights cannot carry over."""
    return {k: (have.get(k), v) for k, v in want.items() if k != "default_steps" and have.get(k) != v}


def attach_adapter(model: nn.Module, cfg: AdapterConfig, seed: int = 0) -> TransitionAdapter:
    """Create the adapter (seeded) as a submodule of ``model``, on its device and dtype."""
    p = next(model.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter = TransitionAdapter(cfg)
    adapter.to(device=p.device, dtype=p.dtype)
    model.add_module(ADAPTER_ATTR, adapter)
    return adapter


def save_adapter(adapter: TransitionAdapter, path: Path) -> None:
    from safetensors.torch import save_file

    (path / ADAPTER_DIR).mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in adapter.state_dict().items()},
        str(path / ADAPTER_DIR / "adapter.safetensors"),
    )


def load_adapter(model: nn.Module, cfg: AdapterConfig, path: Path) -> TransitionAdapter:
    from safetensors.torch import load_file

    f = path / ADAPTER_DIR / "adapter.safetensors"
    if not f.is_file():
        raise FileNotFoundError(f"{f} missing: the embedder's settings name a latent adapter but its weights are gone")
    adapter = attach_adapter(model, cfg)
    adapter.load_state_dict(load_file(str(f)))
    return adapter


# ----------------------------------------------------------------------------- the latent pass
@dataclass
class LatentOutput:
    """What one latent pass produced; every tensor keeps its graph (learners back-propagate)."""

    anchor: torch.Tensor  # [B, D] hidden at <disc_emb> (the disc embedding, unnormalised)
    latents: list[torch.Tensor]  # K x [B, D] the z after each step
    router_probs: list[torch.Tensor]  # K x [B, M] (empty without experts)
    hidden: torch.Tensor  # [B, L, D] continuation hidden states
    read_pos: torch.Tensor  # [B] index of <gen_emb> inside the continuation
    labels: torch.Tensor  # [B, L] continuation ids, -100 on padding (CE targets; <eot> at 0 is never predicted)

    def gen_embedding(self) -> torch.Tensor:
        rows = torch.arange(self.hidden.shape[0], device=self.hidden.device)
        return F.normalize(self.hidden[rows, self.read_pos].float(), dim=-1)

    def disc_embedding(self) -> torch.Tensor:
        return F.normalize(self.anchor.float(), dim=-1)


def _next_positions(model: PreTrainedModel, enc: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(prefix position ids, each row's next free position [B]). Qwen2-VL: 3-D multimodal rotary
    positions from the model's own ``get_rope_index``; other families: 1-D positions over the mask."""
    mask = enc["attention_mask"]
    inner = model.model
    if hasattr(inner, "get_rope_index"):
        mm = enc.get("mm_token_type_ids")
        if mm is None:
            mm = torch.zeros_like(enc["input_ids"])
        pos, _ = inner.get_rope_index(
            enc["input_ids"],
            mm,
            image_grid_thw=enc.get("image_grid_thw"),
            video_grid_thw=enc.get("video_grid_thw"),
            attention_mask=mask,
        )
        return pos, pos.amax(dim=(0, 2)) + 1
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return pos, pos.amax(dim=-1) + 1


def _positions(start: torch.Tensor, length: int, mrope: bool) -> torch.Tensor:
    pos = start.unsqueeze(1) + torch.arange(length, device=start.device)
    return pos.unsqueeze(0).expand(3, -1, -1) if mrope else pos


def latent_pass(
    model: PreTrainedModel,
    enc: PromptEncoder,
    items: Sequence[Item],
    steps: int,
    continuations: Sequence[Sequence[int]] | None = None,
) -> LatentOutput:
    """Prefix → ``steps`` latent steps → continuation tokens, batched, differentiable, on the embedder's
    HF ``model`` (with its adapter, if any) and prompt encoder ``enc``.

    ``continuations`` are token ids per row, each starting at ``<eot>`` and ending at (or after)
    ``<gen_emb>``; None = the forced suffix (inference). Rows of different lengths are right-padded
    there; the embedding is read at each row's last ``<gen_emb>``."""
    adapter: TransitionAdapter | None = getattr(model, ADAPTER_ATTR, None)
    if steps < 0:
        raise ValueError(f"latent steps: must be >= 0, got {steps}")
    if adapter is not None and steps > adapter.cfg.max_steps:
        raise ValueError(f"latent steps: {steps} > the adapter's max_steps {adapter.cfg.max_steps}")
    prefix = enc.latent_prompt_batch(items)
    pos, nxt = _next_positions(model, prefix)
    mrope = pos.dim() == 3
    with vision_in_step(model, enc, prefix):  # a text-only batch still runs the vision tower in training (see there)
        out = model.model(**prefix, position_ids=pos, use_cache=True)
    cache, h = out.past_key_values, out.last_hidden_state
    rows = torch.arange(h.shape[0], device=h.device)
    anchor = h[rows, enc.read_positions(prefix["input_ids"], "disc_emb")]
    z = h[:, -1]  # <bot>: the prefix is left-padded, so it is every row's last column
    mask = prefix["attention_mask"]
    latents, probs = [], []
    for k in range(steps):
        x, p = (z, None) if adapter is None else adapter(z, k, anchor)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        o = model.model(
            inputs_embeds=x.unsqueeze(1),
            attention_mask=mask,
            position_ids=_positions(nxt + k, 1, mrope),
            past_key_values=cache,
            use_cache=True,
        )
        cache, z = o.past_key_values, o.last_hidden_state[:, -1]
        latents.append(z)
        if p is not None:
            probs.append(p)
    if continuations is None:
        suffix = enc.token_ids(enc.template.latent_suffix(enc.tokens))
        continuations = [suffix] * len(items)
    width = max(len(c) for c in continuations)
    pad = enc.tokenizer.pad_token_id
    ids = torch.full((len(items), width), pad, dtype=torch.long, device=mask.device)
    cmask = torch.zeros_like(ids)
    for b, c in enumerate(continuations):
        ids[b, : len(c)] = torch.tensor(list(c), dtype=torch.long)
        cmask[b, : len(c)] = 1
    gen_id = enc.token_id["gen_emb"]
    hits = ids == gen_id
    if not bool(hits.any(dim=1).all()):
        raise ValueError("continuations: every row must contain <gen_emb> (the embedding is read there)")
    read = torch.where(hits, torch.arange(width, device=ids.device).expand_as(ids), -1).max(dim=1).values
    o = model.model(
        inputs_embeds=model.get_input_embeddings()(ids),
        attention_mask=torch.cat([mask, cmask], dim=1),
        position_ids=_positions(nxt + steps, width, mrope),
        past_key_values=cache,
        use_cache=True,
    )
    return LatentOutput(
        anchor=anchor,
        latents=latents,
        router_probs=probs,
        hidden=o.last_hidden_state,
        read_pos=read,
        labels=ids.masked_fill(cmask == 0, -100),
    )
