"""`rime train` with the PLUME stage end to end on 2 DeepSpeed learners: the curriculum's phases in
MLflow, optimizer resets at curriculum-stage changes, latent-mode eval, a saved model carrying its
adapter; then a run that starts later in the curriculum from that model, as the single-MLP ablation.
Exact resume is test_train's kill test; what PLUME adds to a resume is test_stage_loop's."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from rime_cli import ROOT, clean_env, set_values, train_cmd

PER_STAGE = 2
STEPS = 5 * PER_STAGE  # 4 segments -> curriculum stages 0..4


TINY = {
    "data.synth_train": 20,
    "data.synth_test": 4,
    "data.synth_val": 0,
    "plume.steps_per_stage": PER_STAGE,
    "checkpoint.every_steps": 3,
    "learners.micro_batch_size": 4,
    "eval.max_queries_per_task": 3,
    "plume.probe_queries_per_task": 3,
    "eval.before_training": "false",
    "tracking.log_model": "false",
}


def _cmd(tmp: Path, name: str, *extra: str) -> list[str]:
    return train_cmd("configs/plume-tiny.yaml", tmp, name, TINY, *extra)


@dataclass
class Run:
    summary: dict
    stdout: str


def _start(tmp: Path, name: str, *extra: str) -> subprocess.Popen:
    log = open(tmp / f"{name}.log", "w")  # a file, not a pipe: two runs at once never block on a full pipe
    return subprocess.Popen(_cmd(tmp, name, *extra), stdout=log, stderr=subprocess.STDOUT, env=clean_env(), cwd=ROOT)


def _finish(tmp: Path, name: str, proc: subprocess.Popen) -> Run:
    rc, out = proc.wait(timeout=900), (tmp / f"{name}.log").read_text()
    assert rc == 0, out[-4000:]
    return Run(json.loads((tmp / "runs" / name / "summary.json").read_text()), out)


@pytest.fixture(scope="module")
def plume_runs(tmp_path_factory, tiny_latent_dir) -> tuple[Path, Run, Run]:
    """The two runs of this module, side by side (one run keeps the 2 cores ~75% busy): the straight
    curriculum on 2 learners, and a run from a saved PLUME model (``tiny_latent_dir``: the tiny model
    with a 4-expert adapter) that starts at curriculum stage 3 with a single-MLP adapter on 1 learner, its
    micro-batches through GradCache (``plume.grad_cache_chunk``: 2 chunks of 2 pairs; the gradient equality
    itself is tests/test_grad_cache.py's)."""
    tmp = tmp_path_factory.mktemp("plume")
    from orchestrator.config import load_config
    from orchestrator.train import ensure_data

    argv = _cmd(tmp, "data")
    ensure_data(load_config("configs/plume-tiny.yaml", set_values(argv)))
    straight = _start(tmp, "straight")
    later = _start(
        tmp,
        "from-stage3",
        *("--set", f"model.spec={tiny_latent_dir}", "--set", "plume.first_stage=3", "--set", "plume.experts=0"),
        *("--set", "learners.num_actors=1", "--set", "eval.query_modes=[latent]", "--set", "eval.cand_modes=[latent]"),
        *("--set", "plume.grad_cache_chunk=2"),
    )
    try:
        return tmp, _finish(tmp, "straight", straight), _finish(tmp, "from-stage3", later)
    finally:
        for proc in (straight, later):
            if proc.poll() is None:
                proc.kill()


def test_curriculum_phases_resets_and_latent_eval(plume_runs):
    tmp, run, _ = plume_runs
    summary, stdout = run.summary, run.stdout
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


def test_a_run_from_a_saved_plume_model_starts_at_its_first_stage_with_the_configured_adapter(plume_runs):
    """``plume.first_stage`` skips the all-text stages (a CoT start model's recipe; ``plume.last_stage: 0``,
    the CoT run itself, is a schedule: test_curriculum): the probe reads the start model before step 0 and the
    schedule opens at the given stage. With ``plume.experts=0`` it is also PLUME's single-MLP ablation from a
    saved MoE model: the configured adapter replaces the saved one (kept-or-replaced itself: test_latent).
    One learner: the two-rank paths run in the straight run."""
    tmp, _, r = plume_runs
    run_dir = tmp / "runs" / "from-stage3"
    summary = r.summary
    assert summary["steps"] == 2 * PER_STAGE  # stage 3, then the last stage: the skipped stages cost no steps
    assert r.stdout.count("explicit-reasoning probe on the start model") == 1 and "probe after stage 0" not in r.stdout
    assert r.stdout.count("optimizer state reset") == 1
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run_id = summary["mlflow_run_id"]
    assert [m.value for m in client.get_metric_history(run_id, "plume/stage")] == [3, 3, 4, 4]
    assert [m.value for m in client.get_metric_history(run_id, "plume/keep_answer")] == [1, 1, 1, 0]
    assert [m.step for m in client.get_metric_history(run_id, "plume/explicit_answer_acc")] == [0]
    assert json.loads((run_dir / "eval" / "plume-explicit.json").read_text())["n"] == 6 * 3
    assert "transition adapter differs from the config (num_experts: 4 -> 0" in r.stdout
    saved = json.loads((run_dir / "final" / "rime_embedder.json").read_text())["latent_adapter"]
    assert saved["num_experts"] == 0 and saved["shared_expert"] is True
