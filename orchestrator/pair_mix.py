"""Several training datasets mixed by weight (``data.mix``), with an exact resume position.

Each dataset keeps its own ``PairStream`` (its Ray Data pipeline, shuffle, epochs and bad-row log); batch
``k`` of the mixture comes whole from one dataset, drawn with probability proportional to its weight by a
generator seeded with (run seed, k) alone. So a batch never mixes datasets (in-batch negatives stay within
one dataset, as VLM2Vec and MMEB training sample per dataset), and the position is just ``k`` plus each
dataset's own (epoch, offset): a resume re-draws the same sequence and re-enters every dataset where it
stopped, neither skipping nor repeating rows. A dataset that runs out starts its next epoch on its own.

Candidates of all datasets form one id space (the reward service ranks against their union, InfoNCE masks
duplicate targets by id): an id that two datasets define differently is refused.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from actors.batches import Pair

from .pairs import PairStream, StreamPosition, target_id_map


def draw(seed: int, k: int, weights: Sequence[float]) -> int:
    """Which dataset batch ``k`` comes from: a function of (seed, k) alone, so a resume re-draws the same."""
    return random.Random(f"{seed}:mix:{k}").choices(range(len(weights)), weights=weights)[0]


class MixedPairStream:
    """``PairStream``'s interface over several streams; ``pos.parts`` holds each one's position."""

    def __init__(self, streams: list[PairStream], weights: Sequence[float], seed: int, names: Sequence[str] = ()):
        if len(streams) != len(weights) or not streams:
            raise ValueError(f"data.mix: {len(streams)} datasets and {len(weights)} weights; give one weight per dataset")
        self.parts, self.weights, self.seed = streams, list(weights), seed
        self.names = list(names) or [str(s.q_path) for s in streams]
        self.cands: dict[str, dict] = {}
        for name, s in zip(self.names, streams):
            for cid, c in s.cands.items():
                if cid in self.cands and self.cands[cid] != c:
                    raise ValueError(
                        f"data.mix: candidate id {cid!r} means two different candidates ({name} and another dataset); "
                        "give each dataset its own ids (e.g. a task prefix, as `rime data import-train` writes)"
                    )
                self.cands[cid] = c
        self.target_ids = target_id_map(self.cands)
        for s in streams:  # one id space: duplicate-target masking and rewards compare ids across datasets
            s.target_ids = self.target_ids
        self.drawn = 0
        self.counts = [0] * len(streams)  # batches drawn from each since this stream was built

    @property
    def pos(self) -> StreamPosition:
        """A snapshot: epoch = the fewest full passes any dataset has made, offset = batches drawn."""
        parts = [[s.pos.epoch, s.pos.offset] for s in self.parts]
        return StreamPosition(min(e for e, _ in parts), self.drawn, parts)

    @pos.setter
    def pos(self, pos: StreamPosition) -> None:
        if pos.parts is None:  # a fresh stage (position 0) or a run that had no mixture
            if pos.offset:
                raise ValueError("data.mix: this run's checkpoint has no mixture position; resume with its own data.mix")
            parts = [[0, 0]] * len(self.parts)
        elif len(pos.parts) != len(self.parts):
            raise ValueError(
                f"data.mix: the checkpoint's position covers {len(pos.parts)} datasets, the config lists "
                f"{len(self.parts)}; resume with the data.mix the run started with"
            )
        else:
            parts = pos.parts
        for s, (epoch, offset) in zip(self.parts, parts):
            s.pos = StreamPosition(epoch, offset)
        self.drawn = pos.offset

    def next_batch(self, n: int) -> list[Pair]:
        i = draw(self.seed, self.drawn, self.weights)
        batch = self.parts[i].next_batch(n)
        self.drawn += 1
        self.counts[i] += 1
        return batch

    @property
    def hard_negatives(self) -> int:
        return self.parts[0].hard_negatives

    @hard_negatives.setter
    def hard_negatives(self, n: int) -> None:
        for s in self.parts:
            s.hard_negatives = n

    @property
    def bad_rows(self) -> int:
        return sum(s.bad_rows for s in self.parts)

    @property
    def dropped_pairs(self) -> int:
        return sum(s.dropped_pairs for s in self.parts)

    @property
    def pipeline(self):
        return self.parts[0].pipeline

    @property
    def q_paths(self) -> list[Path]:
        return [p for s in self.parts for p in s.q_paths]

    def mix_metrics(self) -> dict[str, float]:
        """``data/mix/<i>/share`` (batches drawn from dataset i since the stage started, as a share) and
        ``data/mix/<i>/epoch``, so the realised mixture can be checked against the weights."""
        total = max(1, sum(self.counts))
        out: dict[str, float] = {}
        for i, (s, c) in enumerate(zip(self.parts, self.counts)):
            out[f"data/mix/{i}/share"] = c / total
            out[f"data/mix/{i}/epoch"] = float(s.pos.epoch)
        return out

    def close(self) -> None:
        for s in self.parts:
            s.close()
