"""Typed step data that crosses actor boundaries in Refine-RL (as verl's ``DataProto`` and OpenRLHF's
``Experience``): what rollout workers return, what the reward service is asked and answers, and what
the learners train on.

Plain dataclasses of lists (no torch, no Ray): Ray pickles them between processes, the vLLM rollout
venv imports them too, and the driver's few operations (concat worker chunks, attach rewards and
advantages, shard per rank x accumulation step) are methods here instead of index arithmetic on dicts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T", bound="Rows")


class Rows:
    """A batch stored column-wise: every list field has one entry per row."""

    def __len__(self) -> int:
        return len(getattr(self, fields(self)[0].name))  # type: ignore[arg-type]

    def _columns(self) -> list[str]:
        return [f.name for f in fields(self) if isinstance(getattr(self, f.name), list)]  # type: ignore[arg-type]

    def take(self: T, index: Sequence[int]) -> T:
        """The rows at ``index``, in that order (scalar fields are kept)."""
        cols = {c: [getattr(self, c)[i] for i in index] for c in self._columns()}
        return type(self)(**{**self.__dict__, **cols})

    def __getitem__(self: T, sl: slice) -> T:
        return self.take(range(len(self))[sl])

    def chunks(self: T, parts: int) -> list[T]:
        """Contiguous near-equal chunks over ``parts`` consumers (empty chunks dropped)."""
        return [self[a:b] for a, b in chunk_bounds(len(self), parts)]


def chunk_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal [start, end) slices of n items over ``parts`` consumers (empty ones dropped)."""
    bounds = np.linspace(0, n, parts + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def shard(rows: Sequence | Rows, ranks: int, accum: int) -> list[list[Any]]:
    """Rank r's micro-batches of a step's global batch: rank-major, then accumulation step, equal sizes
    (InfoNCE all-gathers equal row counts across ranks); a remainder is left out, as ``len // (ranks*accum)``."""
    per_mb = len(rows) // (ranks * accum)
    return [[rows[(r * accum + a) * per_mb : (r * accum + a + 1) * per_mb] for a in range(accum)] for r in range(ranks)]


@dataclass(frozen=True)
class Negative:
    """A hard-negative candidate of a pair, embedded like a target: its item (disc), its ideal rewrite (gen
    mode teacher-forces it, as for the positive) and its small-int id (duplicate masking in InfoNCE)."""

    item: dict
    rewrite: str
    target_id: int


@dataclass
class Pair:
    """A (query, positive) training pair as the pair stream yields it (``orchestrator.pairs.to_pair``): both
    sides as embedder items with their ideal rewrites (CMA's CE and gen targets), the query's reasoning
    segments (PLUME's curriculum text), what Refine-RL's reward needs to rank the query, and the query's
    hard negatives (at most ``cma.hard_negatives`` of its ``hard_negatives`` column; none when that is 0)."""

    q: dict  # the query item {"text", "image", "instruction"}
    t: dict  # the positive candidate item
    q_rewrite: str
    t_rewrite: str
    q_reasoning: list[str]
    target_id: int  # small-int id of the positive (duplicate-target masking in InfoNCE)
    query_id: str
    task: str
    positive_ids: list[str]
    cand_ids: list[str] | None  # the query's own candidate list (None: rank against the task corpus)
    negs: tuple[Negative, ...] = ()


@dataclass
class RolloutBatch(Rows):
    """Sampled rewrites: row i is rewrite ``sample_index[i]`` of query ``query_index[i]`` (an index into the
    step's query list), with its exact token ids and behaviour log-probs and the weight version that sampled it."""

    query_index: list[int]
    sample_index: list[int]
    token_ids: list[list[int]]
    logprobs: list[list[float]]
    text: list[str]
    well_formed: list[bool]
    version: list[int]
    time_s: float = 0.0  # the worker's generation time
    tokens: int = 0  # sampled tokens in the batch

    @classmethod
    def empty(cls) -> RolloutBatch:
        return cls([], [], [], [], [], [], [])

    @classmethod
    def concat(cls, parts: Sequence[RolloutBatch], query_offsets: Sequence[int]) -> RolloutBatch:
        """One step's rollouts from per-worker chunks (chunk k's queries start at ``query_offsets[k]``), ordered
        by (query, sample): query q's G rewrites are rows ``q*G .. q*G+G-1``."""
        out = cls.empty()
        for part, off in zip(parts, query_offsets):
            shifted = replace(part, query_index=[off + q for q in part.query_index])
            for c in out._columns():
                getattr(out, c).extend(getattr(shifted, c))
        out.time_s = max((p.time_s for p in parts), default=0.0)
        out.tokens = sum(p.tokens for p in parts)
        order = sorted(range(len(out)), key=lambda i: (out.query_index[i], out.sample_index[i]))
        return out.take(order)

    @property
    def lengths(self) -> list[int]:
        return [len(t) for t in self.token_ids]


@dataclass
class RewardRequest:
    """One query and its G sampled rewrites, as the anchor reward service scores them."""

    query: dict  # the query item {"text", "image", "instruction"}
    completions: list[list[int]]  # sampled token ids, teacher-forced by the service
    well_formed: list[bool]
    positive_ids: list[str]
    cand_ids: list[str] | None  # the query's own candidate list (None: rank against the task corpus)
    task: str
    query_id: str


@dataclass
class RewardResult:
    """The reward service's answer for one request: each reward term per rewrite, and the frozen disc anchor
    of the positive (the target of the learners' InfoNCE on ``g``)."""

    terms: dict[str, list[float]]
    anchor: list[float]


@dataclass
class ScoredBatch(Rows):
    """What the learners train on in Refine-RL: one row per sampled rewrite with its advantage and anchor."""

    query: list[dict]
    token_ids: list[list[int]]
    logprobs: list[list[float]]
    advantage: list[float]
    anchor: list[list[float]]
    target_id: list[int]

    @classmethod
    def build(
        cls, queries: Sequence[Pair], rollouts: RolloutBatch, results: Sequence[RewardResult], advantages: Sequence[float]
    ) -> ScoredBatch:
        """Join rollouts (rows ordered by query) with the per-query reward results and per-row advantages."""
        qi = rollouts.query_index
        return cls(
            query=[queries[i].q for i in qi],
            token_ids=list(rollouts.token_ids),
            logprobs=list(rollouts.logprobs),
            advantage=[float(a) for a in advantages],
            anchor=[results[i].anchor for i in qi],
            target_id=[queries[i].target_id for i in qi],
        )

    def shuffled(self, seed: int) -> ScoredBatch:
        """Rows in a seeded random order, so each rank's shard mixes queries."""
        return self.take(np.random.default_rng(seed).permutation(len(self)).tolist())
