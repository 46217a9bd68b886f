"""The console script runs the main job on embedded defaults and reports bad input cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def _rime(*args, cwd, env=None):
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


def test_quickstart_runs_and_writes_report(zoo_cache, tmp_path):
    out = tmp_path / "qs"
    r = _rime("quickstart", "--scenes", "6", "--out", str(out), cwd=os.getcwd())
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report["caption_to_image_hit@1"]) == {"disc->disc", "disc->gen", "gen->disc", "gen->gen"}
    assert report["dim"] == 128 and report["n_scenes"] == 6
    from orchestrator.quickstart import NEXT_STEPS

    assert "not yet" not in r.stdout  # every stage has landed: the smoke path names the real commands
    assert all(f"next: {command}" in r.stdout for _, command in NEXT_STEPS)


def test_embed_command_errors_name_the_field(zoo_cache, tmp_path):
    r = _rime("embed", "--image", str(tmp_path / "missing.png"), cwd=os.getcwd())
    assert r.returncode == 2
    assert "inputs[0].image: file not found" in r.stderr
    ok = _rime("embed", "--text", "a red circle", "--mode", "gen", "--max-new-tokens", "4", cwd=os.getcwd())
    assert ok.returncode == 0, ok.stderr[-2000:]
    row = json.loads(ok.stdout.strip().splitlines()[-1])
    assert row["dim"] == 128 and 1 <= row["rewrite_tokens"] <= 4


def test_mlflow_none_turns_tracking_off_even_with_env(monkeypatch):
    """`--mlflow none` used to reach MLflow as a ./none file-store path (and crash after the eval)."""
    from orchestrator.tracking import tracking_uri_or_none

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert tracking_uri_or_none("none") is None
    assert tracking_uri_or_none("OFF") is None
    assert tracking_uri_or_none(None) == "sqlite:///env.db"
    assert tracking_uri_or_none("sqlite:///x.db") == "sqlite:///x.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking_uri_or_none(None) is None


def test_sqlite_store_keeps_its_artifacts_beside_it(tmp_path, monkeypatch):
    """MLflow's default artifact root for a sqlite store is ./mlruns of the cwd; rime puts them beside the
    mlflow.db instead (a run dir is self-contained), and an existing experiment keeps its location."""
    import mlflow

    from orchestrator.tracking import run_dir_uri, sqlite_artifact_root, use_experiment

    monkeypatch.chdir(tmp_path)  # where MLflow's default would have put them
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # set_tracking_uri exports it; restored after
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("a: 1\n")
    uri = run_dir_uri(run_dir)
    assert sqlite_artifact_root(uri) == (run_dir / "mlartifacts").resolve()
    assert sqlite_artifact_root("http://mlflow:5000") is None and sqlite_artifact_root("postgresql://h/db") is None
    try:
        use_experiment(uri, "rime-test")
        use_experiment(uri, "rime-test")  # already exists: set, not created again
        exp = mlflow.get_experiment_by_name("rime-test")
        assert exp.artifact_location == (run_dir / "mlartifacts").resolve().as_uri()
        with mlflow.start_run() as run:
            mlflow.log_artifact(str(run_dir / "config.yaml"))
        logged = run_dir / "mlartifacts" / run.info.run_id / "artifacts" / "config.yaml"
        assert logged.read_text() == "a: 1\n"
        assert not (tmp_path / "mlruns").exists()
    finally:
        mlflow.set_tracking_uri(None)


def test_a_run_with_a_transfer_split_prints_both_side_by_side_before_its_json():
    from orchestrator.run_summary import format_summary

    final = {"disc->disc": {"hit@1": 0.5}, "gen->disc": {"hit@1": 0.4}, "gen->gen": {"hit@1": 0.0}}
    transfer = {"disc->disc": {"hit@1": 0.3}, "gen->disc": {"hit@1": 0.1}, "gen->gen": {"hit@1": 0.2}}
    out = format_summary({"steps": 3, "final": final, "final_transfer": transfer, "checksums": [1.0]})
    table, _, js = out.partition("\n{")
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[2:]}
    assert rows == {
        "disc->disc": ["0.500", "0.300", "0.60"],
        "gen->disc": ["0.400", "0.100", "0.25"],
        "gen->gen": ["0.000", "0.200", "-"],
    }
    assert json.loads("{" + js) == {"steps": 3, "final": final, "final_transfer": transfer}  # checksums are not printed
    assert format_summary({"steps": 3, "final": final}).startswith("{")  # no transfer split: JSON only
