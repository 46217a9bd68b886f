"""Ray Data streaming of query records: read parquet -> validate/normalise in map_batches -> batches.

Bad rows (schema violations, undecodable images) are not dropped inside the Ray tasks, where a
count would be lost: ``map_batches`` tags each row with ``_error`` and the consumer side
(``CleanBatches``) filters them, counts them and appends them with their row ids to an errors
file. Nothing is silently lost, and one bad row never fails a batch.

On a 2-CPU machine a consumer actor that reserves a whole CPU starves the read tasks (STACK.md):
map tasks here ask ``task_cpus`` (0.5 by default) and consumers should ask <= 0.25.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rime_model.inputs import InputError, open_image, reserved_in

from .schema import validate_candidate, validate_query

ERROR_COL = "_error"


@dataclass(frozen=True)
class PipelineConfig:
    """Knobs of the streaming pipeline (all have CPU-safe defaults)."""

    batch_size: int = 16
    map_batch_size: int = 64
    task_cpus: float = 0.5
    max_image_side: int = 448  # larger images are downscaled once here, not in every model call
    image_columns: tuple[str, ...] = ("qry_image",)
    # the model's control tokens (Embedder.reserved_tokens_of): a text holding one would move the position
    # an embedding is read from, so such a row is bad data, caught here rather than in a learner's step
    reserved_tokens: tuple[str, ...] = ()
    text_columns: tuple[str, ...] = ("qry_text", "qry_inst", "rewrite", "reasoning")


def reserved_token_error(row: dict[str, Any], columns: tuple[str, ...], reserved: tuple[str, ...]) -> str | None:
    """Why a row's text holds a control token (column named), or None; list cells are checked per item."""
    for col in columns:
        value = row.get(col)
        texts = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple, np.ndarray)) else []
        for t in texts:
            hit = reserved_in(t, reserved) if isinstance(t, str) else None
            if hit:
                return f"{col}: contains the model's control token {hit!r}; remove it from the data"
    return None


def normalise_image(data: bytes, max_side: int) -> bytes:
    """Decode (raises InputError on corrupt bytes or an oversized header), convert to RGB, downscale if
    needed, re-encode as PNG."""
    img = open_image(data)
    if img.mode == "RGB" and max(img.size) <= max_side and img.format == "PNG":
        return data
    img = img.convert("RGB")
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def error_column(errors: list[str | None], index: pd.Index) -> pd.Series:
    """``_error`` as an object column: pandas would store a mix of reasons and None as its string dtype,
    turning None into NaN, which is truthy, so a good row read back in-process would look bad."""
    return pd.Series(errors, index=index, dtype=object)


def validate_and_normalise(batch: pd.DataFrame, cfg: PipelineConfig) -> pd.DataFrame:
    """Ray Data map function: per row, a reason in ``_error`` (None if fine) and normalised images."""
    errors: list[str | None] = []
    images: dict[str, list[Any]] = {c: [] for c in cfg.image_columns if c in batch.columns}
    for row in batch.to_dict("records"):
        why = validate_query(row) or reserved_token_error(row, cfg.text_columns, cfg.reserved_tokens)
        for col in images:
            data = row.get(col)
            if not isinstance(data, (bytes, bytearray)) or why is not None:
                images[col].append(data)
                continue
            try:
                images[col].append(normalise_image(data, cfg.max_image_side))
            except InputError as e:
                images[col].append(None)
                why = f"{col}: {str(e).split(': ', 1)[1]}"
        errors.append(why)
    out = batch.copy()
    for col, vals in images.items():
        out[col] = vals
    out[ERROR_COL] = error_column(errors, out.index)
    return out


CAND_TEXT_COLUMNS = ("cand_text", "cand_inst", "rewrite")


def check_candidate(row: dict, cfg: PipelineConfig) -> tuple[dict, str | None]:
    """(the row with its image normalised, why it is bad or None): the same rules as queries."""
    why = validate_candidate(row) or reserved_token_error(row, CAND_TEXT_COLUMNS, cfg.reserved_tokens)
    if why is None and isinstance(row.get("cand_image"), (bytes, bytearray)):
        try:
            row = {**row, "cand_image": normalise_image(row["cand_image"], cfg.max_image_side)}
        except InputError as e:
            why = f"cand_image: {str(e).split(': ', 1)[1]}"
    return row, why


