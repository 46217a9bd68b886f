"""`rime train` end to end (cma then refine-rl) on a mixture of two training datasets (``data.mix``; the
mixture's own resume test is test_pair_mix): a driver killed mid-run resumes to the same final step, same
MLflow run, and the same weights as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from rime_cli import ROOT, clean_env, run_cli, set_values, train_cmd

CMA_STEPS, RL_STEPS = 8, 2
STEPS = CMA_STEPS + RL_STEPS


TINY = {
    "data.synth_train": 20,
    "data.synth_test": 4,
    "data.synth_val": 0,
    "cma.steps": CMA_STEPS,
    "cma.matryoshka_dims": "[64]",  # the Matryoshka loss on real learners (its maths: test_losses)
    "checkpoint.every_steps": 4,
    "learners.micro_batch_size": 4,
    "refine_rl.steps": RL_STEPS,
    "refine_rl.queries_per_step": 4,
    "rollout.group_size": 2,
    "rollout.num_actors": 1,  # several workers' chunks: test_refine_rl
    "rollout.max_new_tokens": 6,
    "refine_rl.probe_every": RL_STEPS,  # the probe before the first RL step and after the last
    "refine_rl.probe_queries_per_task": 1,
    "eval.max_queries_per_task": 3,
    "eval.max_new_tokens": 4,
    "eval.before_training": "false",
    "tracking.log_model": "false",
}


MIX = {"mix-a": ("t2i", "i2t", "cls"), "mix-b": ("vqa", "composed", "referring")}  # weights 2:1


def _cmd(tmp: Path, name: str, *extra: str) -> list[str]:
    mix = f"{tmp / 'mix-a'}:2,{tmp / 'mix-b'}:1"  # training data; data.path (tmp/data) is evaluated on
    return train_cmd(
        "configs/tiny-cpu.yaml", tmp, name, {**TINY, "data.transfer_path": tmp / "transfer", "data.mix": mix}, *extra
    )


@dataclass
class Runs:
    """The two runs of this module, started side by side (one run keeps the 2 cores ~75% busy)."""

    tmp: Path
    summary: dict  # the uninterrupted run's summary.json
    killed_at: dict  # the killed run's state.json when it was killed
    resume: subprocess.CompletedProcess  # `rime train --resume` of the killed run


def _data_first(tmp: Path) -> None:
    """Generate the runs' data before either starts, so two runs never write the same folder at once."""
    from orchestrator.config import load_config
    from orchestrator.train import ensure_data, ensure_transfer_data
    from rime_data.synth import write_synth

    for i, (name, tasks) in enumerate(MIX.items()):
        write_synth(tmp / name, {"train": int(TINY["data.synth_train"])}, seed=i, tasks=tasks)
    argv = _cmd(tmp, "data")
    cfg = load_config("configs/tiny-cpu.yaml", set_values(argv))
    ensure_data(cfg)
    ensure_transfer_data(cfg)


def _kill_after_cma(proc: subprocess.Popen, state: Path) -> dict:
    """SIGKILL the run's whole process group once its CMA checkpoint is written; its state at that moment."""
    deadline = time.time() + 600
    while time.time() < deadline:
        if state.is_file() and json.loads(state.read_text()).get("checkpoint") == f"step{CMA_STEPS}":
            break  # CMA done: the resume re-enters at the stage boundary
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.5)
    else:
        pytest.fail("no checkpoint appeared in time")
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    proc.wait()
    return json.loads(state.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny) -> Runs:
    tmp = tmp_path_factory.mktemp("train")
    _data_first(tmp)  # (the ``tiny`` fixture built the zoo model both runs start from)
    log = open(tmp / "straight.log", "w")
    straight = subprocess.Popen(_cmd(tmp, "straight"), stdout=log, stderr=subprocess.STDOUT, env=clean_env(), cwd=ROOT)
    # evals do not touch the weights: disc-only ones make the killed run cheaper without changing what it trains
    cmd = _cmd(tmp, "killed", "--set", "eval.query_modes=[disc]", "--set", "eval.cand_modes=[disc]")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=clean_env(), cwd=ROOT, start_new_session=True
    )
    try:
        killed_at = _kill_after_cma(proc, tmp / "runs" / "killed" / "state.json")
        resume = run_cli(cmd + ["--resume"])
        assert straight.wait(timeout=900) == 0, (tmp / "straight.log").read_text()[-4000:]
    finally:
        if straight.poll() is None:
            straight.kill()
        log.close()
    return Runs(tmp, json.loads((tmp / "runs" / "straight" / "summary.json").read_text()), killed_at, resume)


