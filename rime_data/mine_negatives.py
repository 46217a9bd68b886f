"""``rime data mine-negatives``: each query's hardest non-positive candidates under a frozen model.

Ray Data embeds the split in disc mode (``rime_data.embed_split``: the training stream's row checks, then
an actor pool of embedders; a row training would refuse is never mined, nor picked as a negative). The
driver only ranks: per query, the candidates of its pool (its ``cand_ids``, else
its task's corpus, as the benchmark ranks it) minus its positives, best first, keeping ``k``.

False negatives (an unlabelled near-duplicate of the positive) are the risk of mining: as
sentence-transformers' ``mine_hard_negatives``, a candidate is dropped when it scores within
``absolute_margin`` of the positive (kept iff ``score <= pos - absolute_margin``) or above
``(1 - relative_margin)`` times it. With several positives the weakest one's score is the reference.
The result is the ``hard_negatives`` column of the split's queries.parquet, replaced atomically.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .embed_split import COLUMN, embed_split
from .schema import split_paths


@dataclass(frozen=True)
class MineConfig:
    """What to keep and how to run the embedders (CPU-safe defaults for a 2-CPU machine)."""

    k: int = 8
    absolute_margin: float | None = 0.05  # None = no absolute margin
    relative_margin: float | None = None  # None = no relative margin
    workers: int = 2  # embedder actors in the pool
    num_cpus: float = 0.25  # per actor: Ray Data's reader needs a whole CPU free beside them
    num_gpus: float = 0.0  # per actor
    batch_size: int = 16
    task_cpus: float = 0.25  # read and check tasks

    def check(self) -> None:
        """ValueError naming the option and the fix."""
        if self.k < 1:
            raise ValueError(f"--k: must be >= 1, got {self.k}")
        if self.absolute_margin is not None and not self.absolute_margin >= 0:
            raise ValueError(f"--absolute-margin: must be >= 0 (or off), got {self.absolute_margin}")
        if self.relative_margin is not None and not 0 <= self.relative_margin < 1:
            raise ValueError(f"--relative-margin: must be in [0, 1) (or off), got {self.relative_margin}")
        if self.workers < 1 or self.batch_size < 1:
            raise ValueError(f"--workers and --batch-size: must be >= 1, got {self.workers} and {self.batch_size}")
        if self.num_cpus <= 0 or self.num_gpus < 0:
            raise ValueError(f"--num-cpus must be > 0 and --num-gpus >= 0, got {self.num_cpus} and {self.num_gpus}")


# ---------------------------------------------------------------- selection (driver, numpy)
def select_negatives(
    scores: np.ndarray, is_positive: np.ndarray, k: int, absolute_margin: float | None, relative_margin: float | None
) -> tuple[list[int], int]:
    """(indices of the top-``k`` non-positive scores that pass the margins, best first, ties by index; how
    many non-positives the margins dropped). The reference is the weakest positive's score."""
    pos = float(scores[is_positive].min())
    ok = ~is_positive
    if absolute_margin is not None:
        ok &= scores <= pos - absolute_margin
    if relative_margin is not None:
        ok &= scores <= pos * (1 - relative_margin)
    dropped = int((~is_positive).sum() - ok.sum())
    idx = np.flatnonzero(ok)
    best = idx[np.argsort(-scores[idx], kind="stable")][:k]
    return [int(i) for i in best], dropped


def mine(
    queries: list[dict], qvecs: dict[str, np.ndarray], cands: dict[str, tuple[str, np.ndarray]], cfg: MineConfig
) -> tuple[list[list[str] | None], list[dict], int]:
    """Per query row: its negatives (None where it cannot be mined), the rows that could not (id, error),
    and how many candidates the margins dropped in all. ``cands``: usable id -> (task, vector)."""
    ids = sorted(cands)  # ties break by id, not by the order the embedders answered in
    mat = np.stack([cands[c][1] for c in ids]) if ids else np.zeros((0, 1), np.float32)
    index = {c: i for i, c in enumerate(ids)}
    by_task: dict[str, list[int]] = {}
    for i, c in enumerate(ids):
        by_task.setdefault(cands[c][0], []).append(i)
    out: list[list[str] | None] = []
    errors: list[dict] = []
    dropped = 0
    for q in queries:
        vec = qvecs.get(q["query_id"])
        if vec is None:
            out.append(None)  # a bad row: its reason is already among the errors
            continue
        own = q.get("cand_ids")
        pool = np.array([index[c] for c in own if c in index] if own else by_task.get(q["task"], []), dtype=int)
        positives = {index[c] for c in q["positive_ids"] if c in index}
        is_pos = np.array([i in positives for i in pool], dtype=bool)
        if not is_pos.any():
            errors.append(
                {
                    "id": q["query_id"],
                    "error": "positive_ids: no usable positive among the candidates of its pool, so no score to "
                    "measure the margin against; fix the candidate (its own line here, if bad)",
                }
            )
            out.append(None)
            continue
        best, n_dropped = select_negatives(mat[pool] @ vec, is_pos, cfg.k, cfg.absolute_margin, cfg.relative_margin)
        dropped += n_dropped
        out.append([ids[pool[i]] for i in best])
    return out, errors, dropped


