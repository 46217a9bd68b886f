"""Ray Data streaming: bad rows are counted and logged (never fatal, never lost); no 2-CPU deadlock."""

from __future__ import annotations

import json

import pytest

from rime_data.pipeline import CleanBatches, PipelineConfig, query_dataset
from rime_data.schema import QUERY_SCHEMA, write_table
from rime_data.synth import synth_split


@pytest.fixture(scope="module")
def dirty_parquet(tmp_path_factory):
    d = synth_split("train", 10, seed=0)  # 60 queries
    rows = d.queries
    rows[3]["qry_image"] = b"\x89PNG but truncated"
    rows[17]["positive_ids"] = []
    rows[40]["qry_text"], rows[40]["qry_image"] = "", None
    path = tmp_path_factory.mktemp("dirty") / "queries.parquet"
    write_table(rows, QUERY_SCHEMA, path)
    return path, {rows[3]["query_id"], rows[17]["query_id"], rows[40]["query_id"]}, len(rows)


def test_bad_rows_counted_logged_and_skipped(ray_local, dirty_parquet, tmp_path):
    path, bad_ids, total = dirty_parquet
    it = CleanBatches(query_dataset(path, PipelineConfig(map_batch_size=16)), batch_size=8, errors_file=tmp_path / "errors.jsonl")
    batches = list(it)
    assert all(len(b) == 8 for b in batches[:-1])
    assert it.n_good == total - 3 == sum(len(b) for b in batches)
    assert it.n_bad == 3 and set(it.bad_ids) == bad_ids
    logged = [json.loads(l) for l in (tmp_path / "errors.jsonl").read_text().splitlines()]
    reasons = {r["id"]: r["error"] for r in logged}
    assert set(reasons) == bad_ids
    assert any("cannot decode image" in e for e in reasons.values())
    assert any("positive_ids: empty" in e for e in reasons.values())
    assert all("_error" not in row for b in batches for row in b)


def test_streaming_split_to_two_actor_consumers_does_not_deadlock(ray_local, dirty_parquet, tmp_path):
    ray = ray_local
    path, bad_ids, total = dirty_parquet

    @ray.remote(num_cpus=0.25)
    class Consumer:
        def consume(self, shard, rank, errors_dir):
            from pathlib import Path

            it = CleanBatches(shard, batch_size=4, errors_file=Path(errors_dir) / f"errors-{rank}.jsonl")
            ids = [r["query_id"] for b in it for r in b]
            return ids, it.n_bad

    shards = query_dataset(path, PipelineConfig(map_batch_size=16)).streaming_split(2, equal=True)
    consumers = [Consumer.remote() for _ in range(2)]
    results = ray.get([c.consume.remote(s, i, str(tmp_path)) for i, (c, s) in enumerate(zip(consumers, shards))], timeout=300)
    ids = [i for r in results for i in r[0]]
    assert len(ids) == len(set(ids)) == total - 3
    assert sum(r[1] for r in results) == 3
    assert all(len(r[0]) > 0 for r in results)  # both consumers got work
