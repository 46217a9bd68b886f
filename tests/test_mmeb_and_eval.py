"""MMEB-format import (fixture written here) and `rime eval` on it and on a generated split."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from PIL import Image

from rime_data.mmeb import import_mmeb


@pytest.fixture()
def mmeb_fixture(tmp_path):
    """Two MMEB-style tasks: an image->text classification (shared labels) and a text->image retrieval."""
    root = tmp_path / "images"
    (root / "cls").mkdir(parents=True)
    colours = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220)}
    for name, rgb in colours.items():
        Image.new("RGB", (48, 48), rgb).save(root / "cls" / f"{name}.png")
    rows = [
        {
            "qry_inst": "<|image_1|> Represent the given image for classification",
            "qry_text": "",
            "qry_img_path": f"cls/{c}.png",
            "tgt_inst": "Represent the class label",
            "tgt_text": [c] + [o for o in colours if o != c],
            "tgt_img_path": ["", "", ""],
        }
        for c in colours
    ]
    rows.append({"qry_text": "x", "qry_img_path": "cls/missing.png", "tgt_text": ["red"], "tgt_img_path": [""]})
    (tmp_path / "ColourCls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    t2i = [
        {
            "qry_text": f"a {c} picture",
            "qry_img_path": "",
            "tgt_text": ["", ""],
            "tgt_img_path": [f"cls/{c}.png", f"cls/{'red' if c != 'red' else 'blue'}.png"],
        }
        for c in colours
    ]
    (tmp_path / "ColourT2I.jsonl").write_text("".join(json.dumps(r) + "\n" for r in t2i))
    return tmp_path, root


def test_import_mmeb_rows_candidates_and_errors(mmeb_fixture, tmp_path):
    src, root = mmeb_fixture
    summary = import_mmeb([src / "ColourCls.jsonl", src / "ColourT2I.jsonl"], root, tmp_path / "out")
    assert summary["queries"] == 6 and summary["errors"] == 2
    errors = [json.loads(l) for l in open(summary["errors_file"])]
    assert {e["row"] for e in errors} == {3, 4}
    assert any("qry_img_path: image file not found" in e["error"] for e in errors)
    assert any("not valid JSON" in e["error"] for e in errors)
    q = pq.read_table(tmp_path / "out" / "test" / "queries.parquet").to_pylist()
    c = {r["cand_id"]: r for r in pq.read_table(tmp_path / "out" / "test" / "candidates.parquet").to_pylist()}
    cls = [r for r in q if r["task"] == "ColourCls"]
    assert len(c) == 3 + 3  # shared labels stored once; 3 distinct images in the t2i task
    assert all(r["positive_ids"][0] == r["cand_ids"][0] for r in cls)  # positive first
    assert [c[r["positive_ids"][0]]["cand_text"] for r in cls] == ["red", "green", "blue"]
    assert cls[0]["qry_inst"] == "Represent the given image for classification"  # marker stripped
    assert cls[0]["qry_image"][:4] == b"\x89PNG"


def _rime(*args):
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True, env={**os.environ}, timeout=900
    )


def test_rime_eval_on_mmeb_fixture_all_pairs(zoo_cache, mmeb_fixture, tmp_path):
    src, root = mmeb_fixture
    import_mmeb([src / "ColourCls.jsonl", src / "ColourT2I.jsonl"], root, tmp_path / "ds")
    out = tmp_path / "report.json"
    r = _rime(
        "eval",
        "--data",
        str(tmp_path / "ds"),
        "--max-new-tokens",
        "4",
        "--out",
        str(out),
        "--mlflow",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert set(rep["pairs"]) == {"disc->disc", "disc->gen", "gen->disc", "gen->gen"}
    assert rep["n_queries"] == 6 and rep["pairs"]["disc->disc"]["tasks"]["ColourCls"]["n"] == 3
    assert "disc->disc" in r.stdout and "ALL (mean)" in r.stdout
    # what the model wrote is in the report, next to the ideal rewrite (a degenerate rewriter is visible)
    assert {x["task"] for x in rep["rewrite_samples"]} == {"ColourCls", "ColourT2I"}
    assert all(set(x) >= {"rewrite", "ideal", "well_formed", "tokens"} for x in rep["rewrite_samples"])
    assert 0.0 <= rep["rewrite_stats"]["empty_frac"] <= 1.0 and 0.0 <= rep["rewrite_stats"]["well_formed_frac"] <= 1.0
    assert "per_query" not in rep  # opt-in: reports stay small
    assert rep["latent_steps"] is None  # no latent side scored (the ablation test checks a K=0 and a K report)

    # --per-query: every query's metrics, which average back to the report's, and feed `rime compare`
    out_pq = tmp_path / "report-pq.json"
    r = _rime(
        "eval",
        "--data",
        str(tmp_path / "ds"),
        "--query-mode",
        "disc",
        "--cand-mode",
        "disc",
        "--per-query",
        "--out",
        str(out_pq),
        "--mlflow",
        "none",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    pq_rep = json.loads(out_pq.read_text())
    rows = pq_rep["per_query"]["disc->disc"]
    assert len(rows) == 6 and {m["task"] for m in rows.values()} == {"ColourCls", "ColourT2I"}
    for task, ms in pq_rep["pairs"]["disc->disc"]["tasks"].items():
        mine = [m["hit@1"] for m in rows.values() if m["task"] == task]
        assert sum(mine) / len(mine) == pytest.approx(ms["hit@1"]) and len(mine) == ms["n"]
    r = _rime("compare", str(out_pq), str(out_pq), "--pair", "disc->disc")
    assert r.returncode == 0 and "on 6 shared queries" in r.stdout and "B - A: +0.0000" in r.stdout, r.stdout + r.stderr

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["rime-eval"])
    assert len(runs) == 1
    assert "metrics.disc_to_disc/hit_at_1" in runs.columns
    assert runs["artifact_uri"][0].startswith((tmp_path / "mlartifacts").resolve().as_uri())  # beside the db


def test_evaluate_counts_bad_rows_and_oracle_mode(tiny, tmp_path):
    """A corrupt image is skipped and reported, never fatal; oracle mode uses the ideal rewrites."""
    from orchestrator.eval_report import format_table
    from orchestrator.evaluate import evaluate
    from rime_data.schema import CANDIDATE_SCHEMA, QUERY_SCHEMA, write_table
    from rime_data.synth import synth_split

    d = synth_split("test", 4, seed=0, tasks=("referring", "vqa"))
    d.queries[0]["qry_image"] = b"garbage"
    write_table(d.queries, QUERY_SCHEMA, tmp_path / "test" / "queries.parquet")
    write_table(d.candidates, CANDIDATE_SCHEMA, tmp_path / "test" / "candidates.parquet")
    res = evaluate(tiny, tmp_path, query_modes=("disc", "oracle"), cand_modes=("disc",))
    assert res.n_queries == 7 and len(res.skipped) == 1
    assert res.skipped[0]["id"] == d.queries[0]["query_id"] and "cannot decode" in res.skipped[0]["error"]
    assert set(res.pairs) == {"disc->disc", "oracle->disc"}
    import hashlib  # the report names the exact query file it scored (rime compare refuses different ones)

    assert res.queries_sha1 == hashlib.sha1((tmp_path / "test" / "queries.parquet").read_bytes()).hexdigest()
    table = format_table(res)
    assert "referring" in table and "vqa" in table
    with pytest.raises(ValueError, match="query_mode"):
        evaluate(tiny, tmp_path, query_modes=("nope",))
    with pytest.raises(FileNotFoundError, match="splits present"):
        evaluate(tiny, tmp_path, split="train")


def test_evaluate_skips_queries_it_cannot_rank_as_defined(tiny, tmp_path):
    """A query whose own candidate list names a missing candidate would be ranked against fewer negatives
    (an inflated Hit@1), and a repeated query id would overwrite a per-query row: both are skipped and
    reported once, and n_queries counts only what was scored."""
    from orchestrator.evaluate import evaluate
    from rime_data.schema import CANDIDATE_SCHEMA, QUERY_SCHEMA, write_table
    from rime_data.synth import synth_split

    d = synth_split("test", 4, seed=0, tasks=("referring",))
    task_cands = [c["cand_id"] for c in d.candidates if c["task"] == "referring"]
    short = d.queries[0]
    short["cand_ids"] = [short["positive_ids"][0], "referring/no-such-candidate"] + [
        c for c in task_cands if c != short["positive_ids"][0]
    ][:2]
    d.queries.append(dict(d.queries[1]))  # same query_id twice
    write_table(d.queries, QUERY_SCHEMA, tmp_path / "test" / "queries.parquet")
    write_table(d.candidates, CANDIDATE_SCHEMA, tmp_path / "test" / "candidates.parquet")
    res = evaluate(tiny, tmp_path, query_modes=("disc",), cand_modes=("disc",))
    why = {s["id"]: s["error"] for s in res.skipped}
    assert len(res.skipped) == 2 and res.n_queries == 3
    assert why[short["query_id"]].startswith("cand_ids: 1 of 4 candidates missing from the split or unusable")
    assert why[d.queries[1]["query_id"]].startswith("query_id: appears twice in the split")
    assert set(res.per_query["disc->disc"]) == {q["query_id"] for q in d.queries[1:4]}


@pytest.mark.parametrize(
    "change, words",
    [
        ({"positive_grades": [-1.0]}, "positive_grades: [-1.0] has a grade that is not a finite number > 0"),
        ({"positive_grades": [float("nan")]}, "not a finite number > 0"),
        ({"positive_ids": ["a", "a"], "positive_grades": None}, "positive_ids: an id is listed twice"),
        ({"cand_ids": ["a", "b", "b"]}, "cand_ids: an id is listed twice"),
    ],
)
def test_validate_query_refuses_grades_and_ids_that_would_break_metrics(change, words):
    import numpy as np

    from rime_data.schema import validate_query

    row = {
        "query_id": "q",
        "task": "t",
        "qry_text": "x",
        "positive_ids": ["a"],
        "positive_grades": [1.0],
        "cand_ids": ["a", "b"],
        **change,
    }
    assert words in validate_query(row)
    ok = {
        "query_id": "q",
        "task": "t",
        "qry_text": "x",
        "positive_ids": np.array(["a"]),
        "positive_grades": np.array([0.5], dtype=np.float32),
        "cand_ids": None,
    }
    assert validate_query(ok) is None  # numpy cells, as Ray Data batches give them


def test_import_mmeb_malformed_rows_and_per_dataset_folders(tmp_path):
    """HF's MMEB layout (one folder per dataset, all files test-*.parquet/jsonl) gives one task per folder,
    and a row of the wrong shape or types is an error line, never a failed import."""
    for name in ("CatsCls", "DogsCls"):
        (tmp_path / name).mkdir()
        rows = [
            {"qry_text": f"a {name} query", "qry_img_path": "", "tgt_text": ["yes", "no"]},
            ["not", "a", "row"],
            {"qry_text": "x", "tgt_text": [5, "cat"]},
            {"qry_text": "x", "qry_img_path": ["p.png"], "tgt_text": ["a"]},
        ]
        (tmp_path / name / "test-00000-of-00001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "CatsCls.jsonl").write_text(json.dumps({"task": "CatsCls", "qry_text": "q", "tgt_text": ["a"]}) + "\n")
    (tmp_path / "CatsCls.jsonl").write_text(json.dumps({"qry_text": "q2", "tgt_text": ["b"]}) + "\n")
    summary = import_mmeb(
        [
            tmp_path / "CatsCls" / "test-00000-of-00001.jsonl",
            tmp_path / "DogsCls" / "test-00000-of-00001.jsonl",
            tmp_path / "CatsCls.jsonl",
            tmp_path / "again" / "CatsCls.jsonl",
        ],
        tmp_path,
        tmp_path / "out",
    )
    q = pq.read_table(tmp_path / "out" / "test" / "queries.parquet").to_pylist()
    assert summary["queries"] == 3 and summary["errors"] == 7
    assert sorted(r["task"] for r in q) == ["CatsCls", "CatsCls", "DogsCls"]
    errors = [json.loads(l)["error"] for l in open(summary["errors_file"])]
    assert sum("row: expected a JSON object" in e for e in errors) == 2
    assert sum("tgt_text[0]: expected a string, got int" in e for e in errors) == 2
    assert sum("qry_img_path: expected a path string, got list" in e for e in errors) == 2
    assert sum("query_id: 'CatsCls/CatsCls/0' again" in e for e in errors) == 1


def test_rime_eval_dims_scores_truncated_vectors_and_records_them(tiny, tmp_path, capsys):
    """`rime eval --dims D` ranks by the first D components of both sides, re-normalised; the report and
    the table header say D (the report says null without it)."""
    from orchestrator.cli import main
    from orchestrator.evaluate import cand_item, evaluate, load_candidates, load_queries, query_item, score_pairs
    from rime_data.schema import CANDIDATE_SCHEMA, QUERY_SCHEMA, write_table
    from rime_data.synth import synth_split

    d = synth_split("test", 3, seed=0, tasks=("referring",))
    write_table(d.queries, QUERY_SCHEMA, tmp_path / "test" / "queries.parquet")
    write_table(d.candidates, CANDIDATE_SCHEMA, tmp_path / "test" / "candidates.parquet")
    out = tmp_path / "report.json"
    args = ["eval", "--data", str(tmp_path), "--query-mode", "disc", "--cand-mode", "disc", "--max-queries-per-task", "3"]
    assert main([*args, "--dims", "32", "--mlflow", "none", "--out", str(out)]) == 0
    assert "hit@1, dims 32" in capsys.readouterr().out
    rep = json.loads(out.read_text())
    assert rep["dims"] == 32 and rep["n_queries"] == 3
    skipped: list[dict] = []
    queries, _ = load_queries(tiny, tmp_path, "test", None, 3, skipped)
    cands = load_candidates(tiny, tmp_path, "test", None, skipped)
    qv = tiny.embed([query_item(q) for q in queries], dims=32).vectors
    cv = tiny.embed([cand_item(c) for c in cands], dims=32).vectors
    want, _, _ = score_pairs(queries, cands, {"disc": qv}, {"disc": cv}, skipped)
    assert rep["pairs"]["disc->disc"]["all"] == pytest.approx(want["disc->disc"]["all"])
    full = evaluate(tiny, tmp_path, query_modes=("disc",), cand_modes=("disc",), max_queries_per_task=3)
    assert full.to_dict()["dims"] is None
    with pytest.raises(ValueError, match=r"dims: must be an integer in 1\.\.128"):
        evaluate(tiny, tmp_path, query_modes=("disc",), cand_modes=("disc",), dims=129)


def test_the_report_counts_greedy_rewrites_equal_to_the_ideal_one_per_task():
    """``rewrite_stats.ideal_match_frac``: case, spacing and a final full stop do not count; a query with no
    ideal rewrite is left out of the share, not counted as a miss."""
    from types import SimpleNamespace

    from orchestrator.evaluate import _rewrite_report

    queries = [
        {"query_id": "a", "task": "referring", "rewrite": "a yellow square"},
        {"query_id": "b", "task": "referring", "rewrite": "an orange cross"},
        {"query_id": "c", "task": "t2i", "rewrite": "a red circle"},
        {"query_id": "d", "task": "t2i", "rewrite": None},
    ]
    texts = ["A  yellow square.", "a red cross", "a red circle", "anything"]
    produced = [SimpleNamespace(text=t, well_formed=True, num_tokens=3) for t in texts]
    _, stats = _rewrite_report(queries, produced)
    assert stats["ideal_match_frac"] == pytest.approx(2 / 3)
    assert stats["ideal_match_frac/referring"] == 0.5 and stats["ideal_match_frac/t2i"] == 1.0
    no_ideal = [dict(q, rewrite=None) for q in queries]
    assert "ideal_match_frac" not in _rewrite_report(no_ideal, produced)[1]
