"""Training pairs streamed from Ray Data, in an order that a resumed run reproduces exactly.

Ray Data reads and validates the query parquet (``rime_data.pipeline``) with order preserved; a
seeded shuffle buffer (seed, epoch) mixes rows; each query joins its positive candidate and, when
``hard_negatives`` > 0, the first that many of its hard-negative candidates. The
position is (epoch, batches consumed in that epoch), so a resume re-reads the epoch and skips what
was already trained on, across epoch boundaries too, instead of restarting or skipping data.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from actors.batches import Negative, Pair
from rime_data.pipeline import CleanBatches, PipelineConfig, append_errors, query_dataset, read_candidates
from rime_data.schema import split_paths


@dataclass
class StreamPosition:
    epoch: int = 0
    offset: int = 0  # batches already trained on in this epoch (a mixture: batches drawn in all)
    parts: list[list[int]] | None = None  # a mixture (data.mix): [epoch, offset] of each dataset, in its order


def _cand_item(cand: dict) -> dict:
    return {"text": cand.get("cand_text"), "image": cand.get("cand_image"), "instruction": cand.get("cand_inst") or None}


def _cand_rewrite(cand: dict) -> str:
    return cand.get("rewrite") or (cand.get("cand_text") or "")


def to_pair(q: dict, cand: dict, target_id: int, negs: tuple[Negative, ...] = ()) -> Pair:
    """A (query, positive) training pair from a checked query row, its positive candidate row and its hard
    negatives (``negs``, from ``negatives``)."""
    return Pair(
        q={"text": q.get("qry_text"), "image": q.get("qry_image"), "instruction": q.get("qry_inst") or None},
        t=_cand_item(cand),
        q_rewrite=q.get("rewrite") or (q.get("qry_text") or ""),
        t_rewrite=_cand_rewrite(cand),
        q_reasoning=[] if _missing(q.get("reasoning")) else [str(x) for x in q["reasoning"]],  # PLUME curriculum
        target_id=target_id,
        query_id=q["query_id"],
        task=q["task"],
        positive_ids=[str(x) for x in q["positive_ids"]],
        cand_ids=None if _missing(q.get("cand_ids")) else [str(x) for x in q["cand_ids"]],
        negs=negs,
    )


def negatives(q: dict, cands: dict[str, dict], target_ids: dict[str, int], cap: int) -> tuple[Negative, ...] | str:
    """The first ``cap`` hard negatives of query row ``q``, or why the row is bad: every listed id must be a
    usable candidate of the split (checked whatever ``cap``, so the same rows count as bad whether or not a
    stage uses the column)."""
    ids = [] if _missing(q.get("hard_negatives")) else [str(x) for x in q["hard_negatives"]]
    unknown = [c for c in ids if c not in cands]
    if unknown:
        return (
            f"hard_negatives: candidate {unknown[0]!r} is not among the split's usable candidates "
            f"({len(unknown)} of {len(ids)} ids; a bad candidate has its own line here): remove it, or re-run "
            "`rime data mine-negatives`"
        )
    return tuple(Negative(_cand_item(cands[c]), _cand_rewrite(cands[c]), target_ids[c]) for c in ids[:cap])


def _missing(v) -> bool:
    """None, or pandas' NaN for a missing list cell (Ray Data batches come through pandas/numpy)."""
    return v is None or isinstance(v, float)


def target_id_map(cand_ids) -> dict[str, int]:
    """Stable small-int id per candidate (duplicate-target masking in InfoNCE compares these)."""
    return {cid: i for i, cid in enumerate(sorted(cand_ids))}


def make_pairs(queries: list[dict], candidates: list[dict], hard_negatives: int = 0) -> list[Pair]:
    """In-memory pairs of a small split (tests, benchmarks); training streams them with ``PairStream``.
    ``hard_negatives``: how many of each query's hard negatives to attach (a bad id raises ValueError)."""
    cands = {c["cand_id"]: c for c in candidates}
    ids = target_id_map(cands)
    out = []
    for q in queries:
        negs = negatives(q, cands, ids, hard_negatives)
        if isinstance(negs, str):
            raise ValueError(f"query {q['query_id']!r}: {negs}")
        out.append(to_pair(q, cands[q["positive_ids"][0]], ids[q["positive_ids"][0]], negs))
    return out


