"""Import MMEB(-V2) evaluation files (JSONL or parquet) into rime's record schema.

Accepted columns per row (VLM2Vec / MMEB eval layout):
  qry_inst (optional), qry_text, qry_img_path   the query; an empty path means text-only
  tgt_inst (optional), tgt_text (list), tgt_img_path or tgt_img_paths (list)
                                                the candidate list, positive FIRST
  task (optional)                               else the file name's stem, or its folder's name
                                                when the stem only names a split (HF's
                                                ImageNet-1K/test-00000-of-00001.parquet)
Image paths are relative to ``image_root``. MMEB's inline image markers (``<|image_1|>``,
``<image>``) are stripped from texts: rime places media itself. Identical candidates shared by
many queries (class labels, a common corpus) are stored once. A row that cannot be used
(missing column, unreadable image) is skipped, counted and written with its row number and
reason to ``errors.jsonl``; it never stops the import.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from .schema import CANDIDATE_SCHEMA, QUERY_SCHEMA, write_table

IMAGE_MARKERS = re.compile(r"<\|image_\d+\|>|<image>")


def read_rows(path: Path) -> Iterator[dict[str, Any]]:
    """A .jsonl or .parquet file's rows; a line that is not JSON becomes a row carrying ``__error__``."""
    if path.suffix == ".jsonl":
        with path.open() as f:
            for line in f:
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        yield {"__error__": f"not valid JSON ({e.msg} at column {e.colno})"}
    elif path.suffix == ".parquet":
        yield from pq.read_table(str(path)).to_pylist()
    else:
        raise ValueError(f"data: {path} has suffix {path.suffix!r}; MMEB files must be .jsonl or .parquet")


def candidate_id(task: str, inst: str, text: str, image_path: str) -> str:
    """A candidate's id from its content: the same target met in many rows is stored once."""
    return f"{task}/" + hashlib.sha1(f"{task}\0{inst}\0{text}\0{image_path}".encode()).hexdigest()[:16]


SPLIT_STEM = re.compile(r"^(test|train|val|validation|dev|eval|data)([-_.].*)?$", re.IGNORECASE)


def default_task(file: Path) -> str:
    """The task of a file's rows that name none: its stem, unless the stem only names a split (HF
    datasets keep one folder per dataset, all holding ``test-*.parquet``), then its folder's name."""
    return file.parent.name if SPLIT_STEM.match(file.stem) and file.parent.name else file.stem


def clean_text(text: Any, field: str = "text") -> str:
    """The text without MMEB's image markers; a non-string is a bad row naming ``field``."""
    if text is not None and not isinstance(text, str):
        raise ValueError(f"{field}: expected a string, got {type(text).__name__}")
    return IMAGE_MARKERS.sub("", text or "").strip()


def _as_list(v: Any) -> list:
    if v is None:
        return []
    return list(v) if isinstance(v, (list, tuple)) else [v]


def read_image(root: Path, rel: Any, field: str) -> bytes | None:
    """The bytes of the image at ``root/rel`` (None without a path); a missing file is a bad row naming ``field``."""
    if not rel:
        return None
    if not isinstance(rel, str):
        raise ValueError(f"{field}: expected a path string, got {type(rel).__name__}")
    p = root / rel
    if not p.is_file():
        raise ValueError(f"{field}: image file not found: {p}")
    return p.read_bytes()


def import_mmeb(files: list[str | Path], image_root: str | Path, out: str | Path, split: str = "test") -> dict:
    """Convert MMEB files into ``out/<split>/{queries,candidates}.parquet``; returns counts and errors."""
    root = Path(image_root)
    queries: list[dict] = []
    cands: dict[str, dict] = {}
    errors: list[dict] = []
    seen: dict[str, str] = {}  # query_id -> the file that gave it
    for file in map(Path, files):
        for n, row in enumerate(read_rows(file)):
            try:
                q, row_cands = _convert(row, file, n, root)
                if q["query_id"] in seen:
                    raise ValueError(
                        f"query_id: {q['query_id']!r} again (first from {seen[q['query_id']]}); two files "
                        "give the same task and name: rename one or set a task column"
                    )
            except ValueError as e:
                errors.append({"file": str(file), "row": n, "error": str(e)})
                continue
            seen[q["query_id"]] = str(file)
            queries.append(q)
            for c in row_cands:
                cands.setdefault(c["cand_id"], c)
    err_file = write_split(Path(out) / split, queries, cands.values(), errors)
    return {"queries": len(queries), "candidates": len(cands), "errors": len(errors), "errors_file": str(err_file)}


def write_split(out_dir: Path, queries: list[dict], cands: Iterable[dict], errors: list[dict]) -> Path:
    """An imported split: ``queries.parquet``, ``candidates.parquet`` and the skipped rows in ``errors.jsonl``
    (its path is returned); shared by the MMEB and training-pair importers."""
    write_table(queries, QUERY_SCHEMA, out_dir / "queries.parquet")
    write_table(cands, CANDIDATE_SCHEMA, out_dir / "candidates.parquet")
    err_file = out_dir / "errors.jsonl"
    err_file.write_text("".join(json.dumps(e) + "\n" for e in errors))
    return err_file


def _convert(row: dict, file: Path, n: int, root: Path) -> tuple[dict, list[dict]]:
    if not isinstance(row, dict):
        raise ValueError(f"row: expected a JSON object with qry_text, tgt_text, ..., got {type(row).__name__}")
    if "__error__" in row:
        raise ValueError(row["__error__"])
    task = row.get("task") or default_task(file)
    if not isinstance(task, str):
        raise ValueError(f"task: expected a string, got {type(task).__name__}")
    for col in ("qry_text", "tgt_text"):
        if col not in row:
            raise ValueError(f"{col}: column missing; MMEB rows need qry_text, qry_img_path, tgt_text, tgt_img_path")
    texts = _as_list(row.get("tgt_text"))
    paths = _as_list(row.get("tgt_img_path", row.get("tgt_img_paths")))
    if not texts and not paths:
        raise ValueError("tgt_text/tgt_img_path: both empty; the positive target must come first")
    k = max(len(texts), len(paths))
    texts, paths = texts + [""] * (k - len(texts)), paths + [""] * (k - len(paths))
    tgt_inst = clean_text(row.get("tgt_inst"), "tgt_inst")
    row_cands = []
    for j, (t, p) in enumerate(zip(texts, paths)):
        img = read_image(root, p, f"tgt_img_path[{j}]")
        text = clean_text(t, f"tgt_text[{j}]")
        if not text and img is None:
            raise ValueError(f"tgt_text[{j}]/tgt_img_path[{j}]: both empty")
        row_cands.append(
            dict(
                cand_id=candidate_id(task, tgt_inst, text, p),
                task=task,
                cand_inst=tgt_inst,
                cand_text=text or None,
                cand_image=img,
            )
        )
    qry_img = read_image(root, row.get("qry_img_path"), "qry_img_path")
    qry_text = clean_text(row.get("qry_text"), "qry_text")
    if not qry_text and qry_img is None:
        raise ValueError("qry_text/qry_img_path: both empty")
    ids = list(dict.fromkeys(c["cand_id"] for c in row_cands))  # keep order, drop in-row duplicates
    query = dict(
        query_id=f"{task}/{file.stem}/{n}",
        task=task,
        qry_inst=clean_text(row.get("qry_inst"), "qry_inst"),
        qry_text=qry_text or None,
        qry_image=qry_img,
        positive_ids=[ids[0]],
        cand_ids=ids,
    )
    return query, row_cands
