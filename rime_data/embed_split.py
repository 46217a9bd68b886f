"""A split's queries and candidates embedded in disc mode through Ray Data, for ``rime data mine-negatives``.

Both parquet files are read and checked in fractional-CPU tasks by the training stream's own rules
(``rime_data.pipeline``: schema, image decoding, the model's control tokens), turned into one item shape,
then embedded by a fixed pool of embedder actors, each loading the frozen model once. Bad rows are not
dropped on the way: they come out with their reason, for the caller to count and report.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from .pipeline import ERROR_COL, PipelineConfig, tag_candidates, validate_and_normalise

COLUMN = "hard_negatives"  # the queries' column mining writes; ignored by the checks here
# the common shape of both tables on their way to the embedders (one actor pool serves both)
ITEM_SCHEMA = pa.schema(
    [
        pa.field("kind", pa.string()),  # "query" or "cand"
        pa.field("id", pa.string()),
        pa.field("task", pa.string()),
        pa.field("text", pa.string()),
        pa.field("image", pa.binary()),
        pa.field("instruction", pa.string()),
        pa.field("error", pa.string()),  # why the row cannot be used; null = fine
    ]
)


def _item_table(kind: str, ids: list, rows: list[dict], prefix: str, errors: list[str | None]) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "kind": kind,
                "id": None if i is None else str(i),
                "task": r.get("task") if isinstance(r.get("task"), str) else None,
                "text": r.get(f"{prefix}_text") if isinstance(r.get(f"{prefix}_text"), str) else None,
                "image": r.get(f"{prefix}_image") if isinstance(r.get(f"{prefix}_image"), (bytes, bytearray)) else None,
                "instruction": r.get(f"{prefix}_inst") if isinstance(r.get(f"{prefix}_inst"), str) else None,
                "error": e,
            }
            for i, r, e in zip(ids, rows, errors)
        ],
        schema=ITEM_SCHEMA,
    )


def query_items(batch: pd.DataFrame, cfg: PipelineConfig) -> pa.Table:
    """Checked query rows as items. The existing ``hard_negatives`` is ignored: mining replaces it."""
    checked = validate_and_normalise(batch.drop(columns=[COLUMN], errors="ignore"), cfg)
    rows = checked.to_dict("records")
    return _item_table("query", [r.get("query_id") for r in rows], rows, "qry", [r[ERROR_COL] for r in rows])


def cand_items(batch: pd.DataFrame, cfg: PipelineConfig) -> pa.Table:
    """Checked candidate rows as items (normalised images; bad ones carry the reason)."""
    rows = tag_candidates(batch, cfg).to_dict("records")
    return _item_table("cand", [r.get("cand_id") for r in rows], rows, "cand", [r[ERROR_COL] for r in rows])


class DiscEmbedder:
    """A Ray Data actor: loads the frozen model once, embeds each batch's usable items in disc mode."""

    def __init__(self, model: str, batch_size: int, num_cpus: float, num_gpus: float):
        import torch

        from rime_model import load_embedder

        torch.set_num_threads(max(1, int(num_cpus)))  # its CPU share, not every core of the node
        self.emb = load_embedder(model, device="cuda" if num_gpus > 0 else "cpu")
        self.batch_size = batch_size

    def __call__(self, batch: pd.DataFrame) -> dict[str, np.ndarray]:
        from rime_model import InputError

        rows = batch.to_dict("records")
        errors = [r["error"] if isinstance(r["error"], str) else None for r in rows]
        items: list[dict] = []
        for n, r in enumerate(rows):
            if errors[n] is None:
                item = {"text": r["text"], "image": r["image"], "instruction": r["instruction"]}
                try:
                    self.emb.prepare([item])  # the model's own refusals (its control tokens), per row
                    items.append(item)
                except InputError as e:
                    errors[n] = str(e).replace("inputs[0].", "")
        vecs = np.zeros((len(rows), self.emb.dim), np.float32)
        if items:
            ok = [n for n, e in enumerate(errors) if e is None]
            vecs[ok] = self.emb.embed(items, mode="disc", batch_size=self.batch_size).vectors
        return {
            "kind": np.array([r["kind"] for r in rows], dtype=object),
            "id": np.array([r["id"] for r in rows], dtype=object),
            "task": np.array([r["task"] for r in rows], dtype=object),
            "error": np.array(["" if e is None else e for e in errors], dtype=object),
            "vec": vecs,
        }


def embed_split(
    model: str,
    q_path: Path,
    c_path: Path,
    reserved: tuple[str, ...] = (),
    workers: int = 2,
    num_cpus: float = 0.25,
    num_gpus: float = 0.0,
    batch_size: int = 16,
    task_cpus: float = 0.25,
) -> Iterator[dict]:
    """Batches of ``{kind, id, task, error, vec}`` for every row of both files (``kind`` "query" or "cand";
    ``error`` "" for a usable row, else why not, and a zero ``vec``). ``reserved``: the control tokens the
    training stream refuses in data; ``workers`` embedder actors of ``num_cpus``/``num_gpus`` each."""
    import ray

    pipe = PipelineConfig(reserved_tokens=reserved, task_cpus=task_cpus)

    def items(path: Path, fn) -> Any:
        ds = ray.data.read_parquet(str(path), num_cpus=task_cpus)
        return ds.map_batches(fn, fn_kwargs={"cfg": pipe}, batch_format="pandas", num_cpus=task_cpus)

    ds = items(c_path, cand_items).union(items(q_path, query_items))
    ds = ds.map_batches(
        DiscEmbedder,
        fn_constructor_kwargs={
            "model": model,
            "batch_size": batch_size,
            "num_cpus": num_cpus,
            "num_gpus": num_gpus,
        },
        batch_size=batch_size,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=workers),  # a fixed pool of embedder actors
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    )
    yield from ds.iter_batches(batch_size=256, batch_format="numpy")
