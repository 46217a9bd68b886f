"""``rime submit`` / ``rime jobs``: run ``rime train`` on a Ray cluster through the Ray Jobs API,
with a cluster profile's overrides (``orchestrator.profiles``).

Everything that can be checked before a job exists is checked here, in seconds, in this order:
the config (``load_config`` with the profile's and the user's overrides: a typo names the dotted
key), the working dir (the config must be inside it, since that folder is what the cluster
receives), then the address (``GET /api/version`` with a short timeout: an unreachable head, a
Ray Client ``ray://`` address or something that is not a Ray dashboard fail with a message that
says which). Only then is the working dir uploaded and the job created.

The job's entrypoint is ``python -m orchestrator.cli train CONFIG --set cluster.address=auto …``
run by the head's Python inside the uploaded working dir, so the driver joins the cluster
instead of starting a local one, and the environment variables given (``MLFLOW_TRACKING_URI`` from
the shell by default) reach the driver and every actor it starts.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import secrets
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from .profiles import check_fits, load_profile, profile_overrides

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# What never goes into the uploaded working dir (gitignore syntax, relative to it; Ray also applies
# .gitignore by default, these hold even where it is missing or RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1).
EXCLUDES = [
    ".git",
    ".venv",
    ".venv-*",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
    ".rime_cache",
    "/runs",
    "/data",
    "/mlruns",
    "/mlartifacts",
    "*.db",
    "/build",
    "/dist",
]
ZOO_NAMES = ("tiny", "small")  # rime_model.zoo.BUILDERS, without importing torch into the submitting shell
FORWARDED_ENV = ("MLFLOW_TRACKING_URI",)  # copied from the submitting shell unless given with --env
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(RuntimeError):
    """Something that makes submission pointless; the message says what and how to fix it."""


# --------------------------------------------------------------------------- the job
@dataclass
class JobSpec:
    entrypoint: str
    runtime_env: dict
    submission_id: str
    metadata: dict
    warnings: list[str] = field(default_factory=list)


def normalize_address(address: str | None) -> str:
    """The dashboard's HTTP address (Jobs API); ``HEAD:8265`` gets ``http://``; ``ray://`` is refused."""
    if not address:
        env = os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or ""
        if env and not env.startswith(("http://", "https://")):
            # a GCS (HEAD:6379), "auto" or ray:// address names a cluster, but not its Jobs API; guessing
            # the local dashboard instead would send the job to whatever runs on this machine
            raise SubmitError(
                f"RAY_ADDRESS={env} is not a Ray dashboard address, which Ray Jobs need: pass --address "
                "http://HEAD:8265 or set RAY_API_SERVER_ADDRESS=http://HEAD:8265"
            )
        address = env or DEFAULT_ADDRESS
    address = address.strip().rstrip("/")
    if address.startswith("ray://"):
        raise SubmitError(
            f"--address {address}: that is a Ray Client address; Ray Jobs use the dashboard's HTTP address, e.g. http://HEAD:8265"
        )
    if "://" not in address:
        address = "http://" + address
    u = urlparse(address)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise SubmitError(f"--address {address}: expected http://HOST:PORT of the Ray dashboard (port 8265 by default)")
    return address


def check_address(address: str, timeout_s: float = 5.0) -> str:
    """Reach the dashboard's ``/api/version`` within ``timeout_s``; returns the cluster's Ray version."""
    import requests

    headers = {}
    try:
        from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled

        headers = get_auth_headers_if_auth_enabled({})
    except Exception:  # noqa: BLE001 - token auth helpers are optional; the SDK adds them again later
        pass
    url = f"{address}/api/version"
    hint = (
        "start the head with `ray start --head --dashboard-host=0.0.0.0` (Jobs need the dashboard, "
        "port 8265 by default) or fix --address"
    )
    try:
        r = requests.get(url, timeout=timeout_s, headers=headers)
    except requests.exceptions.Timeout:
        raise SubmitError(f"--address {address}: no answer from the Ray dashboard within {timeout_s:g}s; {hint}") from None
    except requests.exceptions.RequestException as e:
        reason = str(e.__context__ or e).split("] ")[-1][:200] if (e.__context__ or str(e)) else type(e).__name__
        raise SubmitError(f"--address {address}: cannot connect to a Ray dashboard ({reason}); {hint}") from None
    if r.status_code in (401, 403):
        raise SubmitError(
            f"--address {address}: the dashboard refused the request (HTTP {r.status_code}): the cluster uses "
            "token authentication; export RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) with the cluster's token"
        )
    try:
        body = r.json() if r.status_code == 200 else None
    except ValueError:
        body = None
    if not isinstance(body, dict) or "ray_version" not in body:
        raise SubmitError(
            f"--address {address}: answered HTTP {r.status_code} at /api/version but is not a Ray dashboard; "
            "give the dashboard address (http://HEAD:8265), not the GCS (6379) or Serve (8000) port"
        )
    return str(body["ray_version"])


