"""Refine-RL on the HF model: sampled rollouts with their behaviour log-probs, and the learner's
recomputation of those log-probs.

Both sides read the same raw (temperature-1) logits: the rollout worker's ``sample_rollouts`` logs each
sampled token's log-prob before any sampling warper, and the learner's ``action_logprobs`` recomputes
it on a ``PromptEncoder.rollout_batch`` (prompt + the exact sampled ids + forced suffix), so PPO's
ratio compares like with like.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .encoding import Item, cut_at_stop

if TYPE_CHECKING:  # pragma: no cover
    from .embedder import Embedder, GenerationConfig


def action_logprobs(
    emb: Embedder, hidden: torch.Tensor, labels: torch.Tensor, span: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-prob and entropy of each labelled token under ``emb``'s model, over the last ``span`` columns
    (rollout batches are right-aligned, so the actions live there): (logp, entropy, mask), [B, span].
    The lm head only runs on those columns, never on the whole sequence."""
    mask_full = labels != -100
    if span is None:
        cols = mask_full.any(dim=0).nonzero()
        span = int(labels.shape[1] - cols.min()) if len(cols) else 1
    tgt = labels[:, -span:]
    mask = tgt != -100
    logits = emb.model.get_output_embeddings()(hidden[:, -span - 1 : -1]).float()
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp * mask, entropy * mask, mask.to(logp.dtype)


@torch.no_grad()
def sample_rollouts(
    emb: Embedder, items: list[Item], n: int, generation: GenerationConfig, batch_size: int = 16
) -> list[tuple[list[int], list[float]]]:
    """``n`` sampled completions per item (item-major) with each sampled token's log-prob under the
    raw policy (temperature-1 logits, before any sampling warper): PPO's behaviour log-probs."""
    if generation.seed is not None:
        torch.manual_seed(generation.seed)
    enc = emb.enc
    pad = enc.tokenizer.pad_token_id
    out: list[tuple[list[int], list[float]]] = []
    for i in range(0, len(items), batch_size):
        prompts = enc.gen_prompt_batch(items[i : i + batch_size])
        res = emb.model.generate(
            **prompts,
            max_new_tokens=generation.max_new_tokens,
            num_return_sequences=n,
            eos_token_id=enc.stop_ids,
            pad_token_id=pad,
            output_logits=True,
            return_dict_in_generate=True,
            **generation.sampling(),
            **generation.extra,
        )
        new = res.sequences[:, prompts["input_ids"].shape[1] :]
        # one step at a time: a stacked fp32 [B*n, L, V] log-softmax is GBs at a 151k vocabulary
        tok_lp = torch.stack(
            [torch.log_softmax(x.float(), dim=-1).gather(-1, new[:, t : t + 1]).squeeze(-1) for t, x in enumerate(res.logits)],
            dim=1,
        )
        for b in range(new.shape[0]):
            ids = cut_at_stop(new[b].tolist(), pad, enc.stop_ids)
            out.append((ids, tok_lp[b, : len(ids)].tolist()))
    return out
