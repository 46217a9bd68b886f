"""The training pair stream: one task per batch, and a resume that neither skips nor repeats data,
also across an epoch boundary."""

from __future__ import annotations

from dataclasses import asdict

from orchestrator.pairs import PairStream, StreamPosition
from rime_data.synth import write_synth


def _ids(batches):
    return [[p["query_id"] for p in b] for b in batches]


def test_resume_position_across_epoch_boundary(ray_local, tmp_path):
    write_synth(tmp_path / "d", {"train": 6}, seed=0)  # 36 queries, 6 tasks x 6
    make = lambda: PairStream(tmp_path / "d", "train", seed=1, shuffle_buffer=8, errors_file=tmp_path / "err.jsonl")  # noqa: E731
    straight = make()
    ref = [straight.next_batch(3) for _ in range(17)]  # 12 batches per epoch: crosses into epoch 1
    straight.close()
    assert all(len({p["task"] for p in b}) == 1 for b in ref)  # one task per batch
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