def _parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for it in items:
        if "=" not in it or not it.split("=", 1)[0]:
            raise SubmitError(f"--env {it!r}: use KEY=VALUE")
        k, v = it.split("=", 1)
        env[k] = v
    return env


def build_job(
    config: str,
    overrides: list[str] | None = None,
    *,
    profile: str | None = None,
    working_dir: str | None = None,
    env: list[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    python: str = "python",
    submission_id: str | None = None,
) -> JobSpec:
    """Validate everything local and return the job to submit; raises SubmitError / ConfigError / ProfileError."""
    from .config import load_config

    wd = Path(working_dir or os.getcwd()).resolve()
    if not wd.is_dir():
        raise SubmitError(f"--working-dir {wd}: not a directory")
    cfg_path = Path(config)
    if not cfg_path.is_file():
        raise SubmitError(f"config: file not found: {config}")
    try:
        rel = cfg_path.resolve().relative_to(wd)
    except ValueError:
        raise SubmitError(
            f"config {config}: outside the working dir {wd}, so the cluster would not receive it; "
            "move it under the working dir or pass --working-dir"
        ) from None
    if not (wd / "orchestrator" / "cli.py").is_file():
        raise SubmitError(
            f"--working-dir {wd}: not a rime checkout (no orchestrator/cli.py); run from the repository root "
            "or pass --working-dir"
        )
    sets = profile_overrides(load_profile(profile)) if profile else []
    user = list(overrides or [])
    sets += user
    if not any(s.split("=", 1)[0].strip() == "cluster.address" for s in sets):
        sets.append("cluster.address=auto")  # the driver joins the cluster it runs on
    cfg = load_config(cfg_path, sets)  # ConfigError names the key, in seconds, before any upload
    if not cfg.cluster.address:
        raise SubmitError(
            "cluster.address: empty would start a second, local Ray inside the job; leave it unset "
            "(rime submit sets auto) or give the cluster's address"
        )
    warnings = []
    for key, val in (("run.out_dir", cfg.run.out_dir), ("data.path", cfg.data.path)):
        if not Path(val).is_absolute():
            warnings.append(
                f"{key}={val} is relative: on the cluster it resolves inside the job's temporary copy of "
                "the working dir; use an absolute path on shared storage to keep the run"
            )
    model_path = local_model_path(cfg.model.spec)
    if model_path is not None:
        where = (
            "is relative: the job resolves it inside its copy of the working dir, which leaves out "
            f"{', '.join(e for e in EXCLUDES if e.startswith('/'))}"
            if not Path(model_path).is_absolute()
            else "is read on the cluster's nodes, not here: it must be on storage they share"
        )
        warnings.append(
            f"model.spec={cfg.model.spec} {where}; or pass the models:/ URI a run logged "
            "(tracking.log_model) with an MLflow server as MLFLOW_TRACKING_URI"
        )
    env_vars = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    env_vars.update(_parse_env(env or []))
    uri = env_vars.get("MLFLOW_TRACKING_URI", "")
    if uri and not uri.startswith(("http://", "https://", "databricks", "postgresql", "mysql")):
        warnings.append(
            f"MLFLOW_TRACKING_URI={uri} is local to this machine; the job writes to the head's filesystem. "
            "Use an MLflow server URI (rime mlflow-server) to see the run here"
        )
    elif not uri and not cfg.tracking.uri:
        warnings.append("no MLFLOW_TRACKING_URI: the run logs to sqlite in its run dir on the cluster")
    argv = [python, "-m", "orchestrator.cli", "train", rel.as_posix()]
    for s in sets:
        argv += ["--set", s]
    if resume:
        argv.append("--resume")
    if overwrite:
        argv.append("--overwrite")
    sid = submission_id or f"rime-{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    runtime_env = {"working_dir": str(wd), "excludes": list(EXCLUDES), "env_vars": env_vars}
    meta = {"rime_config": rel.as_posix(), "run_name": cfg.run.name, "submitted_by": getpass.getuser()}
    if profile:
        meta["rime_profile"] = Path(profile).name
    return JobSpec(shlex.join(argv), runtime_env, sid, meta, warnings)


def client_for(address: str, timeout_s: float = 5.0):
    """A JobSubmissionClient, after checking the address answers like a Ray dashboard."""
    check_address(address, timeout_s)
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # noqa: BLE001 - the SDK raises bare ConnectionError/RuntimeError
        raise SubmitError(f"--address {address}: {e}") from None


def local_model_path(spec: str) -> str | None:
    """The filesystem path a ``model.spec`` names (a saved folder, or ``hf:`` with a path), else None (a zoo
    name, which every node builds; a hub id; an MLflow URI, which every node downloads)."""
    from rime_model.mlflow_uri import is_mlflow_uri

    if spec in ZOO_NAMES or is_mlflow_uri(spec):
        return None
    if spec.startswith("hf:"):
        path = spec[3:]
        return path if path.startswith(("/", ".", "~")) or Path(path).exists() else None
    return spec


def submit(spec: JobSpec, address: str, entrypoint_num_cpus: float = 0.0, timeout_s: float = 5.0) -> str:
    client = client_for(address, timeout_s)
    try:
        return client.submit_job(
            entrypoint=spec.entrypoint,
            runtime_env=spec.runtime_env,
            submission_id=spec.submission_id,
            metadata=spec.metadata,
            entrypoint_num_cpus=entrypoint_num_cpus or None,
        )
    except Exception as e:  # noqa: BLE001
        raise SubmitError(f"submission to {address} failed: {e}") from None


def follow(client, job_id: str, out=None) -> str:
    """Stream the job's logs until it ends; returns its final status."""
    out = out or sys.stdout

    async def _tail():
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(_tail())
    return wait(client, job_id, timeout_s=60)


def wait(client, job_id: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(1.0)


# --------------------------------------------------------------------------- CLI handlers
def _print_warnings(spec: JobSpec) -> None:
    for w in spec.warnings:
        print(f"rime submit: warning: {w}", file=sys.stderr)


def cmd_submit(args) -> int:
    address = normalize_address(args.address)
    spec = build_job(
        args.config,
        args.set,
        profile=args.profile,
        working_dir=args.working_dir,
        env=args.env,
        resume=args.resume,
        overwrite=args.overwrite,
        python=args.python,
        submission_id=args.submission_id,
    )
    _print_warnings(spec)
    if args.dry_run:
        import json

        print(
            json.dumps(
                {
                    "address": address,
                    "submission_id": spec.submission_id,
                    "entrypoint": spec.entrypoint,
                    "runtime_env": spec.runtime_env,
                    "metadata": spec.metadata,
                },
                indent=2,
            )
        )
        return 0
    job_id = submit(spec, address, args.entrypoint_num_cpus, args.timeout)
    print(f"submitted job {job_id} to {address}")
    print(f"  logs:   rime jobs logs {job_id} --address {address} --follow")
    print(f"  status: rime jobs status {job_id} --address {address}")
    sys.stdout.flush()
    if not args.follow:
        return 0
    from ray.job_submission import JobSubmissionClient

    try:
        status = follow(JobSubmissionClient(address), job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running (rime jobs stop {job_id} --address {address})", file=sys.stderr)
        return 130
    print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def cmd_jobs(args) -> int:
    address = normalize_address(args.address)
    client = client_for(address, args.timeout)
    if args.jobs_command == "list":
        jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
        print(f"{'submission_id':44} {'status':10} {'started':19} entrypoint")
        for j in jobs:
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.start_time / 1000)) if j.start_time else "-"
            ep = j.entrypoint if len(j.entrypoint) <= 80 else j.entrypoint[:77] + "..."
            print(f"{str(j.submission_id or j.job_id):44} {str(j.status.value):10} {started:19} {ep}")
        return 0
    job_id = args.job_id
    try:
        info = client.get_job_info(job_id)
    except Exception as e:  # noqa: BLE001
        raise SubmitError(f"job {job_id}: not found at {address} ({str(e).splitlines()[0][:200]})") from None
    if args.jobs_command == "status":
        status = wait(client, job_id, args.wait) if args.wait else str(info.status.value)
        print(f"{job_id}: {status}" + (f" ({info.message})" if info.message and status != "RUNNING" else ""))
        return 0 if status != "FAILED" else 1
    if args.jobs_command == "logs":
        if args.follow:
            status = follow(client, job_id)
            print(f"job {job_id}: {status}")
        else:
            sys.stdout.write(client.get_job_logs(job_id))
        return 0
    if args.jobs_command == "stop":
        stopped = client.stop_job(job_id)
        status = wait(client, job_id, args.wait) if args.wait else str(client.get_job_status(job_id).value)
        print(f"{job_id}: {'stop requested' if stopped else 'already finished'}; status {status}")
        return 0
    raise SubmitError(f"unknown jobs command {args.jobs_command}")  # pragma: no cover - argparse restricts it


def cmd_profile(args) -> int:
    prof = load_profile(args.profile)
    if args.check_config:
        from .config import load_config

        load_config(args.check_config, profile_overrides(prof))
    placed = check_fits(prof)
    if args.sets:
        print(" ".join(f"--set {shlex.quote(s)}" for s in profile_overrides(prof)))
        return 0
    tot = prof.total
    print(f"{prof.name}: {prof.description}".rstrip(": "))
    print(f"  cluster: {tot['CPU']:g} CPU, {tot['GPU']:g} GPU in {sum(n.count for n in prof.nodes)} node(s)")
    for node, roles in placed.items():
        print(f"  {node}: {', '.join(roles) or '(driver only)'}")
    print("  overrides: " + " ".join(f"--set {shlex.quote(s)}" for s in profile_overrides(prof)))
    return 0


def add_parsers(sub) -> None:
    """Register ``submit``, ``jobs`` and ``profile`` on the ``rime`` CLI's subparsers."""
    s = sub.add_parser("submit", help="run `rime train CONFIG` on a Ray cluster through the Ray Jobs API")
    s.add_argument("config")
    s.add_argument(
        "--address", default=None, help=f"Ray dashboard address (default $RAY_API_SERVER_ADDRESS, else {DEFAULT_ADDRESS})"
    )
    s.add_argument("--profile", default=None, help="clusters/profiles/<size>.yaml: roles -> resources, as config overrides")
    s.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value (after the profile)"
    )
    s.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="env var for the job (MLFLOW_TRACKING_URI is forwarded by default)",
    )
    s.add_argument("--working-dir", default=None, help="folder uploaded to the cluster (default: the current directory)")
    s.add_argument("--follow", action="store_true", help="stream the job's logs until it ends; exit 0 only if it SUCCEEDED")
    s.add_argument("--resume", action="store_true")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--python", default="python", help="Python on the head that has rime's dependencies (default: python)")
    s.add_argument("--submission-id", default=None)
    s.add_argument("--entrypoint-num-cpus", type=float, default=0.0, help="CPUs reserved for the driver (default 0)")
    s.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the dashboard to answer")
    s.add_argument("--dry-run", action="store_true", help="validate and print the job without submitting")
    s.set_defaults(func=cmd_submit)

    j = sub.add_parser("jobs", help="list, inspect, stop and read logs of Ray jobs (same API as rime submit)")
    jsub = j.add_subparsers(dest="jobs_command", required=True)
    for name, help_ in (
        ("list", "all jobs on the cluster"),
        ("status", "a job's status"),
        ("logs", "a job's logs"),
        ("stop", "stop a running job"),
    ):
        c = jsub.add_parser(name, help=help_)
        if name != "list":
            c.add_argument("job_id")
        if name in ("status", "stop"):
            c.add_argument("--wait", type=float, default=0, metavar="SECONDS", help="wait up to SECONDS for the job to end")
        if name == "logs":
            c.add_argument("--follow", action="store_true")
        c.add_argument("--address", default=None)
        c.add_argument("--timeout", type=float, default=5.0)
    j.set_defaults(func=cmd_jobs)

    p = sub.add_parser("profile", help="show how a cluster profile places the roles, or print it as --set overrides")
    p.add_argument("profile")
    p.add_argument("--sets", action="store_true", help="print only the --set overrides")
    p.add_argument("--check-config", default=None, metavar="CONFIG", help="also validate CONFIG with the overrides")
    p.set_defaults(func=cmd_profile)
