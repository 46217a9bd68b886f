"""Ray Serve embedding throughput over loopback against the in-process embedder: the serving efficiency.

One process: a local Ray (2 CPUs), the in-process baseline (the same model, the replica's torch threads,
single-text disc items at batch 1 and at batch B), then each Serve configuration deployed in turn and
driven by C concurrent clients sending single-item disc requests. The load generator is asyncio over
raw keep-alive HTTP/1.1 connections in this one process, so it takes little of the two cores the
replica and the proxy need. Prints req/s, p50/p99 and the serving efficiency: service req/s divided by
in-process items/s at the batch size the service can form (1 without batching, B with it).

The last run is a burst: ``--burst`` clients at once against the deployment options of
``configs/serve.yaml`` (bounded queue, 429 + Retry-After beyond it), reporting the status counts and
the rate against the 16-client one.

Usage: python bench/serve.py [--requests 400] [--batch 16] [--burst 300] [--max-seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from collections import Counter
from urllib.parse import urlparse

TEXT = "a red circle left of a blue square"


def body(items: int = 1) -> bytes:
    return json.dumps({"input": TEXT if items == 1 else [TEXT] * items, "mode": "disc"}).encode()


async def _request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, path: str, data: bytes) -> int:
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    await writer.drain()
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("server closed the connection")
    status, length, close, chunked = int(status_line.split()[1]), 0, False, False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
        elif name.lower() == "connection" and value.strip().lower() == "close":
            close = True
        elif name.lower() == "transfer-encoding" and "chunked" in value.lower():
            chunked = True  # (Serve's own 429 body)
    if chunked:
        while (size := int((await reader.readline()).split(b";")[0], 16)) > 0:
            await reader.readexactly(size + 2)
        await reader.readline()
    else:
        await reader.readexactly(length)
    return -status if close else status


async def _drive(url: str, n: int, clients: int, max_seconds: float, items: int = 1, timeout_s: float = 60) -> dict:
    """``clients`` connections, each sending requests of ``items`` texts back to back until ``n`` are sent or
    time is up."""
    data = body(items)
    u = urlparse(url)
    path, deadline = u.path.rstrip("/") + "/v1/embeddings", time.perf_counter() + max_seconds
    remaining = [n]
    lat: list[float] = []
    statuses: Counter = Counter()

    async def client() -> None:
        reader, writer = await asyncio.open_connection(u.hostname, u.port)
        try:
            while remaining[0] > 0 and time.perf_counter() < deadline:
                remaining[0] -= 1
                t = time.perf_counter()
                try:
                    status = await asyncio.wait_for(_request(reader, writer, u.netloc, path, data), timeout_s)
                except TimeoutError:
                    statuses["timeout"] += 1
                    return
                if status < 0:  # the server closes after this answer: reconnect
                    status = -status
                    writer.close()
                    reader, writer = await asyncio.open_connection(u.hostname, u.port)
                statuses[status] += 1
                lat.append(time.perf_counter() - t)
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(clients)])
    wall = time.perf_counter() - t0
    ok = sorted(lat)
    return {
        "rps": statuses[200] / wall,
        "items_per_s": statuses[200] * items / wall,
        "p50_ms": 1000 * statistics.median(ok) if ok else float("nan"),
        "p99_ms": 1000 * ok[int(0.99 * (len(ok) - 1))] if ok else float("nan"),
        "statuses": dict(statuses),
        "max_ms": 1000 * ok[-1] if ok else float("nan"),
    }


def drive(url: str, n: int, clients: int, max_seconds: float, items: int = 1) -> dict:
    return asyncio.run(_drive(url, n, clients, max_seconds, items))


def in_process_rate(model: str, batch: int, threads: int, seconds: float = 5.0) -> float:
    """Items/s of ``Embedder.embed`` on single-text disc items, ``batch`` at a time, ``threads`` torch threads."""
    import torch

    from rime_model import load_embedder

    torch.set_num_threads(threads)
    emb = load_embedder(model)
    items = [{"text": "a red circle left of a blue square"}] * batch
    emb.embed(items, batch_size=batch)  # warm-up
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        emb.embed(items, batch_size=batch)
        done += batch
    return done / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--requests", type=int, default=400, help="per measured configuration")
    ap.add_argument("--batch", type=int, default=16, help="clients of the batched runs (and the in-process batch)")
    ap.add_argument("--burst", type=int, default=300, help="clients of the burst run (0: skip it)")
    ap.add_argument("--max-seconds", type=float, default=30.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads, in-process and per replica")
    ap.add_argument("--config", default="configs/serve.yaml", help="Serve config whose deployment options are used")
    ap.add_argument("--only-batched", action="store_true", help="skip the runs without batching and with 1 client")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from actors.serve_app import EmbedderServer
    from orchestrator.learner_group import free_port
    from orchestrator.serving import load_serve_config, wait_ready
    from rime_model.zoo import BUILDERS, ensure_zoo_model

    model = str(ensure_zoo_model(args.model)) if args.model in BUILDERS else args.model
    base = {1: in_process_rate(model, 1, args.threads), args.batch: in_process_rate(model, args.batch, args.threads)}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    deployment = next(d for d in load_serve_config(args.config)["applications"][0]["deployments"])
    default_options = {k: v for k, v in deployment.items() if k not in ("name", "autoscaling_config")}
    runs = []  # (label, batch the service can form, clients, items per request, result)
    for label, max_batch, clients, items in (
        ("no batching", 1, 1, 1),
        ("no batching", 1, args.batch, 1),
        ("batching", 32, 1, 1),
        ("batching", 32, args.batch, 1),
        ("batching", 32, 2, args.batch),  # what a client that batches its own items gets
    ):
        if args.only_batched and (max_batch == 1 or clients == 1):
            continue
        app = EmbedderServer.options(**default_options, num_replicas=1).bind(
            model=model,
            torch_threads=args.threads,
            modes=["disc"],
            disc_batch={"max_batch_size": max_batch, "batch_wait_timeout_s": 0.005 if max_batch > 1 else 0.0},
        )
        serve.run(app, name="bench", route_prefix="/")
        wait_ready(url)
        drive(url, 50, clients, 10, items)  # connections and the replica warm
        formed = min(max_batch, clients * items)
        runs.append((label, formed, clients, items, drive(url, args.requests, clients, args.max_seconds, items)))
        if args.burst and label == "batching" and clients == args.batch and items == 1:
            runs.append(("burst", 32, args.burst, 1, drive(url, args.burst, args.burst, args.max_seconds * 4)))
        serve.delete("bench")
    serve.shutdown()
    ray.shutdown()

    print(f"disc mode, 1 text per request, {args.threads} torch thread(s), 2 CPUs, model {args.model}")
    print(f"in-process embed: {base[1]:.0f} items/s at batch 1, {base[args.batch]:.0f} items/s at batch {args.batch}")
    print(
        f"{'config':>12s} {'clients':>7s} {'items/req':>9s} {'req/s':>7s} {'items/s':>8s} {'p50 ms':>7s} {'p99 ms':>8s} "
        f"{'efficiency':>10s}  statuses"
    )
    for label, batch, clients, items, r in runs:
        ref = base[1] if batch == 1 else base[args.batch]
        print(
            f"{label:>12s} {clients:7d} {items:9d} {r['rps']:7.1f} {r['items_per_s']:8.1f} {r['p50_ms']:7.1f} "
            f"{r['p99_ms']:8.1f} {r['items_per_s'] / ref:10.2f}  {r['statuses']}"
        )
    if args.burst:
        burst = next(r for lab, *_, r in runs if lab == "burst")
        batched = next(r for lab, _, c, i, r in runs if lab == "batching" and c == args.batch and i == 1)
        print(
            f"burst of {args.burst}: {burst['rps'] / batched['rps']:.2f}x the {args.batch}-client rate, "
            f"slowest answer {burst['max_ms']:.0f} ms"
        )
    print("efficiency = service items/s / in-process items/s at the batch the service can form (1, else the batch size)")


if __name__ == "__main__":
    main()
