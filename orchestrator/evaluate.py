"""``rime eval``: MMEB-protocol retrieval evaluation in any query/candidate mode pair.

Candidates are embedded once per candidate mode (and cached on disk for saved models), queries
once per query mode; every requested pair is then scored from those vectors. Query modes:
``disc``, ``gen`` (the model writes its rewrite), ``oracle`` (gen embedding of the record's ideal
rewrite, teacher-forced: the ceiling a perfect rewriter reaches with this encoder) and ``latent``
(PLUME). Rows that cannot be embedded are counted, reported with their ids, and left out. ``dims``
scores the first ``dims`` components of both sides, re-normalised (Matryoshka models, ``cma.matryoshka_dims``).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from rime_data.metrics import METRICS, aggregate, query_metrics
from rime_data.schema import read_table, split_paths, validate_candidate, validate_query
from rime_model import Embedder, GenerationConfig, InputError
from rime_model.embedder import check_dims, truncate

from .config import EVAL_CAND_MODES as CAND_MODES
from .config import EVAL_QUERY_MODES as QUERY_MODES


@dataclass
class EvalResult:
    """Metrics per mode pair plus the bookkeeping a reader needs to trust them."""

    pairs: dict[str, dict]  # "qmode->cmode" -> aggregate(...) output
    n_queries: int
    n_candidates: int
    skipped: list[dict] = field(default_factory=list)
    rewrite_tokens_mean: float | None = None
    rewrite_stats: dict[str, float] = field(default_factory=dict)  # gen queries: empty / well-formed fractions
    rewrite_samples: list[dict] = field(default_factory=list)  # a few per task, next to the ideal rewrite
    timings: dict[str, float] = field(default_factory=dict)
    # "qmode->cmode" -> query_id -> that query's metrics: what a paired comparison of two models needs
    per_query: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    # what the query ids refer to: synthetic ids repeat across seeds (referring/test/q0), so `rime compare`
    # refuses two reports whose query files differ, wherever the files lie
    queries_sha1: str = ""
    # K of latent mode where a latent side was scored (None otherwise): reports of one model at two K
    # (e.g. the ablation's K=0 control) differ only here
    latent_steps: int | None = None
    dims: int | None = None  # leading components scored (re-normalised); None = all

    def to_dict(self, per_query: bool = False) -> dict:
        """The report; ``per_query`` adds every query's metrics (for ``rime compare``)."""
        return {
            "pairs": self.pairs,
            "n_queries": self.n_queries,
            "n_candidates": self.n_candidates,
            "skipped": self.skipped,
            "n_skipped": len(self.skipped),
            "rewrite_tokens_mean": self.rewrite_tokens_mean,
            "rewrite_stats": self.rewrite_stats,
            "rewrite_samples": self.rewrite_samples,
            "timings": self.timings,
            "queries_sha1": self.queries_sha1,
            "latent_steps": self.latent_steps,
            "dims": self.dims,
            **({"per_query": self.per_query} if per_query else {}),
        }

    def flat_metrics(self) -> dict[str, float]:
        """``<qmode>_<cmode>/<metric>`` (overall) and ``.../<task>/<metric>`` for MLflow."""
        out = {}
        for pair, agg in self.pairs.items():
            key = pair.replace("->", "_to_")
            out.update({f"{key}/{m}": v for m, v in agg["all"].items()})
            for task, ms in agg["tasks"].items():
                out.update({f"{key}/{task}/{m}": ms[m] for m in METRICS})
        return out


def query_item(r: dict) -> dict:
    return {"text": r.get("qry_text"), "image": r.get("qry_image"), "instruction": r.get("qry_inst") or None}


def cand_item(r: dict) -> dict:
    return {"text": r.get("cand_text"), "image": r.get("cand_image"), "instruction": r.get("cand_inst") or None}


def _usable(emb: Embedder, rows: list[dict], to_item, id_key: str, check, skipped: list[dict]) -> list[dict]:
    """Rows that pass schema checks and decode; the rest go to ``skipped`` with the reason."""
    good = []
    for r in rows:
        why = check(r)
        if why is None:
            try:
                emb.prepare([to_item(r)])
            except InputError as e:
                why = str(e).replace("inputs[0].", "")
        if why is None:
            good.append(r)
        else:
            skipped.append({"id": r.get(id_key), "error": why})
    return good