def test_run_writes_summary_eval_and_mlflow(runs):
    tmp, summary = runs.tmp, runs.summary
    run_dir = tmp / "runs" / "straight"
    assert summary["steps"] == STEPS and summary["bad_rows"] == 0
    assert set(summary["final"]) == {"disc->disc", "disc->gen", "gen->disc", "gen->gen"}
    assert set(summary["final_transfer"]) == set(summary["final"])  # the transfer split, scored beside the test split
    assert (run_dir / "eval" / "final-transfer.json").is_file() and (tmp / "transfer" / "test").is_dir()
    assert summary["checksums"][0] == summary["checksums"][1]
    assert (run_dir / "config.yaml").is_file()
    assert json.loads((run_dir / "final" / "rime_embedder.json").read_text())["matryoshka_dims"] == [64]  # kept after RL
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{run_dir / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    hist = client.get_metric_history(summary["mlflow_run_id"], "train/loss")
    assert [m.step for m in hist] == list(range(1, STEPS + 1))
    assert hist[CMA_STEPS - 1].value < hist[0].value  # the CMA loss went down
    rl = client.get_metric_history(summary["mlflow_run_id"], "reward/reward_mean")
    assert [m.step for m in rl] == list(range(CMA_STEPS + 1, STEPS + 1))
    probe = _probe_history(client, summary["mlflow_run_id"])
    assert [step for step, _ in probe["probe/reward_mean"]] == [CMA_STEPS, STEPS]  # the stage's start, and its end
    assert set(probe) >= {"probe/acc", "probe/zero_variance_groups", "probe_greedy/acc", "probe/t2i/reward_mean"}
    assert all(step == [CMA_STEPS, STEPS] for step in ([s for s, _ in h] for h in probe.values()))
    assert [v for _, v in probe["probe/queries"]] == [6.0, 6.0]  # one per task, the same set both times
    assert [m.value for m in client.get_metric_history(summary["mlflow_run_id"], "sync/version")] == [
        float(v) for v in range(1, RL_STEPS + 1)
    ]
    assert set(summary["stages"]) == {"cma", "refine-rl"} and (run_dir / "stages" / "cma" / "rime_embedder.json").is_file()
    assert (run_dir / "eval" / "after-cma.json").is_file() and (run_dir / "eval" / "final.json").is_file()
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["learners.num_actors"] == "2"
    # the run dir is self-contained: its artifacts sit beside its mlflow.db, not in the cwd's ./mlruns
    assert run.info.artifact_uri.startswith((run_dir / "mlartifacts").resolve().as_uri()), run.info.artifact_uri
    assert [a.path for a in client.list_artifacts(run.info.run_id) if a.path == "config.yaml"] == ["config.yaml"]
    assert list((run_dir / "mlartifacts").rglob("config.yaml")), "the logged config is not in the run dir"
    assert "eval/gen_to_disc/hit@1".replace("@", "_at_") in run.data.metrics
    assert {"data/mix/0/share", "data/mix/1/share"} <= set(run.data.metrics)  # both stages drew from the mixture
    assert run.data.params["data.mix"].endswith("mix-a:2," + str(tmp / "mix-b") + ":1")


def _probe_history(client, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every probe/* and probe_greedy/* metric of a run: (step, value) in step order."""
    keys = [k for k in client.get_run(run_id).data.metrics if k.startswith(("probe/", "probe_greedy/"))]
    return {k: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, k), key=lambda m: m.step)] for k in keys}


def test_killed_driver_resumes_to_same_step_run_and_weights(runs):
    killed_at, r = runs.killed_at, runs.resume
    assert killed_at["step"] < STEPS and not killed_at["finished"]
    assert r.returncode == 0, r.stderr[-4000:]
    assert "resumed from step" in r.stdout + r.stderr
    run_dir = runs.tmp / "runs" / "killed"
    done = json.loads((run_dir / "state.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert done["finished"] and done["step"] == STEPS
    assert done["mlflow_run_id"] == killed_at["mlflow_run_id"] == summary["mlflow_run_id"]
    assert summary["checksums"] == pytest.approx(runs.summary["checksums"], rel=1e-9)  # exact resume: same data, same state
    import mlflow

    # the probe after a resume: the same queries and sampling seed on the same weights, so the same numbers
    straight_db, killed_db = runs.tmp / "runs" / "straight" / "mlflow.db", run_dir / "mlflow.db"
    straight = _probe_history(mlflow.MlflowClient(f"sqlite:///{straight_db}"), runs.summary["mlflow_run_id"])
    resumed = _probe_history(mlflow.MlflowClient(f"sqlite:///{killed_db}"), summary["mlflow_run_id"])
    assert straight and resumed.keys() == straight.keys()
    for key, hist in straight.items():
        assert [s for s, _ in resumed[key]] == [s for s, _ in hist], key
        assert [v for _, v in resumed[key]] == pytest.approx([v for _, v in hist], rel=1e-6, abs=1e-6), key
    assert json.loads((run_dir / "final" / "rime_embedder.json").read_text())["matryoshka_dims"] == [64]


def test_bad_config_and_existing_run_dir_fail_fast(runs, capsys):
    from orchestrator.cli import main

    t = time.time()
    assert main(["train", "configs/tiny-cpu.yaml", "--set", "learners.zero_stag=1"]) == 2
    assert "learners.zero_stag: unknown key" in capsys.readouterr().err
    assert main(_cmd(runs.tmp, "straight")[3:]) == 2
    assert "exists; pass --resume" in capsys.readouterr().err
    assert time.time() - t < 60


def test_a_trainer_inside_the_callers_ray_session_leaves_it_running(ray_local, zoo_cache, tmp_path, capsys):
    """A driver that already runs Ray (a Ray job's entrypoint, a notebook) hands its session to the trainer:
    the run uses that cluster and, when it ends (here: a placement the cluster cannot host), does not shut
    down Ray under the caller, which ``ray.shutdown()`` in the trainer used to do."""
    from orchestrator.config import load_config
    from orchestrator.placement import PlacementError
    from orchestrator.train import Trainer

    ray = ray_local
    node = ray.get_runtime_context().get_node_id()
    argv = _cmd(tmp_path, "inside", "--set", "learners.cpus_per_actor=8", "--set", "data.mix=[]")  # data.path alone
    overrides = set_values(argv)
    with pytest.raises(PlacementError, match="placement: the roles need"):
        Trainer(load_config("configs/tiny-cpu.yaml", overrides)).run()
    assert ray.is_initialized() and ray.get_runtime_context().get_node_id() == node  # the caller's cluster, still up
    from orchestrator.cli import main

    assert main(argv[3:] + ["--set", "run.name=inside-cli"]) == 2  # the CLI says the same with exit code 2
    assert "placement: the roles need" in capsys.readouterr().err and ray.is_initialized()
    assert ray.get(ray.remote(lambda: 7).options(num_cpus=0).remote(), timeout=60) == 7
