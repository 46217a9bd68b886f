"""What the user sees: rime's lines on stdout, Ray Data's execution reports only in the run log (unless
--verbose), and every record of the run in <run dir>/train.log."""

from __future__ import annotations

import logging

from orchestrator.logs import PACKAGES, attach_run_log, detach_run_log, quiet_ray_data, setup_console


def _console_levels() -> list[int]:
    return [
        h.level
        for h in logging.getLogger("ray.data").handlers
        if not isinstance(h, logging.FileHandler) and type(h).__name__ != "SessionFileHandler"
    ]


def test_ray_data_reports_leave_the_console_unless_verbose(tmp_path):
    import ray.data  # noqa: F401  (configures Ray Data's own handlers)

    quiet_ray_data(verbose=False)
    assert _console_levels() and all(lv >= logging.WARNING for lv in _console_levels())
    assert not ray.data.DataContext.get_current().enable_progress_bars
    quiet_ray_data(verbose=True)
    assert all(lv <= logging.INFO for lv in _console_levels())
    quiet_ray_data(verbose=False)


def test_the_run_log_gets_rimes_and_ray_datas_records(tmp_path, capsys):
    import ray.data  # noqa: F401  (Ray Data's logger at DEBUG, as in a run)

    setup_console()  # the CLI's: [rime] lines on (this test's captured) stdout
    h = attach_run_log(tmp_path / "train.log")
    try:
        logging.getLogger("orchestrator.train").info("stage cma: 3 steps")
        logging.getLogger("ray.data").info("Execution plan of Dataset: ...")
        detach_run_log(h)
        logging.getLogger("orchestrator.train").info("after the run")
    finally:
        for name in PACKAGES:
            logger = logging.getLogger(name)
            for c in [c for c in logger.handlers if c.get_name() == "rime-console"]:
                logger.removeHandler(c)
            logger.propagate = True
    text = (tmp_path / "train.log").read_text()
    assert "orchestrator.train: stage cma: 3 steps" in text and "ray.data: Execution plan" in text
    assert "after the run" not in text
    out = capsys.readouterr().out
    assert "[rime] stage cma: 3 steps" in out and "Execution plan" not in out