def load_queries(
    emb: Embedder,
    data: str | Path,
    split: str,
    tasks: tuple[str, ...] | None,
    max_queries_per_task: int | None,
    skipped: list[dict],
) -> tuple[list[dict], str]:
    """The split's usable query rows (first ``max_queries_per_task`` of each task) and the sha1 of the file
    they were read from (one read: the digest `rime compare` checks is of exactly these bytes); bad rows go
    to ``skipped`` with the reason, never silently."""
    raw = split_paths(data, split)[0].read_bytes()
    queries = pq.read_table(pa.BufferReader(raw)).to_pylist()
    if tasks:
        queries = [q for q in queries if q["task"] in tasks]
    if max_queries_per_task:
        kept: dict[str, int] = {}
        limited = []
        for q in queries:
            if kept.get(q["task"], 0) < max_queries_per_task:
                kept[q["task"]] = kept.get(q["task"], 0) + 1
                limited.append(q)
        queries = limited
    usable, seen = [], set()
    for q in _usable(emb, queries, query_item, "query_id", validate_query, skipped):
        if q["query_id"] in seen:  # per-query reports and `rime compare` key on the id
            skipped.append(
                {
                    "id": q["query_id"],
                    "error": "query_id: appears twice in the split; give every query a unique id (the first one is scored)",
                }
            )
            continue
        seen.add(q["query_id"])
        usable.append(q)
    return usable, hashlib.sha1(raw).hexdigest()


def embed_rows(
    emb: Embedder,
    items: list[dict],
    mode: str,
    batch_size: int,
    gen: GenerationConfig,
    rewrites: list[str] | None = None,
    desc: str = "",
    generated: list | None = None,
    latent_steps: int | None = None,
) -> tuple[np.ndarray, list[int]]:
    """Vectors of ``items`` in ``mode`` with a progress bar; also the rewrite token counts (gen).
    ``generated`` (a list) receives the gen-mode ``Rewrite`` objects, for the report."""
    vecs, counts = [], []
    for i in tqdm(range(0, len(items), batch_size), desc=desc, unit="batch", leave=False, disable=None):
        chunk = items[i : i + batch_size]
        if mode == "oracle":
            res = emb.embed_with_rewrite(chunk, rewrites[i : i + batch_size], batch_size=batch_size)
        else:
            res = emb.embed(chunk, mode=mode, batch_size=batch_size, generation=gen, steps=latent_steps)
            counts += res.rewrite_token_counts or []
            if generated is not None and res.rewrites:
                generated.extend(res.rewrites)
        vecs.append(res.vectors)
    return (np.concatenate(vecs) if vecs else np.zeros((0, emb.dim), np.float32)), counts


def _cache_file(
    cache_dir: Path | None, model_tag: str | None, cand_path: Path, mode: str, gen: GenerationConfig, latent_steps: int
) -> Path | None:
    if cache_dir is None or model_tag is None:
        return None
    st = cand_path.stat()
    key = f"{model_tag}\0{cand_path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{mode}\0{gen.max_new_tokens}"
    if mode == "latent":
        key += f"\0{latent_steps}"
    return cache_dir / f"cands-{hashlib.sha1(key.encode()).hexdigest()[:20]}.npz"


