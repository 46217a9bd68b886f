"""Import training pairs (JSONL or parquet) into rime's record schema, next to the MMEB eval importer.

Two row layouts, told apart per row by its columns:

* VLM2Vec / MMEB training: ``qry``, ``qry_image_path``, ``pos_text``, ``pos_image_path``,
  ``neg_text`` and ``neg_image_path`` (the negative is optional), ``task`` (optional).
* plain pairs: ``query``, ``positive`` (texts), ``query_image``, ``positive_image``, ``negative``,
  ``negative_image`` (optional), ``query_instruction``/``positive_instruction`` (optional), ``task``
  (optional).

Each row becomes one query that ranks against its task's corpus (``cand_ids`` null, as training
does), its positive candidate and, when it has one, its negative as the query's only
``hard_negatives`` id. Image paths are relative to ``image_root`` and stored as the file's bytes:
the training pipeline decodes and resizes them in Ray Data tasks, so the import stays I/O bound.
Candidates are stored once per content digest, with mmeb's formula, so a corpus shared by many rows
(class labels, one caption set) is not repeated. A row that cannot be used is skipped, counted and
written with its row number and reason to ``errors.jsonl``; it never stops the import.
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from .mmeb import candidate_id, clean_text, default_task, read_image, read_rows, write_split


@dataclass(frozen=True)
class Layout:
    """The column names of one row layout; a side is (text column, image column)."""

    name: str
    query: tuple[str, str]
    positive: tuple[str, str]
    negative: tuple[str, str]
    query_inst: str | None = None
    cand_inst: str | None = None

    def columns(self) -> set[str]:
        cols = {*self.query, *self.positive, *self.negative, self.query_inst, self.cand_inst}
        return {c for c in cols if c}

    def needs(self) -> str:
        return f"{self.name} rows need {self.query[0]} and {self.positive[0]} (texts, may be empty beside an image)"


VLM2VEC = Layout("vlm2vec", ("qry", "qry_image_path"), ("pos_text", "pos_image_path"), ("neg_text", "neg_image_path"))
PAIRS = Layout(
    "pairs",
    ("query", "query_image"),
    ("positive", "positive_image"),
    ("negative", "negative_image"),
    query_inst="query_instruction",
    cand_inst="positive_instruction",
)
LAYOUTS = (VLM2VEC, PAIRS)


def import_train(
    files: list[str | Path], image_root: str | Path, out: str | Path, split: str = "train", task: str | None = None
) -> dict:
    """Convert training files into ``out/<split>/{queries,candidates}.parquet``; returns counts and errors."""
    root = Path(image_root)
    queries: list[dict] = []
    cands: dict[str, dict] = {}
    errors: list[dict] = []
    seen: dict[str, str] = {}  # query_id -> the file that gave it
    layouts: Counter[str] = Counter({lay.name: 0 for lay in LAYOUTS})
    dropped = 0
    for file in map(Path, files):
        for n, row in enumerate(read_rows(file)):
            try:
                layout, q, row_cands, same = _convert(row, file, n, root, task)
                _check_new(q["query_id"], seen)
            except ValueError as e:
                errors.append({"file": str(file), "row": n, "error": str(e)})
                continue
            seen[q["query_id"]] = str(file)
            queries.append(q)
            layouts[layout] += 1
            dropped += same
            for c in row_cands:
                cands.setdefault(c["cand_id"], c)
    err_file = write_split(Path(out) / split, queries, cands.values(), errors)
    return {
        "queries": len(queries),
        "candidates": len(cands),
        "hard_negatives": sum(q["hard_negatives"] is not None for q in queries),
        "negatives_dropped": dropped,
        "errors": len(errors),
        "errors_file": str(err_file),
        "layouts": dict(layouts),
    }


def _check_new(query_id: str, seen: dict[str, str]) -> None:
    """Two files with the same stem and task would give the same ids; the second one's rows are refused."""
    if query_id in seen:
        raise ValueError(
            f"query_id: {query_id!r} again (first from {seen[query_id]}); two files give the same task and "
            "name: rename one, set a task column, or import them with different --task"
        )


