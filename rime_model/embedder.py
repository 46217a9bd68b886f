"""The RIME embedder: discriminative (one pass), generative (rewrite, then embed) and latent (PLUME) modes.

``Embedder`` holds the model and its prompt encoder (``.enc``, ``rime_model.encoding``) and serves
inference (``embed``), the reward service (``embed_with_rewrite``, teacher forced) and the learners
(``enc.*_batch`` + ``encode`` keep gradients). Refine-RL's rollouts and log-probs live in
``rime_model.rollout_ops``, PLUME's explicit reasoning in ``rime_model.reasoning``, the latent pass in
``rime_model.latent``, gen mode's one-pass read of ``<gen_emb>`` from the generation's KV cache in
``rime_model.gen_embed``. Embeddings are the final-layer hidden state read AT the special token (not the
position after it, UME-R1's off-by-one), L2-normalised in float32.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import GenerationConfig as HFGenerationConfig
from transformers import PreTrainedModel
from transformers.processing_utils import ProcessorMixin

from .choices import MODES
from .encoding import Item, ModelBatch, PromptEncoder, Rewrite
from .families import FAMILIES, ModelFamily
from .gen_embed import generate, generate_and_embed, one_pass_blocker
from .latent import (
    ADAPTER_ATTR,
    AdapterConfig,
    TransitionAdapter,
    adapter_differences,
    attach_adapter,
    latent_pass,
    load_adapter,
    save_adapter,
)
from .prompts import PromptTemplate
from .tokens import SpecialTokens, add_special_tokens
from .vision_step import vision_in_step

EMBEDDER_CONFIG = "rime_embedder.json"
DEFAULT_LATENT_STEPS = 8  # PLUME's K, used when the model has no adapter settings of its own


@dataclass
class EmbeddingResult:
    """L2-normalised float32 vectors, plus the rewrites in gen mode."""

    vectors: np.ndarray
    mode: str
    rewrites: list[Rewrite] | None = None

    @property
    def rewrite_texts(self) -> list[str] | None:
        return None if self.rewrites is None else [r.text for r in self.rewrites]

    @property
    def rewrite_token_counts(self) -> list[int] | None:
        return None if self.rewrites is None else [r.num_tokens for r in self.rewrites]


def check_dims(dims: int, size: int) -> int:
    """``dims`` for truncated scoring: a prefix size in 1..size (ValueError names it and the range)."""
    if isinstance(dims, bool) or not isinstance(dims, (int, np.integer)) or not 1 <= dims <= size:
        raise ValueError(f"dims: must be an integer in 1..{size} (the model's embedding size), got {dims!r}")
    return int(dims)


def truncate(vectors: np.ndarray, dims: int | None) -> np.ndarray:
    """The first ``dims`` components of each row, re-normalised to unit length (Matryoshka scoring); the
    vectors as they are for None. A zero prefix stays zero (as ``F.normalize``), never NaN."""
    if dims is None:
        return vectors
    head = vectors[:, :dims]
    norms = np.linalg.norm(head, axis=1, keepdims=True)
    return (head / np.maximum(norms, 1e-12)).astype(vectors.dtype, copy=False)


@dataclass
class GenerationConfig:
    """Sampling settings of the rewrite; greedy by default (deterministic eval and serving)."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off (transformers' generate would otherwise apply its default top_k=50)
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Gen mode reads <gen_emb> from the generation's own KV cache (generation + one token) instead of
    # teacher-forcing prompt + rewrite again; same vectors (rime_model.gen_embed). False forces two passes.
    one_pass: bool = True

    def sampling(self) -> dict[str, Any]:
        """``generate``'s sampling arguments for these settings."""
        if not self.do_sample:
            return dict(do_sample=False)
        return dict(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)


def _check_generation(g: GenerationConfig) -> None:
    if g.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be >= 1, got {g.max_new_tokens}")


def _from_encoder(name: str) -> property:
    """A read-only attribute that is the prompt encoder's (one object, shared with it)."""
    return property(lambda self: getattr(self.enc, name), doc=f"The prompt encoder's ``{name}``.")


