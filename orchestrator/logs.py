"""Logging for rime's packages: one logger per package, ``[rime] message`` lines on stdout from the CLI, and
a run's full log (rime's lines plus Ray Data's execution reports) in ``<run dir>/train.log``.

Ray Data prints a table per executed dataset (every epoch of the pair stream) and progress bars; those
go to the run log only, unless ``--verbose``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

PACKAGES = ("orchestrator", "actors", "rewards", "rime_model", "rime_data")
_CONSOLE = "rime-console"


def setup_console(verbose: bool = False) -> None:
    """``[rime] …`` INFO lines on stdout for rime's packages. Idempotent, and each call points the handler
    at the current ``sys.stdout`` (the CLI's ``main`` may run more than once in one process: tests)."""
    remove_console()  # (setStream on the old handler would flush a stream that may be closed by now)
    for name in PACKAGES:
        logger = logging.getLogger(name)
        logger.setLevel(logging.DEBUG if verbose else logging.INFO)
        h = logging.StreamHandler(sys.stdout)
        h.set_name(_CONSOLE)
        h.setFormatter(logging.Formatter("[rime] %(message)s"))
        logger.addHandler(h)
        logger.propagate = False  # a root handler some library configured would print every line twice


def remove_console() -> None:
    """Undo ``setup_console``: its handlers go, and records propagate to the root logger again."""
    for name in PACKAGES:
        logger = logging.getLogger(name)
        for h in [h for h in logger.handlers if h.get_name() == _CONSOLE]:
            logger.removeHandler(h)
        logger.propagate = True


def attach_run_log(path: Path) -> logging.Handler:
    """Write rime's and Ray Data's records to ``path`` (detach with ``detach_run_log``)."""
    import ray.data  # noqa: F401  (Ray Data sets its loggers' handlers when imported: ours go on after that)

    path.parent.mkdir(parents=True, exist_ok=True)
    h = logging.FileHandler(path)
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    h.setLevel(logging.INFO)
    for name in (*PACKAGES, "ray.data"):
        logging.getLogger(name).addHandler(h)
    return h


def detach_run_log(h: logging.Handler) -> None:
    for name in (*PACKAGES, "ray.data"):
        logging.getLogger(name).removeHandler(h)
    h.close()


def quiet_ray_data(verbose: bool) -> None:
    """Ray Data's per-dataset execution reports and progress bars off the console (they stay in Ray's
    ``ray-data.log`` and the run log) unless ``verbose``."""
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = verbose
    for h in logging.getLogger("ray.data").handlers:
        if not isinstance(h, logging.FileHandler) and type(h).__name__ != "SessionFileHandler":
            h.setLevel(logging.INFO if verbose else logging.WARNING)