class PairStream:
    """Endless, epoch-numbered stream of training pairs with an exact resume position."""

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        seed: int,
        shuffle_buffer: int,
        errors_file: Path,
        pipeline: PipelineConfig | None = None,
        group_by_task: bool = True,
        hard_negatives: int = 0,
    ):
        q_path, c_path = split_paths(data_dir, split)
        self.q_path = q_path
        self.seed, self.buffer, self.errors_file = seed, max(1, shuffle_buffer), errors_file
        self.pipeline = pipeline or PipelineConfig()
        good, bad = read_candidates(c_path, self.pipeline)  # images decoded in Ray Data map tasks
        self.cands = {c["cand_id"]: c for c in good}
        self.bad_candidates = len(bad)  # reported beside the bad query rows; logged once, here
        if bad and errors_file is not None:
            append_errors(errors_file, bad, "cand_id")
        self.target_ids = target_id_map(self.cands)
        self.pos = StreamPosition()
        self._source: CleanBatches | None = None
        self.group_by_task = group_by_task
        self.hard_negatives = hard_negatives  # per pair, from each query's list (cma.hard_negatives); 0 = none
        self.dropped_pairs = 0
        self._it: Iterator[dict] | None = None
        self._it_epoch = -1

    def _epoch(self, epoch: int) -> Iterator[Pair]:
        import ray

        ray.data.DataContext.get_current().execution_options.preserve_order = True
        rng = random.Random(f"{self.seed}:{epoch}")
        source = CleanBatches(
            query_dataset(self.q_path, self.pipeline), batch_size=64, errors_file=self.errors_file if epoch == 0 else None
        )
        self._source = source
        buf: list[Pair] = []
        for batch in source:
            for q in batch:
                cand = self.cands.get(q["positive_ids"][0])
                if cand is None:
                    source.log_bad(
                        [
                            {
                                **q,
                                "_error": f"positive_ids[0]: candidate {q['positive_ids'][0]!r} is not among "
                                "the split's usable candidates (a bad one has its own line here)",
                            }
                        ]
                    )
                    continue
                negs = negatives(q, self.cands, self.target_ids, self.hard_negatives)
                if isinstance(negs, str):
                    source.log_bad([{**q, "_error": negs}])
                    continue
                buf.append(to_pair(q, cand, self.target_ids[cand["cand_id"]], negs))
                if len(buf) >= self.buffer:
                    yield buf.pop(rng.randrange(len(buf)))
        rng.shuffle(buf)
        yield from buf

    def mix_metrics(self) -> dict[str, float]:
        """One dataset: no mixture metrics (``pair_mix.MixedPairStream`` has them)."""
        return {}

    @property
    def q_paths(self) -> list[Path]:
        """The query tables this stream reads (one; a mixture's: each dataset's)."""
        return [Path(self.q_path)]

    def close(self) -> None:
        """Stop the Ray Data iterator now (not at garbage collection, after Ray may be gone)."""
        if self._it is not None:
            self._it.close()
            self._it = None

    @property
    def bad_rows(self) -> int:
        """Bad candidates plus the bad query rows met so far in the current epoch (the same rows recur
        each epoch; logged once)."""
        return self.bad_candidates + (self._source.n_bad if self._source else 0)

    def _epoch_batches(self, epoch: int, n: int) -> Iterator[list[Pair]]:
        """Batches of ``n`` pairs; with ``group_by_task`` every batch comes from one task, so in-batch
        negatives are hard ones (as VLM2Vec/MMEB training samples per dataset). An epoch's last
        partial batches are dropped and counted in ``dropped_pairs`` (never silently)."""
        buckets: dict[str, list[Pair]] = {}
        for pair in self._epoch(epoch):
            key = pair.task if self.group_by_task else ""
            bucket = buckets.setdefault(key, [])
            bucket.append(pair)
            if len(bucket) == n:
                yield bucket
                buckets[key] = []
        self.dropped_pairs += sum(len(b) for b in buckets.values())

    def next_batch(self, n: int) -> list[Pair]:
        """The next batch of ``n`` pairs from ``self.pos`` (epochs roll over; a resumed run replays the
        epoch's deterministic order and skips the ``pos.offset`` batches it already trained on)."""
        while True:
            if self._it is None or self._it_epoch != self.pos.epoch:
                self.close()
                self._it, self._it_epoch = self._epoch_batches(self.pos.epoch, n), self.pos.epoch
                for _ in range(self.pos.offset):
                    next(self._it)
            try:
                batch = next(self._it)
                self.pos.offset += 1
                return batch
            except StopIteration:
                if self.pos.offset == 0:
                    raise RuntimeError(
                        f"data: fewer than {n} usable training pairs per batch in {self.q_path} "
                        f"(see {self.errors_file}); lower learners.micro_batch_size"
                    ) from None
                self._it = None
                self.pos = StreamPosition(self.pos.epoch + 1, 0)
