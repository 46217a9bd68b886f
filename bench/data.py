"""Rows/s of the Ray Data query pipeline versus plain pyarrow reading of the same parquet file.

Both paths run the same validation/normalisation, so the ratio shows Ray Data's overhead (or
gain from parallel map tasks) at this size. Usage: python bench/data.py [--per-task 500]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--per-task", type=int, default=500, help="queries per task (6 tasks)")
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from rime_data.pipeline import CleanBatches, PipelineConfig, query_dataset, validate_and_normalise
    from rime_data.schema import QUERY_SCHEMA, write_table
    from rime_data.synth import synth_split

    tmp = Path(tempfile.mkdtemp())
    path = tmp / "queries.parquet"
    n = write_table(synth_split("train", args.per_task).queries, QUERY_SCHEMA, path)
    cfg = PipelineConfig(map_batch_size=args.batch)

    t = time.perf_counter()
    rows = 0
    for rb in pq.ParquetFile(path).iter_batches(batch_size=args.batch):
        rows += len(validate_and_normalise(rb.to_pandas(), cfg))
    plain = rows / (time.perf_counter() - t)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    CleanBatches(query_dataset(path, cfg), batch_size=args.batch).__iter__().__next__()  # warm-up (workers, imports)
    t = time.perf_counter()
    it = CleanBatches(query_dataset(path, cfg), batch_size=args.batch)
    for _ in it:
        pass
    ray_rate = (it.n_good + it.n_bad) / (time.perf_counter() - t)
    ray.shutdown()
    print(f"rows={n} batch={args.batch}")
    print(f"plain pyarrow + validation : {plain:10.1f} rows/s")
    print(f"ray data pipeline          : {ray_rate:10.1f} rows/s")
    print(f"ray / plain ratio          : {ray_rate / plain:10.2f}x")


if __name__ == "__main__":
    main()
