"""Special tokens of RIME/PLUME and how their embedding rows are initialised.

New rows are copied from existing tokens when the base vocabulary has them (PLUME copies
``<|object_ref_start|>`` / ``<|object_ref_end|>``), otherwise from the mean embedding of a short
descriptive word, so a fresh token starts inside the model's embedding distribution instead of at
a random point the contrastive loss would first have to pull in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class SpecialTokens:
    """Names of every token rime adds; one instance is saved with each embedder."""

    disc_emb: str = "<disc_emb>"
    gen_emb: str = "<gen_emb>"
    rewrite_start: str = "<rewrite>"
    rewrite_end: str = "</rewrite>"
    # PLUME latent reasoning markers.
    think_start: str = "<think>"
    think_end: str = "</think>"
    latent_start: str = "<bot>"
    latent_end: str = "<eot>"
    # token -> existing token (preferred) or plain text whose mean embedding seeds the row.
    init_from: dict[str, str] = field(
        default_factory=lambda: {
            "<disc_emb>": "<|object_ref_start|>",
            "<gen_emb>": "<|object_ref_end|>",
            "<rewrite>": " rewrite",
            "</rewrite>": " end",
            "<think>": " think",
            "</think>": " end",
            "<bot>": " begin",
            "<eot>": " end",
        }
    )

    def all(self) -> list[str]:
        """Every added token, in a fixed order (ids are assigned in this order)."""
        return [
            self.disc_emb,
            self.gen_emb,
            self.rewrite_start,
            self.rewrite_end,
            self.think_start,
            self.think_end,
            self.latent_start,
            self.latent_end,
        ]

    def to_dict(self) -> dict:
        return {
            "disc_emb": self.disc_emb,
            "gen_emb": self.gen_emb,
            "rewrite_start": self.rewrite_start,
            "rewrite_end": self.rewrite_end,
            "think_start": self.think_start,
            "think_end": self.think_end,
            "latent_start": self.latent_start,
            "latent_end": self.latent_end,
            "init_from": dict(self.init_from),
        }

    @classmethod
    def from_dict(cls, d: dict) -> SpecialTokens:
        return cls(**d)


def add_special_tokens(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, tokens: SpecialTokens) -> list[int]:
    """Add ``tokens`` to the tokenizer, grow the embedding if needed and initialise the new rows.

    Returns the ids of the added tokens. Idempotent: tokens already present are left untouched.
    """
    missing = [t for t in tokens.all() if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in tokens.all()]
    needed = max(len(tokenizer), max(ids) + 1)
    in_emb = model.get_input_embeddings()
    if in_emb.weight.shape[0] < needed:
        model.resize_token_embeddings(needed, mean_resizing=False)
        in_emb = model.get_input_embeddings()
    out_emb = model.get_output_embeddings()
    tied = out_emb is None or out_emb.weight.data_ptr() == in_emb.weight.data_ptr()
    with torch.no_grad():
        for tok in missing:
            row = _seed_row(tokenizer, in_emb.weight, tokens.init_from.get(tok, " token"))
            tid = tokenizer.convert_tokens_to_ids(tok)
            in_emb.weight[tid] = row
            if not tied:
                out_emb.weight[tid] = _seed_row(tokenizer, out_emb.weight, tokens.init_from.get(tok, " token"))
    return ids


def _seed_row(tokenizer: PreTrainedTokenizerBase, weight: torch.Tensor, source: str) -> torch.Tensor:
    """Row to copy: the source token's row if it is one token, else the mean of its pieces."""
    vocab = tokenizer.get_vocab()
    if source in vocab and vocab[source] < weight.shape[0]:
        return weight[vocab[source]].clone()
    piece_ids = [i for i in tokenizer(source, add_special_tokens=False).input_ids if i < weight.shape[0]]
    if not piece_ids:
        return weight.mean(dim=0)
    return weight[piece_ids].mean(dim=0)