# ---------------------------------------------------------------- the command
def _reserved_tokens(model: str) -> tuple[str, ...]:
    """The control tokens training refuses in data, where the model is a saved embedder folder (else the
    embedders' own ``prepare`` still refuses them in the text they embed)."""
    from rime_model import Embedder

    try:
        return Embedder.reserved_tokens_of(model)
    except (FileNotFoundError, ValueError):
        return ()


def resolve_model(spec: str) -> str:
    """A spec every actor can load: zoo models built once here, local folders made absolute."""
    from rime_model.zoo import BUILDERS, ensure_zoo_model

    if spec in BUILDERS:
        return str(ensure_zoo_model(spec))
    return str(Path(spec).resolve()) if Path(spec).exists() else spec


@contextmanager
def ray_session() -> Iterator[None]:
    """The caller's Ray session, else a local one (RAY_ADDRESS to join a cluster), stopped after."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    owns = not ray.is_initialized()
    if owns:
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        if owns:
            ray.shutdown()


def write_column(src: Path, dst: Path, values: list[list[str] | None]) -> None:
    """``src`` with its ``hard_negatives`` column replaced (or added), written to ``dst`` atomically: a
    temporary file beside it, renamed over it, so a reader never sees half a file."""
    table = pq.read_table(str(src))
    col = pa.array(values, type=pa.list_(pa.string()))
    if COLUMN in table.column_names:
        table = table.set_column(table.column_names.index(COLUMN), pa.field(COLUMN, col.type), col)
    else:
        table = table.append_column(pa.field(COLUMN, col.type), col)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    pq.write_table(table, str(tmp))
    os.replace(tmp, dst)


def mine_negatives(
    model: str, data: str | Path, split: str = "train", out: str | Path | None = None, cfg: MineConfig | None = None
) -> dict:
    """Mine the split's hard negatives into ``<out>/<split>/queries.parquet`` (``out`` defaults to ``data``:
    in place; elsewhere the candidates file is copied beside it); returns the summary. Rows that cannot
    be mined keep a null list and are written with the reason to ``mine_negatives_errors.jsonl``."""
    cfg = cfg or MineConfig()
    cfg.check()
    q_path, c_path = split_paths(data, split)
    out_dir = Path(out if out is not None else data) / split
    model = resolve_model(model)
    queries = pq.read_table(str(q_path), columns=["query_id", "task", "positive_ids", "cand_ids"]).to_pylist()
    errors: list[dict] = []
    qvecs: dict[str, np.ndarray] = {}
    cands: dict[str, tuple[str, np.ndarray]] = {}
    with ray_session():
        batches = embed_split(
            model,
            q_path,
            c_path,
            _reserved_tokens(model),
            workers=cfg.workers,
            num_cpus=cfg.num_cpus,
            num_gpus=cfg.num_gpus,
            batch_size=cfg.batch_size,
            task_cpus=cfg.task_cpus,
        )
        for b in batches:
            for kind, rid, task, err, vec in zip(b["kind"], b["id"], b["task"], b["error"], b["vec"]):
                if err:
                    errors.append({"id": rid, "error": err})
                elif kind == "query":
                    qvecs[rid] = vec
                else:
                    cands[rid] = (task, vec)
    seen: dict[str, int] = {}
    for q in queries:
        seen[q["query_id"]] = seen.get(q["query_id"], 0) + 1
    for qid in [q for q, n in seen.items() if n > 1]:  # which row a vector belongs to would be a guess
        qvecs.pop(qid, None)
        errors.append({"id": qid, "error": "query_id: appears twice in the split; give every query a unique id"})
    negs, unmined, dropped = mine(queries, qvecs, cands, cfg)
    errors += unmined
    write_column(q_path, out_dir / "queries.parquet", negs)
    c_out = out_dir / "candidates.parquet"
    if not (c_out.exists() and c_out.samefile(c_path)):  # a dataset elsewhere needs the ids' candidates
        shutil.copy2(c_path, c_out)
    err_file = out_dir / "mine_negatives_errors.jsonl"
    err_file.write_text("".join(json.dumps(e) + "\n" for e in errors))
    kept = [len(n) for n in negs if n is not None]
    return {
        "queries": len(queries),
        "mined": len(kept),
        "k": cfg.k,
        "mean_negatives": round(float(np.mean(kept)), 3) if kept else 0.0,
        "fewer_than_k": sum(n < cfg.k for n in kept),
        "margin_dropped": dropped,
        "bad_rows": len(errors),
        "out": str(out_dir / "queries.parquet"),
        "errors_file": str(err_file),
    }
