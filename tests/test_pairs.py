"""The training pair stream: one task per batch, and a resume that neither skips nor repeats data,
also across an epoch boundary."""

from __future__ import annotations

from dataclasses import asdict

from orchestrator.pairs import PairStream, StreamPosition
from rime_data.synth import write_synth


def _ids(batches):
    return [[p.query_id for p in b] for b in batches]


def test_resume_position_across_epoch_boundary(ray_local, tmp_path):
    write_synth(tmp_path / "d", {"train": 6}, seed=0)  # 36 queries, 6 tasks x 6
    make = lambda: PairStream(tmp_path / "d", "train", seed=1, shuffle_buffer=8, errors_file=tmp_path / "err.jsonl")  # noqa: E731
    straight = make()
    ref = [straight.next_batch(3) for _ in range(17)]  # 12 batches per epoch: crosses into epoch 1
    straight.close()
    assert all(len({p.task for p in b}) == 1 for b in ref)  # one task per batch
    epoch0 = [q for b in ref[:12] for q in _ids([b])[0]]
    assert len(epoch0) == len(set(epoch0)) == 36  # every query exactly once per epoch
    assert _ids(ref[12:]) != _ids(ref[:5])  # the next epoch is reshuffled

    first = make()
    part = [first.next_batch(3) for _ in range(11)]
    saved = asdict(first.pos)
    first.close()
    resumed = make()
    resumed.pos = StreamPosition(**saved)
    rest = [resumed.next_batch(3) for _ in range(6)]
    resumed.close()
    assert _ids(part + rest) == _ids(ref)
    assert resumed.pos.epoch == 1 and straight.dropped_pairs == 0


def test_bad_candidates_and_control_tokens_are_counted_bad_rows_not_failed_steps(ray_local, tmp_path):
    """A corrupt candidate image, a candidate text or a query rewrite holding a model control token would
    fail a learner step mid-run; the stream counts them as bad rows, logs why, and trains on the rest."""
    import json

    import pyarrow.parquet as pq

    from rime_data.pipeline import PipelineConfig

    write_synth(tmp_path / "d", {"train": 4}, seed=0)  # 24 queries, 6 tasks x 4, one positive each
    q_path, c_path = tmp_path / "d/train/queries.parquet", tmp_path / "d/train/candidates.parquet"
    queries, cands = pq.read_table(q_path).to_pylist(), pq.read_table(c_path).to_pylist()
    by_id = {c["cand_id"]: c for c in cands}
    broken_image = next(c for c in cands if c["cand_image"])
    broken_image["cand_image"] = b"\x89PNG not really"
    token_text = next(c for c in cands if c["cand_text"] and c is not broken_image)
    token_text["cand_text"] += " <gen_emb>"
    token_rewrite = next(q for q in queries if by_id[q["positive_ids"][0]] not in (broken_image, token_text))
    token_rewrite["rewrite"] = "a rewrite <|im_end|> with a control token"
    pq.write_table(pq.read_table(c_path).from_pylist(cands, schema=pq.read_schema(c_path)), c_path)
    pq.write_table(pq.read_table(q_path).from_pylist(queries, schema=pq.read_schema(q_path)), q_path)
    lost = {q["query_id"] for q in queries if q["positive_ids"][0] in (broken_image["cand_id"], token_text["cand_id"])}

    stream = PairStream(
        tmp_path / "d",
        "train",
        seed=0,
        shuffle_buffer=4,
        errors_file=tmp_path / "err.jsonl",
        pipeline=PipelineConfig(reserved_tokens=("<gen_emb>", "<|im_end|>")),
        group_by_task=False,
    )
    seen = [p.query_id for _ in range(24 - len(lost) - 1) for p in stream.next_batch(1)]
    stream.close()
    assert set(seen) == {q["query_id"] for q in queries} - lost - {token_rewrite["query_id"]}
    assert stream.bad_rows == 2 + len(lost) + 1
    errors = {e["id"]: e["error"] for e in map(json.loads, (tmp_path / "err.jsonl").read_text().splitlines())}
    assert "cand_image: cannot decode image bytes" in errors[broken_image["cand_id"]]
    assert "cand_text: contains the model's control token '<gen_emb>'" in errors[token_text["cand_id"]]
    assert "rewrite: contains the model's control token '<|im_end|>'" in errors[token_rewrite["query_id"]]
    assert all("not among the split's usable candidates" in errors[q] for q in lost)


