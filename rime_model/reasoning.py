"""PLUME's explicit reasoning: write it (greedy, stage-0 layout) and embed after a written one.

The curriculum distils explicit reasoning into latent steps, so ``orchestrator.plume_probe`` checks
that a model can write that reasoning (``generate_reasoning``) and how well the gen embedding after it
retrieves (``embed_with_reasoning``): the ceiling the curriculum carries into latent steps.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from .curriculum import Phase, continuation_text
from .embedder import Embedder, EmbeddingResult
from .encoding import cut_at_stop
from .latent import latent_pass


@torch.no_grad()
def generate_reasoning(
    emb: Embedder, inputs: Iterable[Any], max_new_tokens: int = 128, batch_size: int = 16
) -> list[tuple[str, str]]:
    """Greedy explicit reasoning in PLUME's stage-0 layout (``<think><bot><eot>`` then text until
    ``<gen_emb>``): one (reasoning before ``</think>``, answer after it) pair per input. Used to check
    that a model can write the reasoning its curriculum turns into latent steps."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    enc = emb.enc
    items = enc.prepare(inputs)
    think_end, pad = enc.token_id["think_end"], enc.tokenizer.pad_token_id
    out: list[tuple[str, str]] = []
    for i in range(0, len(items), batch_size):
        prompts = enc.latent_prompt_batch(items[i : i + batch_size], tail=enc.tokens.latent_end)
        seqs = emb.model.generate(
            **prompts, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=enc.stop_ids, pad_token_id=pad
        )
        for gen in seqs[:, prompts["input_ids"].shape[1] :].tolist():
            ids = [t for t in cut_at_stop(gen, pad, enc.stop_ids) if t not in enc.stop_ids]
            cut = ids.index(think_end) if think_end in ids else len(ids)
            with enc.tokenizer_lock:
                reasoning = enc.tokenizer.decode(ids[:cut], skip_special_tokens=True).strip()
                answer = enc.tokenizer.decode(ids[cut + 1 :], skip_special_tokens=True).strip()
            out.append((reasoning, answer))
    return out


@torch.no_grad()
def embed_with_reasoning(
    emb: Embedder, inputs: Iterable[Any], written: Sequence[tuple[str, str]], batch_size: int = 16
) -> EmbeddingResult:
    """Gen embedding after a given explicit (reasoning, answer), teacher-forced in PLUME's stage-0 layout
    (``<bot><eot>`` reasoning ``</think>`` answer ``<gen_emb>``): how a CoT embedder retrieves, i.e. what
    the curriculum has to carry into latent steps. ``written`` is what ``generate_reasoning`` returns."""
    enc = emb.enc
    items = enc.prepare(inputs)
    if len(written) != len(items):
        raise ValueError(f"written: got {len(written)} (reasoning, answer) pairs for {len(items)} inputs; give one per input")
    stage0 = Phase(stage=0, latent_steps=0, replaced=0, keep_answer=True)  # the learner's layout, by construction
    conts = [enc.token_ids(continuation_text(enc.template, enc.tokens, [r.strip()], stage0, a)) for r, a in written]
    vecs = [
        latent_pass(emb.model, enc, items[i : i + batch_size], 0, conts[i : i + batch_size]).gen_embedding()
        for i in range(0, len(items), batch_size)
    ]
    return EmbeddingResult(torch.cat(vecs).cpu().numpy() if vecs else np.zeros((0, emb.dim), np.float32), "explicit")
