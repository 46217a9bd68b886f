"""What the user sees: rime's lines on stdout, Ray Data's execution reports only in the run log (unless
--verbose), and every record of the run in <run dir>/train.log."""

from __future__ import annotations

import logging

from orchestrator.logs import attach_run_log, detach_run_log, quiet_ray_data, remove_console, setup_console


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
        remove_console()
    text = (tmp_path / "train.log").read_text()
    assert "orchestrator.train: stage cma: 3 steps" in text and "ray.data: Execution plan" in text
    assert "after the run" not in text
    out = capsys.readouterr().out
    assert "[rime] stage cma: 3 steps" in out and "Execution plan" not in out


def test_ray_data_records_reach_a_run_log_attached_before_ray_data_was_imported(tmp_path):
    """The trainer attaches its run log before anything imports Ray Data, whose import replaces its loggers'
    handlers: the executor's reports must still land in the file (a fresh interpreter, as in `rime train`)."""
    import subprocess
    import sys

    code = (
        "import logging, pathlib, sys; from orchestrator.logs import attach_run_log, quiet_ray_data; "
        "h = attach_run_log(pathlib.Path(sys.argv[1])); quiet_ray_data(False); "
        "logging.getLogger('ray.data._internal.execution.streaming_executor').info('Execution plan of Dataset x')"
    )
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "train.log")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "streaming_executor: Execution plan of Dataset x" in (tmp_path / "train.log").read_text()
    assert "Execution plan" not in r.stdout + r.stderr  # not on the console
