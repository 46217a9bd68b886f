"""MLflow tracking defaults: an explicit URI, else $MLFLOW_TRACKING_URI, else (for runs) sqlite in the run dir."""

from __future__ import annotations

import os
from pathlib import Path


def tracking_uri_or_none(explicit: str | None) -> str | None:
    """The URI to log to, or None when the user asked for no tracking."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or None


def run_dir_uri(run_dir: str | Path) -> str:
    """Default for training runs: ``sqlite:///<run dir>/mlflow.db`` (no server needed)."""
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"
