"""The weight-sync strategy interface: how learner rank 0's weights reach the rollout workers.

A strategy owns everything about a transport: the weight version, group epochs and rebuilds, retries and
timeouts. The Refine-RL loop only calls ``push(version)`` after each update, stamps every rollout call with
``token()`` (so a worker Ray restarted can tell it holds stale weights) and hands a failed rollout call to
``recover(err)``. Strategies are chosen by name (``rollout.weight_sync``) from ``WEIGHT_SYNCS``: a new one
(e.g. LoRA adapters only) is one module with ``@register_weight_sync("name")`` plus its import in
``orchestrator/sync/__init__.py``. Importing this package stays torch- and Ray-free (config validation reads
the names); strategies import Ray inside their methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from ..config import Config
    from ..learner_group import LearnerGroup

WEIGHT_SYNCS: dict[str, type[WeightSync]] = {}


def register_weight_sync(name: str) -> Callable[[type[WeightSync]], type[WeightSync]]:
    """Class decorator: make a strategy available as ``rollout.weight_sync: name``."""

    def add(cls: type[WeightSync]) -> type[WeightSync]:
        if name in WEIGHT_SYNCS:
            raise ValueError(f"weight sync {name!r} is registered twice ({WEIGHT_SYNCS[name].__name__}, {cls.__name__})")
        cls.name = name
        WEIGHT_SYNCS[name] = cls
        return cls

    return add


class WeightSync(ABC):
    """Learner rank 0 -> every rollout worker (and, with ``reward.query_encoder: policy``, the reward
    actors' query encoder), under a version number that only grows."""

    name: ClassVar[str] = ""

    def __init__(self, cfg: Config, learners: LearnerGroup, rollout: list[Any], reward: list[Any]):
        self.cfg, self.learners, self.rollout, self.reward = cfg, learners, rollout, reward
        self.version = 0  # the version every current member holds after the last push

    @abstractmethod
    def push(self, version: int) -> dict[str, float]:
        """Send the learners' current weights as ``version``; returns ``sync/*`` metrics."""

    @abstractmethod
    def token(self) -> dict | None:
        """What each rollout call carries: {"version", "ref"} (``RolloutWorker.generate``), None before the
        first push."""

    def recover(self, err: BaseException) -> bool:
        """A rollout call failed with ``err``: True when the strategy repaired the cause (the caller re-issues
        the call with a fresh ``token()``), False when the error is not the strategy's to handle."""
        return False

    def _export_refs(self) -> list[Any]:
        """Every learner packs its weights for the object store (collective under ZeRO-3: all ranks must
        take part); rank 0's ref is the export, the others are None."""
        import ray

        refs = [a.export_to_object_store.remote() for a in self.learners.actors]
        ray.wait(refs, num_returns=len(refs))
        return refs

    def _update_reward_encoders(self, version: int, ref: Any | None = None) -> None:
        """``reward.query_encoder: policy``: the reward actors' query encoder follows the policy through the
        object store (they are never members of a broadcast group); ``frozen`` needs nothing."""
        if self.cfg.reward.query_encoder != "policy" or not self.reward:
            return
        import ray

        ref = ref if ref is not None else self._export_refs()[0]
        ray.get([r.update_weights.remote(version, [ref]) for r in self.reward])
