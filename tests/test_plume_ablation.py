"""`scripts/plume_ablation.sh` end to end on the tiny model (a few steps per arm): both arms per seed
trained, scored per query on generated test data, compared paired and across seeds; the curriculum
arm is also scored with 0 latent steps and compared with itself at its K; a re-run skips what is
already scored and groups the pairs by start model; bad arguments fail fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.compare import compare_files

SCRIPT = "scripts/plume_ablation.sh"
TRAIN_ARGS = ["--set", "data.synth_train=20", "--set", "data.synth_test=4", "--set", "data.synth_val=0",
              "--set", "plume.steps_per_stage=2", "--set", "plume.final_stage_steps=2",
              "--set", "learners.micro_batch_size=4", "--set", "eval.max_queries_per_task=3",
              "--set", "plume.probe_queries_per_task=0", "--set", "eval.before_training=false",
              "--set", "tracking.log_model=false", "--set", "checkpoint.every_steps=100"]


def _run(tmp: Path, *args: str, parallel: str = "1", **extra_env: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env |= {"RIME": str(Path(sys.executable).parent / "rime"), "RUNS_DIR": str(tmp / "runs"), "OUT": str(tmp / "out"),
            "TEST_DATA": str(tmp / "test"), "TEST_QUERIES": "6", "PARALLEL": parallel, **extra_env}
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=1500, env=env)


def test_ablation_trains_both_arms_per_seed_compares_them_and_resumes(tmp_path, zoo_cache):
    # two arms at once: the same four reports as one after another
    r = _run(tmp_path, "smoke", "tiny", "0,1", "--set", f"data.path={tmp_path / 'data'}", *TRAIN_ARGS, parallel="2")
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stderr.count("[ablation] train") == 4 and r.stderr.count("[ablation] scored") == 4
    reports = tmp_path / "out" / "reports"
    assert sorted(p.name for p in reports.glob("*.json")) == [
        "m0-seed0-cur-k0.json", "m0-seed0-cur.json", "m0-seed0-nocur.json",
        "m0-seed1-cur-k0.json", "m0-seed1-cur.json", "m0-seed1-nocur.json"]
    for seed in (0, 1):  # each arm is its own trained run, with its own seed and curriculum setting
        for arm, curriculum in (("cur", True), ("nocur", False)):
            cfg = yaml.safe_load((tmp_path / "runs" / f"smoke-m0-seed{seed}-{arm}" / "config.yaml").read_text())
            assert cfg["run"]["seed"] == seed and cfg["plume"]["curriculum"] is curriculum
    out = json.loads((tmp_path / "out" / "compare.json").read_text())
    s = out["summary"]
    assert s["unit"] == "run" and s["groups"] is None and s["runs"] == 2
    for seed, run, diff in zip((0, 1), out["runs"], s["diffs"]):  # B = curriculum, A = no curriculum, per seed
        c = compare_files(reports / f"m0-seed{seed}-nocur.json", reports / f"m0-seed{seed}-cur.json", resamples=100)
        assert c.n == run["n"] == 6 and c.diff == pytest.approx(diff) and c.mean_b == pytest.approx(run["mean_b"])
    assert "across 2 pairs of runs (the run is the unit)" in r.stdout

    # the zero-step control: the curriculum arm's own model, latent->latent at 0 steps (A) against its K (B)
    k = yaml.safe_load((tmp_path / "runs" / "smoke-m0-seed0-cur" / "config.yaml").read_text())["plume"]["latent_steps"]
    out = json.loads((tmp_path / "out" / "latent_steps.json").read_text())
    assert out["summary"]["runs"] == 2 and "the latent steps' own share" in r.stdout
    for seed, run in zip((0, 1), out["runs"]):
        a, b = reports / f"m0-seed{seed}-cur-k0.json", reports / f"m0-seed{seed}-cur.json"
        ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
        assert ra["model"] == rb["model"] == str(tmp_path / "runs" / f"smoke-m0-seed{seed}-cur" / "final")
        assert (ra["latent_steps"], rb["latent_steps"]) == (0, k) and k > 0
        assert sorted(ra["per_query"]) == ["latent->latent"] and run["pair"] == "latent->latent"
        c = compare_files(a, b, resamples=100)
        assert c.n == run["n"] == 6 and c.diff == pytest.approx(run["diff"]) and c.mean_a == pytest.approx(run["mean_a"])

    # a missing control is scored on a re-run without training anything
    (reports / "m0-seed1-cur-k0.json").unlink()
    r = _run(tmp_path, "smoke", "tiny", "0,1", "--set", f"data.path={tmp_path / 'data'}", *TRAIN_ARGS)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "[ablation] train" not in r.stderr and "[ablation] scored" not in r.stderr
    assert r.stderr.count("with 0 latent steps") == 1 and "eval smoke-m0-seed1-cur with 0 latent steps" in r.stderr
    assert json.loads((reports / "m0-seed1-cur-k0.json").read_text())["latent_steps"] == 0
    assert json.loads((tmp_path / "out" / "latent_steps.json").read_text())["runs"][1] == out["runs"][1]
    compare_before = (tmp_path / "out" / "compare.json").read_text()

    # a start model that cannot load: its arms fail, no new arm starts after the first failure, the
    # scored reports stay, nothing is compared, exit 1
    bad = str(tmp_path / "no-such-model")
    r = _run(tmp_path, "smoke", f"tiny,{bad}", "0,1", "--set", f"data.path={tmp_path / 'data'}", *TRAIN_ARGS,
             parallel="2")
    assert r.returncode == 1, r.stderr[-4000:]
    assert "train smoke-m0" not in r.stderr and r.stderr.count("[ablation] train smoke-m1") == 2, r.stderr[-4000:]
    assert "training smoke-m1-seed0-nocur failed" in r.stderr and "2 arm(s) failed" in r.stderr
    assert "is neither a zoo name" in (tmp_path / "out" / "logs" / "smoke-m1-seed0-nocur.log").read_text()
    assert len(list(reports.glob("*.json"))) == 6 and (tmp_path / "out" / "compare.json").read_text() == compare_before

    # a second start model: the seed-0 pair of the first is reused, only the new model's arms train,
    # and the pairs are grouped by start model
    second = str(tmp_path / "runs" / "smoke-m0-seed0-cur" / "final")
    r = _run(tmp_path, "smoke", f"tiny,{second}", "0", "--set", f"data.path={tmp_path / 'data'}", *TRAIN_ARGS)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stderr.count("[ablation] train") == 2 and "smoke-m1-seed0-nocur" in r.stderr and "train smoke-m0" not in r.stderr
    s = json.loads((tmp_path / "out" / "compare.json").read_text())["summary"]
    assert s["unit"] == "group" and s["groups"] == ["tiny", second] and s["runs"] == 2
    assert "the group is the unit" in r.stdout
    s = json.loads((tmp_path / "out" / "latent_steps.json").read_text())["summary"]
    assert s["unit"] == "group" and s["groups"] == ["tiny", second] and (reports / "m1-seed0-cur-k0.json").is_file()


@pytest.mark.parametrize("args, parallel, message", [
    (["x", "tiny", "0"], "1", "one start model and one seed give one pair"),
    (["x", "tiny", "0,a"], "1", "seed 'a' is not a non-negative integer"),
    (["x", "tiny,tiny", "0"], "1", "a start model is listed twice"),
    (["x"], "1", "plume_ablation.sh NAME START"),
    (["x", "tiny", "0,1"], "0", "PARALLEL=0 must be a positive integer"),
    (["x", "tiny", "0,1"], "two", "PARALLEL=two must be a positive integer"),
])
def test_ablation_rejects_bad_arguments_before_training(tmp_path, args, parallel, message):
    r = _run(tmp_path, *args, parallel=parallel)
    assert r.returncode == 2 and message in r.stderr and not (tmp_path / "runs").exists()


def test_ablation_rejects_a_bad_zero_step_control_before_training(tmp_path):
    r = _run(tmp_path, "x", "tiny", "0,1", ZERO_STEP_CONTROL="yes")
    assert r.returncode == 2 and "ZERO_STEP_CONTROL=yes must be 0 or 1" in r.stderr and not (tmp_path / "runs").exists()


def test_ablation_with_an_unreachable_submit_address_fails_before_training(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = _run(tmp_path, "x", "tiny", "0,1", SUBMIT=f"http://127.0.0.1:{port}")
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"SUBMIT=http://127.0.0.1:{port} is not a Ray dashboard that answers" in r.stderr
    assert "cannot connect to a Ray dashboard" in r.stderr  # rime's own message says why
    assert not (tmp_path / "runs").exists() and not (tmp_path / "test").exists()
