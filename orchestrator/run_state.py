"""A run's resumable state (``state.json``) and its run directory.

Everything a resume needs: the MLflow run id, the global and stage step, the data position, the last
checkpoint and where it was taken, which stages are done and the model each stage started from. Written
atomically, and only after every rank finished its checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .pairs import StreamPosition

STATE = "state.json"


class RunDirError(RuntimeError):
    """The run directory's state does not match what was asked (new run vs resume)."""


@dataclass
class CheckpointMeta:
    """Where a checkpoint was taken; a resume rolls back to exactly this."""

    step: int
    stage: str
    stage_step: int
    position: StreamPosition

    @classmethod
    def from_dict(cls, d: dict) -> CheckpointMeta:
        return cls(d["step"], d["stage"], d["stage_step"], StreamPosition(**d["position"]))


@dataclass
class RunState:
    mlflow_run_id: str | None = None
    step: int = 0  # learner updates over all stages
    stage: str | None = None
    stage_step: int = 0
    position: StreamPosition = field(default_factory=StreamPosition)
    checkpoint: str | None = None  # tag of the last complete checkpoint (checkpoints/<tag>)
    checkpoint_meta: CheckpointMeta | None = None
    baseline_done: bool = False
    finished: bool = False
    stages_done: list[str] = field(default_factory=list)
    stage_models: dict[str, str] = field(default_factory=dict)  # stage -> the folder it started from
    plume_rows_short_reasoning: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunState:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["position"] = StreamPosition(**kw.get("position", {}))
        if kw.get("checkpoint_meta"):
            kw["checkpoint_meta"] = CheckpointMeta.from_dict(kw["checkpoint_meta"])
        return cls(**kw)

    def save(self, run_dir: Path) -> None:
        write_json_atomic(run_dir / STATE, self.to_dict())


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> RunState | None:
    """Create or reopen the run dir; returns the saved state when resuming."""
    state_file = run_dir / STATE
    if resume:
        if not state_file.is_file():
            raise RunDirError(f"--resume: no {state_file}; start the run without --resume first")
        return RunState.from_dict(json.loads(state_file.read_text()))
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise RunDirError(
                f"run dir {run_dir} exists; pass --resume to continue it, --overwrite to start over, "
                "or set run.name to a new name"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return None