class Embedder:
    """An image-text-to-text model with rime's special tokens, producing embeddings in any mode."""

    processor = _from_encoder("processor")
    tokenizer = _from_encoder("tokenizer")
    family = _from_encoder("family")
    tokens = _from_encoder("tokens")
    template = _from_encoder("template")
    token_id = _from_encoder("token_id")

    def __init__(
        self,
        model: PreTrainedModel,
        processor: ProcessorMixin,
        family: ModelFamily,
        tokens: SpecialTokens | None = None,
        template: PromptTemplate | None = None,
    ):
        self.model = model
        tokens = tokens or SpecialTokens()
        tokenizer = processor.tokenizer
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            raise ValueError("tokenizer has no pad_token; set one before building the Embedder")
        add_special_tokens(tokenizer, self.model, tokens)
        # Matryoshka prefix sizes the model was trained for (cma.matryoshka_dims); () = none. Saved with it.
        self.matryoshka_dims: tuple[int, ...] = ()
        self.enc = PromptEncoder(processor, family, tokens, template or PromptTemplate(), device=lambda: self.device)
        # rime's GenerationConfig is the only source of sampling settings. ``generate`` fills every setting a
        # call leaves unset from the checkpoint's generation_config.json (Qwen2-VL-Instruct's carries a
        # repetition penalty), so rollouts would sample from another distribution than the raw-logit
        # log-probs PPO's ratio uses, and than the vLLM backend, which ignores those defaults. Keep only ids.
        old = getattr(self.model, "generation_config", None)
        if old is not None:
            self.model.generation_config = HFGenerationConfig(
                bos_token_id=old.bos_token_id, eos_token_id=old.eos_token_id, pad_token_id=old.pad_token_id
            )

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        """The embedding size: the token embedding's width (under ZeRO-3 its full ``ds_shape``: the
        partitioned weight itself reads as empty on a learner)."""
        w = self.model.get_input_embeddings().weight
        return int(getattr(w, "ds_shape", w.shape)[1])

    @property
    def latent_adapter(self) -> TransitionAdapter | None:
        """PLUME's transition adapter, a submodule of the model (None = identity transition)."""
        return getattr(self.model, ADAPTER_ATTR, None)

    @property
    def latent_steps(self) -> int:
        """Default K of latent mode: the adapter's trained setting, else PLUME's 8."""
        a = self.latent_adapter
        return a.cfg.default_steps if a is not None else DEFAULT_LATENT_STEPS

    def attach_latent_adapter(self, cfg: AdapterConfig, seed: int = 0) -> TransitionAdapter:
        """Give the model a fresh (identity-initialised) transition adapter; saved and loaded with it."""
        if self.latent_adapter is not None:
            raise ValueError("the model already has a latent adapter")
        if cfg.hidden_size != self.dim:
            raise ValueError(f"latent adapter hidden_size {cfg.hidden_size} != the model's hidden size {self.dim}")
        return attach_adapter(self.model, cfg, seed)

    def use_latent_adapter(self, cfg: AdapterConfig, seed: int = 0) -> TransitionAdapter:
        """The adapter a PLUME stage trains: the saved one when its settings match ``cfg`` (``default_steps``
        aside, which only sets K), else a fresh one of ``cfg``'s shape (an ablation from a CoT start model
        means what it says; the driver announces it: ``orchestrator.stages.plume.announce_adapter``)."""
        have = self.latent_adapter
        if have is not None and adapter_differences(have.cfg.to_dict(), cfg.to_dict()):
            delattr(self.model, ADAPTER_ATTR)
            have = None
        if have is None:
            return self.attach_latent_adapter(cfg, seed=seed)
        have.cfg = cfg  # at most K's default differs
        return have

    def prepare(self, inputs: Iterable[Any]) -> list[Item]:
        """Validate and decode user items (raises ``InputError`` naming the bad item)."""
        return self.enc.prepare(inputs)

    # ------------------------------------------------------------------ forward
    def hidden_states(self, batch: ModelBatch) -> torch.Tensor:
        """Final-layer hidden states [B, T, D] (the backbone only: no vocab-sized logits)."""
        with vision_in_step(self.model, self.enc, batch.inputs):
            out = self.model.model(**batch.inputs, use_cache=False)
        return out.last_hidden_state

    def encode(self, batch: ModelBatch, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised embeddings [B, D] in float32; differentiable (learners call it)."""
        h = self.hidden_states(batch) if hidden is None else hidden
        rows = torch.arange(h.shape[0], device=h.device)
        return F.normalize(h[rows, batch.read_pos].float(), dim=-1)

    # ------------------------------------------------------------------ inference API
    @torch.no_grad()
    def embed(
        self,
        inputs: Iterable[Any],
        mode: str = "disc",
        batch_size: int = 16,
        generation: GenerationConfig | None = None,
        steps: int | None = None,
        dims: int | None = None,
    ) -> EmbeddingResult:
        """Embed items in ``disc`` (one pass), ``gen`` (generate a rewrite, then embed) or ``latent``
        (PLUME: ``steps`` latent steps through the transition adapter, default ``self.latent_steps``).
        ``dims``: keep the first ``dims`` components, re-normalised (smaller vectors; a model trained with
        ``cma.matryoshka_dims`` lists the sizes it learnt in ``matryoshka_dims``)."""
        if mode not in MODES:
            raise ValueError(f"mode: {mode!r} is not one of {MODES}")
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        if dims is not None:
            check_dims(dims, self.dim)
        res = self._embed(self.prepare(inputs), mode, batch_size, generation, steps)
        res.vectors = truncate(res.vectors, dims)
        return res

    def _embed(
        self, items: list[Item], mode: str, batch_size: int, generation: GenerationConfig | None, steps: int | None
    ) -> EmbeddingResult:
        chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
        if mode == "disc":
            return EmbeddingResult(torch.cat([self.encode(self.enc.disc_batch(c)) for c in chunks]).cpu().numpy(), "disc")
        if mode == "latent":
            k = self.latent_steps if steps is None else steps
            vecs = [latent_pass(self.model, self.enc, c, k).gen_embedding() for c in chunks]
            return EmbeddingResult(torch.cat(vecs).cpu().numpy(), "latent")
        g = generation or GenerationConfig()
        if one_pass_blocker(g) is None:
            return self._embed_gen_one_pass(items, batch_size, g)
        rewrites = self.generate_rewrites(items, batch_size=batch_size, generation=g)
        return EmbeddingResult(self._embed_items_with_rewrites(items, [r.text for r in rewrites], batch_size), "gen", rewrites)

    def _embed_gen_one_pass(self, items: list[Item], batch_size: int, g: GenerationConfig) -> EmbeddingResult:
        """Gen mode with ``<gen_emb>`` read from each chunk's generation cache: the rewrites and (up to float
        rounding) the vectors of the two-pass path, at the cost of the generation plus one token."""
        _check_generation(g)
        if g.seed is not None:
            torch.manual_seed(g.seed)
        rewrites: list[Rewrite] = []
        vecs = []
        for i in range(0, len(items), batch_size):
            res = generate_and_embed(self.model, self.enc, items[i : i + batch_size], g)
            rewrites.extend(res.rewrites)
            vecs.append(res.vectors)
        return EmbeddingResult(torch.cat(vecs).cpu().numpy(), "gen", rewrites)

    @torch.no_grad()
    def embed_with_rewrite(self, inputs: Iterable[Any], rewrites: Sequence[str], batch_size: int = 16) -> EmbeddingResult:
        """Gen-mode embedding of given rewrites, teacher-forced (no sampling)."""
        items = self.prepare(inputs)
        return EmbeddingResult(self._embed_items_with_rewrites(items, list(rewrites), batch_size), "gen")

    def _embed_items_with_rewrites(self, items: list[Item], rewrites: list[str], batch_size: int) -> np.ndarray:
        if len(rewrites) != len(items):
            raise ValueError(f"rewrites: got {len(rewrites)} for {len(items)} inputs; give one rewrite per input")
        vecs = [
            self.encode(self.enc.gen_batch(items[i : i + batch_size], rewrites[i : i + batch_size]))
            for i in range(0, len(items), batch_size)
        ]
        return torch.cat(vecs).cpu().numpy()

    @torch.no_grad()
    def generate_rewrites(
        self, items: list[Item], batch_size: int = 16, generation: GenerationConfig | None = None, num_samples: int = 1
    ) -> list[Rewrite]:
        """Generate ``num_samples`` rewrites per item (item-major order), left-padded batches."""
        g = generation or GenerationConfig()
        _check_generation(g)
        if g.seed is not None:
            torch.manual_seed(g.seed)
        out: list[Rewrite] = []
        for i in range(0, len(items), batch_size):
            enc = self.enc.gen_prompt_batch(items[i : i + batch_size])
            seqs = generate(self.model, self.enc, enc, g, num_return_sequences=num_samples)
            out.extend(self.enc.parse_rewrite(ids) for ids in seqs[:, enc["input_ids"].shape[1] :].tolist())
        return out

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write model, tokenizer, image processor and rime's own settings to one folder. ``state_dict``:
        the model's weights to write under the plain model's names, when the model's own are not them
        (LoRA: the merged weights, ``rime_model.lora``)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        adapter = self.latent_adapter
        # The adapter is saved beside the model, not inside its checkpoint (stock loaders and rollout
        # engines read the checkpoint and know nothing of it).
        state = state_dict
        if adapter is not None:
            own = self.model.state_dict() if state is None else state
            state = {k: v for k, v in own.items() if not k.startswith(ADAPTER_ATTR + ".")}
        self.model.save_pretrained(str(path), state_dict=state)
        self.family.save_processor(self.processor, path)
        meta = {
            "family": self.family.name,
            "tokens": self.tokens.to_dict(),
            "template": self.template.to_dict(),
            "matryoshka_dims": list(self.matryoshka_dims),
        }
        if adapter is not None:
            save_adapter(adapter, path)
            meta["latent_adapter"] = adapter.cfg.to_dict()
        (path / EMBEDDER_CONFIG).write_text(json.dumps(meta, indent=2))
        return path

    @staticmethod
    def saved_settings(path: str | Path) -> dict:
        """A saved embedder's own settings (family, tokens, template, latent adapter, Matryoshka sizes),
        checked, without loading weights."""
        meta_file = Path(path) / EMBEDDER_CONFIG
        if not meta_file.is_file():
            raise FileNotFoundError(f"{meta_file} not found: {path} is not a saved rime embedder (Embedder.save writes it)")
        meta = json.loads(meta_file.read_text())
        if meta.get("family") not in FAMILIES:
            raise ValueError(f"{meta_file}: family {meta.get('family')!r} unknown; known: {sorted(FAMILIES)}")
        return meta

    @staticmethod
    def saved_dim(path: str | Path) -> int:
        """A saved embedder's embedding size (its language model's hidden size), read from the model's
        config without loading weights: settings checked against it fail before any model loads."""
        from transformers import AutoConfig

        return int(AutoConfig.from_pretrained(str(path)).get_text_config().hidden_size)

    @staticmethod
    def reserved_tokens_of(path: str | Path) -> tuple[str, ...]:
        """The control tokens a saved embedder refuses in input text (``enc.reserved``), read from its
        settings file without loading weights: the data stream checks training rows against them."""
        meta = Embedder.saved_settings(path)
        return tuple(SpecialTokens.from_dict(meta["tokens"]).all()) + FAMILIES[meta["family"]].control_tokens

    @classmethod
    def load(cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str | None = None) -> Embedder:
        """Load a folder written by ``save`` (model, processor and settings) in one call."""
        path = Path(path)
        meta = cls.saved_settings(path)
        family = FAMILIES[meta["family"]]
        model = family.load_model(str(path), dtype).eval()
        if device:
            model.to(device)
        processor = family.load_processor(str(path))
        emb = cls(model, processor, family, SpecialTokens.from_dict(meta["tokens"]), PromptTemplate.from_dict(meta["template"]))
        if meta.get("latent_adapter"):
            load_adapter(emb.model, AdapterConfig.from_dict(meta["latent_adapter"]), path).eval()
        emb.matryoshka_dims = tuple(meta.get("matryoshka_dims", ()))  # folders saved before it: none
        return emb
