"""`rime submit` / `rime jobs` / `rime mlflow-server`: what fails before submission fails in seconds with a
message naming the problem, and end to end on a real `ray start --head` (own ports and temp dir, stopped
afterwards) the tiny config trains as a Ray job and its metrics land in an `mlflow server`."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import pytest
import yaml
from rime_cli import clean_env, set_values
from rime_cli import sets as set_args

from orchestrator.config import ConfigError
from orchestrator.submit import EXCLUDES, SubmitError, build_job, check_address, normalize_address

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
CONFIG = "configs/tiny-cpu.yaml"
PROFILE = "clusters/profiles/cpu-2.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict:
    """This process's env without a tracking URI or Ray address other tests may have exported, the venv
    first on PATH (the head's `python` is the venv's, as after `source .venv/bin/activate`)."""
    return clean_env(PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}", RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1", **extra)


# --------------------------------------------------------------------------- before submission
def test_job_spec_joins_the_cluster_uploads_the_checkout_and_forwards_tracking(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    spec = build_job(
        CONFIG, ["cma.steps=7", "learners.zero_stage=2"], profile=PROFILE, working_dir=str(ROOT), env=["RIME_CACHE=/shared/cache"]
    )
    argv = spec.entrypoint.split()
    assert argv[:5] == ["python", "-m", "orchestrator.cli", "train", CONFIG]
    sets = set_values(argv)
    assert sets.count("cluster.address=auto") == 1
    # profile first, the user's --set after it (so they win), both applied
    assert sets.index("learners.zero_stage=1") < sets.index("learners.zero_stage=2")
    assert "cma.steps=7" in sets and "learners.num_actors=2" in sets
    assert spec.runtime_env["working_dir"] == str(ROOT)
    assert spec.runtime_env["env_vars"] == {"MLFLOW_TRACKING_URI": "http://mlflow.example:5000", "RIME_CACHE": "/shared/cache"}
    assert spec.metadata["rime_profile"] == "cpu-2.yaml" and spec.submission_id.startswith("rime-tiny-cpu-")
    assert any("run.out_dir=runs is relative" in w for w in spec.warnings)


def test_a_start_model_on_local_disk_is_flagged_before_submission():
    """A saved folder as model.spec is read on the cluster: a relative one from the job's upload, which leaves
    out /runs, an absolute one only where the nodes share it. Zoo names, hub ids and MLflow URIs need nothing."""
    from orchestrator.submit import ZOO_NAMES
    from rime_model.zoo import BUILDERS

    assert tuple(BUILDERS) == ZOO_NAMES

    def model_warnings(model):
        spec = build_job(CONFIG, [f"model.spec={model}"], working_dir=str(ROOT))
        return [w for w in spec.warnings if w.startswith("model.spec=")]

    for model in ("tiny", "small", "models:/m-0123", "runs:/abc/embedder", "hf:Qwen/Qwen2-VL-2B-Instruct"):
        assert model_warnings(model) == [], model
    relative = model_warnings("runs/ref-s0/final")
    assert len(relative) == 1 and "is relative" in relative[0] and "/runs" in relative[0] and "models:/" in relative[0]
    for model in ("/shared/ckpt/qwen-cot", "hf:/shared/Qwen2-VL-2B"):
        absolute = model_warnings(model)
        assert len(absolute) == 1 and "storage they share" in absolute[0], model


def test_excludes_keep_environments_runs_and_data_out_of_the_upload(tmp_path):
    from ray._private.runtime_env.packaging import _zip_files

    files = [
        ".venv/lib/x.py",
        ".venv-vllm/bin/python",
        "runs/tiny/ckpt.pt",
        "data/synth/train/q.parquet",
        "mlruns/0/m",
        "x/mlflow.db",
        "orchestrator/__pycache__/cli.cpython-311.pyc",
        ".git/HEAD",
        "orchestrator/cli.py",
        ".ruff_cache/0/x",
        "configs/tiny-cpu.yaml",
        "rime_data/pipeline.py",
        "rime_data/fixtures/data/keep.txt",
    ]
    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("x")
    out = tmp_path.parent / "pkg.zip"
    _zip_files(str(tmp_path), EXCLUDES, str(out), include_gitignore=False)
    names = {n for n in zipfile.ZipFile(out).namelist() if not n.endswith("/")}
    assert names == {"orchestrator/cli.py", "configs/tiny-cpu.yaml", "rime_data/pipeline.py", "rime_data/fixtures/data/keep.txt"}


def test_invalid_config_fails_in_seconds_naming_the_key():
    t = time.monotonic()
    with pytest.raises(ConfigError, match=r"learners\.zero_stag: unknown key; valid keys in 'learners'"):
        build_job(CONFIG, ["learners.zero_stag=1"], working_dir=str(ROOT))
    with pytest.raises(ConfigError, match=r"cma\.steps: must be >= 1"):
        build_job(CONFIG, ["cma.steps=0"], profile=PROFILE, working_dir=str(ROOT))
    assert time.monotonic() - t < 5


def test_config_outside_the_working_dir_or_missing_is_refused(tmp_path):
    outside = tmp_path / "c.yaml"
    outside.write_text((ROOT / CONFIG).read_text())
    with pytest.raises(SubmitError, match="outside the working dir .* the cluster would not receive it"):
        build_job(str(outside), working_dir=str(ROOT))
    with pytest.raises(SubmitError, match="config: file not found"):
        build_job("configs/nope.yaml", working_dir=str(ROOT))
    with pytest.raises(SubmitError, match="cluster.address: empty would start a second, local Ray"):
        build_job(CONFIG, ["cluster.address=''"], working_dir=str(ROOT))


def test_addresses_are_normalised_and_ray_client_addresses_refused(monkeypatch):
    assert normalize_address("head:8265") == "http://head:8265"
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert normalize_address(None) == "http://head:8265"
    for gcs in ("head:6379", "auto", "ray://head:10001"):  # a cluster, but not its Jobs API: no silent local guess
        monkeypatch.setenv("RAY_ADDRESS", gcs)
        with pytest.raises(SubmitError, match=f"RAY_ADDRESS={gcs} is not a Ray dashboard address"):
            normalize_address(None)
    monkeypatch.delenv("RAY_ADDRESS")
    assert normalize_address(None) == "http://127.0.0.1:8265"
    assert normalize_address("https://ray.example/") == "https://ray.example"
    with pytest.raises(SubmitError, match="Ray Client address; Ray Jobs use the dashboard's HTTP address"):
        normalize_address("ray://head:10001")


def test_unreachable_address_fails_in_seconds_saying_so():
    port = _free_port()  # nothing listens there
    t = time.monotonic()
    with pytest.raises(
        SubmitError, match=rf"--address http://127.0.0.1:{port}: cannot connect to a Ray dashboard .*ray start --head"
    ):
        check_address(f"http://127.0.0.1:{port}", timeout_s=3)
    assert time.monotonic() - t < 5


def test_a_server_that_is_not_a_ray_dashboard_is_named_as_such():
    class NotRay(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotRay)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with pytest.raises(SubmitError, match=r"answered HTTP 404 at /api/version but is not a Ray dashboard"):
            check_address(f"http://127.0.0.1:{srv.server_address[1]}", timeout_s=3)
    finally:
        srv.shutdown()


def test_a_silent_address_times_out_within_the_limit():
    with socket.socket() as s:  # accepts the TCP connection (backlog) but never answers HTTP
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        t = time.monotonic()
        with pytest.raises(SubmitError, match=r"no answer from the Ray dashboard within 1s"):
            check_address(f"http://127.0.0.1:{s.getsockname()[1]}", timeout_s=1)
        assert time.monotonic() - t < 4


def test_cli_reports_wrong_address_and_bad_config_with_exit_2():
    """The real command line. It pays the CLI's import time (torch via rime_model, ~8 s on 2 busy cores) on
    top of the checks timed above, so the bound here is looser."""
    port = _free_port()
    cmd = [sys.executable, "-m", "orchestrator.cli", "submit", CONFIG, "--address", f"127.0.0.1:{port}", "--timeout", "3"]
    t = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env(), cwd=ROOT)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"rime submit: error: --address http://127.0.0.1:{port}: cannot connect to a Ray dashboard" in r.stderr
    r2 = subprocess.run(
        cmd + ["--set", "learners.zero_stag=1"], capture_output=True, text=True, timeout=120, env=_env(), cwd=ROOT
    )
    assert r2.returncode == 2 and "rime submit: error: learners.zero_stag: unknown key" in r2.stderr, r2.stderr[-2000:]
    assert time.monotonic() - t < 90


def test_profile_command_prints_overrides_that_validate():
    from orchestrator.cli import main

    r = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "profile", "clusters/profiles/8gpu.yaml", "--sets", "--check-config", CONFIG],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == [
        "--set",
        "cluster.address=auto",
        "--set",
        "learners.num_actors=4",
        "--set",
        "learners.cpus_per_actor=10",
        "--set",
        "learners.gpus_per_actor=1",
        "--set",
        "rollout.num_actors=3",
        "--set",
        "rollout.cpus_per_actor=8",
        "--set",
        "rollout.gpus_per_actor=1",
        "--set",
        "rollout.backend=vllm",
        "--set",
        "reward.num_actors=1",
        "--set",
        "reward.cpus_per_actor=4",
        "--set",
        "reward.gpus_per_actor=1",
        "--set",
        "learners.precision=bf16",
        "--set",
        "rollout.vllm_python=/opt/rime-vllm/bin/python",
        "--set",
        "rollout.weight_sync=collective",
        "--set",
        "learners.zero_stage=2",
        "--set",
        "cluster.placement_timeout_s=600",
    ]
    assert main(["profile", "clusters/profiles/nope.yaml"]) == 2


def test_mlflow_server_command_line(tmp_path, capsys):
    from orchestrator.cli import main
    from orchestrator.mlflow_server import MlflowServerError, server_command

    assert main(["mlflow-server", "--dir", str(tmp_path / "m"), "--port", "5123", "--dry-run"]) == 0
    out = capsys.readouterr().out.split()
    assert out[1:] == [
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        "5123",
        "--backend-store-uri",
        f"sqlite:///{tmp_path / 'm' / 'mlflow.db'}",
        "--serve-artifacts",
        "--artifacts-destination",
        str(tmp_path / "m" / "artifacts"),
        "--workers",
        "2",
    ]
    assert Path(out[0]).name == "mlflow"
    with pytest.raises(MlflowServerError, match="expected sqlite:///PATH or postgresql"):
        server_command(backend="file:///tmp/mlruns")
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        with pytest.raises(MlflowServerError, match="Postgres needs psycopg2"):
            server_command(backend="postgresql://u:p@db/mlflow")
    else:
        assert "postgresql://u:p@db/mlflow" in server_command(backend="postgresql://u:p@db/mlflow")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        assert main(["mlflow-server", "--dir", str(tmp_path / "m"), "--port", str(s.getsockname()[1])]) == 2
    assert "already in use" in capsys.readouterr().err


# --------------------------------------------------------------------------- end to end
def _session_pids(sid: int) -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # state, ppid, pgrp, session, ...
        if int(fields[3]) == sid and fields[0] != "Z":  # zombies are gone, only not yet reaped
            pids.append(int(d))
    return pids


def _stop_sessions(sids: list[int], grace_s: float = 5) -> None:
    """End every process of the sessions this test started (its Ray head, its MLflow server), and only those:
    `ray stop` would also stop any other Ray on the machine."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in (p for sid in sids for p in _session_pids(sid)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while any(_session_pids(sid) for sid in sids) and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.fixture(scope="module")
