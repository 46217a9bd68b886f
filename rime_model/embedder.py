"""The RIME embedder: discriminative (one pass) and generative (rewrite, then embed) modes.

One class serves inference (``embed``), the reward service (``embed_with_rewrite``, teacher
forced) and the learners (``build_*_batch`` + ``encode`` keep gradients). Embeddings are the
final-layer hidden state read AT the special token (not the position after it, UME-R1's
off-by-one), L2-normalised in float32.
"""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import GenerationConfig as HFGenerationConfig
from transformers import PreTrainedModel
from transformers.processing_utils import ProcessorMixin

from .curriculum import Phase, continuation_text
from .families import FAMILIES, ModelFamily
from .inputs import normalize_inputs, reserved_in
from .latent import ADAPTER_ATTR, AdapterConfig, TransitionAdapter, attach_adapter, latent_pass, load_adapter, save_adapter
from .prompts import PromptTemplate
from .tokens import SpecialTokens, add_special_tokens

EMBEDDER_CONFIG = "rime_embedder.json"
MODES = ("disc", "gen", "latent")
DEFAULT_LATENT_STEPS = 8  # PLUME's K, used when the model has no adapter settings of its own

Item = tuple[str, Image.Image | None, str]


@dataclass
class ModelBatch:
    """Model inputs plus, per row, where to read the embedding and which tokens carry CE loss."""

    inputs: dict[str, torch.Tensor]
    read_pos: torch.Tensor  # [B] index of <disc_emb>/<gen_emb>
    labels: torch.Tensor | None = None  # [B, T], -100 outside the teacher-forced completion


@dataclass
class Rewrite:
    """One generated rewrite: decoded text, generated ids (stop token included) and format check."""

    text: str
    token_ids: list[int]
    well_formed: bool  # emitted ``</rewrite><gen_emb>`` before stopping

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


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


def cut_at_stop(generated: Sequence[int], pad_id: int | None, stop_ids: Sequence[int]) -> list[int]:
    """Generated ids up to and including the first stop token (padding after an early stop dropped)."""
    ids: list[int] = []
    for t in generated:
        if t == pad_id and t not in stop_ids:
            break
        ids.append(t)
        if t in stop_ids:
            break
    return ids


def parse_generated(generated: Sequence[int], tokenizer, stop_ids: Sequence[int], rewrite_end_id: int, gen_emb_id: int) -> Rewrite:
    """A ``Rewrite`` from generated ids; shared by the HF path and the vLLM rollout backend."""
    ids = cut_at_stop(generated, tokenizer.pad_token_id, stop_ids)
    body = ids[: ids.index(rewrite_end_id)] if rewrite_end_id in ids else [t for t in ids if t not in stop_ids]
    well_formed = len(ids) >= 2 and ids[-1] == gen_emb_id and ids[-2] == rewrite_end_id
    text = tokenizer.decode(body, skip_special_tokens=True).strip()
    return Rewrite(text=text, token_ids=ids, well_formed=well_formed)


def _tensors(x: Any) -> Iterable[torch.Tensor]:
    """Every tensor inside a model output (tensors, tuples, lists and ``ModelOutput`` mappings)."""
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)


