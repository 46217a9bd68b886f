"""``rime mlflow-server``: an MLflow tracking server for cluster runs (sqlite or Postgres + proxied artifacts).

It is ``mlflow server`` with rime's defaults spelled out:

    mlflow server --host H --port P --backend-store-uri sqlite:///DIR/mlflow.db \\
                  --serve-artifacts --artifacts-destination DIR/artifacts --workers N

Artifacts are proxied through the server (``mlflow-artifacts:/`` URIs), so a job on any node logs
params, metrics and artifacts over HTTP with nothing but ``MLFLOW_TRACKING_URI=http://H:P``; the
artifacts land under ``--artifacts-destination`` (a folder, or s3://… / gs://… where the server
has the client libraries). ``--backend-store-uri postgresql://user:pw@db/mlflow`` uses Postgres
(needs ``psycopg2``, which the base install does not include).
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
from pathlib import Path


class MlflowServerError(RuntimeError):
    pass


def backend_uri(backend: str | None, root: Path) -> str:
    if not backend:
        return f"sqlite:///{(root / 'mlflow.db').resolve()}"
    if backend.startswith(("postgresql", "postgres://")):
        try:
            import psycopg2  # noqa: F401
        except ImportError:
            raise MlflowServerError(
                f"--backend-store-uri {backend.split('@')[-1]}: Postgres needs psycopg2; "
                "`pip install psycopg2-binary` into this environment"
            ) from None
    elif not backend.startswith(("sqlite:///", "mysql", "mssql")):
        raise MlflowServerError(
            f"--backend-store-uri {backend}: expected sqlite:///PATH or postgresql://… "
            "(the plain file store is deprecated in MLflow 3)"
        )
    return backend


def server_command(
    host: str = "127.0.0.1",
    port: int = 5000,
    root: str | Path = "runs/mlflow",
    backend: str | None = None,
    artifacts: str | None = None,
    workers: int = 2,
    allowed_hosts: str | None = None,
) -> list[str]:
    """The ``mlflow server`` argv (the ``mlflow`` beside this Python)."""
    root = Path(root)
    exe = Path(sys.executable).parent / "mlflow"
    cmd = [
        str(exe) if exe.exists() else (shutil.which("mlflow") or "mlflow"),
        "server",
        "--host",
        host,
        "--port",
        str(port),
        "--backend-store-uri",
        backend_uri(backend, root),
        "--serve-artifacts",
        "--artifacts-destination",
        artifacts or str((root / "artifacts").resolve()),
        "--workers",
        str(workers),
    ]
    if allowed_hosts:
        cmd += ["--allowed-hosts", allowed_hosts]
    return cmd


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def wait_healthy(uri: str, timeout_s: float = 60.0, proc=None) -> None:
    """Poll ``URI/health`` until it answers OK; raises with the reason when it does not in time."""
    import requests

    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise MlflowServerError(f"mlflow server exited with code {proc.returncode} before {uri} was healthy")
        try:
            r = requests.get(f"{uri}/health", timeout=2)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except requests.exceptions.RequestException as e:
            last = type(e).__name__
        time.sleep(0.5)
    raise MlflowServerError(f"{uri}/health not OK after {timeout_s:g}s ({last})")


def cmd_mlflow_server(args) -> int:
    root = Path(args.dir)
    cmd = server_command(
        args.host, args.port, root, args.backend_store_uri, args.artifacts_destination, args.workers, args.allowed_hosts
    )
    shown = "localhost" if args.host in ("0.0.0.0", "::") else args.host
    if args.dry_run:
        print(" ".join(cmd))
        return 0
    if not port_free(args.host, args.port):
        raise MlflowServerError(f"--port {args.port}: already in use on {args.host}; is a server running there already?")
    root.mkdir(parents=True, exist_ok=True)
    if not args.artifacts_destination:
        (root / "artifacts").mkdir(exist_ok=True)
    print(
        f"[rime] MLflow server: export MLFLOW_TRACKING_URI=http://{shown}:{args.port}  (store {cmd[cmd.index('--backend-store-uri') + 1]})",
        flush=True,
    )
    os.execv(cmd[0], cmd)  # the server replaces this process (signals, exit code and logs are mlflow's)
    return 0  # pragma: no cover


def add_parser(sub) -> None:
    m = sub.add_parser(
        "mlflow-server", help="run an MLflow tracking server (sqlite/Postgres + proxied artifacts) for cluster runs"
    )
    m.add_argument("--host", default="127.0.0.1", help="0.0.0.0 on a cluster head")
    m.add_argument("--port", type=int, default=5000)
    m.add_argument("--dir", default="runs/mlflow", help="folder for the sqlite store and artifacts (default runs/mlflow)")
    m.add_argument("--backend-store-uri", default=None, help="default sqlite:///DIR/mlflow.db; or postgresql://user:pw@host/db")
    m.add_argument("--artifacts-destination", default=None, help="default DIR/artifacts; or s3://bucket/path")
    m.add_argument("--workers", type=int, default=2)
    m.add_argument("--allowed-hosts", default=None, help="Host headers to accept beyond localhost/private IPs")
    m.add_argument("--dry-run", action="store_true", help="print the mlflow server command and exit")
    m.set_defaults(func=cmd_mlflow_server)