def test_hard_negatives_reach_pairs_and_unknown_ids_are_bad_rows(ray_local, tmp_path):
    """Up to ``hard_negatives`` of a query's listed negatives ride on its pair as candidate items; a query
    naming an unknown candidate, listing one twice or listing its own positive is a counted, logged bad
    row, and the run goes on."""
    import json

    import pyarrow.parquet as pq

    from rime_data.schema import QUERY_SCHEMA, validate_query, write_table

    write_synth(tmp_path / "d", {"train": 3}, seed=0, tasks=("t2i",))  # 3 queries, 3 candidates
    q_path = tmp_path / "d/train/queries.parquet"
    queries = pq.read_table(q_path).to_pylist()
    cands = [c["cand_id"] for c in pq.read_table(tmp_path / "d/train/candidates.parquet").to_pylist()]
    good, unknown, twice = queries
    good["hard_negatives"] = [c for c in cands if c not in good["positive_ids"]]  # two ids
    unknown["hard_negatives"] = [cands[0], "t2i/train/no-such-image"]
    twice["hard_negatives"] = [good["positive_ids"][0]] * 2
    assert "hard_negatives: 't2i/train/img0' is also in positive_ids" in validate_query(
        {**good, "hard_negatives": ["t2i/train/img0"]}
    )
    # the good query last: the stream has met (and logged) both bad ones when it yields it
    write_table([unknown, twice, good], QUERY_SCHEMA, q_path)

    stream = PairStream(tmp_path / "d", "train", 0, 1, tmp_path / "err.jsonl", group_by_task=False, hard_negatives=1)
    pair = stream.next_batch(1)[0]
    stream.close()
    by_id = {c["cand_id"]: c for c in pq.read_table(tmp_path / "d/train/candidates.parquet").to_pylist()}
    assert pair.query_id == good["query_id"] and len(pair.negs) == 1  # capped at 1 of its 2
    first = by_id[good["hard_negatives"][0]]
    assert pair.negs[0].item["image"] == first["cand_image"] and pair.negs[0].target_id == stream.target_ids[first["cand_id"]]
    assert stream.bad_rows == 2
    errors = {e["id"]: e["error"] for e in map(json.loads, (tmp_path / "err.jsonl").read_text().splitlines())}
    assert "hard_negatives: candidate 't2i/train/no-such-image' is not among the split's usable" in errors[unknown["query_id"]]
    assert "hard_negatives: an id is listed twice" in errors[twice["query_id"]]


def test_the_rl_probe_set_is_fixed_by_data_and_seed_and_skips_bad_rows(tmp_path):
    """Refine-RL's probe queries (orchestrator.rl_probe): the same per-task set every time the stage builds it
    (every probe, every resume), another for another seed; a row the stream would refuse is not probed."""
    from collections import Counter

    import pyarrow.parquet as pq

    from orchestrator.rl_probe import probe_pairs
    from rime_data.pipeline import PipelineConfig

    write_synth(tmp_path / "d", {"train": 6}, seed=0)  # 6 tasks x 6 queries
    q_path = tmp_path / "d/train/queries.parquet"
    queries = pq.read_table(q_path).to_pylist()
    bad = queries[0]
    bad["rewrite"] = "a rewrite <|im_end|> with a control token"
    pq.write_table(pq.read_table(q_path).from_pylist(queries, schema=pq.read_schema(q_path)), q_path)
    stream = PairStream(
        tmp_path / "d",
        "train",
        seed=9,
        shuffle_buffer=8,
        errors_file=None,
        pipeline=PipelineConfig(reserved_tokens=("<|im_end|>",)),
    )

    def probe(seed: int, per_task: int = 2) -> list[str]:
        return [p.query_id for p in probe_pairs(stream, per_task=per_task, seed=seed)]

    first = probe(0)
    assert probe(0) == first and probe(1) != first and len(set(first)) == 12
    tasks = {q["query_id"]: q["task"] for q in queries}
    assert Counter(tasks[q] for q in first) == dict.fromkeys(set(tasks.values()), 2)
    everything = probe(0, per_task=6)  # every usable query: the bad one's task has 5
    assert bad["query_id"] not in everything and len(everything) == 35


def test_real_size_candidate_jpegs_are_resized_in_ray_data_tasks_not_the_driver(ray_local, tmp_path, monkeypatch):
    """Candidates of real size (a 640x480 JPEG) reach the pairs as PNGs within ``max_image_side``, decoded
    by Ray Data map tasks: the driver's own image decoder is made to fail, and nothing notices."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    import rime_data.pipeline as pipeline
    from rime_data.pipeline import PipelineConfig

    write_synth(tmp_path / "d", {"train": 2}, seed=0, tasks=("t2i",))  # 2 queries, 2 image candidates
    c_path = tmp_path / "d/train/candidates.parquet"
    table = pq.read_table(c_path)
    rows = table.to_pylist()
    for i, r in enumerate(rows):
        buf = io.BytesIO()
        Image.new("RGB", (640, 480), (40 * i, 100, 200)).save(buf, format="JPEG", quality=90)
        r["cand_image"] = buf.getvalue()
    pq.write_table(table.from_pylist(rows, schema=table.schema), c_path)

    def not_here(*_a, **_k):
        raise AssertionError("a candidate image was decoded in the driver")

    monkeypatch.setattr(pipeline, "normalise_image", not_here)  # Ray's worker processes keep the real one
    cfg = PipelineConfig(max_image_side=128)
    stream = PairStream(tmp_path / "d", "train", 0, 1, tmp_path / "err.jsonl", pipeline=cfg, group_by_task=False)
    pairs = stream.next_batch(2)
    stream.close()
    assert stream.bad_rows == 0
    for p in pairs:
        img = Image.open(io.BytesIO(p.t["image"]))
        assert img.format == "PNG" and img.size == (128, 96)
