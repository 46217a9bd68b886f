"""MLflow tracking defaults: an explicit URI, else $MLFLOW_TRACKING_URI, else (for runs) sqlite in the run dir."""

from __future__ import annotations

import os
from pathlib import Path


NO_TRACKING = frozenset({"none", "off", "false", "0"})


def tracking_uri_or_none(explicit: str | None) -> str | None:
    """The URI to log to, or None for no tracking: ``--mlflow none`` (or off/false/0) turns it off even
    when $MLFLOW_TRACKING_URI is set, instead of being taken as a ./none file-store path."""
    if explicit is not None and explicit.strip().lower() in NO_TRACKING:
        return None
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or None


def run_dir_uri(run_dir: str | Path) -> str:
    """Default for training runs: ``sqlite:///<run dir>/mlflow.db`` (no server needed)."""
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"