def tag_candidates(batch: pd.DataFrame, cfg: PipelineConfig) -> pd.DataFrame:
    """Ray Data map function for candidate rows: normalised images and ``_error`` per row, order kept."""
    checked = [check_candidate(r, cfg) for r in batch.to_dict("records")]
    out = pd.DataFrame([r for r, _ in checked], columns=batch.columns)
    out[ERROR_COL] = error_column([why for _, why in checked], out.index)
    return out


def read_candidates(path: str | Path, cfg: PipelineConfig) -> tuple[list[dict], list[dict]]:
    """A split's candidates, read whole (training joins them to queries by id) and checked by
    ``check_candidate`` (a bad one becomes a counted bad row, not a failed learner step), their images
    decoded and resized in Ray Data map tasks beside the driver rather than in it: (usable rows, bad
    rows tagged with ``_error``)."""
    import ray

    ds = ray.data.read_parquet(str(path), num_cpus=cfg.task_cpus).map_batches(
        tag_candidates, fn_kwargs={"cfg": cfg}, batch_format="pandas", batch_size=cfg.map_batch_size, num_cpus=cfg.task_cpus
    )
    good, bad = [], []
    for df in ds.iter_batches(batch_size=cfg.map_batch_size, batch_format="pandas"):
        for r in df.to_dict("records"):
            why = r.pop(ERROR_COL, None)
            if why:
                bad.append({**r, ERROR_COL: why})
            else:
                good.append(r)
    return good, bad


def append_errors(path: Path, rows: list[dict], id_column: str) -> None:
    """One JSON line per bad row: its id and the reason."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for r in rows:
            f.write(json.dumps({"id": r.get(id_column), "error": r[ERROR_COL]}) + "\n")


def query_dataset(paths: str | Path | list, cfg: PipelineConfig | None = None):
    """A lazy Ray Dataset of validated query rows (bad rows tagged, not removed)."""
    import ray

    cfg = cfg or PipelineConfig()
    paths = [str(p) for p in paths] if isinstance(paths, (list, tuple)) else str(paths)
    # Read tasks ask the same fractional CPU as the map. Ray 2.60's parquet reader also runs one
    # ListFiles task that always asks a WHOLE CPU: callers keep 1 CPU free beside their actors
    # (orchestrator.placement.DATA_TASK_CPUS), or the stream never starts.
    ds = ray.data.read_parquet(paths, num_cpus=cfg.task_cpus)
    return ds.map_batches(
        validate_and_normalise,
        fn_kwargs={"cfg": cfg},
        batch_format="pandas",
        batch_size=cfg.map_batch_size,
        num_cpus=cfg.task_cpus,
    )


@dataclass
class CleanBatches:
    """Iterate clean row batches from a Ray Dataset or DataIterator; count and log the bad rows."""

    source: Any  # ray.data.Dataset or ray.data.DataIterator (a streaming_split shard)
    batch_size: int
    errors_file: Path | None = None
    id_column: str = "query_id"
    n_good: int = 0
    n_bad: int = 0
    bad_ids: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[list[dict]]:
        pending: list[dict] = []
        for df in self.source.iter_batches(batch_size=self.batch_size, batch_format="pandas"):
            rows = df.to_dict("records")
            bad = [r for r in rows if r.get(ERROR_COL)]
            if bad:
                self.log_bad(bad)
            for r in rows:
                if not r.get(ERROR_COL):
                    r.pop(ERROR_COL, None)
                    pending.append(r)
            while len(pending) >= self.batch_size:
                self.n_good += self.batch_size
                yield pending[: self.batch_size]
                pending = pending[self.batch_size :]
        if pending:
            self.n_good += len(pending)
            yield pending

    def log_bad(self, bad: list[dict]) -> None:
        """Count rows (carrying an ``_error`` reason) and append them to the errors file."""
        self.n_bad += len(bad)
        self.bad_ids += [str(r.get(self.id_column)) for r in bad]
        if self.errors_file is not None:
            append_errors(self.errors_file, bad, self.id_column)

    def summary(self) -> dict:
        return {
            "good_rows": self.n_good,
            "bad_rows": self.n_bad,
            "errors_file": str(self.errors_file) if self.errors_file else None,
        }
