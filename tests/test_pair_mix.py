"""``data.mix``: several training datasets mixed by weight, batch by batch, with a resume that neither skips nor
repeats rows in any of them; conflicting candidate ids and missing folders are refused naming the key."""

from __future__ import annotations

import json
from dataclasses import asdict
from types import SimpleNamespace

import pytest

from orchestrator.pair_mix import MixedPairStream, draw
from orchestrator.pairs import PairStream, StreamPosition
from rime_data.synth import write_synth


def _ids(batches):
    return [[p.query_id for p in b] for b in batches]


def test_draws_follow_the_weights_and_depend_on_seed_and_index_only():
    picks = [draw(3, k, [3.0, 1.0]) for k in range(2000)]
    assert picks == [draw(3, k, [3.0, 1.0]) for k in range(2000)]
    assert 0.72 < picks.count(0) / 2000 < 0.78
    assert picks != [draw(4, k, [3.0, 1.0]) for k in range(2000)]


def test_resume_mid_mixture_is_exact_across_epochs(ray_local, tmp_path):
    """Two datasets (3:1), 8 batches straight vs 5 then a resume from the JSON-saved position: the same
    batches, each from one dataset; both datasets cross an epoch boundary, b's right after the resume."""
    write_synth(tmp_path / "a", {"train": 4}, seed=0, tasks=("t2i", "cls"))  # 8 queries
    write_synth(tmp_path / "b", {"train": 2}, seed=1, tasks=("i2t",))  # 2 queries: 1 batch of 2 per epoch

    def make() -> MixedPairStream:
        parts = [
            PairStream(tmp_path / d, "train", seed=1, shuffle_buffer=4, errors_file=tmp_path / "err.jsonl") for d in ("a", "b")
        ]
        return MixedPairStream(parts, [3.0, 1.0], seed=0, names=["a", "b"])

    straight = make()
    ref = [straight.next_batch(2) for _ in range(8)]
    end = straight.pos
    metrics = straight.mix_metrics()
    straight.close()
    source = [{p.task for p in b} for b in ref]
    assert all(len(s) == 1 for s in source)  # never two datasets (or tasks) in one batch
    assert [int(s == {"i2t"}) for s in source] == [draw(0, k, [3.0, 1.0]) for k in range(8)] == [0, 0, 0, 1, 0, 1, 0, 0]
    assert metrics["data/mix/1/share"] == pytest.approx(2 / 8)
    assert end.offset == 8 and end.parts == [[1, 2], [1, 1]]  # a: 4 batches an epoch; b: 1
    assert len({p.target_id for b in ref for p in b}) > 1

    first = make()
    part = [first.next_batch(2) for _ in range(5)]
    saved = json.loads(json.dumps(asdict(first.pos)))  # as run_state.json / the checkpoint keep it
    first.close()
    resumed = make()
    resumed.pos = StreamPosition(**saved)
    rest = [resumed.next_batch(2) for _ in range(3)]
    assert asdict(resumed.pos) == asdict(end)
    resumed.close()
    assert _ids(part + rest) == _ids(ref)

    wrong = make()
    with pytest.raises(ValueError, match=r"data\.mix: the checkpoint's position covers 1 datasets, the config lists 2"):
        wrong.pos = StreamPosition(0, 3, [[0, 3]])
    with pytest.raises(ValueError, match=r"data\.mix: this run's checkpoint has no mixture position"):
        wrong.pos = StreamPosition(0, 3)
    wrong.close()


def test_a_candidate_id_two_datasets_define_differently_is_refused():
    def stream(cands: dict):
        return SimpleNamespace(cands=cands, q_path="x", target_ids={})

    same = {"t2i/c0": {"cand_id": "t2i/c0", "cand_text": "a red circle"}}
    mix = MixedPairStream([stream(same), stream(dict(same))], [1.0, 1.0], seed=0, names=["a", "b"])
    assert mix.target_ids == {"t2i/c0": 0}  # the same candidate in both: one id
    other = {"t2i/c0": {"cand_id": "t2i/c0", "cand_text": "a blue square"}}
    with pytest.raises(ValueError, match=r"data\.mix: candidate id 't2i/c0' means two different candidates \(b and"):
        MixedPairStream([stream(same), stream(other)], [1.0, 1.0], seed=0, names=["a", "b"])


def test_mix_config_parses_and_a_missing_folder_is_named(tmp_path):
    from orchestrator.config import apply_overrides, parse_config
    from orchestrator.train import ensure_data

    cfg = parse_config(apply_overrides({}, [f"data.mix={tmp_path}/a:3,{tmp_path}/b", f"data.path={tmp_path}/eval"]))
    assert [(m.path, m.weight) for m in cfg.data.mix] == [(f"{tmp_path}/a", 3.0), (f"{tmp_path}/b", 1.0)]
    assert cfg.flat()["data.mix"] == f"{tmp_path}/a:3,{tmp_path}/b:1"
    with pytest.raises(FileNotFoundError, match=rf"data\.mix: {tmp_path}/a has no train/queries\.parquet"):
        ensure_data(cfg)
    write_synth(tmp_path / "a", {"train": 1}, seed=0, tasks=("t2i",))
    write_synth(tmp_path / "b", {"train": 1}, seed=0, tasks=("cls",))
    write_synth(tmp_path / "eval", {"test": 1}, seed=0, tasks=("t2i",))  # data.path: the eval split alone
    assert ensure_data(cfg) == tmp_path / "eval"