def evaluate(
    emb: Embedder,
    data: str | Path,
    split: str = "test",
    query_modes: tuple[str, ...] = ("disc", "gen"),
    cand_modes: tuple[str, ...] = ("disc", "gen"),
    batch_size: int = 16,
    generation: GenerationConfig | None = None,
    tasks: tuple[str, ...] | None = None,
    max_queries_per_task: int | None = None,
    cache_dir: str | Path | None = None,
    model_tag: str | None = None,
    latent_steps: int | None = None,
    dims: int | None = None,
) -> EvalResult:
    """Score every (query mode, candidate mode) pair on one split of a rime dataset. ``latent_steps``
    is K of latent mode (None = the model's own default); ``dims`` scores truncated, re-normalised vectors
    (candidates are embedded and cached whole, so one cache serves every ``dims``)."""
    if dims is not None:
        check_dims(dims, emb.dim)
    for m in query_modes:
        if m not in QUERY_MODES:
            raise ValueError(f"query_mode: {m!r} is not one of {QUERY_MODES}")
    for m in cand_modes:
        if m not in CAND_MODES:
            raise ValueError(f"cand_mode: {m!r} is not one of {CAND_MODES}")
    gen = generation or GenerationConfig(max_new_tokens=32)
    k = emb.latent_steps if latent_steps is None else latent_steps
    skipped: list[dict] = []
    queries, queries_sha1 = load_queries(emb, data, split, tasks, max_queries_per_task, skipped)
    c_path = split_paths(data, split)[1]
    cands = load_candidates(emb, data, split, tasks, skipped)
    if "oracle" in query_modes:
        missing = [q["query_id"] for q in queries if not q.get("rewrite")]
        if missing:
            raise ValueError(f"query_mode 'oracle' needs a rewrite on every query; {len(missing)} lack one (e.g. {missing[0]})")
    timings: dict[str, float] = {}
    cvecs: dict[str, np.ndarray] = {}
    for m in cand_modes:
        t = time.perf_counter()
        cache = _cache_file(Path(cache_dir) if cache_dir else None, model_tag, c_path, m, gen, k)
        if cache is not None and cache.is_file():
            z = np.load(cache, allow_pickle=False)
            if list(z["ids"]) == [c["cand_id"] for c in cands]:
                cvecs[m] = z["vecs"]
        if m not in cvecs:
            cvecs[m], _ = embed_rows(
                emb, [cand_item(c) for c in cands], m, batch_size, gen, desc=f"candidates[{m}]", latent_steps=k
            )
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                np.savez(cache, ids=np.array([c["cand_id"] for c in cands]), vecs=cvecs[m])
        timings[f"cand_{m}_s"] = round(time.perf_counter() - t, 3)

    qvecs: dict[str, np.ndarray] = {}
    token_counts: list[int] = []
    samples: list[dict] = []
    stats: dict[str, float] = {}
    rewrites = [q.get("rewrite") or "" for q in queries]
    for m in query_modes:
        t = time.perf_counter()
        produced: list = []
        qvecs[m], counts = embed_rows(
            emb,
            [query_item(q) for q in queries],
            m,
            batch_size,
            gen,
            rewrites,
            desc=f"queries[{m}]",
            generated=produced,
            latent_steps=k,
        )
        if m == "gen" and produced:
            samples, stats = _rewrite_report(queries, produced)
        token_counts += counts
        timings[f"query_{m}_s"] = round(time.perf_counter() - t, 3)

    qvecs = {m: truncate(v, dims) for m, v in qvecs.items()}
    cvecs = {m: truncate(v, dims) for m, v in cvecs.items()}
    pairs, per_query, n_ranked = score_pairs(queries, cands, qvecs, cvecs, skipped)
    mean_tokens = float(np.mean(token_counts)) if token_counts else None
    return EvalResult(
        pairs,
        n_ranked,
        len(cands),
        _dedupe(skipped),
        mean_tokens,
        rewrite_stats=stats,
        rewrite_samples=samples,
        timings=timings,
        per_query=per_query,
        queries_sha1=queries_sha1,
        latent_steps=k if "latent" in (*query_modes, *cand_modes) else None,
        dims=dims,
    )


def load_candidates(
    emb: Embedder, data: str | Path, split: str, tasks: tuple[str, ...] | None, skipped: list[dict]
) -> list[dict]:
    """The split's usable candidate rows (of ``tasks``, None = all); bad rows go to ``skipped`` with the reason."""
    cands = read_table(split_paths(data, split)[1]).to_pylist()
    if tasks:
        cands = [c for c in cands if c["task"] in tasks]
    return _usable(emb, cands, cand_item, "cand_id", validate_candidate, skipped)


def score_pairs(
    queries: list[dict], cands: list[dict], qvecs: dict[str, np.ndarray], cvecs: dict[str, np.ndarray], skipped: list[dict]
) -> tuple[dict[str, dict], dict[str, dict[str, dict[str, float]]], int]:
    """Every (query mode, candidate mode) pair of the given vectors, ranked as the benchmark defines it:
    ``(pairs: "q->c" -> aggregate, per_query: "q->c" -> query_id -> metrics, queries ranked)``. Queries
    that cannot be ranked go to ``skipped``."""
    cand_index = {c["cand_id"]: i for i, c in enumerate(cands)}
    by_task: dict[str, list[int]] = {}
    for i, c in enumerate(cands):
        by_task.setdefault(c["task"], []).append(i)
    ranked = _rankable(queries, cands, cand_index, by_task, skipped)
    pairs, per_query = {}, {}
    for qm, qv in qvecs.items():
        for cm, cv in cvecs.items():
            rows, by_id = [], {}
            for qi, idx, rel in ranked:
                q = queries[qi]
                rows.append((q["task"], query_metrics(cv[idx] @ qv[qi], rel)))
                by_id[q["query_id"]] = {"task": q["task"], **rows[-1][1]}
            pairs[f"{qm}->{cm}"] = aggregate(rows, {t: "image" for t in by_task})
            per_query[f"{qm}->{cm}"] = by_id
    return pairs, per_query, len(ranked)


