"""Hard-negative mining: the margin rule on hand-made scores, and `rime data mine-negatives` end to end
(Ray Data actor pool of embedders on the session cluster) against the same model embedding directly."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rime_data.mine_negatives import select_negatives


def test_select_negatives_margins_drop_near_duplicates_of_the_positive():
    scores = np.array([0.9, 0.88, 0.5, 0.7, 0.3, 0.8])
    pos = np.array([True, False, False, False, False, True])  # two positives: the weaker (0.8) is the reference
    assert select_negatives(scores, pos, 2, None, None) == ([1, 3], 0)  # 0.88 outranks the weaker positive
    assert select_negatives(scores, pos, 2, 0.05, None) == ([3, 2], 1)  # kept iff score <= 0.8 - 0.05
    assert select_negatives(scores, pos, 2, 0.15, None) == ([2, 4], 2)
    assert select_negatives(scores, pos, 5, None, 0.25) == ([2, 4], 2)  # kept iff score <= 0.75 x 0.8
    assert select_negatives(scores, pos, 5, 0.0, None) == ([3, 2, 4], 1)  # at most the positive's score


def test_mine_negatives_end_to_end(ray_local, zoo_cache, tiny, tmp_path, capsys):
    """Every query gets k non-positive candidates of its task, exactly those the model ranks first when it
    embeds the items itself; an exact copy of a positive under another id (an unlabelled positive) would
    be a query's hardest negative, but the margin drops it; a corrupt candidate is a reported bad row,
    never a negative; a stale list is replaced. Constructed so that the untrained model still ranks each
    positive first: a candidate's text is its query's caption (both without instruction)."""
    from orchestrator.cli import main
    from rime_data.synth import write_synth

    d = tmp_path / "d"
    write_synth(d, {"train": 4}, seed=0, tasks=("t2i",))  # 4 queries, 4 candidates
    q_path, c_path = d / "train/queries.parquet", d / "train/candidates.parquet"
    queries, cands = pq.read_table(q_path).to_pylist(), pq.read_table(c_path).to_pylist()
    by_id = {c["cand_id"]: c for c in cands}
    for q in queries:
        q["qry_inst"] = None
        by_id[q["positive_ids"][0]].update(cand_text=q["qry_text"], cand_image=None, cand_inst=None)
    dup = {**by_id[queries[0]["positive_ids"][0]], "cand_id": "t2i/train/copy-of-q0-positive"}
    broken = {**cands[1], "cand_id": "t2i/train/broken", "cand_text": None, "cand_image": b"\x89PNG not really"}
    pq.write_table(pa.Table.from_pylist(cands + [dup, broken], schema=pq.read_schema(c_path)), c_path)
    queries[1]["hard_negatives"] = ["t2i/train/gone"]
    pq.write_table(pa.Table.from_pylist(queries, schema=pq.read_schema(q_path)), q_path)

    argv = ["data", "mine-negatives", "--model", "tiny", "--data", str(d), "--k", "2", "--margin", "0.01"]
    assert main(argv + ["--workers", "1", "--batch-size", "4"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    mined = {r["query_id"]: r["hard_negatives"] for r in pq.read_table(q_path).to_pylist()}

    usable = sorted(cands + [dup], key=lambda c: c["cand_id"])  # equal scores rank by id
    cvec = tiny.embed([{"text": c["cand_text"]} for c in usable]).vectors
    qvec = tiny.embed([{"text": q["qry_text"]} for q in queries]).vectors
    dropped = 0
    for q, v in zip(queries, qvec):
        is_pos = np.array([c["cand_id"] in q["positive_ids"] for c in usable])
        best, n = select_negatives(cvec @ v, is_pos, 2, 0.01, None)
        dropped += n
        assert mined[q["query_id"]] == [usable[i]["cand_id"] for i in best]
        assert len(best) == 2 and not set(mined[q["query_id"]]) & set(q["positive_ids"])
    is_pos0 = np.array([c["cand_id"] in queries[0]["positive_ids"] for c in usable])
    no_margin, _ = select_negatives(cvec @ qvec[0], is_pos0, 2, None, None)
    assert usable[no_margin[0]]["cand_id"] == dup["cand_id"]  # the copy scores as the positive: hardest of all
    assert dup["cand_id"] not in mined[queries[0]["query_id"]] and "t2i/train/broken" not in str(mined)
    assert summary["queries"] == summary["mined"] == 4 and summary["mean_negatives"] == 2.0
    assert summary["margin_dropped"] == dropped == 1 and summary["bad_rows"] == 1
    errors = [json.loads(line) for line in open(summary["errors_file"])]
    assert errors[0]["id"] == "t2i/train/broken" and "cand_image: cannot decode image bytes" in errors[0]["error"]
