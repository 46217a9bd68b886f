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


def test_a_token_cluster_is_reached_with_the_token_and_refused_without_it(tmp_path):
    """A dashboard behind Ray's token auth (here a stand-in that wants ``Bearer sekret``): with RAY_AUTH_MODE=token
    and the token in the environment the check passes (the Jobs SDK sends the same header); without, the
    error says what to export. In subprocesses: Ray reads the auth mode once per process."""

    class TokenDashboard(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            ok = self.headers.get("Authorization") == "Bearer sekret"
            self.send_response(200 if ok else 401)
            self.end_headers()
            self.wfile.write(json.dumps({"ray_version": "2.60.0"} if ok else {}).encode())

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), TokenDashboard)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    code = f"from orchestrator.submit import check_address; print(check_address('http://127.0.0.1:{srv.server_address[1]}'))"
    try:
        for mode, out in (("token", "2.60.0"), ("disabled", "export RAY_AUTH_MODE=token and the cluster's token")):
            env = {**_env(RAY_AUTH_TOKEN="sekret", HOME=str(tmp_path)), "RAY_AUTH_MODE": mode}
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
            assert out in r.stdout + r.stderr, (mode, r.stderr[-2000:])
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


def test_ablate_submit_runs_each_run_as_rime_submit_follow(tmp_path, capsys, monkeypatch):
    """`rime ablate --submit ADDRESS -- SUBMIT_ARGS` checks the address once, before anything trains, then trains
    every run with its own `rime submit CONFIG --address ADDRESS --follow` (here recorded, not run; what such a
    submission does: test_a_submitted_train_job_runs_on_the_head_... below): --runs-dir and a local --start
    made absolute (the job runs in an uploaded copy of the checkout, where a relative path points nowhere),
    the --set before `--` and the `rime submit` arguments after it (--profile, --env, --set) passed through,
    the arm's overrides last; with an http(s) MLFLOW_TRACKING_URI each run, and its zero-step control, is
    scored from the models:/ URI its job printed."""
    from test_plume_ablation import FakeBackend  # tests/ is on sys.path (pytest prepend import mode)

    from orchestrator.ablate_arms import LocalBackend
    from orchestrator.cli import build_parser, main

    monkeypatch.chdir(ROOT)  # the relative paths below are relative to the checkout, as a user gives them
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    start = tmp_path / "start"
    start.mkdir()  # a local start model (never loaded: nothing trains)
    (tmp_path / "test" / "test").mkdir(parents=True)
    (tmp_path / "test" / "test" / "queries.parquet").touch()  # the test queries exist: none are generated
    reached, submitted, scored = [], [], []
    monkeypatch.setattr("orchestrator.submit.check_address", lambda address, **kw: reached.append(address))
    real_run = subprocess.run

    def fake_run(argv, *a, stdout=None, **kw):
        if argv[1:3] != ["-m", "orchestrator.cli"]:
            return real_run(argv, *a, stdout=stdout, **kw)
        assert reached, "the address is checked before the first run"
        submitted.append(argv)
        run = set_values(argv)[0].split("=", 1)[1]
        stdout.write(f'job done\n{{"model_uri": "models:/m-{run}"}}\n')  # what the job's `rime train` prints last
        return subprocess.CompletedProcess(argv, 0)

    def fake_score(self, run, model, report, log, zero_steps):
        scored.append((run.run_name, model, zero_steps))
        FakeBackend().score(run, model, report, log, zero_steps)

    monkeypatch.setattr("orchestrator.ablate_arms.subprocess.run", fake_run)
    monkeypatch.setattr(LocalBackend, "score", fake_score)
    runs_dir = tmp_path / "runs"
    argv = [
        "ablate",
        "--name",
        "jobs",
        "--start",
        os.path.relpath(start, ROOT),
        "--seeds",
        "0,1",
        "--runs-dir",
        os.path.relpath(runs_dir, ROOT),
        "--out",
        str(tmp_path / "out"),
        "--test-data",
        str(tmp_path / "test"),
        "--test-queries",
        "6",
        "--submit",
        "127.0.0.1:8265",
        "--set",
        f"data.path={tmp_path / 'data'}",
        "--",
        "--profile",
        PROFILE,
        "--env",
        "RIME_CACHE=/shared/cache",
        "--set",
        "plume.segments=1",
    ]
    assert main(argv) == 0, capsys.readouterr().err[-3000:]
    err = capsys.readouterr().err
    address = "http://127.0.0.1:8265"
    assert reached == [address] and f"runs train as Ray jobs on {address}, writing to {runs_dir.resolve()}" in err
    arms = {"nocur": ["plume.curriculum=false", "plume.probe_queries_per_task=0"], "cur": []}  # the default arms
    runs = [(f"jobs-m0-seed{seed}-{arm}", seed, overrides) for seed in (0, 1) for arm, overrides in arms.items()]
    assert len(submitted) == len(runs) == err.count("as a Ray job")  # one submission per run
    for argv, (name, seed, overrides) in zip(submitted, runs):
        head = [sys.executable, "-m", "orchestrator.cli", "submit", "configs/plume-referring.yaml", "--address", address]
        assert argv[:9] == [*head, "--follow", "--overwrite"]
        ns = build_parser().parse_args(argv[3:])
        assert (ns.profile, ns.env) == (PROFILE, ["RIME_CACHE=/shared/cache"])
        assert ns.set == [
            f"run.name={name}",
            f"run.seed={seed}",
            f"run.out_dir={runs_dir.resolve()}",
            f"model.spec={start.resolve()}",
            f"data.path={tmp_path / 'data'}",
            "plume.segments=1",
            *overrides,
        ]
        spec = build_job(ns.config, ns.set, profile=ns.profile, working_dir=ns.working_dir, env=ns.env)  # what it submits
        assert spec.runtime_env["env_vars"] == {
            "MLFLOW_TRACKING_URI": "http://mlflow.example:5000",
            "RIME_CACHE": "/shared/cache",
        }
        assert spec.metadata["run_name"] == name and "cluster.address=auto" in set_values(spec.entrypoint.split())
    names = [name for name, _, _ in runs]
    assert sorted(scored) == sorted(
        [(n, f"models:/m-{n}", False) for n in names] + [(n, f"models:/m-{n}", True) for n in names if n.endswith("-cur")]
    )
    assert json.loads((tmp_path / "out" / "compare.json").read_text())["summary"]["runs"] == 2


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
@pytest.mark.timeout(600)
def test_a_submitted_train_job_runs_on_the_head_and_logs_to_the_mlflow_server(
    head_and_mlflow, zoo_cache, tiny, capsys, monkeypatch
):
    """`rime submit --follow` end to end, as `rime ablate --submit` runs it per run (the command lines it builds:
    test_ablate_submit_runs_each_run_as_rime_submit_follow): `rime train` runs as a Ray job on a real head (its
    driver joins the cluster), starts from a local model folder given by its absolute path, writes its run
    under an absolute run.out_dir (the job runs in an uploaded copy of the checkout, where a relative path
    points nowhere), takes the profile with the user's --set winning, and logs metrics, params, artifacts
    (through the server's artifact proxy) and the model to the MLflow server the submitting shell names;
    the model loads back here from the server alone (no storage shared with the cluster needed), as
    ablate's eval loads it. `rime jobs` reads the same job back."""
    import mlflow
    import torch
    from mlflow import MlflowClient
    from ray.job_submission import JobSubmissionClient

    from orchestrator.ablate_arms import logged_model_uri
    from orchestrator.cli import main
    from rime_model import Embedder, load_embedder

    c = head_and_mlflow
    tmp = c["tmp"] / "job"
    start = tiny.save(tmp / "start")  # a saved embedder folder, as a finished run's `final/` is
    run = "job"
    sets = [*_tiny_sets(tmp, run, 2), *set_args({"model.spec": start, "learners.num_actors": 1, "tracking.log_model": "true"})]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", c["uri"])  # forwarded to the job from the submitting shell
    capsys.readouterr()
    rc = main(
        ["submit", CONFIG, "--address", c["address"], "--follow", "--profile", PROFILE, "--env", f"RIME_CACHE={zoo_cache}", *sets]
    )
    log = capsys.readouterr().out  # the job's logs, followed
    assert rc == 0, log[-4000:]
    job_id = re.search(r"submitted job (\S+) to", log).group(1)
    assert f"job {job_id}: SUCCEEDED" in log
    cfg = yaml.safe_load((tmp / "runs" / run / "config.yaml").read_text())  # written by the job, read here
    assert cfg["cluster"]["address"] == "auto" and cfg["run"]["stages"] == ["cma"]
    assert cfg["run"]["out_dir"] == str(tmp / "runs") and cfg["model"]["spec"] == str(start.resolve())
    job = next(j for j in JobSubmissionClient(c["address"]).list_jobs() if j.submission_id == job_id)
    assert str(job.status.value) == "SUCCEEDED" and job.metadata["run_name"] == run

    # the run, as the MLflow server holds it
    run_id = re.search(rf"\[rime\] mlflow run (\w+) at {re.escape(c['uri'])}", log).group(1)
    client = MlflowClient(tracking_uri=c["uri"])
    logged = client.get_run(run_id)
    assert logged.info.status == "FINISHED" and logged.data.params["run.name"] == run
    assert logged.data.params["cluster.address"] == "auto" and logged.data.params["learners.num_actors"] == "1"
    steps = json.loads((tmp / "runs" / run / "summary.json").read_text())["steps"]
    hist = client.get_metric_history(run_id, "train/loss")
    assert steps == 2 and [m.step for m in hist] == list(range(1, steps + 1)) and all(m.value > 0 for m in hist)
    assert "config.yaml" in {a.path for a in client.list_artifacts(run_id)}  # through the server's proxy
    stored = [f for f in c["artifacts"].rglob("config.yaml") if run_id in str(f)]
    assert stored and yaml.safe_load(stored[0].read_text())["cluster"]["address"] == "auto"
    model_uri = logged_model_uri(log)  # what rime ablate scores: the models:/ URI the job printed
    assert model_uri and model_uri.startswith("models:/")
    try:
        mlflow.set_tracking_uri(c["uri"])
        served = load_embedder(model_uri)
    finally:
        mlflow.set_tracking_uri(None)  # the env var it exports is restored by monkeypatch
    final = Embedder.load(tmp / "runs" / run / "final").model.state_dict()
    assert all(torch.equal(v, final[k]) for k, v in served.model.state_dict().items())

    # `rime jobs` wraps the same API
    assert main(["jobs", "status", job_id, "--address", c["address"]]) == 0
    assert capsys.readouterr().out.strip().startswith(f"{job_id}: SUCCEEDED")
    assert main(["jobs", "list", "--address", c["address"]]) == 0
    assert re.search(rf"{job_id}\s+SUCCEEDED", capsys.readouterr().out)
    assert main(["jobs", "logs", job_id, "--address", c["address"]]) == 0
    assert f"[rime] mlflow run {run_id}" in capsys.readouterr().out
    assert main(["jobs", "status", "no-such-job", "--address", c["address"]]) == 2
    assert "job no-such-job: not found" in capsys.readouterr().err
