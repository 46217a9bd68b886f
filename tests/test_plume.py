"""`rime train` with the PLUME stage end to end on 2 DeepSpeed learners: the curriculum's phases in
MLflow, optimizer resets at curriculum-stage changes, latent-mode eval, a saved model carrying its
adapter, and a driver killed mid-curriculum that resumes to the same weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

PER_STAGE = 2
STEPS = 5 * PER_STAGE  # 4 segments -> curriculum stages 0..4


def _cmd(tmp: Path, name: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "orchestrator.cli",
        "train",
        "configs/plume-tiny.yaml",
        "--set",
        f"run.name={name}",
        "--set",
        f"run.out_dir={tmp / 'runs'}",
        "--set",
        f"data.path={tmp / 'data'}",
        "--set",
        "data.synth_train=20",
        "--set",
        "data.synth_test=4",
        "--set",
        "data.synth_val=0",
        "--set",
        f"plume.steps_per_stage={PER_STAGE}",
        "--set",
        "checkpoint.every_steps=3",
        "--set",
        "learners.micro_batch_size=4",
        "--set",
        "eval.max_queries_per_task=3",
        "--set",
        "plume.probe_queries_per_task=3",
        "--set",
        "eval.before_training=false",
        "--set",
        "tracking.log_model=false",
        *extra,
    ]


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=_env(), **kw)


@pytest.fixture(scope="module")
def plume_run(tmp_path_factory, zoo_cache):
    tmp = tmp_path_factory.mktemp("plume")
    r = _run(_cmd(tmp, "straight"))
    assert r.returncode == 0, r.stderr[-4000:]
    return tmp, json.loads((tmp / "runs" / "straight" / "summary.json").read_text()), r.stdout


def test_curriculum_phases_resets_and_latent_eval(plume_run):
    tmp, summary, stdout = plume_run
    run_dir = tmp / "runs" / "straight"
    assert summary["steps"] == STEPS and summary["checksums"][0] == summary["checksums"][1]
    assert set(summary["final"]) == {"disc->disc", "disc->latent", "latent->disc", "latent->latent"}
    assert stdout.count("optimizer state reset") == 4  # one per curriculum stage change
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{run_dir / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    hist = {
        k: [m.value for m in client.get_metric_history(summary["mlflow_run_id"], k)]
        for k in ("plume/stage", "plume/latent_steps", "plume/keep_answer", "train/ce", "train/balance", "train/router_p0")
    }
    assert hist["plume/stage"] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert hist["plume/latent_steps"] == [0, 0, 2, 2, 4, 4, 6, 6, 8, 8]
    assert hist["plume/keep_answer"] == [1] * 9 + [0]
    assert len(hist["train/router_p0"]) == STEPS  # targets run K latent steps from the start (target_layout: latent)
    assert all(v >= 0 for v in hist["train/balance"]) and all(v > 0 for v in hist["train/ce"])
    # the explicit-reasoning probe ran once, when curriculum stage 0 ended, on the eval queries
    probe = client.get_metric_history(summary["mlflow_run_id"], "plume/explicit_answer_acc")
    assert [m.step for m in probe] == [PER_STAGE] and 0.0 <= probe[0].value <= 1.0
    report = json.loads((run_dir / "eval" / "plume-explicit.json").read_text())
    assert report["n"] == 6 * 3 and report["skipped"] == report["no_reasoning"] == 0 and len(report["samples"]) == 4
    assert set(report["metrics"]) == (
        {"plume/explicit_answer_acc", "plume/explicit_latent_hit1"} | {f"plume/explicit_segment{i}_exact" for i in range(4)}
    )
    # Hit@1 over the 6 tasks' 3 probed queries each (MMEB mean over tasks): a multiple of 1/18
    assert 0.0 <= report["metrics"]["plume/explicit_latent_hit1"] <= 1.0
    assert (
        abs(report["metrics"]["plume/explicit_latent_hit1"] * 18 - round(report["metrics"]["plume/explicit_latent_hit1"] * 18))
        < 1e-9
    )
    assert stdout.count("explicit-reasoning probe after stage 0") == 1

    from rime_model import Embedder

    emb = Embedder.load(run_dir / "final")
    assert emb.latent_adapter is not None and emb.latent_steps == 8
    assert emb.embed(["a red circle"], mode="latent").vectors.shape == (1, 128)
    report = json.loads((run_dir / "eval" / "final.json").read_text())
    assert "latent->latent" in report["pairs"]


def test_explicit_reasoning_run_then_first_stage_from_it(plume_run):
    """``plume.last_stage: 0`` trains explicit reasoning only (a CoT start model, probed at its end);
    ``plume.first_stage`` then skips the all-text stages: the probe reads the start model before step 0,
    and the schedule opens at the given stage."""
    tmp, _, _ = plume_run
    r = _run(_cmd(tmp, "cot", "--set", "plume.last_stage=0"))
    assert r.returncode == 0, r.stderr[-4000:]
    cot = json.loads((tmp / "runs" / "cot" / "summary.json").read_text())
    assert cot["steps"] == PER_STAGE and r.stdout.count("explicit-reasoning probe after stage 0") == 1
    assert "optimizer state reset" not in r.stdout

    r = _run(
        _cmd(
            tmp,
            "from-stage3",
            "--set",
            f"model.spec={tmp / 'runs' / 'cot' / 'final'}",
            "--set",
            "plume.first_stage=3",
            "--set",
            "eval.query_modes=[latent]",
            "--set",
            "eval.cand_modes=[latent]",
        )
    )
    assert r.returncode == 0, r.stderr[-4000:]
    run_dir = tmp / "runs" / "from-stage3"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 * PER_STAGE  # stage 3, then the last stage: the skipped stages cost no steps
    assert r.stdout.count("explicit-reasoning probe on the start model") == 1 and "probe after stage 0" not in r.stdout
    assert r.stdout.count("optimizer state reset") == 1
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp / 'runs' / 'cot' / 'mlflow.db'}")
    assert [m.value for m in client.get_metric_history(cot["mlflow_run_id"], "plume/stage")] == [0] * PER_STAGE
    assert [m.step for m in client.get_metric_history(cot["mlflow_run_id"], "plume/explicit_answer_acc")] == [PER_STAGE]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run_id = summary["mlflow_run_id"]
    assert [m.value for m in client.get_metric_history(run_id, "plume/stage")] == [3, 3, 4, 4]
    assert [m.value for m in client.get_metric_history(run_id, "plume/keep_answer")] == [1, 1, 1, 0]
    assert [m.step for m in client.get_metric_history(run_id, "plume/explicit_answer_acc")] == [0]
    assert json.loads((run_dir / "eval" / "plume-explicit.json").read_text())["n"] == 6 * 3
    assert "transition adapter differs" not in r.stdout  # same plume.* as the CoT run: its adapter is kept

    # an ablation from the same CoT model (single MLP): the configured adapter replaces the saved one
    r = _run(
        _cmd(
            tmp,
            "single-mlp",
            "--set",
            f"model.spec={tmp / 'runs' / 'cot' / 'final'}",
            "--set",
            "plume.first_stage=4",
            "--set",
            "plume.experts=0",
            "--set",
            "plume.probe_queries_per_task=0",
            "--set",
            "eval.query_modes=[latent]",
            "--set",
            "eval.cand_modes=[latent]",
        )
    )
    assert r.returncode == 0, r.stderr[-4000:]
    assert "transition adapter differs from the config (num_experts: 4 -> 0" in r.stdout
    saved = json.loads((tmp / "runs" / "single-mlp" / "final" / "rime_embedder.json").read_text())["latent_adapter"]
    assert saved["num_experts"] == 0 and saved["shared_expert"] is True


def test_killed_mid_curriculum_resumes_to_the_same_weights(plume_run):
    ref_tmp, ref, _ = plume_run
    cmd = _cmd(ref_tmp, "killed")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), start_new_session=True)
    state = ref_tmp / "runs" / "killed" / "state.json"
    deadline = time.time() + 600
    while time.time() < deadline:  # step 6 ends curriculum stage 2: the resume must reset Adam before stage 3
        if state.is_file() and json.loads(state.read_text()).get("checkpoint") == "step6":
            break
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.5)
    else:
        pytest.fail("no checkpoint appeared in time")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    r = _run(cmd + ["--resume"])
    assert r.returncode == 0, r.stderr[-4000:]
    assert "resumed from step6" in r.stdout and "plume curriculum stage 3" in r.stdout
    summary = json.loads((ref_tmp / "runs" / "killed" / "summary.json").read_text())
    assert summary["steps"] == STEPS
    assert summary["checksums"] == pytest.approx(ref["checksums"], rel=1e-9)
