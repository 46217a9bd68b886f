"""``rime serve``: deploy the Serve config's embedding application on a local (or joined) Ray.

The same ``configs/serve.yaml`` works with ``serve deploy`` on a cluster; locally this reads it,
applies the command-line overrides (model, host, port, replicas) and runs it.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import yaml

from actors.serve_auth import ENV_VAR, key_digest, split_keys


def local_model_spec(model: str) -> str:
    """A model path that exists here is made absolute: replicas do not share the driver's working dir.
    Zoo names, ``hf:`` and MLflow URIs pass through (replicas resolve those themselves)."""
    return str(Path(model).resolve()) if Path(model).exists() else model


def load_serve_config(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--config: {p} not found; pass a Ray Serve config file (see configs/serve.yaml)")
    cfg = yaml.safe_load(p.read_text()) or {}
    apps = cfg.get("applications") or []
    if len(apps) != 1 or "args" not in apps[0]:
        raise ValueError(f"{p}: applications: expected exactly one application with args (as in configs/serve.yaml)")
    return cfg


def served_name(model: str, configured: str | None, model_flag: bool) -> str:
    """The name ``/v1/models`` and every response report: ``--model-name``, else the model as the user gave
    it on the command line (a config's ``model_name`` describes the config's own model, not one passed
    with ``--model``), else the config's ``model_name`` or ``model``."""
    if configured and not model_flag:
        return configured
    return model.rstrip("/")


def fit_autoscaling(options: dict, cluster_cpus: float) -> tuple[dict, str | None]:
    """Cap ``max_replicas`` at what a local cluster can run: each replica holds ``num_cpus`` for its torch
    threads and one CPU stays with the HTTP proxy and the clients. More replicas than cores only split the
    same cores (measured: 1 -> 4 replicas on 2 cores took 70 req/s down to 14). GPU replicas are left alone."""
    scaling = options.get("autoscaling_config")
    actor = options.get("ray_actor_options") or {}
    if not scaling or actor.get("num_gpus"):
        return options, None
    per = float(actor.get("num_cpus", 1)) or 1.0
    fit = max(1, math.floor((cluster_cpus - 1) / per + 1e-9))
    want = int(scaling.get("max_replicas", 1))
    if want <= fit:
        return options, None
    capped = {**scaling, "max_replicas": fit, "min_replicas": min(int(scaling.get("min_replicas", 1)), fit)}
    note = (
        f"autoscaling max_replicas {want} -> {fit}: this Ray has {cluster_cpus:g} CPUs, each replica takes "
        f"ray_actor_options.num_cpus={per:g} and one stays with the HTTP proxy"
    )
    return {**options, "autoscaling_config": capped}, note


def wait_ready(url: str, timeout_s: float = 300) -> None:
    """Until ``/health`` answers 200 (every served mode warmed up on a replica); a TimeoutError naming the
    last answer otherwise."""
    import urllib.error
    import urllib.request

    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}: {e.read()[:200]!r}"
        except OSError as e:
            last = str(e)
        time.sleep(0.2)
    raise TimeoutError(f"{url}/health not ready after {timeout_s:.0f}s (last: {last})")


def api_key_digests(keys: list[str] | None) -> list[str]:
    """``--api-key`` values and ``$RIME_API_KEY`` (comma-separated), as SHA-256 digests: the keys themselves
    never reach the Serve config, the dashboard or the logs."""
    return sorted({key_digest(k) for k in [*(keys or []), *split_keys(os.environ.get(ENV_VAR))]})


def run_server(
    model: str | None,
    config: str,
    host: str | None,
    port: int | None,
    replicas: int | None,
    block: bool = True,
    model_name: str | None = None,
    api_keys: list[str] | None = None,
) -> str:
    """Start Serve with the config's application; returns the base URL."""
    import ray
    from ray import serve

    from actors.serve_app import EmbedderServer, build_app

    cfg = load_serve_config(config)
    app_cfg = cfg["applications"][0]
    args = dict(app_cfg["args"])
    if model:
        args["model"] = model
    args["model_name"] = model_name or served_name(args["model"], args.get("model_name"), bool(model))
    args["model"] = local_model_spec(args["model"])
    digests = api_key_digests(api_keys)
    if digests:
        args["api_key_sha256"] = digests
    http = {**cfg.get("http_options", {}), **({"host": host} if host else {}), **({"port": port} if port else {})}
    http.setdefault("host", "127.0.0.1")
    http.setdefault("port", 8000)
    dep_cfg = next((d for d in app_cfg.get("deployments", []) if d.get("name") == "EmbedderServer"), {})
    options = {k: v for k, v in dep_cfg.items() if k != "name"}
    if replicas:
        options.pop("autoscaling_config", None)
        options["num_replicas"] = replicas
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    local = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False, log_to_driver=False)
    if local:  # a cluster's autoscaler can add nodes: only a local Ray's size is fixed
        options, note = fit_autoscaling(options, ray.cluster_resources().get("CPU", 1))
        if note:
            print(f"[rime] {note}", flush=True)
    serve.start(http_options=http)
    app = EmbedderServer.options(**options).bind(**args) if options else build_app(args)
    serve.run(app, name=app_cfg.get("name", "rime-embeddings"), route_prefix=app_cfg.get("route_prefix", "/"))
    url = f"http://{http['host']}:{http['port']}"
    wait_ready(url.replace("0.0.0.0", "127.0.0.1"))
    auth = f", {len(digests)} API key(s) required" if digests else ""
    print(f"[rime] serving {args['model']} as {args['model_name']!r} at {url}/v1/embeddings{auth} (Ctrl-C to stop)", flush=True)
    if block:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
    return url
