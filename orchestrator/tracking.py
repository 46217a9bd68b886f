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


def sqlite_artifact_root(uri: str) -> Path | None:
    """Where a ``sqlite:///PATH`` store's artifacts go: ``mlartifacts/`` beside the database (the name
    MLflow's server uses). None for any other store: a server or database decides for itself."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :]).resolve().parent / "mlartifacts"


def use_experiment(uri: str, name: str) -> None:
    """Point MLflow at store ``uri`` and experiment ``name``; on a sqlite store a new experiment keeps its
    artifacts beside the database (``sqlite_artifact_root``).

    MLflow's default puts a sqlite store's artifacts (config, eval reports, the logged model) in
    ``./mlruns`` of whatever directory the process started in, not beside the ``mlflow.db`` they belong
    to: a run dir would not be self-contained, and every run started from one directory would share one
    artifact folder. An experiment that already exists keeps the location it was created with."""
    import mlflow  # here, not at module level: config.py imports this module and must stay light

    mlflow.set_tracking_uri(uri)
    root = sqlite_artifact_root(uri)
    if root is not None and mlflow.get_experiment_by_name(name) is None:
        mlflow.create_experiment(name, artifact_location=root.as_uri())
    mlflow.set_experiment(name)
