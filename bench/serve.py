"""Ray Serve embedding throughput over loopback: batching on vs off, 1 vs 2 replicas.

Each configuration is deployed in turn on one local Ray, then driven by C concurrent clients
sending N single-item disc requests (bounded by count and by --max-seconds). Prints requests/s
and p50/p99 latency, and ratios against batching-off with 1 replica.
Usage: python bench/serve.py [--requests 200] [--concurrency 16] [--max-seconds 60]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor


def drive(url: str, n: int, concurrency: int, max_seconds: float) -> dict:
    body = json.dumps({"input": "a red circle left of a blue square", "mode": "disc"}).encode()
    deadline = time.perf_counter() + max_seconds

    def one(_: int) -> float | None:
        if time.perf_counter() > deadline:
            return None
        t = time.perf_counter()
        req = urllib.request.Request(url + "/v1/embeddings", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            r.read()
        return time.perf_counter() - t

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        lat = [x for x in pool.map(one, range(n)) if x is not None]
    wall = time.perf_counter() - t0
    lat.sort()
    return {
        "rps": len(lat) / wall,
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))],
        "n": len(lat),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-seconds", type=float, default=60.0)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from actors.serve_app import EmbedderServer
    from orchestrator.learner_group import free_port
    from rime_model.zoo import BUILDERS, ensure_zoo_model

    model = str(ensure_zoo_model(args.model)) if args.model in BUILDERS else args.model
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    results = {}
    for replicas, batch in ((1, 1), (1, 32), (2, 32)):
        app = EmbedderServer.options(num_replicas=replicas, ray_actor_options={"num_cpus": 0.5}).bind(
            model=model, disc_batch={"max_batch_size": batch, "batch_wait_timeout_s": 0.005 if batch > 1 else 0.0}
        )
        serve.run(app, name="bench", route_prefix="/")
        drive(url, 20, 4, 30)  # warm-up
        results[(replicas, batch)] = drive(url, args.requests, args.concurrency, args.max_seconds)
        serve.delete("bench")
    serve.shutdown()
    ray.shutdown()
    base = results[(1, 1)]
    print(f"disc mode, 1 text per request, {args.requests} requests, {args.concurrency} concurrent clients, 2 CPUs")
    print(f"{'replicas':>8s} {'max_batch':>9s} {'req/s':>7s} {'p50 ms':>7s} {'p99 ms':>7s} {'vs 1x/no-batch':>14s}")
    for (rep, b), r in results.items():
        print(f"{rep:8d} {b:9d} {r['rps']:7.1f} {r['p50_ms']:7.1f} {r['p99_ms']:7.1f} {r['rps'] / base['rps']:13.2f}x")


if __name__ == "__main__":
    main()