class Embedder:
    """An image-text-to-text model with rime's special tokens, producing embeddings in any mode."""

    def __init__(
        self,
        model: PreTrainedModel,
        processor: ProcessorMixin,
        family: ModelFamily,
        tokens: SpecialTokens | None = None,
        template: PromptTemplate | None = None,
    ):
        self.model = model
        self.processor = processor
        self.family = family
        self.tokens = tokens or SpecialTokens()
        self.template = template or PromptTemplate()
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            raise ValueError("tokenizer has no pad_token; set one before building the Embedder")
        add_special_tokens(self.tokenizer, self.model, self.tokens)
        self.token_id = {name: self.tokenizer.convert_tokens_to_ids(t) for name, t in self.tokens.to_dict().items() if isinstance(t, str)}
        self.stop_ids = [self.token_id["gen_emb"], self.tokenizer.convert_tokens_to_ids("<|im_end|>")]
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in self.stop_ids:
            self.stop_ids.append(self.tokenizer.eos_token_id)
        self.reserved = tuple(self.tokens.all()) + family.control_tokens
        # rime's GenerationConfig is the only source of sampling settings. ``generate`` fills every setting a
        # call leaves unset from the checkpoint's generation_config.json (Qwen2-VL-Instruct's carries a
        # repetition penalty), so rollouts would sample from another distribution than the raw-logit
        # log-probs PPO's ratio uses, and than the vLLM backend, which ignores those defaults. Keep only ids.
        old = getattr(self.model, "generation_config", None)
        if old is not None:
            self.model.generation_config = HFGenerationConfig(
                bos_token_id=old.bos_token_id, eos_token_id=old.eos_token_id, pad_token_id=old.pad_token_id)
        # HF fast tokenizers are not thread-safe: a padded batch call switches the Rust tokenizer's padding
        # on and off, and a call from another thread meanwhile fails with "Already borrowed". Serving runs
        # one thread per mode on one embedder, so every tokenizer/processor use goes through this lock.
        self.tokenizer_lock = threading.RLock()
        self._blank_vision: dict[str, torch.Tensor] | None = None  # vision inputs of one blank image

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

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

    # ------------------------------------------------------------------ inputs
    def prepare(self, inputs: Iterable[Any]) -> list[Item]:
        """Validate and decode user items (raises ``InputError`` naming the bad item)."""
        return normalize_inputs(inputs, self.template.default_instruction, self.reserved)

    def _media(self, image: Image.Image | None) -> str:
        return self.family.image_placeholder if image is not None else ""

    def _encode_texts(self, texts: list[str], images: list[Image.Image | None]) -> dict[str, torch.Tensor]:
        present = [im for im in images if im is not None]
        with self.tokenizer_lock:
            enc = self.processor(
                text=texts, images=present or None, padding=True, return_tensors="pt", add_special_tokens=False
            )
        return {k: v.to(self.device) for k, v in enc.items()}

    def _read_positions(self, input_ids: torch.Tensor, token: str) -> torch.Tensor:
        """Index of the LAST occurrence of ``token`` per row (the template's own one)."""
        tid = self.token_id[token]
        hits = input_ids == tid
        if not bool(hits.any(dim=1).all()):
            raise RuntimeError(f"{token} missing from a built sequence; the prompt template lost it")
        idx = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        return torch.where(hits, idx, -1).max(dim=1).values

    def build_disc_batch(self, items: Sequence[Item]) -> ModelBatch:
        texts = [self.template.disc(self._media(im), ins, txt, self.tokens) for txt, im, ins in items]
        enc = self._encode_texts(texts, [im for _, im, _ in items])
        return ModelBatch(enc, self._read_positions(enc["input_ids"], "disc_emb"))

    def build_gen_batch(self, items: Sequence[Item], rewrites: Sequence[str]) -> ModelBatch:
        """Teacher-forced gen sequences; labels cover the completion (rewrite + end markers)."""
        if len(rewrites) != len(items):
            raise ValueError(f"rewrites: got {len(rewrites)} for {len(items)} inputs; give one rewrite per input")
        prompts = [self.template.gen_prompt(self._media(im), ins, txt, self.tokens) for txt, im, ins in items]
        completions = []
        for i, r in enumerate(rewrites):
            if not isinstance(r, str):
                raise ValueError(f"rewrites[{i}]: must be a string, got {type(r).__name__}")
            tok = reserved_in(r, self.reserved)
            if tok:
                raise ValueError(f"rewrites[{i}]: contains the reserved control token {tok!r}; remove it")
            completions.append(self.template.gen_completion(r.strip(), self.tokens))
        enc = self._encode_texts([p + c for p, c in zip(prompts, completions)], [im for _, im, _ in items])
        ids = enc["input_ids"]
        comp_lens = [len(self.token_ids(c)) for c in completions]
        labels = torch.full_like(ids, -100)
        for b, n in enumerate(comp_lens):
            labels[b, ids.shape[1] - n :] = ids[b, ids.shape[1] - n :]
        return ModelBatch(enc, self._read_positions(ids, "gen_emb"), labels)

    def build_gen_prompt_batch(self, items: Sequence[Item]) -> dict[str, torch.Tensor]:
        prompts = [self.template.gen_prompt(self._media(im), ins, txt, self.tokens) for txt, im, ins in items]
        return self._encode_texts(prompts, [im for _, im, _ in items])

    # ------------------------------------------------------------------ forward
    def hidden_states(self, batch: ModelBatch) -> torch.Tensor:
        """Final-layer hidden states [B, T, D] (the backbone only: no vocab-sized logits)."""
        with self.vision_in_step(batch.inputs):
            out = self.model.model(**batch.inputs, use_cache=False)
        return out.last_hidden_state

    @contextmanager
    def vision_in_step(self, inputs: dict[str, torch.Tensor]):
        """Within this context, a training forward without images still runs the vision tower, on one
        blank image, and adds 0 x its output to the token embeddings.

        Data-parallel ranks must run the same modules in the same order: DeepSpeed reduces only the
        gradients that exist (ZeRO-1/2 buckets then differ: gloo aborts with "Received data size doesn't
        match", NCCL hangs) and ZeRO-3 gathers each module's weights as it runs. A learner whose
        micro-batch happens to be text-only would skip the tower while another rank runs it. The tower
        runs where a real image's would, right after the token embedding and before the decoder (as
        LLaMA-Factory and ms-swift do for Qwen2-VL's text-only batches), so forward and backward visit
        the same modules in the same order on every rank; values and gradients are unchanged."""
        if not torch.is_grad_enabled() or any(k.startswith("pixel_values") for k in inputs):
            yield
            return
        fired = []

        def add_blank_image(module, args, output):
            if fired:
                return output
            fired.append(True)
            touched = [t for t in _tensors(self.model.model.get_image_features(**self._blank_vision_inputs()))
                       if t.is_floating_point() and t.requires_grad]
            if not touched:  # a frozen vision tower (model.freeze_vision): no gradient to keep in step
                return output
            return output + sum(t.float().sum() for t in touched).to(output.dtype) * 0.0

        handle = self.model.get_input_embeddings().register_forward_hook(add_blank_image)
        try:
            yield
        finally:
            handle.remove()

    def _blank_vision_inputs(self) -> dict[str, torch.Tensor]:
        """The processor's vision inputs (pixel values, grid) for one small blank image, made once."""
        if self._blank_vision is None:
            blank = Image.new("RGB", (56, 56))
            enc = self._encode_texts([self._media(blank)], [blank])
            self._blank_vision = {k: v for k, v in enc.items() if k.startswith(("pixel_values", "image_"))}
        return self._blank_vision

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
    ) -> EmbeddingResult:
        """Embed items in ``disc`` (one pass), ``gen`` (generate a rewrite, then embed) or ``latent``
        (PLUME: ``steps`` latent steps through the transition adapter, default ``self.latent_steps``)."""
        if mode not in MODES:
            raise ValueError(f"mode: {mode!r} is not one of {MODES}")
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        items = self.prepare(inputs)
        if mode == "disc":
            vecs = [self.encode(self.build_disc_batch(items[i : i + batch_size])) for i in range(0, len(items), batch_size)]
            return EmbeddingResult(torch.cat(vecs).cpu().numpy(), "disc")
        if mode == "latent":
            k = self.latent_steps if steps is None else steps
            vecs = [latent_pass(self, items[i : i + batch_size], k).gen_embedding() for i in range(0, len(items), batch_size)]
            return EmbeddingResult(torch.cat(vecs).cpu().numpy(), "latent")
        rewrites = self.generate_rewrites(items, batch_size=batch_size, generation=generation)
        vecs = self._embed_items_with_rewrites(items, [r.text for r in rewrites], batch_size)
        return EmbeddingResult(vecs, "gen", rewrites)

    @torch.no_grad()
    def embed_with_rewrite(self, inputs: Iterable[Any], rewrites: Sequence[str], batch_size: int = 16) -> EmbeddingResult:
        """Gen-mode embedding of given rewrites, teacher-forced (no sampling)."""
        items = self.prepare(inputs)
        return EmbeddingResult(self._embed_items_with_rewrites(items, list(rewrites), batch_size), "gen")

    @torch.no_grad()
    def embed_with_reasoning(self, inputs: Iterable[Any], written: Sequence[tuple[str, str]], batch_size: int = 16) -> EmbeddingResult:
        """Gen embedding after a given explicit (reasoning, answer), teacher-forced in PLUME's stage-0 layout
        (``<bot><eot>`` reasoning ``</think>`` answer ``<gen_emb>``): how a CoT embedder retrieves, i.e. what
        the curriculum has to carry into latent steps. ``written`` is what ``generate_reasoning`` returns."""
        items = self.prepare(inputs)
        if len(written) != len(items):
            raise ValueError(f"written: got {len(written)} (reasoning, answer) pairs for {len(items)} inputs; give one per input")
        stage0 = Phase(stage=0, latent_steps=0, replaced=0, keep_answer=True)  # the learner's layout, by construction
        conts = [self.token_ids(continuation_text(self.template, self.tokens, [r.strip()], stage0, a)) for r, a in written]
        vecs = [latent_pass(self, items[i : i + batch_size], 0, conts[i : i + batch_size]).gen_embedding()
                for i in range(0, len(items), batch_size)]
        return EmbeddingResult(torch.cat(vecs).cpu().numpy() if vecs else np.zeros((0, self.dim), np.float32), "explicit")

    def _embed_items_with_rewrites(self, items: list[Item], rewrites: list[str], batch_size: int) -> np.ndarray:
        if len(rewrites) != len(items):
            raise ValueError(f"rewrites: got {len(rewrites)} for {len(items)} inputs; give one rewrite per input")
        vecs = [
            self.encode(self.build_gen_batch(items[i : i + batch_size], rewrites[i : i + batch_size]))
            for i in range(0, len(items), batch_size)
        ]
        return torch.cat(vecs).cpu().numpy()

    @torch.no_grad()
    def generate_rewrites(
        self, items: list[Item], batch_size: int = 16, generation: GenerationConfig | None = None, num_samples: int = 1
    ) -> list[Rewrite]:
        """Generate ``num_samples`` rewrites per item (item-major order), left-padded batches."""
        g = generation or GenerationConfig()
        if g.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {g.max_new_tokens}")
        if g.seed is not None:
            torch.manual_seed(g.seed)
        out: list[Rewrite] = []
        for i in range(0, len(items), batch_size):
            enc = self.build_gen_prompt_batch(items[i : i + batch_size])
            sampling = dict(do_sample=True, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k) if g.do_sample else dict(do_sample=False)
            seqs = self.model.generate(
                **enc,
                max_new_tokens=g.max_new_tokens,
                num_return_sequences=num_samples,
                eos_token_id=self.stop_ids,
                pad_token_id=self.tokenizer.pad_token_id,
                **sampling,
                **g.extra,
            )
            new = seqs[:, enc["input_ids"].shape[1] :].tolist()
            out.extend(self.parse_rewrite(ids) for ids in new)
        return out

    @torch.no_grad()
    def generate_reasoning(self, inputs: Iterable[Any], max_new_tokens: int = 128, batch_size: int = 16) -> list[tuple[str, str]]:
        """Greedy explicit reasoning in PLUME's stage-0 layout (``<think><bot><eot>`` then text until
        ``<gen_emb>``): one (reasoning before ``</think>``, answer after it) pair per input. Used to check
        that a model can write the reasoning its curriculum turns into latent steps."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
        items = self.prepare(inputs)
        think_end = self.token_id["think_end"]
        out: list[tuple[str, str]] = []
        for i in range(0, len(items), batch_size):
            chunk = items[i : i + batch_size]
            texts = [self.template.latent_prompt(self._media(im), ins, txt, self.tokens) + self.tokens.latent_end
                     for txt, im, ins in chunk]
            enc = self._encode_texts(texts, [im for _, im, _ in chunk])
            seqs = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                       eos_token_id=self.stop_ids, pad_token_id=self.tokenizer.pad_token_id)
            for gen in seqs[:, enc["input_ids"].shape[1] :].tolist():
                ids = [t for t in cut_at_stop(gen, self.tokenizer.pad_token_id, self.stop_ids) if t not in self.stop_ids]
                cut = ids.index(think_end) if think_end in ids else len(ids)
                with self.tokenizer_lock:
                    reasoning = self.tokenizer.decode(ids[:cut], skip_special_tokens=True).strip()
                    answer = self.tokenizer.decode(ids[cut + 1 :], skip_special_tokens=True).strip()
                out.append((reasoning, answer))
        return out

    def parse_rewrite(self, generated: list[int]) -> Rewrite:
        """Cut generated ids at the first stop token; the text is what precedes ``</rewrite>``."""
        with self.tokenizer_lock:
            return parse_generated(generated, self.tokenizer, self.stop_ids, self.token_id["rewrite_end"], self.token_id["gen_emb"])

    def token_ids(self, text: str) -> list[int]:
        """``text``'s token ids without special tokens, safe to call from any thread."""
        with self.tokenizer_lock:
            return self.tokenizer(text, add_special_tokens=False).input_ids

    # ------------------------------------------------------------------ Refine-RL (rollouts scored by the learner)
    def forced_suffix(self, completion: Sequence[int]) -> list[int]:
        """Tokens appended (without loss) so every rollout ends AT ``<gen_emb>``: a truncated or
        malformed rewrite still gets an embedding, read where a well-formed one would be."""
        end, gen = self.token_id["rewrite_end"], self.token_id["gen_emb"]
        ids = list(completion)
        if ids and ids[-1] == gen:
            return []
        if ids and ids[-1] in self.stop_ids:  # stopped on <|im_end|>/eos without the markers
            return [end, gen]
        return [gen] if ids and ids[-1] == end else [end, gen]

    def build_rollout_batch(self, items: Sequence[Item], completions: Sequence[Sequence[int]]) -> ModelBatch:
        """Gen prompt + the EXACT generated token ids (no decode/re-encode round trip) + forced suffix,
        left-padded. ``labels`` mark the generated tokens (the policy's actions); the embedding is
        read at the final ``<gen_emb>``."""
        if len(completions) != len(items):
            raise ValueError(f"completions: got {len(completions)} for {len(items)} inputs")
        enc = self.build_gen_prompt_batch(items)
        ids, att = enc["input_ids"].tolist(), enc["attention_mask"].tolist()
        rows, acts = [], []
        for b, comp in enumerate(completions):
            prompt = [t for t, m in zip(ids[b], att[b]) if m]
            comp = [int(t) for t in comp]
            suffix = self.forced_suffix(comp)
            rows.append(prompt + comp + suffix)
            acts.append((len(prompt), len(comp)))
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for b, row in enumerate(rows):
            off = width - len(row)
            input_ids[b, off:] = torch.tensor(row)
            attention[b, off:] = 1
            start, n = acts[b]
            labels[b, off + start : off + start + n] = input_ids[b, off + start : off + start + n]
        inputs = {**enc, "input_ids": input_ids.to(self.device), "attention_mask": attention.to(self.device)}
        for key, val in enc.items():  # other per-token tensors (mm_token_type_ids): re-aligned, 0 on new tokens
            if key not in ("input_ids", "attention_mask") and val.dim() == 2 and val.shape == enc["input_ids"].shape:
                col = torch.zeros_like(input_ids)
                for b in range(len(rows)):
                    kept = val[b][enc["attention_mask"][b].bool()].cpu()
                    col[b, width - len(rows[b]) : width - len(rows[b]) + len(kept)] = kept
                inputs[key] = col.to(self.device)
        return ModelBatch(inputs, self._read_positions(inputs["input_ids"], "gen_emb"), labels.to(self.device))

    def action_logprobs(self, hidden: torch.Tensor, labels: torch.Tensor, span: int | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Log-prob and entropy of each labelled token under the model, over the last ``span`` columns
        (rollout batches are right-aligned, so the actions live there): (logp, entropy, mask), [B, span].
        The lm head only runs on those columns, never on the whole sequence."""
        mask_full = labels != -100
        if span is None:
            cols = mask_full.any(dim=0).nonzero()
            span = int(labels.shape[1] - cols.min()) if len(cols) else 1
        tgt = labels[:, -span:]
        mask = tgt != -100
        logits = self.model.get_output_embeddings()(hidden[:, -span - 1 : -1]).float()
        logp_all = torch.log_softmax(logits, dim=-1)
        logp = logp_all.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        return logp * mask, entropy * mask, mask.to(logp.dtype)

    @torch.no_grad()
    def sample_rollouts(self, items: list[Item], n: int, generation: GenerationConfig, batch_size: int = 16
                        ) -> list[tuple[list[int], list[float]]]:
        """``n`` sampled completions per item (item-major) with each sampled token's log-prob under the
        raw policy (temperature-1 logits, before any sampling warper): PPO's behaviour log-probs."""
        if generation.seed is not None:
            torch.manual_seed(generation.seed)
        sampling = (dict(do_sample=True, temperature=generation.temperature, top_p=generation.top_p, top_k=generation.top_k)
                    if generation.do_sample else dict(do_sample=False))
        out: list[tuple[list[int], list[float]]] = []
        for i in range(0, len(items), batch_size):
            enc = self.build_gen_prompt_batch(items[i : i + batch_size])
            res = self.model.generate(**enc, max_new_tokens=generation.max_new_tokens, num_return_sequences=n,
                                      eos_token_id=self.stop_ids, pad_token_id=self.tokenizer.pad_token_id,
                                      output_logits=True, return_dict_in_generate=True, **sampling, **generation.extra)
            new = res.sequences[:, enc["input_ids"].shape[1] :]
            # one step at a time: a stacked fp32 [B*n, L, V] log-softmax is GBs at a 151k vocabulary
            tok_lp = torch.stack([torch.log_softmax(x.float(), dim=-1).gather(-1, new[:, t : t + 1]).squeeze(-1)
                                  for t, x in enumerate(res.logits)], dim=1)
            for b in range(new.shape[0]):
                ids = cut_at_stop(new[b].tolist(), self.tokenizer.pad_token_id, self.stop_ids)
                out.append((ids, tok_lp[b, : len(ids)].tolist()))
        return out

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write model, tokenizer, image processor and rime's own settings to one folder."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        adapter = self.latent_adapter
        # The adapter is saved beside the model, not inside its checkpoint (stock loaders and rollout
        # engines read the checkpoint and know nothing of it).
        state = None if adapter is None else {k: v for k, v in self.model.state_dict().items() if not k.startswith(ADAPTER_ATTR + ".")}
        self.model.save_pretrained(str(path), state_dict=state)
        self.family.save_processor(self.processor, path)
        meta = {"family": self.family.name, "tokens": self.tokens.to_dict(), "template": self.template.to_dict()}
        if adapter is not None:
            save_adapter(adapter, path)
            meta["latent_adapter"] = adapter.cfg.to_dict()
        (path / EMBEDDER_CONFIG).write_text(json.dumps(meta, indent=2))
        return path

    @staticmethod
    def saved_settings(path: str | Path) -> dict:
        """A saved embedder's own settings (family, tokens, template, latent adapter), checked, without
        loading weights."""
        meta_file = Path(path) / EMBEDDER_CONFIG
        if not meta_file.is_file():
            raise FileNotFoundError(f"{meta_file} not found: {path} is not a saved rime embedder (Embedder.save writes it)")
        meta = json.loads(meta_file.read_text())
        if meta.get("family") not in FAMILIES:
            raise ValueError(f"{meta_file}: family {meta.get('family')!r} unknown; known: {sorted(FAMILIES)}")
        return meta

    @staticmethod
    def reserved_tokens_of(path: str | Path) -> tuple[str, ...]:
        """The control tokens a saved embedder refuses in input text (``self.reserved``), read from its
        settings file without loading weights: the data stream checks training rows against them."""
        meta = Embedder.saved_settings(path)
        return tuple(SpecialTokens.from_dict(meta["tokens"]).all()) + FAMILIES[meta["family"]].control_tokens

    @classmethod
    def load(cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str | None = None) -> "Embedder":
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
        return emb
