"""The record schema: queries and candidates as two parquet tables per split.

A dataset folder holds ``<split>/queries.parquet`` and ``<split>/candidates.parquet``. A query
names its relevant candidates (``positive_ids`` with optional graded ``positive_grades`` for
NDCG) and either its own candidate list (``cand_ids``, MMEB's per-query lists) or null, meaning
"rank the whole task corpus" (every candidate of the same ``task``). ``hard_negatives`` (optional) lists
candidate ids that CMA's InfoNCE adds to the in-batch negatives (``cma.hard_negatives``). Images are encoded bytes,
decoded only when a model needs them.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

QUERY_SCHEMA = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("qry_inst", pa.string()),
        pa.field("qry_text", pa.string()),
        pa.field("qry_image", pa.binary()),
        pa.field("positive_ids", pa.list_(pa.string()), nullable=False),
        pa.field("positive_grades", pa.list_(pa.float32())),  # null = every positive has grade 1
        pa.field("cand_ids", pa.list_(pa.string())),  # null = the task corpus
        pa.field("rewrite", pa.string()),  # ideal rewrite (SFT target, oracle baseline)
        pa.field("reasoning", pa.list_(pa.string())),  # explicit reasoning segments (PLUME curriculum)
        pa.field("hard_negatives", pa.list_(pa.string())),  # candidate ids (`rime data mine-negatives`); null = none
    ]
)

CANDIDATE_SCHEMA = pa.schema(
    [
        pa.field("cand_id", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("cand_inst", pa.string()),
        pa.field("cand_text", pa.string()),
        pa.field("cand_image", pa.binary()),
        pa.field("rewrite", pa.string()),  # ideal rewrite of the candidate (gen-mode corpus oracle)
    ]
)

SPLITS = ("train", "val", "test")


def _has_text(v: Any) -> bool:
    """Non-empty string (pandas turns missing strings into NaN floats, which count as absent)."""
    return isinstance(v, str) and bool(v.strip())


def _has_bytes(v: Any) -> bool:
    return isinstance(v, (bytes, bytearray)) and len(v) > 0


def _seq(v: Any) -> list | None:
    """A list-valued cell as a list; None/NaN (pandas' missing value) as None."""
    return None if v is None or isinstance(v, float) else list(v)


def validate_query(row: dict[str, Any]) -> str | None:
    """Why a query row is unusable, or None. Image bytes are checked by the pipeline (decoding)."""
    if not row.get("query_id"):
        return "query_id: missing; every query needs a unique id"
    if not row.get("task"):
        return "task: missing; name the task the query belongs to"
    if not _has_text(row.get("qry_text")) and not _has_bytes(row.get("qry_image")):
        return "qry_text/qry_image: both empty; a query needs text, an image, or both"
    pos = _seq(row.get("positive_ids"))  # lists arrive as numpy arrays from pandas batches
    if not pos:
        return "positive_ids: empty; a query needs at least one relevant candidate id"
    grades = _seq(row.get("positive_grades"))
    if grades is not None and len(grades) != len(pos):
        return f"positive_grades: {len(grades)} grades for {len(pos)} positive_ids; give one grade per id"
    if grades is not None and not all(isinstance(g, numbers.Real) and math.isfinite(g) and g > 0 for g in grades):
        return f"positive_grades: {list(grades)} has a grade that is not a finite number > 0; a positive's grade is its relevance"
    if len(set(map(str, pos))) != len(pos):
        return "positive_ids: an id is listed twice; list each relevant candidate once"
    cands = _seq(row.get("cand_ids"))
    if cands is not None and len(set(map(str, cands))) != len(cands):
        return "cand_ids: an id is listed twice; a duplicate would be ranked as two candidates"
    if cands is not None and not set(pos) <= set(cands):
        return "cand_ids: does not contain every positive id; add the positives to the candidate list"
    return _hard_negatives_error(_seq(row.get("hard_negatives")), pos)


def _hard_negatives_error(negs: list | None, pos: list) -> str | None:
    """Why a query's hard-negative list contradicts itself or its positives, or None. Whether the ids exist
    is checked where the candidates are known (``orchestrator.pairs.PairStream``)."""
    if negs is None:
        return None
    if len(set(map(str, negs))) != len(negs):
        return "hard_negatives: an id is listed twice; list each negative candidate once"
    both = sorted(set(map(str, negs)) & set(map(str, pos)))
    if both:
        return (
            f"hard_negatives: {both[0]!r} is also in positive_ids; a relevant candidate cannot be a negative "
            "(remove it, or re-run `rime data mine-negatives`)"
        )
    return None


def validate_candidate(row: dict[str, Any]) -> str | None:
    if not row.get("cand_id"):
        return "cand_id: missing; every candidate needs a unique id"
    if not row.get("task"):
        return "task: missing"
    if not _has_text(row.get("cand_text")) and not _has_bytes(row.get("cand_image")):
        return "cand_text/cand_image: both empty; a candidate needs text, an image, or both"
    return None


def write_table(rows: Iterable[dict[str, Any]], schema: pa.Schema, path: str | Path) -> int:
    """Write rows (dicts; missing fields = null) as parquet with the given schema; returns the count."""
    rows = list(rows)
    table = pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, str(path))
    return len(rows)


def split_paths(root: str | Path, split: str) -> tuple[Path, Path]:
    """(queries, candidates) parquet paths of one split, with a clear error if absent."""
    root = Path(root)
    q, c = root / split / "queries.parquet", root / split / "candidates.parquet"
    for p in (q, c):
        if not p.is_file():
            have = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
            raise FileNotFoundError(f"data: {p} not found (splits present in {root}: {have or 'none'})")
    return q, c


def read_table(path: str | Path) -> pa.Table:
    return pq.read_table(str(path))
