"""``rime submit`` / ``rime jobs``: run ``rime train`` on a Ray cluster through the Ray Jobs API,
and per-size cluster profiles (``clusters/profiles/*.yaml``) that map roles to resources.

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
from typing import Any
from urllib.parse import urlparse

import yaml

from .placement import BUILTIN_RESOURCES, DATA_TASK_CPUS, NODE_RESOURCE_UNIT

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# What never goes into the uploaded working dir (gitignore syntax, relative to it; Ray also applies
# .gitignore by default, these hold even where it is missing or RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1).
EXCLUDES = [
    ".git", ".venv", ".venv-*", "__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache", "*.egg-info", ".rime_cache",
    "/runs", "/data", "/mlruns", "/mlartifacts", "*.db", "/build", "/dist",
]
ZOO_NAMES = ("tiny", "small")  # rime_model.zoo.BUILDERS, without importing torch into the submitting shell
FORWARDED_ENV = ("MLFLOW_TRACKING_URI",)  # copied from the submitting shell unless given with --env
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(RuntimeError):
    """Something that makes submission pointless; the message says what and how to fix it."""


# --------------------------------------------------------------------------- profiles
class ProfileError(ValueError):
    """A malformed profile or one whose roles cannot fit on its nodes; the message names file and key."""


# role in a profile -> (config section, {profile field: config key}); load_config checks the values
# (e.g. rollout.backend hf|vllm), and a key the config lacks fails loudly like any bad --set.
ROLE_KEYS: dict[str, tuple[str, dict[str, str]]] = {
    "learners": ("learners", {"count": "num_learners", "cpus": "cpus_per_learner", "gpus": "gpus_per_learner",
                              "node_resource": "node_resource"}),
    "rollout_workers": ("rollout", {"count": "num_workers", "cpus": "cpus_per_worker", "gpus": "gpus_per_worker",
                                    "backend": "backend", "node_resource": "node_resource"}),
    "reward_actors": ("reward", {"count": "num_actors", "cpus": "cpus_per_actor", "gpus": "gpus_per_actor",
                                 "node_resource": "node_resource"}),
}


@dataclass(frozen=True)
class NodeGroup:
    name: str
    count: int
    cpus: float
    gpus: float = 0.0
    memory_gib: float = 0.0
    head: bool = False
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources each node advertises


@dataclass(frozen=True)
class Role:
    name: str
    count: int
    cpus: float
    gpus: float = 0.0
    extra: dict = field(default_factory=dict)  # e.g. rollout backend, node_resource

    @property
    def node_resource(self) -> str:
        return str(self.extra.get("node_resource") or "")


@dataclass(frozen=True)
class Serving:
    cpus: float
    gpus: float
    min_replicas: int
    max_replicas: int


@dataclass(frozen=True)
class Profile:
    name: str
    path: str
    description: str
    nodes: tuple[NodeGroup, ...]
    driver_cpus: float
    roles: dict[str, Role]
    serving: Serving | None
    overrides: dict[str, Any]
    kuberay: dict[str, str]
    launcher: str = ""  # a Ray cluster launcher YAML whose node types are this profile's nodes

    @property
    def total(self) -> dict[str, float]:
        return {"CPU": sum(n.count * n.cpus for n in self.nodes), "GPU": sum(n.count * n.gpus for n in self.nodes)}


def _num(d: dict, key: str, where: str, *, integer: bool = False, default: Any = None, minimum: float = 0) -> Any:
    if key not in d:
        if default is None:
            raise ProfileError(f"{where}.{key}: required")
        return default
    v = d[key]
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok:
        raise ProfileError(f"{where}.{key}: expected {'an integer' if integer else 'a number'}, got {v!r}")
    if v < minimum:
        raise ProfileError(f"{where}.{key}: must be >= {minimum}, got {v}")
    return v


def _mapping(d: Any, where: str) -> dict:
    if not isinstance(d, dict):
        raise ProfileError(f"{where}: expected a mapping, got {type(d).__name__}")
    return d


def _only(d: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ProfileError(f"{where}.{unknown[0]}: unknown key; valid: {', '.join(sorted(allowed))}")


def load_profile(path: str | Path) -> Profile:
    """Parse and check a profile: required keys, types, role names, and that the roles fit its nodes."""
    p = Path(path)
    if not p.is_file():
        raise ProfileError(f"profile: file not found: {p}")
    raw = _mapping(yaml.safe_load(p.read_text()) or {}, f"{p.name}")
    w = p.name
    _only(raw, {"name", "description", "nodes", "driver", "roles", "serving", "overrides", "kuberay", "launcher"}, w)
    for k in ("name", "nodes", "roles"):
        if k not in raw:
            raise ProfileError(f"{w}: {k}: required")
    if not isinstance(raw["nodes"], list) or not raw["nodes"]:
        raise ProfileError(f"{w}: nodes: expected a non-empty list of node groups")
    nodes = []
    for i, n in enumerate(raw["nodes"]):
        where = f"{w}: nodes[{i}]"
        n = _mapping(n, where)
        _only(n, {"name", "count", "cpus", "gpus", "memory_gib", "head", "resources"}, where)
        res = _mapping(n.get("resources") or {}, f"{where}.resources")
        custom = {str(k): _num(res, k, f"{where}.resources") for k in res}
        if set(custom) & set(BUILTIN_RESOURCES):
            raise ProfileError(f"{where}.resources: custom resources only; give CPUs and GPUs as cpus/gpus")
        nodes.append(NodeGroup(str(n.get("name", f"group{i}")), _num(n, "count", where, integer=True, minimum=1),
                               _num(n, "cpus", where), _num(n, "gpus", where, default=0),
                               _num(n, "memory_gib", where, default=0), bool(n.get("head", False)), custom))
    heads = [n for n in nodes if n.head]
    if len(heads) != 1 or heads[0].count != 1:
        raise ProfileError(f"{w}: nodes: exactly one node group with head: true and count: 1 is required")
    roles = {}
    for name, r in _mapping(raw["roles"], f"{w}: roles").items():
        where = f"{w}: roles.{name}"
        if name not in ROLE_KEYS:
            raise ProfileError(f"{where}: unknown role; valid: {', '.join(ROLE_KEYS)}")
        r = _mapping(r, where)
        _only(r, set(ROLE_KEYS[name][1]), where)
        extra = {k: v for k, v in r.items() if k not in ("count", "cpus", "gpus")}
        roles[name] = Role(name, _num(r, "count", where, integer=True, minimum=1), _num(r, "cpus", where),
                           _num(r, "gpus", where, default=0), extra)
    if "learners" not in roles:
        raise ProfileError(f"{w}: roles.learners: required (every stage trains on learners)")
    serving = None
    if raw.get("serving") is not None:
        s = _mapping(raw["serving"], f"{w}: serving")
        _only(s, {"cpus", "gpus", "min_replicas", "max_replicas"}, f"{w}: serving")
        serving = Serving(_num(s, "cpus", f"{w}: serving"), _num(s, "gpus", f"{w}: serving", default=0),
                          _num(s, "min_replicas", f"{w}: serving", integer=True, minimum=0),
                          _num(s, "max_replicas", f"{w}: serving", integer=True, minimum=1))
        if serving.min_replicas > serving.max_replicas:
            raise ProfileError(f"{w}: serving.min_replicas: {serving.min_replicas} > max_replicas {serving.max_replicas}")
    overrides = _mapping(raw.get("overrides") or {}, f"{w}: overrides")
    for k in overrides:
        if not isinstance(k, str) or k.count(".") != 1:
            raise ProfileError(f"{w}: overrides.{k}: use section.key (a key of orchestrator/config.py)")
        if any(k == f"{sec}.{key}" for sec, keys in ROLE_KEYS.values() for key in keys.values()):
            raise ProfileError(f"{w}: overrides.{k}: set by roles; change the role instead")
    driver = _mapping(raw.get("driver") or {}, f"{w}: driver")
    _only(driver, {"cpus"}, f"{w}: driver")
    driver_cpus = _num(driver, "cpus", f"{w}: driver", default=DATA_TASK_CPUS)
    if driver_cpus + 1e-9 < DATA_TASK_CPUS:
        raise ProfileError(f"{w}: driver.cpus: {driver_cpus:g} is less than the {DATA_TASK_CPUS:g} CPU a run keeps free for "
                           "Ray Data (its parquet ListFiles task asks a whole CPU; orchestrator/placement.py "
                           "DATA_TASK_CPUS): the job would hang reading data; shrink the roles instead")
    prof = Profile(str(raw["name"]), str(p), str(raw.get("description", "")), tuple(nodes),
                   driver_cpus, roles, serving, dict(overrides),
                   {str(k): str(v) for k, v in _mapping(raw.get("kuberay") or {}, f"{w}: kuberay").items()},
                   str(raw.get("launcher") or ""))
    check_fits(prof)
    return prof


def pack(roles: list[Role], nodes: list[NodeGroup], driver_cpus: float = 0.0) -> dict[str, list[str]]:
    """First-fit-decreasing placement of every actor on the nodes (the driver and Ray Data tasks keep
    ``driver_cpus`` on the head; a role with a node_resource goes only where that resource is left).
    Returns node -> roles placed; raises ProfileError when one cannot fit."""
    free = []
    for g in nodes:
        for i in range(g.count):
            free.append({"name": f"{g.name}[{i}]", "CPU": g.cpus - (driver_cpus if g.head else 0), "GPU": g.gpus,
                         "custom": dict(g.resources), "roles": []})
    if any(n["CPU"] < -1e-9 for n in free):
        raise ProfileError(f"driver.cpus: {driver_cpus:g} CPU does not fit on the head node")
    actors = sorted(((r, i) for r in roles for i in range(r.count)), key=lambda a: (-a[0].gpus, -a[0].cpus))
    for role, i in actors:
        pool = role.node_resource
        for n in free:
            if n["CPU"] + 1e-9 >= role.cpus and n["GPU"] + 1e-9 >= role.gpus \
                    and (not pool or n["custom"].get(pool, 0) + 1e-9 >= NODE_RESOURCE_UNIT):
                n["CPU"] -= role.cpus
                n["GPU"] -= role.gpus
                if pool:
                    n["custom"][pool] -= NODE_RESOURCE_UNIT
                n["roles"].append(f"{role.name}[{i}]")
                break
        else:
            left = ", ".join(f"{n['name']}: {n['CPU']:g} CPU {n['GPU']:g} GPU" for n in free
                             if not pool or n["custom"].get(pool, 0) + 1e-9 >= NODE_RESOURCE_UNIT)
            where = f"free on the nodes with {pool!r} after the larger actors" if pool else "free after the larger actors"
            raise ProfileError(f"roles.{role.name}: actor {i} ({role.cpus:g} CPU, {role.gpus:g} GPU"
                               f"{', on ' + pool if pool else ''}) fits on no node; {where}: {left or 'none has it'}")
    return {n["name"]: n["roles"] for n in free}


def check_fits(profile: Profile) -> dict[str, list[str]]:
    try:
        return pack(list(profile.roles.values()), list(profile.nodes), profile.driver_cpus)
    except ProfileError as e:
        raise ProfileError(f"{Path(profile.path).name}: {e}") from None


def profile_overrides(profile: Profile) -> list[str]:
    """The profile as ``section.key=value`` overrides of the run config (roles first, then ``overrides``)."""
    out = ["cluster.address=auto"]
    for name, role in profile.roles.items():
        section, keys = ROLE_KEYS[name]
        vals = {"count": role.count, "cpus": role.cpus, "gpus": role.gpus, **role.extra}
        out += [f"{section}.{keys[k]}={_yaml_scalar(v)}" for k, v in vals.items()]
    out += [f"{k}={_yaml_scalar(v)}" for k, v in profile.overrides.items()]
    return out


def _yaml_scalar(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


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
            raise SubmitError(f"RAY_ADDRESS={env} is not a Ray dashboard address, which Ray Jobs need: pass --address "
                              "http://HEAD:8265 or set RAY_API_SERVER_ADDRESS=http://HEAD:8265")
        address = env or DEFAULT_ADDRESS
    address = address.strip().rstrip("/")
    if address.startswith("ray://"):
        raise SubmitError(f"--address {address}: that is a Ray Client address; Ray Jobs use the dashboard's HTTP "
                          "address, e.g. http://HEAD:8265")
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
    hint = ("start the head with `ray start --head --dashboard-host=0.0.0.0` (Jobs need the dashboard, "
            "port 8265 by default) or fix --address")
    try:
        r = requests.get(url, timeout=timeout_s, headers=headers)
    except requests.exceptions.Timeout:
        raise SubmitError(f"--address {address}: no answer from the Ray dashboard within {timeout_s:g}s; {hint}") from None
    except requests.exceptions.RequestException as e:
        reason = str(e.__context__ or e).split("] ")[-1][:200] if (e.__context__ or str(e)) else type(e).__name__
        raise SubmitError(f"--address {address}: cannot connect to a Ray dashboard ({reason}); {hint}") from None
    if r.status_code in (401, 403):
        raise SubmitError(f"--address {address}: the dashboard refused the request (HTTP {r.status_code}): the cluster uses "
                          "token authentication; export RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) with the cluster's token")
    try:
        body = r.json() if r.status_code == 200 else None
    except ValueError:
        body = None
    if not isinstance(body, dict) or "ray_version" not in body:
        raise SubmitError(f"--address {address}: answered HTTP {r.status_code} at /api/version but is not a Ray dashboard; "
                          "give the dashboard address (http://HEAD:8265), not the GCS (6379) or Serve (8000) port")
    return str(body["ray_version"])


def _parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for it in items:
        if "=" not in it or not it.split("=", 1)[0]:
            raise SubmitError(f"--env {it!r}: use KEY=VALUE")
        k, v = it.split("=", 1)
        env[k] = v
    return env


def build_job(config: str, overrides: list[str] | None = None, *, profile: str | None = None,
              working_dir: str | None = None, env: list[str] | None = None, resume: bool = False,
              overwrite: bool = False, python: str = "python", submission_id: str | None = None) -> JobSpec:
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
        raise SubmitError(f"config {config}: outside the working dir {wd}, so the cluster would not receive it; "
                          "move it under the working dir or pass --working-dir") from None
    if not (wd / "orchestrator" / "cli.py").is_file():
        raise SubmitError(f"--working-dir {wd}: not a rime checkout (no orchestrator/cli.py); run from the repository root "
                          "or pass --working-dir")
    sets = profile_overrides(load_profile(profile)) if profile else []
    user = list(overrides or [])
    sets += user
    if not any(s.split("=", 1)[0].strip() == "cluster.address" for s in sets):
        sets.append("cluster.address=auto")  # the driver joins the cluster it runs on
    cfg = load_config(cfg_path, sets)  # ConfigError names the key, in seconds, before any upload
    if not cfg.cluster.address:
        raise SubmitError("cluster.address: empty would start a second, local Ray inside the job; leave it unset "
                          "(rime submit sets auto) or give the cluster's address")
    warnings = []
    for key, val in (("run.out_dir", cfg.run.out_dir), ("data.path", cfg.data.path)):
        if not Path(val).is_absolute():
            warnings.append(f"{key}={val} is relative: on the cluster it resolves inside the job's temporary copy of "
                            "the working dir; use an absolute path on shared storage to keep the run")
    model_path = local_model_path(cfg.model.spec)
    if model_path is not None:
        where = ("is relative: the job resolves it inside its copy of the working dir, which leaves out "
                 f"{', '.join(e for e in EXCLUDES if e.startswith('/'))}" if not Path(model_path).is_absolute()
                 else "is read on the cluster's nodes, not here: it must be on storage they share")
        warnings.append(f"model.spec={cfg.model.spec} {where}; or pass the models:/ URI a run logged "
                        "(tracking.log_model) with an MLflow server as MLFLOW_TRACKING_URI")
    env_vars = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    env_vars.update(_parse_env(env or []))
    uri = env_vars.get("MLFLOW_TRACKING_URI", "")
    if uri and not uri.startswith(("http://", "https://", "databricks", "postgresql", "mysql")):
        warnings.append(f"MLFLOW_TRACKING_URI={uri} is local to this machine; the job writes to the head's filesystem. "
                        "Use an MLflow server URI (rime mlflow-server) to see the run here")
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
        return client.submit_job(entrypoint=spec.entrypoint, runtime_env=spec.runtime_env, submission_id=spec.submission_id,
                                 metadata=spec.metadata, entrypoint_num_cpus=entrypoint_num_cpus or None)
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
    spec = build_job(args.config, args.set, profile=args.profile, working_dir=args.working_dir, env=args.env,
                     resume=args.resume, overwrite=args.overwrite, python=args.python, submission_id=args.submission_id)
    _print_warnings(spec)
    if args.dry_run:
        import json

        print(json.dumps({"address": address, "submission_id": spec.submission_id, "entrypoint": spec.entrypoint,
                          "runtime_env": spec.runtime_env, "metadata": spec.metadata}, indent=2))
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
    s.add_argument("--address", default=None, help=f"Ray dashboard address (default $RAY_API_SERVER_ADDRESS, else {DEFAULT_ADDRESS})")
    s.add_argument("--profile", default=None, help="clusters/profiles/<size>.yaml: roles -> resources, as config overrides")
    s.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value (after the profile)")
    s.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="env var for the job (MLFLOW_TRACKING_URI is forwarded by default)")
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
    for name, help_ in (("list", "all jobs on the cluster"), ("status", "a job's status"), ("logs", "a job's logs"),
                        ("stop", "stop a running job")):
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
