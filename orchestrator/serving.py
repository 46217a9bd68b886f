"""``rime serve``: deploy the Serve config's embedding application on a local (or joined) Ray.

The same ``configs/serve.yaml`` works with ``serve deploy`` on a cluster; locally this reads it,
applies the command-line overrides (model, host, port, replicas) and runs it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import yaml


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


def run_server(
    model: str | None, config: str, host: str | None, port: int | None, replicas: int | None, block: bool = True
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
    args["model"] = local_model_spec(args["model"])
    http = {**cfg.get("http_options", {}), **({"host": host} if host else {}), **({"port": port} if port else {})}
    http.setdefault("host", "127.0.0.1")
    http.setdefault("port", 8000)
    dep_cfg = next((d for d in app_cfg.get("deployments", []) if d.get("name") == "EmbedderServer"), {})
    options = {k: v for k, v in dep_cfg.items() if k != "name"}
    if replicas:
        options.pop("autoscaling_config", None)
        options["num_replicas"] = replicas
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False, log_to_driver=False)
    serve.start(http_options=http)
    app = EmbedderServer.options(**options).bind(**args) if options else build_app(args)
    serve.run(app, name=app_cfg.get("name", "rime-embeddings"), route_prefix=app_cfg.get("route_prefix", "/"))
    url = f"http://{http['host']}:{http['port']}"
    print(f"[rime] serving {args['model']} at {url}/v1/embeddings (Ctrl-C to stop)", flush=True)
    if block:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
    return url
