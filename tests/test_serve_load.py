"""The embedding service under load, on the session's local Ray: a burst beyond the queue is refused at once
with 429 + Retry-After while every accepted request is answered; the Prometheus metrics scraped from Ray's
endpoint afterwards match the traffic; Serve scales 1 -> 2 replicas under load and back to 1 after it, with
no failed request in either transition; a replica is ready (``/health`` 200) only after its warm-up."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest


def _post(url: str, body: dict, timeout: float = 60) -> tuple[int, dict, dict, float]:
    """Status, JSON body (Serve's own 429 is plain text: {"raw": ...}), lower-cased headers, seconds to the answer."""
    t = time.monotonic()
    req = urllib.request.Request(
        url + "/v1/embeddings", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), {k.lower(): v for k, v in r.headers.items()}, time.monotonic() - t
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            body = json.loads(raw)
        except json.JSONDecodeError:
            body = {"raw": raw.decode(errors="replace")}
        return e.code, body, {k.lower(): v for k, v in e.headers.items()}, time.monotonic() - t


@pytest.fixture(scope="module")
def serve_port(ray_local):
    from ray import serve

    from orchestrator.learner_group import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})  # (an earlier module shut its Serve down)
    yield port
    serve.shutdown()


def _deploy(name: str, port: int, model: str, options: dict, **args) -> str:
    from ray import serve

    from actors.serve_app import EmbedderServer
    from orchestrator.serving import wait_ready

    serve.run(EmbedderServer.options(**options).bind(model=model, **args), name=name, route_prefix=f"/{name}")
    url = f"http://127.0.0.1:{port}/{name}"
    wait_ready(url, timeout_s=120)
    return url


# --------------------------------------------------------------------------- metrics
_SAMPLE = re.compile(r"^(\w+)\{(.*)\}\s+(\S+)$")


