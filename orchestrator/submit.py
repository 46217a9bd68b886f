"""``rime submit`` / ``rime jobs``: run ``rime train`` on a Ray cluster through the Ray Jobs API,
with a cluster profile's overrides (``orchestrator.profiles``). The Ray Jobs client side (submitting,
following, ``rime jobs``) is ``orchestrator.jobs``.

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

The commands themselves (``rime submit``, ``rime jobs``, ``rime profile``) are ``orchestrator.submit_cli``.
"""

from __future__ import annotations

import getpass
import os
import secrets
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from .profiles import load_profile, profile_overrides

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
            "token authentication; export RAY_AUTH_MODE=token and the cluster's token as RAY_AUTH_TOKEN (or keep it in "
            "~/.ray/auth_token, or point RAY_AUTH_TOKEN_PATH at it)"
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
