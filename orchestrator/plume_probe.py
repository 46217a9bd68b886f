"""Explicit-reasoning probe for PLUME's curriculum.

The curriculum distils explicit reasoning into latent steps, so it can only help when the model can
write that reasoning. At the end of curriculum stage 0 (full explicit text) the driver asks the
model to reason greedily on held-out queries and logs how often the answer and each reference
segment come out right: a near-zero score says the latent stages have nothing to carry over.
It also retrieves with that written reasoning (the gen embedding after it, against the corpus in
latent mode, as the latent→latent score ranks it): right text is not enough if the embedding after
it does not find the picture, and this Hit@1 is the ceiling the curriculum distils.
"""

from __future__ import annotations

from pathlib import Path

from rime_model import Embedder
from rime_model.curriculum import score_explicit_reasoning, split_segments
from rime_model.reasoning import embed_with_reasoning, generate_reasoning

from .evaluate import cand_item, load_candidates, load_queries, query_item, score_pairs


def explicit_reasoning_probe(
    emb: Embedder,
    data: str | Path,
    split: str,
    queries_per_task: int,
    segments: int,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    latent_steps: int | None = None,
) -> dict:
    """Greedy stage-0 reasoning on the first ``queries_per_task`` queries of each task: answer accuracy,
    per-segment exact-match rates, Hit@1 of the embedding after the written reasoning against the
    candidates in latent mode (``latent_steps``, None = the model's K), counts (bad rows skipped, rows
    without reasoning) and a few samples."""
    skipped: list[dict] = []
    usable, _ = load_queries(emb, data, split, None, queries_per_task, skipped)
    rows = [r for r in usable if r.get("reasoning")]
    counts = {"skipped": len(skipped), "no_reasoning": len(usable) - len(rows)}  # reported, not dropped silently
    if not rows:
        return {"n": 0, **counts, "metrics": {}, "samples": []}
    generated = generate_reasoning(emb, [query_item(r) for r in rows], max_new_tokens, batch_size)
    scores = [
        score_explicit_reasoning(
            reasoning, answer, split_segments(r["reasoning"], segments)[0], r.get("rewrite") or r.get("qry_text") or ""
        )  # the answer training teacher-forces (pairs.to_pair)
        for r, (reasoning, answer) in zip(rows, generated)
    ]
    n = len(rows)
    metrics = {"plume/explicit_answer_acc": sum(s.answer_correct for s in scores) / n}
    for i in range(segments):
        metrics[f"plume/explicit_segment{i}_exact"] = sum(s.segments_exact[i] for s in scores) / n
    cands = load_candidates(emb, data, split, tuple(sorted({r["task"] for r in rows})), skipped)
    qv = embed_with_reasoning(emb, [query_item(r) for r in rows], generated, batch_size).vectors
    cv = emb.embed([cand_item(c) for c in cands], mode="latent", batch_size=batch_size, steps=latent_steps).vectors
    pairs, _, ranked = score_pairs(rows, cands, {"explicit": qv}, {"latent": cv}, skipped)
    if ranked:
        metrics["plume/explicit_latent_hit1"] = pairs["explicit->latent"]["all"]["hit@1"]
    counts["skipped"] = len(skipped)  # candidates and unrankable queries too
    samples = [
        {
            "task": r["task"],
            "reasoning": g[0],
            "answer": g[1],
            "ideal": " ".join(r["reasoning"]) + " => " + (r.get("rewrite") or ""),
        }
        for r, g in list(zip(rows, generated))[:4]
    ]
    return {"n": n, **counts, "metrics": metrics, "samples": samples}
