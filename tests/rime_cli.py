"""Running `rime` as a user does, in a subprocess: the command line, a clean environment and the call.

Shared by the end-to-end tests (test_train, test_plume, test_plume_ablation, test_submit)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# what a test's rime must not inherit: the tracking URI other tests export (mlflow.set_tracking_uri) would
# send its runs elsewhere than the run dir the test reads, and a Ray address would join another cluster
_LEAKY = ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without the leaky variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in _LEAKY}
    env.update(extra)
    return env


def sets(values: dict[str, Any]) -> list[str]:
    """``--set key=value`` arguments, in order."""
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


def set_values(argv: list[str]) -> list[str]:
    """The ``key=value`` of every ``--set`` in ``argv``, in order (what ``load_config`` takes as overrides)."""
    return [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]


def train_cmd(config: str, tmp: Path, name: str, values: dict[str, Any], *extra: str) -> list[str]:
    """`rime train CONFIG` writing run ``name`` under ``tmp/runs`` on data in ``tmp/data``."""
    base = {"run.name": name, "run.out_dir": tmp / "runs", "data.path": tmp / "data"}
    return [sys.executable, "-m", "orchestrator.cli", "train", config, *sets({**base, **values}), *extra]


def run_cli(cmd: list[str], timeout: float = 900, **kw: Any) -> subprocess.CompletedProcess:
    """Run ``cmd`` from the repository root with a clean environment, capturing its output."""
    kw.setdefault("env", clean_env())
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kw)