def detect_layout(row: dict) -> Layout:
    """The layout whose columns the row has (null cells ignored: a parquet file mixing both layouts has
    every column); a row with values in both layouts, or in neither, is refused."""
    given = {k for k, v in row.items() if v is not None}
    hits = [lay for lay in LAYOUTS if lay.columns() & given]
    if len(hits) > 1:
        raise ValueError("row: has columns of both layouts (qry/pos_text and query/positive); use one layout per row")
    if not hits:
        raise ValueError(f"row: its values {sorted(given)} match no layout; {VLM2VEC.needs()}; {PAIRS.needs()}")
    return hits[0]


def _convert(row: Any, file: Path, n: int, root: Path, task: str | None) -> tuple[str, dict, list[dict], bool]:
    """(layout name, query, its candidates, whether a negative equal to the positive was dropped)."""
    if not isinstance(row, dict):
        raise ValueError(f"row: expected a JSON object with query and positive columns, got {type(row).__name__}")
    if "__error__" in row:
        raise ValueError(f"{row['__error__']}; fix or remove the line")
    layout = detect_layout(row)
    for col in (layout.query[0], layout.positive[0]):
        if col not in row:
            raise ValueError(f"{col}: column missing; {layout.needs()}")
    name = _task(row, file, task)
    q_text, q_img = _side(row, layout.query, root)
    if not q_text and q_img is None:
        raise ValueError(f"{layout.query[0]}/{layout.query[1]}: both empty; a query needs text, an image, or both")
    inst = clean_text(row.get(layout.cand_inst), layout.cand_inst) if layout.cand_inst else ""
    pos = _candidate(row, layout.positive, root, name, inst)
    if pos is None:
        raise ValueError(f"{layout.positive[0]}/{layout.positive[1]}: both empty; a positive needs text, an image, or both")
    neg = _candidate(row, layout.negative, root, name, inst)
    same = neg is not None and neg["cand_id"] == pos["cand_id"]
    neg = None if same else neg
    query = dict(
        query_id=f"{name}/{file.stem}/{n}",
        task=name,
        qry_inst=clean_text(row.get(layout.query_inst), layout.query_inst) if layout.query_inst else "",
        qry_text=q_text or None,
        qry_image=q_img,
        positive_ids=[pos["cand_id"]],
        cand_ids=None,
        hard_negatives=[neg["cand_id"]] if neg else None,
    )
    return layout.name, query, [pos] + ([neg] if neg else []), same


def _task(row: dict, file: Path, task: str | None) -> str:
    """The row's own task, else the one given to the import, else the file's (as mmeb names it)."""
    name = row.get("task") or task or default_task(file)
    if not isinstance(name, str):
        raise ValueError(f"task: expected a string, got {type(name).__name__}; give the task name as text")
    return name


def _side(row: dict, cols: tuple[str, str], root: Path) -> tuple[str, bytes | None]:
    """(cleaned text, image bytes or None) of one side of a row."""
    text_col, image_col = cols
    return clean_text(row.get(text_col), text_col), _read_image(root, row.get(image_col), image_col)


def _read_image(root: Path, rel: Any, field: str) -> bytes | None:
    """The file's bytes, after checking that PIL can read its header: a broken file is refused at its row
    here, not rows later in a training job."""
    try:
        data = read_image(root, rel, field)
    except OSError as e:
        raise ValueError(f"{field}: cannot read {root / rel} ({e.strerror or e}); fix its permissions or the path") from e
    if data is None:
        return None
    try:
        Image.open(io.BytesIO(data)).close()  # header only: no decoding, no resizing
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{field}: {root / rel} is not an image PIL can read ({e}); re-download or convert it") from e
    return data


def _candidate(row: dict, cols: tuple[str, str], root: Path, task: str, inst: str) -> dict | None:
    """One side as a candidate row, or None when both its text and image are empty."""
    text, img = _side(row, cols, root)
    if not text and img is None:
        return None
    path = row.get(cols[1]) or ""
    return dict(cand_id=candidate_id(task, inst, text, path), task=task, cand_inst=inst, cand_text=text or None, cand_image=img)