def _rankable(
    queries: list[dict], cands: list[dict], cand_index: dict[str, int], by_task: dict[str, list[int]], skipped: list[dict]
) -> list[tuple[int, list[int], list[float]]]:
    """(query index, candidate indices, relevance) of every query that can be ranked as the benchmark
    defines it. A query whose own candidate list names a candidate that is missing or was unusable is
    skipped and reported: ranked against fewer negatives it would score higher than it should."""
    out = []
    for qi, q in enumerate(queries):
        if q.get("cand_ids"):
            missing = [c for c in q["cand_ids"] if c not in cand_index]
            if missing:
                skipped.append(
                    {
                        "id": q["query_id"],
                        "error": f"cand_ids: {len(missing)} of {len(q['cand_ids'])} candidates "
                        f"missing from the split or unusable (e.g. {missing[0]!r}); fix or remove them",
                    }
                )
                continue
            idx = [cand_index[c] for c in q["cand_ids"]]
        else:
            idx = by_task.get(q["task"], [])
        grades = dict(zip(q["positive_ids"], q.get("positive_grades") or [1.0] * len(q["positive_ids"])))
        rel = [float(grades.get(cands[i]["cand_id"], 0.0)) for i in idx]
        if not any(r > 0 for r in rel):
            skipped.append(
                {
                    "id": q["query_id"],
                    "error": "positive_ids: no relevant candidate among the usable candidates "
                    "of its task; check the candidates table",
                }
            )
            continue
        out.append((qi, idx, rel))
    return out


def _rewrite_report(queries: list[dict], produced: list, per_task: int = 3) -> tuple[list[dict], dict[str, float]]:
    """What the model actually wrote: a few rewrites per task beside the ideal one, and the share of
    empty and of well-formed rewrites (a degenerate rewriter must show up in the report, not only
    in the metrics)."""
    shown: dict[str, int] = {}
    samples = []
    for q, r in zip(queries, produced):
        if shown.get(q["task"], 0) < per_task:
            shown[q["task"]] = shown.get(q["task"], 0) + 1
            samples.append(
                {
                    "query_id": q["query_id"],
                    "task": q["task"],
                    "rewrite": r.text,
                    "ideal": q.get("rewrite"),
                    "well_formed": r.well_formed,
                    "tokens": r.num_tokens,
                }
            )
    n = max(1, len(produced))
    stats = {
        "empty_frac": sum(not r.text.strip() for r in produced) / n,
        "well_formed_frac": sum(r.well_formed for r in produced) / n,
    }
    stats.update(_ideal_match(queries, produced))
    return samples, stats


def _normalised(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


def _ideal_match(queries: list[dict], produced: list) -> dict[str, float]:
    """The share of greedy rewrites that equal the data's ideal rewrite (case, spacing and a final full stop
    ignored), overall and per task, over the queries that have one: whether Refine-RL changed what the model
    writes, which Hit@1 alone cannot tell apart from a moved embedding."""
    hits: dict[str, list[bool]] = {}
    for q, r in zip(queries, produced):
        if q.get("rewrite"):
            hits.setdefault(q["task"], []).append(_normalised(r.text) == _normalised(q["rewrite"]))
    if not hits:
        return {}
    every = [h for task in hits.values() for h in task]
    return {"ideal_match_frac": sum(every) / len(every)} | {
        f"ideal_match_frac/{task}": sum(h) / len(h) for task, h in sorted(hits.items())
    }


def _dedupe(rows: list[dict]) -> list[dict]:
    seen, out = set(), []
    for r in rows:
        k = (r["id"], r["error"])
        if k not in seen:
            seen.add(k)
            out.append(r)
    return out
