"""The stage interface and its registry: what the trainer's one step loop runs.

A stage (``cma``, ``refine-rl``, ``plume``, …) says what the learners need (``settings``), which extra Ray
roles it places (``roles``), what to check before anything starts (``preflight``), how to take one step
(``step(i) -> metrics``), where a resume restarts its data (``position``), its log line and its start/end
hooks (probes, evals of its own). The trainer owns everything shared: step counters, the progress bar,
MLflow, checkpoints, scheduled evals and resume. A new stage is one module with
``@register_stage("name")`` plus its import in ``orchestrator/stages/__init__.py``; its learner loss is
registered in ``actors/stage_losses.py`` under the same name. Importing this package stays torch- and
Ray-free (config validation reads the names).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from ..config import Config
    from ..learner_group import LearnerGroup
    from ..pairs import PairStream, StreamPosition
    from ..placement import RoleRequest
    from ..run_state import RunState

STAGES: dict[str, type[Stage]] = {}


def register_stage(name: str) -> Callable[[type[Stage]], type[Stage]]:
    """Class decorator: make a stage available in ``run.stages``."""

    def add(cls: type[Stage]) -> type[Stage]:
        if name in STAGES:
            raise ValueError(f"stage {name!r} is registered twice ({STAGES[name].__name__}, {cls.__name__})")
        cls.name = name
        STAGES[name] = cls
        return cls

    return add


@dataclass(frozen=True)
class StageSettings:
    """What the learners need to run a stage, and how long it runs."""

    loss_cfg: dict  # the stage's loss settings, as ``actors.stage_losses`` takes them
    lr: float
    warmup_steps: int
    steps: int
    embedding_lr: float = 0.0  # the token embedding's rate; 0 = lr


@dataclass
class StageContext:
    """What a running stage may use from the trainer."""

    cfg: Config
    learners: LearnerGroup
    run_dir: Path
    data_dir: Path
    state: RunState
    start_model: str  # the folder the stage starts from (the previous stage's result, or the base model)
    open_stream: Callable[[bool], PairStream]  # by_task -> a pair stream at the state's data position
    log_metrics: Callable[[dict[str, float], int], None]
    log_artifact: Callable[[str, str], None]  # (local path, artifact dir)


class Stage(ABC):
    """One stage of a run; built by the trainer when the stage starts, closed when it ends."""

    name: ClassVar[str] = ""
    log_every: ClassVar[int] = 10  # stage steps between log lines (and the first step)

    def __init__(self, ctx: StageContext):
        self.ctx, self.cfg = ctx, ctx.cfg

    # ---- what the stage needs, read from the config alone (no Ray, no model)
    @classmethod
    @abstractmethod
    def settings(cls, cfg: Config) -> StageSettings:
        """Learner loss settings, learning rates and step count."""

    @classmethod
    def roles(cls, cfg: Config) -> list[RoleRequest]:
        """Ray roles this stage places beside the learners (checked against the cluster before anything starts)."""
        return []

    @classmethod
    def learner_options(cls, cfg: Config) -> dict[str, Any]:
        """Keyword arguments the learners need at construction when this stage is in the run."""
        return {}

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Checks of this stage's settings that span keys, at config load (torch- and Ray-free; raise
        ``ConfigError`` naming the key and the fix)."""

    @classmethod
    def preflight(cls, cfg: Config) -> None:
        """Checks that take seconds, before data, model or Ray (a bad setting fails here, not after actors start)."""

    @classmethod
    def check_start_model(cls, cfg: Config, model_path: str) -> None:
        """Checks of the resolved start model, before Ray starts."""

    # ---- running
    def start(self) -> None:
        """Open the stage's data and actors (after the learners have begun the stage)."""

    @abstractmethod
    def step(self, i: int) -> dict[str, float]:
        """Stage step ``i`` (0-based): one learner update; returns its metrics."""

    @property
    @abstractmethod
    def position(self) -> StreamPosition:
        """Where a resume must restart the stage's data: before any batch not yet trained on."""

    @abstractmethod
    def log_line(self, i: int, metrics: dict[str, float]) -> str:
        """The console line for stage step ``i`` (1-based, after the step)."""

    def postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        """A few numbers for the progress bar."""
        return {"loss": f"{metrics.get('train/loss', float('nan')):.3f}"}

    def end(self) -> dict[str, Any]:
        """After the last step, before the stage's model is saved: its own probes; returns summary entries."""
        return {}

    def close(self) -> None:
        """Release data and actors (always called, also after a failure)."""
