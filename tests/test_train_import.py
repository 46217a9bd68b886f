"""Training-pair import (`rime data import-train`): both layouts, dropped negatives, bad rows, and the
written folder loading with the training pair code."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rime_data.train_import import import_train


def _jsonl(path, rows: list, extra: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + extra)


@pytest.fixture()
def train_files(tmp_path):
    """A VLM2Vec-layout JSONL file (with a broken line) and a plain-pairs parquet file, over tiny real
    PNG/JPEG images."""
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (16, 16), (220, 40, 40)).save(root / "red.png")
    Image.new("RGB", (16, 16), (40, 80, 220)).save(root / "blue.jpg")
    (root / "junk.png").write_bytes(b"not an image")
    vlm = [
        # 0: image query, text positive, text negative
        {
            "qry": "<|image_1|> Represent the given image with the colour",
            "qry_image_path": "red.png",
            "pos_text": "red",
            "pos_image_path": "",
            "neg_text": "blue",
            "neg_image_path": "",
        },
        # 1: text query, image positive, no negative (the columns are empty)
        {"qry": "a blue square", "qry_image_path": "", "pos_text": "", "pos_image_path": "blue.jpg", "neg_text": ""},
        # 2: the negative is the positive: kept, negative dropped
        {"qry": "which colour?", "qry_image_path": "", "pos_text": "red", "pos_image_path": "", "neg_text": "red"},
        # 3: bad: missing image file
        {"qry": "x", "qry_image_path": "missing.png", "pos_text": "red", "pos_image_path": ""},
        # 4: bad: the positive is empty on both sides
        {"qry": "x", "qry_image_path": "", "pos_text": "", "pos_image_path": ""},
        # 5: bad: pos_text column missing
        {"qry": "x", "qry_image_path": "", "pos_image_path": "red.png"},
        # 6: bad: not an image
        {"qry": "x", "qry_image_path": "junk.png", "pos_text": "red"},
        # 7: own task column
        {"qry": "a red thing", "pos_text": "red", "task": "Colours"},
    ]
    _jsonl(tmp_path / "VQA.jsonl", vlm, extra="{not json\n")  # 8: bad JSON
    pairs = [
        # 0: text pair with instructions and an image negative
        {
            "query": "a red square",
            "positive": "red",
            "query_image": None,
            "positive_image": None,
            "negative": "",
            "negative_image": "blue.jpg",
            "query_instruction": "Find the label",
            "positive_instruction": "Represent the label",
        },
        # 1: same positive as row 0: the candidate is stored once
        {
            "query": "crimson",
            "positive": "red",
            "query_image": None,
            "positive_image": None,
            "negative": None,
            "negative_image": None,
            "query_instruction": "Find the label",
            "positive_instruction": "Represent the label",
        },
        # 2: bad: the query is empty on both sides
        {
            "query": "",
            "positive": "red",
            "query_image": None,
            "positive_image": None,
            "negative": None,
            "negative_image": None,
            "query_instruction": None,
            "positive_instruction": None,
        },
    ]
    pq.write_table(pa.Table.from_pylist(pairs), str(tmp_path / "labels.parquet"))
    (tmp_path / "other.jsonl").write_text(json.dumps({"question": "x", "answer": "y"}) + "\n")
    return tmp_path, root


def _read(out, name: str) -> list[dict]:
    return pq.read_table(out / "train" / f"{name}.parquet").to_pylist()


def test_import_train_counts_rows_and_errors(train_files):
    src, root = train_files
    files = [src / "VQA.jsonl", src / "labels.parquet", src / "other.jsonl"]
    summary = import_train(files, root, src / "out")
    assert summary["queries"] == 6 and summary["errors"] == 7
    assert summary["layouts"] == {"vlm2vec": 4, "pairs": 2}
    assert summary["hard_negatives"] == 2 and summary["negatives_dropped"] == 1
    errors = [json.loads(line) for line in open(summary["errors_file"])]
    why = {(e["file"].rsplit("/", 1)[-1], e["row"]): e["error"] for e in errors}
    assert why[("VQA.jsonl", 3)].startswith("qry_image_path: image file not found")
    assert why[("VQA.jsonl", 4)].startswith("pos_text/pos_image_path: both empty")
    assert why[("VQA.jsonl", 5)].startswith("pos_text: column missing; vlm2vec rows need qry and pos_text")
    assert why[("VQA.jsonl", 6)].startswith("qry_image_path:") and "not an image" in why[("VQA.jsonl", 6)]
    assert "not valid JSON" in why[("VQA.jsonl", 8)]
    assert why[("labels.parquet", 2)].startswith("query/query_image: both empty")
    assert why[("other.jsonl", 0)].startswith("row: its values ['answer', 'question'] match no layout")


def test_import_train_writes_queries_candidates_and_images(train_files):
    src, root = train_files
    summary = import_train([src / "VQA.jsonl", src / "labels.parquet"], root, src / "out")
    assert summary["candidates"] == 6  # VQA: red, blue, blue.jpg; Colours: red; labels: red, blue.jpg
    q = {r["query_id"]: r for r in _read(src / "out", "queries")}
    c = {r["cand_id"]: r for r in _read(src / "out", "candidates")}
    assert sorted(q) == ["Colours/VQA/7", "VQA/VQA/0", "VQA/VQA/1", "VQA/VQA/2", "labels/labels/0", "labels/labels/1"]
    assert all(r["cand_ids"] is None and len(r["positive_ids"]) == 1 for r in q.values())
    first = q["VQA/VQA/0"]
    assert first["qry_text"] == "Represent the given image with the colour"  # marker stripped
    assert first["qry_image"] == (root / "red.png").read_bytes()  # the file's bytes, not re-encoded
    assert c[first["positive_ids"][0]]["cand_text"] == "red"
    assert c[first["hard_negatives"][0]]["cand_text"] == "blue"
    assert q["VQA/VQA/1"]["hard_negatives"] is None and q["VQA/VQA/1"]["qry_image"] is None
    assert c[q["VQA/VQA/1"]["positive_ids"][0]]["cand_image"] == (root / "blue.jpg").read_bytes()
    assert q["VQA/VQA/2"]["hard_negatives"] is None  # equal to its positive: dropped
    assert q["VQA/VQA/2"]["positive_ids"] == first["positive_ids"]  # same task, text: one candidate
    assert q["Colours/VQA/7"]["task"] == "Colours" and q["Colours/VQA/7"]["positive_ids"] != first["positive_ids"]
    lab = q["labels/labels/0"]
    assert lab["qry_inst"] == "Find the label" and q["labels/labels/1"]["positive_ids"] == lab["positive_ids"]
    pos, neg = c[lab["positive_ids"][0]], c[lab["hard_negatives"][0]]
    assert pos["cand_inst"] == "Represent the label" and pos["cand_text"] == "red"
    assert neg["cand_text"] is None and neg["cand_image"] == (root / "blue.jpg").read_bytes()
    with Image.open(io.BytesIO(neg["cand_image"])) as im:  # round-trips as the image it was
        assert im.format == "JPEG" and im.size == (16, 16)


def test_import_train_loads_as_training_pairs(train_files):
    from orchestrator.pairs import make_pairs
    from rime_data.schema import read_table, validate_candidate, validate_query

    src, root = train_files
    import_train([src / "VQA.jsonl", src / "labels.parquet"], root, src / "out")
    queries = read_table(src / "out" / "train" / "queries.parquet").to_pylist()
    cands = read_table(src / "out" / "train" / "candidates.parquet").to_pylist()
    assert not [validate_query(r) for r in queries if validate_query(r)]
    assert not [validate_candidate(r) for r in cands if validate_candidate(r)]
    pairs = {p.query_id: p for p in make_pairs(queries, cands, hard_negatives=1)}
    assert len(pairs) == 6
    assert [n.item["text"] for n in pairs["VQA/VQA/0"].negs] == ["blue"]
    assert pairs["VQA/VQA/0"].negs[0].target_id != pairs["VQA/VQA/0"].target_id
    assert pairs["labels/labels/0"].negs[0].item["image"] == (root / "blue.jpg").read_bytes()
    assert pairs["VQA/VQA/2"].negs == () and pairs["VQA/VQA/2"].t["text"] == "red"


def test_import_train_task_argument_and_duplicate_ids(train_files, tmp_path):
    src, root = train_files
    (src / "again").mkdir()
    _jsonl(src / "again" / "pairs.jsonl", [{"query": "q", "positive": "p"}])
    _jsonl(src / "pairs.jsonl", [{"query": "q", "positive": "p"}, {"qry": "q2", "pos_text": "p"}])
    summary = import_train([src / "pairs.jsonl", src / "again" / "pairs.jsonl"], root, tmp_path / "o", task="Mine")
    assert summary["queries"] == 2 and summary["errors"] == 1 and summary["layouts"] == {"vlm2vec": 1, "pairs": 1}
    assert sorted(r["query_id"] for r in _read(tmp_path / "o", "queries")) == ["Mine/pairs/0", "Mine/pairs/1"]
    (err,) = [json.loads(line) for line in open(summary["errors_file"])]
    assert err["row"] == 0 and err["error"].startswith("query_id: 'Mine/pairs/0' again")


def test_cli_import_train(train_files, capsys):
    from orchestrator.cli import main

    src, root = train_files
    out = src / "cli-out"
    args = ["data", "import-train", str(src / "VQA.jsonl"), str(src / "labels.parquet")]
    assert main([*args, "--image-root", str(root), "--out", str(out), "--split", "train", "--task", "T"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["queries"] == 6 and summary["errors"] == 6
    assert "rime data import-train: 6 row(s) skipped; reasons in" in captured.err
    for name in ("queries.parquet", "candidates.parquet", "errors.jsonl"):
        assert (out / "train" / name).is_file()
    assert {r["task"] for r in _read(out, "queries")} == {"T", "Colours"}