def head_and_mlflow(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("submit")
    ray_tmp = tempfile.mkdtemp(prefix="rime-ray-", dir="/tmp")  # short: Ray's socket paths live under it
    m_port, dash = _free_port(), _free_port()
    sessions, procs = [], []
    try:
        mlflow = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "mlflow-server", "--port", str(m_port), "--dir", str(tmp / "mlflow")],
            stdout=open(tmp / "mlflow.log", "w"),
            stderr=subprocess.STDOUT,
            env=_env(),
            cwd=ROOT,
            start_new_session=True,
        )
        sessions.append(mlflow.pid)
        procs.append(mlflow)
        ports = {
            k: _free_port()
            for k in (
                "port",
                "ray-client-server-port",
                "dashboard-agent-listen-port",
                "dashboard-agent-grpc-port",
                "metrics-export-port",
                "runtime-env-agent-port",
                "node-manager-port",
                "object-manager-port",
            )
        }
        start = subprocess.Popen(
            [
                str(VENV_BIN / "ray"),
                "start",
                "--head",
                "--node-ip-address=127.0.0.1",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash}",
                "--num-cpus=2",
                "--include-dashboard=true",
                f"--temp-dir={ray_tmp}",
                "--object-store-memory=500000000",
                "--disable-usage-stats",
                *[f"--{k}={v}" for k, v in ports.items()],
            ],
            stdout=open(tmp / "ray_start.log", "w"),
            stderr=subprocess.STDOUT,
            env=_env(),
            cwd=ROOT,
            start_new_session=True,
        )
        sessions.append(start.pid)
        procs.append(start)
        assert start.wait(timeout=120) == 0, (tmp / "ray_start.log").read_text()[-3000:]
        address, uri = f"http://127.0.0.1:{dash}", f"http://127.0.0.1:{m_port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                check_address(address, timeout_s=2)
                break
            except SubmitError:
                assert time.monotonic() < deadline, "the head's dashboard never answered"
                time.sleep(1)
        from orchestrator.mlflow_server import wait_healthy

        wait_healthy(uri, timeout_s=90, proc=mlflow)
        yield {"address": address, "uri": uri, "tmp": tmp, "artifacts": tmp / "mlflow" / "artifacts"}
    finally:
        import shutil

        _stop_sessions(sessions)
        for proc in procs:
            proc.wait(timeout=10)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        assert not any(_session_pids(sid) for sid in sessions), "processes of the test's Ray head or MLflow server survived"


