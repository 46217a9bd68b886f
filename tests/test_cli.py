"""The console script runs the main job on embedded defaults and reports bad input cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def _rime(*args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


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