def _scrape(ray) -> list[tuple[str, dict, float]]:
    port = ray._private.worker.global_worker.node.metrics_export_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m.group(1).startswith("ray_rime_embedding"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            out.append((m.group(1), labels, float(m.group(3))))
    return out


def _metric(samples, name: str, app: str, **labels) -> float:
    """Summed over the app's replicas."""
    return sum(
        v
        for n, lab, v in samples
        if n == name and lab.get("application") == app and all(lab.get(k) == str(x) for k, x in labels.items())
    )


# --------------------------------------------------------------------------- tests
def test_a_burst_beyond_the_queue_gets_429_at_once_and_metrics_match_the_traffic(ray_local, serve_port, tiny_latent_dir):
    from ray import serve

    app = "burst"
    url = _deploy(
        app,
        serve_port,
        tiny_latent_dir,
        {
            "num_replicas": 1,
            "ray_actor_options": {"num_cpus": 0.5},
            "max_ongoing_requests": 2,
            "max_queued_requests": 4,
            "backpressure_config": {"status_code": 429, "retry_after_s": 1},
        },
        modes=["disc", "gen"],
        max_new_tokens=8,
        gen_batch={"max_batch_size": 2, "batch_wait_timeout_s": 0.01},
    )
    try:
        body = {"input": "a red circle and a blue square", "mode": "gen", "return_rewrite": True}
        with ThreadPoolExecutor(40) as pool:
            answers = list(pool.map(lambda _: _post(url, body), range(40)))
        statuses = Counter(a[0] for a in answers)
        assert set(statuses) == {200, 429} and statuses[429] >= 20, statuses  # 2 in flight + 4 queued at most
        refused = [a for a in answers if a[0] == 429]
        assert all(a[2].get("retry-after") == "1" for a in refused), refused[0]
        assert all("backpressure" in a[1]["raw"] for a in refused)
        assert max(a[3] for a in refused) < 1.0, "a refusal must come at once, not after queueing"
        ok = [a for a in answers if a[0] == 200]
        assert all(len(a[1]["data"][0]["embedding"]) == 128 for a in ok)
        rewrite_tokens = sum(a[1]["data"][0]["rewrite_tokens"] for a in ok)
        assert _post(url, {"input": "after the burst"})[0] == 200  # disc, still serving

        n = len(ok)
        want = {
            ("ray_rime_embedding_requests_total", "gen", "200"): n,
            ("ray_rime_embedding_requests_total", "disc", "200"): 1,
            ("ray_rime_embedding_items_total", "gen", None): n,
            ("ray_rime_embedding_request_latency_s_count", "gen", None): n,
            ("ray_rime_embedding_rewrite_tokens_total", "gen", None): rewrite_tokens,
        }
        deadline, got = time.monotonic() + 30, {}
        while time.monotonic() < deadline:  # Ray exports every 2 s in this session (conftest.ray_local)
            samples = _scrape(ray_local)
            got = {key: _metric(samples, key[0], app, mode=key[1], **({"status": key[2]} if key[2] else {})) for key in want}
            if got == want:
                break
            time.sleep(1)
        assert got == want
        # batch sizes: (Ray rebuilds a histogram's _sum from bucket midpoints, so the buckets are what is exact)
        batches = _metric(samples, "ray_rime_embedding_batch_size_count", app, mode="gen")
        assert n / 2 <= batches <= n  # gen_batch max_batch_size 2
        assert _metric(samples, "ray_rime_embedding_batch_size_bucket", app, mode="gen", le="2.0") == batches
        assert _metric(samples, "ray_rime_embedding_queue_depth", app, mode="gen") == 0
    finally:
        serve.delete(app)


def test_autoscaling_up_and_down_fails_no_request(ray_local, serve_port, tiny_latent_dir):
    from ray import serve

    app = "scale"
    url = _deploy(
        app,
        serve_port,
        tiny_latent_dir,
        {
            "ray_actor_options": {"num_cpus": 0.5},
            "max_ongoing_requests": 8,
            "autoscaling_config": {
                "min_replicas": 1,
                "max_replicas": 2,
                "target_ongoing_requests": 1,
                "metrics_interval_s": 0.5,
                "look_back_period_s": 1,
                "upscale_delay_s": 0.5,
                "downscale_delay_s": 2,
            },
        },
        modes=["gen"],
        max_new_tokens=8,
    )

    def running() -> int:
        states = serve.status().applications[app].deployments["EmbedderServer"].replica_states
        return states.get("RUNNING", 0) if sum(states.values()) == states.get("RUNNING", 0) else -1

    statuses: list[int] = []
    stop, pause = threading.Event(), threading.Event()

    def client(pace_s: float) -> None:
        while not stop.is_set():
            if pause.is_set() and pace_s == 0:
                time.sleep(0.1)
                continue
            statuses.append(_post(url, {"input": "a green triangle", "mode": "gen"}, timeout=120)[0])
            time.sleep(pace_s)

    try:
        with ThreadPoolExecutor(5) as pool:
            for pace in (0, 0, 0, 0, 0.3):  # 4 clients back to back (load), 1 trickling through both transitions
                pool.submit(client, pace)
            deadline = time.monotonic() + 90
            while running() != 2:
                assert time.monotonic() < deadline, f"never scaled up: {serve.status().applications[app]}"
                time.sleep(0.5)
            served_at_2 = len(statuses)
            time.sleep(2)  # both replicas serve
            assert len(statuses) > served_at_2
            pause.set()  # the load stops; the trickle goes on
            deadline = time.monotonic() + 90
            while running() != 1:
                assert time.monotonic() < deadline, f"never scaled down: {serve.status().applications[app]}"
                time.sleep(0.5)
            time.sleep(1)
            stop.set()
        assert statuses and set(statuses) == {200}, Counter(statuses)
    finally:
        stop.set()
        serve.delete(app)


def test_rime_serve_names_the_model_it_serves_requires_its_key_and_fits_the_machine(tiny_latent_dir, tmp_path):
    """`rime serve` as a user runs it (its own local Ray, configs/serve.yaml): it prints its URL only once a
    replica is warm, reports the model given with --model (not the config's model_name), caps the config's
    max_replicas at what 2 CPUs hold, and wants the --api-key it got while its logs never show that key."""
    import os
    import signal
    import subprocess
    import sys

    from rime_cli import ROOT, clean_env

    from orchestrator.learner_group import free_port

    port, key = free_port(), "sk-rime-serve-test"
    model = os.path.relpath(tiny_latent_dir, ROOT)
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "orchestrator.cli", "serve", "--model", model, "--port", str(port), "--api-key", key]
    proc = subprocess.Popen(
        cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=clean_env(), cwd=ROOT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 240
        while "[rime] serving" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        out = log.read_text()
        assert "autoscaling max_replicas 4 -> 1: this Ray has 2 CPUs" in out and "1 API key(s) required" in out
        url = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(url + "/health", timeout=10) as r:  # ready when the URL is printed
            assert r.status == 200
        req = urllib.request.Request(url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert json.loads(r.read())["data"][0]["id"] == model
        status, body, _, _ = _post(url, {"input": "x"})
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: serve.shutdown, then the local Ray goes with the process
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert key not in log.read_text()


def test_health_is_503_until_every_served_mode_is_warmed_up(ray_local, tiny_latent_dir, monkeypatch):
    """In process (the replica's class without Serve), so the warm-up can be held at its start: /health says
    503 while it runs, 200 after; a failed warm-up is 503 with the error and fails Serve's health check (Serve
    then replaces the replica)."""
    import asyncio

    from actors.serve_app import EmbedderServer

    cls = EmbedderServer.func_or_class
    gate = threading.Event()
    warm_up = cls._warm_up
    monkeypatch.setattr(cls, "_warm_up", lambda self: (gate.wait(60), warm_up(self)))

    async def scenario() -> None:
        replica = object.__new__(cls)
        await replica.__init__(model=tiny_latent_dir, max_new_tokens=3, modes=["disc", "gen"])  # Serve's async init
        r = await replica.health()
        assert (r.status_code, json.loads(r.body)) == (503, {"status": "warming up"})
        gate.set()
        deadline = time.monotonic() + 60
        while (await replica.health()).status_code != 200:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        replica.check_health()  # no error

        def broken(mode, items):
            raise RuntimeError("out of memory")

        failed = object.__new__(cls)
        monkeypatch.setattr(cls, "_run_model", lambda self, mode, items: broken(mode, items))
        await failed.__init__(model=tiny_latent_dir, modes=["disc"])
        deadline = time.monotonic() + 60
        while failed.warmup_error is None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        r = await failed.health()
        assert r.status_code == 503 and json.loads(r.body) == {"status": "failed", "error": "RuntimeError: out of memory"}
        with pytest.raises(RuntimeError, match="warm-up failed: RuntimeError: out of memory"):
            failed.check_health()

    asyncio.run(scenario())
