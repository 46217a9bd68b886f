"""The frozen discriminative-anchor reward service: M Ray actors scoring rewrites.

Each actor holds a FROZEN copy of the stage's starting model. Candidates are embedded once in
disc mode and cached by candidate id (the anchors do not drift while the policy moves); a
rewrite is embedded in gen mode teacher-forced on its exact token ids, and scored with the pure
functions of ``rewards.functions``. Which encoder embeds the query side is a config choice:
``frozen`` (default, the anchors' own encoder) or ``policy`` (the current weights, synced like
the rollout workers). The actor is stateless apart from the cache, so a restarted actor simply
recomputes anchors on demand and a retried call returns the same rewards.

The candidates come from the driver: the training stream's own checked set (``PairStream.cands``:
decoded, normalised, bad ones already counted in ``data/bad_rows``), put in the object store once.
Re-reading and re-decoding the corpus in each of M actors (and again on every restart) would cost
start-up time on a large corpus and could disagree with what the learners see.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from actors.batches import RewardRequest, RewardResult
from rime_model.choices import QUERY_ENCODERS

from .functions import RewardConfig, total_reward


class AnchorRewardService:
    """Scores (query, sampled rewrites) groups against frozen disc anchors of the query's candidates."""

    def __init__(
        self,
        model_path: str,
        candidates: list[dict],
        reward_cfg: dict,
        query_encoder: str = "frozen",
        torch_threads: int = 1,
        batch_size: int = 32,
        dtype: str = "float32",
    ):
        """``dtype`` (``model.dtype``): what the frozen anchor copy is held in (bfloat16 halves it)."""
        from rime_model import Embedder

        if query_encoder not in QUERY_ENCODERS:
            raise ValueError(f"reward.query_encoder: {query_encoder!r} is not one of {QUERY_ENCODERS}")
        torch.set_num_threads(torch_threads)
        self.cfg = RewardConfig(**reward_cfg)
        device = "cuda" if torch.cuda.is_available() else None  # the actor's own GPU, never the learners'
        dt = getattr(torch, dtype)
        self.anchor_emb = Embedder.load(model_path, dtype=dt, device=device)
        self.query_emb = Embedder.load(model_path, dtype=dt, device=device) if query_encoder == "policy" else self.anchor_emb
        for e in {id(self.anchor_emb): self.anchor_emb, id(self.query_emb): self.query_emb}.values():
            e.model.requires_grad_(False)
        # already checked by the stream: a corrupt candidate is not here, and queries whose positive it was
        # never arrive (a Ray ObjectRef argument arrives resolved; a restarted actor gets the same list)
        self.cands = {c["cand_id"]: c for c in candidates}
        self.by_task: dict[str, list[str]] = {}
        for cid, c in self.cands.items():
            self.by_task.setdefault(c["task"], []).append(cid)
        self.cache: dict[str, torch.Tensor] = {}
        self.batch_size = batch_size
        self.version = 0
        self.stats = {"anchor_hits": 0, "anchor_misses": 0, "anchor_s": 0.0, "own_list_without_negatives": 0}

    # ------------------------------------------------------------------ anchors
    def _anchors(self, cand_ids: list[str]) -> torch.Tensor:
        """Disc embeddings [len, D] of candidates, computed once per id for the actor's lifetime."""
        missing = [c for c in dict.fromkeys(cand_ids) if c not in self.cache]
        self.stats["anchor_hits"] += len(cand_ids) - len(missing)
        self.stats["anchor_misses"] += len(missing)
        if missing:
            t = time.perf_counter()
            rows = [self.cands[c] for c in missing]
            items = [
                {"text": r.get("cand_text"), "image": r.get("cand_image"), "instruction": r.get("cand_inst") or None}
                for r in rows
            ]
            vecs = self.anchor_emb.embed(items, mode="disc", batch_size=self.batch_size).vectors
            for cid, v in zip(missing, vecs):
                self.cache[cid] = torch.from_numpy(v)
            self.stats["anchor_s"] += time.perf_counter() - t
        return torch.stack([self.cache[c] for c in cand_ids])

    def pool(self, request: RewardRequest) -> tuple[list[str], str]:
        """The query's ranking pool and its positive: its own candidate list, else (or when that list holds
        no negative: the acc@k gate and the hard-negative term would vanish) the task corpus."""
        pos = request.positive_ids[0]
        positives = set(request.positive_ids)
        pool = [c for c in (request.cand_ids or []) if c in self.cands]
        if not set(pool) - positives:
            if request.cand_ids:
                self.stats["own_list_without_negatives"] += 1
            pool = [c for c in self.by_task.get(request.task, []) if c in self.cands]
        if pos not in self.cands:
            raise KeyError(f"positive_ids[0]: candidate {pos!r} of query {request.query_id!r} is not in the split")
        if pos not in pool:
            pool.append(pos)
        return pool, pos

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score(self, requests: list[RewardRequest]) -> list[RewardResult]:
        """Reward terms per request (one query and its sampled rewrites), and the positive's frozen anchor."""
        items, comps, owner = [], [], []
        for i, r in enumerate(requests):
            item = self.query_emb.prepare([r.query])[0]
            items += [item] * len(r.completions)
            comps += r.completions
            owner += [i] * len(r.completions)
        g = []
        for s in range(0, len(items), self.batch_size):
            g.append(
                self.query_emb.encode(
                    self.query_emb.enc.rollout_batch(items[s : s + self.batch_size], comps[s : s + self.batch_size])
                )
            )
        g_all = torch.cat(g).cpu() if g else torch.zeros(0, self.query_emb.dim)
        results = []
        for i, r in enumerate(requests):
            rows = [k for k, o in enumerate(owner) if o == i]
            pool, pos = self.pool(r)
            anchors = self._anchors(pool)
            pos_vec = anchors[pool.index(pos)]
            positives = set(r.positive_ids)
            neg = anchors[[k for k, c in enumerate(pool) if c not in positives]]
            terms = total_reward(
                g_all[rows], pos_vec, neg, torch.tensor(r.well_formed), torch.tensor([len(c) for c in r.completions]), self.cfg
            )
            # logged as reward/no_negatives_mean: the share of rewrites scored without any negative (acc ≡ 1)
            terms["no_negatives"] = torch.full((len(rows),), float(neg.shape[0] == 0))
            results.append(RewardResult({k: v.tolist() for k, v in terms.items()}, pos_vec.tolist()))
        return results

    # ------------------------------------------------------------------ policy-side query encoder
    def update_weights(self, version: int, weights: Any) -> int:
        """Only with ``query_encoder: policy``; the anchors' encoder never changes."""
        if self.query_emb is self.anchor_emb:
            return self.version
        from actors.rollout import load_exported
        from actors.weight_sync import fetch_weights

        load_exported(self.query_emb.model, fetch_weights(weights))
        self.version = version
        return version

    def cache_info(self) -> dict[str, Any]:
        import os

        return {"cached": len(self.cache), "candidates": len(self.cands), "pid": os.getpid(), **self.stats}
