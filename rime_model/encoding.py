"""rime's prompts as model inputs: the layer between the prompt template and the model.

``PromptEncoder`` holds the processor, tokenizer, model family, special tokens and template, and turns
items into padded tensors for every sequence rime runs: the disc sequence, the teacher-forced gen
sequence (labels on the completion), the gen prompt the model continues, a Refine-RL rollout (prompt +
the exact sampled ids + forced suffix) and PLUME's latent prefix. It knows nothing of the model beyond
the device its tensors go to, so the embedder, the latent pass and the RL and reasoning helpers share
it without importing each other. Batches are left-padded: every row's last token sits in the last column.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from .inputs import normalize_inputs, reserved_in

# Type-only: at run time this module needs torch, PIL and ``.inputs`` alone (the vLLM rollout venv imports it).
if TYPE_CHECKING:  # pragma: no cover
    from transformers.processing_utils import ProcessorMixin

    from .families import ModelFamily
    from .prompts import PromptTemplate
    from .tokens import SpecialTokens

Item = tuple[str, Image.Image | None, str]  # (text, image or None, instruction), as ``prepare`` returns them


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


def parse_generated(
    generated: Sequence[int], tokenizer, stop_ids: Sequence[int], rewrite_end_id: int, gen_emb_id: int
) -> Rewrite:
    """A ``Rewrite`` from generated ids; shared by the HF path and the vLLM rollout backend."""
    ids = cut_at_stop(generated, tokenizer.pad_token_id, stop_ids)
    body = ids[: ids.index(rewrite_end_id)] if rewrite_end_id in ids else [t for t in ids if t not in stop_ids]
    well_formed = len(ids) >= 2 and ids[-1] == gen_emb_id and ids[-2] == rewrite_end_id
    text = tokenizer.decode(body, skip_special_tokens=True).strip()
    return Rewrite(text=text, token_ids=ids, well_formed=well_formed)


class PromptEncoder:
    """Items → padded model inputs for every rime sequence, on the device ``device()`` names.

    The processor's tokenizer must already hold the special tokens (``Embedder`` adds them, growing the
    model's embeddings, before it builds its encoder)."""

    def __init__(
        self,
        processor: ProcessorMixin,
        family: ModelFamily,
        tokens: SpecialTokens,
        template: PromptTemplate,
        device: Callable[[], torch.device],
    ):
        self.processor = processor
        self.family = family
        self.tokens = tokens
        self.template = template
        self.tokenizer = processor.tokenizer
        self._device = device  # a callable: the model may move (or be replaced by a DeepSpeed engine's module)
        self.token_id = {
            name: self.tokenizer.convert_tokens_to_ids(t) for name, t in self.tokens.to_dict().items() if isinstance(t, str)
        }
        self.stop_ids = [self.token_id["gen_emb"], self.tokenizer.convert_tokens_to_ids("<|im_end|>")]
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in self.stop_ids:
            self.stop_ids.append(self.tokenizer.eos_token_id)
        self.reserved = tuple(self.tokens.all()) + family.control_tokens
        # HF fast tokenizers are not thread-safe: a padded batch call switches the Rust tokenizer's padding
        # on and off, and a call from another thread meanwhile fails with "Already borrowed". Serving runs
        # one thread per mode on one embedder, so every tokenizer/processor use goes through this lock.
        self.tokenizer_lock = threading.RLock()
        self._blank_vision: dict[str, torch.Tensor] | None = None  # vision inputs of one blank image

    @property
    def device(self) -> torch.device:
        """Where encoded tensors go: the model's device."""
        return self._device()

    # ------------------------------------------------------------------ text and ids
    def prepare(self, inputs: Iterable[Any]) -> list[Item]:
        """Validate and decode user items (raises ``InputError`` naming the bad item)."""
        return normalize_inputs(inputs, self.template.default_instruction, self.reserved)

    def media(self, image: Image.Image | None) -> str:
        """The family's image placeholder for an item with an image, else nothing."""
        return self.family.image_placeholder if image is not None else ""

    def token_ids(self, text: str) -> list[int]:
        """``text``'s token ids without special tokens, safe to call from any thread."""
        with self.tokenizer_lock:
            return self.tokenizer(text, add_special_tokens=False).input_ids

    def parse_rewrite(self, generated: list[int]) -> Rewrite:
        """Cut generated ids at the first stop token; the text is what precedes ``</rewrite>``."""
        with self.tokenizer_lock:
            return parse_generated(
                generated, self.tokenizer, self.stop_ids, self.token_id["rewrite_end"], self.token_id["gen_emb"]
            )

    # ------------------------------------------------------------------ tensors
    def encode_texts(self, texts: list[str], images: list[Image.Image | None]) -> dict[str, torch.Tensor]:
        """Processor outputs (left-padded, no added special tokens) for full prompt texts, on the device."""
        present = [im for im in images if im is not None]
        with self.tokenizer_lock:
            enc = self.processor(text=texts, images=present or None, padding=True, return_tensors="pt", add_special_tokens=False)
        return {k: v.to(self.device) for k, v in enc.items()}

    def read_positions(self, input_ids: torch.Tensor, token: str) -> torch.Tensor:
        """Index of the LAST occurrence of ``token`` per row (the template's own one)."""
        tid = self.token_id[token]
        hits = input_ids == tid
        if not bool(hits.any(dim=1).all()):
            raise RuntimeError(f"{token} missing from a built sequence; the prompt template lost it")
        idx = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        return torch.where(hits, idx, -1).max(dim=1).values

    def blank_vision_inputs(self) -> dict[str, torch.Tensor]:
        """The processor's vision inputs (pixel values, grid) for one small blank image, made once."""
        if self._blank_vision is None:
            blank = Image.new("RGB", (56, 56))
            enc = self.encode_texts([self.media(blank)], [blank])
            self._blank_vision = {k: v for k, v in enc.items() if k.startswith(("pixel_values", "image_"))}
        return self._blank_vision

    # ------------------------------------------------------------------ batches
    def disc_batch(self, items: Sequence[Item]) -> ModelBatch:
        """Disc sequences; the embedding is read at ``<disc_emb>``."""
        texts = [self.template.disc(self.media(im), ins, txt, self.tokens) for txt, im, ins in items]
        enc = self.encode_texts(texts, [im for _, im, _ in items])
        return ModelBatch(enc, self.read_positions(enc["input_ids"], "disc_emb"))

    def gen_batch(self, items: Sequence[Item], rewrites: Sequence[str]) -> ModelBatch:
        """Teacher-forced gen sequences; labels cover the completion (rewrite + end markers)."""
        if len(rewrites) != len(items):
            raise ValueError(f"rewrites: got {len(rewrites)} for {len(items)} inputs; give one rewrite per input")
        prompts = [self.template.gen_prompt(self.media(im), ins, txt, self.tokens) for txt, im, ins in items]
        completions = [self.gen_completion(r, i) for i, r in enumerate(rewrites)]
        enc = self.encode_texts([p + c for p, c in zip(prompts, completions)], [im for _, im, _ in items])
        ids = enc["input_ids"]
        comp_lens = [len(self.token_ids(c)) for c in completions]
        labels = torch.full_like(ids, -100)
        for b, n in enumerate(comp_lens):
            labels[b, ids.shape[1] - n :] = ids[b, ids.shape[1] - n :]
        return ModelBatch(enc, self.read_positions(ids, "gen_emb"), labels)

    def gen_completion(self, rewrite: str, index: int = 0) -> str:
        """The teacher-forced completion text of one rewrite (checked: a string without reserved tokens)."""
        if not isinstance(rewrite, str):
            raise ValueError(f"rewrites[{index}]: must be a string, got {type(rewrite).__name__}")
        tok = reserved_in(rewrite, self.reserved)
        if tok:
            raise ValueError(f"rewrites[{index}]: contains the reserved control token {tok!r}; remove it")
        return self.template.gen_completion(rewrite.strip(), self.tokens)

    def gen_completion_ids(self, rewrite: str, index: int = 0) -> list[int]:
        """The ids ``gen_batch`` puts after the gen prompt for ``rewrite``, up to and including the
        ``<gen_emb>`` it reads at (what follows it cannot change that hidden state)."""
        ids = self.token_ids(self.gen_completion(rewrite, index))
        gen = self.token_id["gen_emb"]
        return ids[: len(ids) - ids[::-1].index(gen)]

    def gen_prompt_batch(self, items: Sequence[Item]) -> dict[str, torch.Tensor]:
        """Gen prompts the model continues after ``<rewrite>`` (generation, rollouts)."""
        prompts = [self.template.gen_prompt(self.media(im), ins, txt, self.tokens) for txt, im, ins in items]
        return self.encode_texts(prompts, [im for _, im, _ in items])

    def latent_prompt_batch(self, items: Sequence[Item], tail: str = "") -> dict[str, torch.Tensor]:
        """PLUME prefixes (``… <disc_emb> … <think><bot>``), each followed by ``tail`` (explicit reasoning
        appends ``<eot>``)."""
        texts = [self.template.latent_prompt(self.media(im), ins, txt, self.tokens) + tail for txt, im, ins in items]
        return self.encode_texts(texts, [im for _, im, _ in items])

    # ------------------------------------------------------------------ Refine-RL rollouts
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

    def rollout_batch(self, items: Sequence[Item], completions: Sequence[Sequence[int]]) -> ModelBatch:
        """Gen prompt + the EXACT generated token ids (no decode/re-encode round trip) + forced suffix,
        left-padded. ``labels`` mark the generated tokens (the policy's actions); the embedding is
        read at the final ``<gen_emb>``."""
        if len(completions) != len(items):
            raise ValueError(f"completions: got {len(completions)} for {len(items)} inputs")
        enc = self.gen_prompt_batch(items)
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
        device = self.device
        inputs = {**enc, "input_ids": input_ids.to(device), "attention_mask": attention.to(device)}
        for key, val in enc.items():  # other per-token tensors (mm_token_type_ids): re-aligned, 0 on new tokens
            if key not in ("input_ids", "attention_mask") and val.dim() == 2 and val.shape == enc["input_ids"].shape:
                col = torch.zeros_like(input_ids)
                for b in range(len(rows)):
                    kept = val[b][enc["attention_mask"][b].bool()].cpu()
                    col[b, width - len(rows[b]) : width - len(rows[b]) + len(kept)] = kept
                inputs[key] = col.to(device)
        return ModelBatch(inputs, self.read_positions(inputs["input_ids"], "gen_emb"), labels.to(device))
