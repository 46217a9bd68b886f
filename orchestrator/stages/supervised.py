"""The learner-only stages' step (cma, plume): a global batch of pairs from Ray Data, sharded over ranks x
accumulation steps, one ``train_step`` on every learner, the mean of their terms."""

from __future__ import annotations

import time
from typing import Any

from actors.batches import Pair, shard

from ..config import Config, ConfigError
from .base import Stage


def check_grad_cache(cfg: Config, section: str, chunk: int) -> None:
    """``<section>.grad_cache_chunk`` is refused under ZeRO-3, naming the key and the way out: a learner died
    in the chunked backward passes (several backwards per step on partitioned weights; cause not pinned)."""
    if chunk and cfg.learners.zero_stage == 3:
        raise ConfigError(
            f"{section}.grad_cache_chunk: GradCache with learners.zero_stage 3 is not supported yet (a learner died "
            f"in the chunked backward passes); use zero_stage 0, 1 or 2, or {section}.grad_cache_chunk=0"
        )


class SupervisedStage(Stage):
    """A stage whose step is one learner update on (query, positive) pairs."""

    by_task: bool = True

    def start(self) -> None:
        self.stream = self.ctx.open_stream(self.by_task)
        self.final_loss: float | None = None

    def step_args(self, i: int, pairs: list[Pair]) -> tuple[dict[str, Any], dict[str, float]]:
        """Extra ``train_step`` keyword arguments and metrics for stage step ``i`` (PLUME: its phase)."""
        return {}, {}

    def step(self, i: int) -> dict[str, float]:
        lc, learners = self.cfg.learners, self.ctx.learners
        t0 = time.perf_counter()
        pairs = self.stream.next_batch(lc.micro_batch_size * lc.grad_accum_steps * learners.size)
        t_data = time.perf_counter() - t0
        kwargs, extra = self.step_args(i, pairs)
        shards = shard(pairs, learners.size, lc.grad_accum_steps)
        terms = learners.call("train_step", per_rank=[(mbs,) for mbs in shards], **kwargs)
        dt = time.perf_counter() - t0
        metrics = {f"train/{k}": sum(t[k] for t in terms) / len(terms) for k in terms[0] if k != "pairs"}
        metrics.update(extra)
        metrics.update(
            {
                "perf/samples_per_s": len(pairs) / dt,
                "perf/step_time_s": dt,
                "perf/data_time_s": t_data,
                "data/bad_rows": self.stream.bad_rows,
                "data/epoch": self.stream.pos.epoch,
                "data/dropped_remainder_pairs": self.stream.dropped_pairs,
                **self.stream.mix_metrics(),
            }
        )
        self.final_loss = metrics["train/loss"]
        return metrics

    @property
    def position(self):
        return self.stream.pos

    def end(self) -> dict[str, Any]:
        return {"final_loss": self.final_loss, "bad_rows": self.stream.bad_rows}

    def close(self) -> None:
        stream = getattr(self, "stream", None)
        if stream is not None:
            stream.close()