def _tiny_sets(tmp: Path, name: str, steps: int) -> list[str]:
    sets = {
        "run.name": name,
        "run.stages": "cma",
        "run.out_dir": tmp / "runs",
        "data.path": tmp / "data",
        "data.transfer_path": "''",
        "data.synth_train": 8,
        "data.synth_val": 0,
        "data.synth_test": 4,
        "cma.steps": steps,
        "checkpoint.every_steps": 100,
        "learners.micro_batch_size": 4,
        "eval.before_training": "false",
        "eval.max_queries_per_task": 2,
        "eval.query_modes": "disc",
        "eval.cand_modes": "disc",
        "eval.max_new_tokens": 4,
        "tracking.log_model": "false",
    }
    return set_args(sets)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_jobs_stop_ends_a_running_submission(head_and_mlflow, zoo_cache, capsys):
    from orchestrator.cli import main

    c = head_and_mlflow
    sets = _tiny_sets(c["tmp"], "stopped", 10_000)[1::2]
    capsys.readouterr()
    assert (
        main(
            [
                "submit",
                CONFIG,
                "--address",
                c["address"],
                "--profile",
                PROFILE,
                "--env",
                f"RIME_CACHE={zoo_cache}",
                "--env",
                f"MLFLOW_TRACKING_URI={c['uri']}",
                *[a for s in sets for a in ("--set", s)],
            ]
        )
        == 0
    )
    job_id = re.search(r"submitted job (\S+) to", capsys.readouterr().out).group(1)
    from ray.job_submission import JobSubmissionClient

    jc = JobSubmissionClient(c["address"])
    deadline = time.monotonic() + 120
    while str(jc.get_job_status(job_id).value) == "PENDING":
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(1)
    assert str(jc.get_job_status(job_id).value) == "RUNNING"
    assert main(["jobs", "stop", job_id, "--address", c["address"], "--wait", "60"]) == 0
    assert capsys.readouterr().out.strip() == f"{job_id}: stop requested; status STOPPED"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ablate_submits_a_run_that_trains_on_the_head_and_logs_to_the_mlflow_server(head_and_mlflow, zoo_cache, tiny, capsys):
    """`rime ablate --submit ADDRESS` runs `rime submit --follow` per run, so this is also the end-to-end test
    of `rime submit`: the run is a Ray job on a real head (its driver joins the cluster), starts from a local
    model folder given by a relative path and writes its run under --runs-dir (both made absolute, since
    the job runs in an uploaded copy of the checkout, where a relative path points nowhere), and logs
    metrics, params and artifacts to the forwarded MLflow server (through its artifact proxy), from which
    the eval loads the run's model (no storage shared with the cluster needed). `rime jobs` reads the same
    job back. Three of the four runs' reports are the start model scored up front, so one run is submitted."""
    from test_plume_ablation import TRAIN_ARGS, prescore  # tests/ is on sys.path (pytest prepend import mode)

    c = head_and_mlflow
    tmp = c["tmp"] / "ablation"
    start = tiny.save(tmp / "start")  # a saved embedder folder, as a finished run's `final/` is
    prescore(tmp, tmp / "out", str(start))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "ablate",
            "--name",
            "jobs",
            "--start",
            os.path.relpath(start, ROOT),
            "--seeds",
            "0,1",
            "--runs-dir",
            os.path.relpath(tmp / "runs", ROOT),
            "--out",
            str(tmp / "out"),
            "--test-data",
            str(tmp / "test"),
            "--test-queries",
            "6",
            "--submit",
            c["address"],
            "--set",
            f"data.path={tmp / 'data'}",
            "--",
            "--profile",
            PROFILE,
            "--env",
            f"RIME_CACHE={zoo_cache}",
            *TRAIN_ARGS,
            "--set",
            "tracking.log_model=true",
        ],  # what the eval loads from the MLflow server
        capture_output=True,
        text=True,
        timeout=840,
        env=_env(MLFLOW_TRACKING_URI=c["uri"]),
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stderr.count("as a Ray job") == 1 and r.stderr.count("[ablate] scored") == 1
    run = "jobs-m0-seed0-cur"
    log = (tmp / "out" / "logs" / f"{run}.log").read_text()
    job_id = re.search(r"submitted job (\S+) to", log).group(1)
    assert f"job {job_id}: SUCCEEDED" in log
    cfg = yaml.safe_load((tmp / "runs" / run / "config.yaml").read_text())  # written by the job, read here
    assert cfg["cluster"]["address"] == "auto" and cfg["plume"]["curriculum"] is True
    assert cfg["run"]["seed"] == 0 and cfg["run"]["out_dir"] == str(tmp / "runs")
    assert cfg["model"]["spec"] == str(start.resolve())
    report = json.loads((tmp / "out" / "reports" / "m0-seed0-cur.json").read_text())
    assert report["model"].startswith("models:/") and report["model"] in log  # the model this job logged
    control = json.loads((tmp / "out" / "reports" / "m0-seed0-cur-k0.json").read_text())  # its zero-step control
    assert control["model"] == report["model"] and control["latent_steps"] == 0
    from ray.job_submission import JobSubmissionClient

    job = next(j for j in JobSubmissionClient(c["address"]).list_jobs() if j.submission_id == job_id)
    assert str(job.status.value) == "SUCCEEDED" and job.metadata["run_name"] == run
    out = json.loads((tmp / "out" / "compare.json").read_text())
    assert out["summary"]["runs"] == 2 and [x["n"] for x in out["runs"]] == [6, 6]

    # the run, as the MLflow server holds it: MLFLOW_TRACKING_URI came from the submitting shell
    from mlflow import MlflowClient

    run_id = re.search(rf"\[rime\] mlflow run (\w+) at {re.escape(c['uri'])}", log).group(1)
    client = MlflowClient(tracking_uri=c["uri"])
    logged = client.get_run(run_id)
    assert logged.info.status == "FINISHED" and logged.data.params["run.name"] == run
    assert logged.data.params["cluster.address"] == "auto" and logged.data.params["learners.num_actors"] == "1"
    steps = json.loads((tmp / "runs" / run / "summary.json").read_text())["steps"]
    hist = client.get_metric_history(run_id, "train/loss")
    assert steps > 0 and [m.step for m in hist] == list(range(1, steps + 1)) and all(m.value > 0 for m in hist)
    assert "config.yaml" in {a.path for a in client.list_artifacts(run_id)}  # through the server's proxy
    stored = [f for f in c["artifacts"].rglob("config.yaml") if run_id in str(f)]
    assert stored and yaml.safe_load(stored[0].read_text())["cluster"]["address"] == "auto"

    # `rime jobs` wraps the same API
    from orchestrator.cli import main

    capsys.readouterr()
    assert main(["jobs", "status", job_id, "--address", c["address"]]) == 0
    assert capsys.readouterr().out.strip().startswith(f"{job_id}: SUCCEEDED")
    assert main(["jobs", "list", "--address", c["address"]]) == 0
    assert re.search(rf"{job_id}\s+SUCCEEDED", capsys.readouterr().out)
    assert main(["jobs", "logs", job_id, "--address", c["address"]]) == 0
    assert f"[rime] mlflow run {run_id}" in capsys.readouterr().out
    assert main(["jobs", "status", "no-such-job", "--address", c["address"]]) == 2
    assert "job no-such-job: not found" in capsys.readouterr().err
