"""Cost of one weight update on a rollout worker, per transport and backend: seconds, and how far the
worker's resident memory rises above its level before the update (the transient copy it holds): all of
it (RSS), and its anonymous part (RSS minus resident shared pages), which leaves out the object store's
shared-memory pages a zero-copy reader maps (they are the store's, held once per node anyway).
Transports: ``object_store_dict`` (one ``ray.put`` of the plain state dict: the worker unpickles
every tensor into a fresh copy, the baseline), ``object_store`` (what Refine-RL sends: the export as
``ObjectStoreWeights``, mapped zero-copy by the worker) and ``collective`` (this process is learner
rank 0 of a gloo broadcast group; the worker loads each bucket of ``--bucket-mb`` as it arrives).
Backends: ``hf`` always, ``vllm`` when ``.venv-vllm`` exists (otherwise a printed reason). Every cell
gets a fresh worker, warmed by one rollout and one untimed update, so they start from the same state;
ratios are against hf/object_store_dict.
Usage: python bench/weight_sync.py [--model tiny] [--bucket-mb 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import time

import torch


class _RssPeak:
    """Samples this process's resident set, and its anonymous part, every 2 ms on a thread (tensor
    copies release the GIL)."""

    def __init__(self):
        import threading

        self.base = self.peak = _rss_bytes()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.002):
            self.peak = tuple(map(max, self.peak, _rss_bytes()))

    def done(self) -> tuple[int, int]:
        self.stop.set()
        self.thread.join()
        peak = tuple(map(max, self.peak, _rss_bytes()))
        return peak[0] - self.base[0], peak[1] - self.base[1]


def _rss_bytes() -> tuple[int, int]:
    """(resident, resident minus resident shared pages) of this process, in bytes (/proc/self/statm)."""
    with open("/proc/self/statm") as f:
        resident, shared = (int(x) for x in f.read().split()[1:3])
    page = os.sysconf("SC_PAGE_SIZE")
    return resident * page, (resident - shared) * page


def _start_sampler(worker) -> None:
    worker._bench_rss = _RssPeak()


def _stop_sampler(worker) -> tuple[int, int]:
    return worker._bench_rss.done()


def _perturbed(export: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + 1e-3 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone() for k, v in export.items()}


def _measure(model: str, backend: str, transport: str, export: dict, bucket_bytes: int, repeats: int) -> dict[str, float]:
    """``transport``: ``object_store`` (what Refine-RL sends: ``ObjectStoreWeights``), ``object_store_dict``
    (the plain state dict, the baseline it replaces) or ``collective``."""
    import ray

    from actors.rollout import RolloutWorker
    from actors.weight_sync import BroadcastGroup, ObjectStoreWeights, tensor_meta
    from orchestrator.config import parse_config
    from orchestrator.rl_actors import rollout_runtime_env

    env = rollout_runtime_env(parse_config({"rollout": {"backend": backend}}))
    worker = ray.remote(RolloutWorker).options(num_cpus=0.5, runtime_env=env).remote(model, backend, 2)
    ray.get(
        worker.generate.remote(
            [{"text": "a red circle left of a blue square"}],
            1,
            {"max_new_tokens": 4, "temperature": 0.0, "top_p": 1.0, "seed": 0},
        ),
        timeout=900,
    )
    src = None
    packed = transport == "object_store"
    if transport == "collective":
        store, host, port = BroadcastGroup.open_store(2, 120)
        join = worker.join_weight_sync.remote(host, port, 1, 2, 1, "gloo", 120)
        src = BroadcastGroup(store, 0, 2, 1, "gloo", 120)
        ray.get(join)
    seconds, rises = [], []
    # update 0 is a warm-up, not recorded: a worker's first update writes into weights that may still be
    # copy-on-write pages of the mmapped checkpoint (shared turns anonymous once); Refine-RL's steady
    # state is the updates after it
    for v in range(0, repeats + 1):
        sd = _perturbed(export, v)
        ray.get(worker.__ray_call__.remote(_start_sampler))
        t = time.perf_counter()
        if src is None:
            ref = ray.put(ObjectStoreWeights(sd) if packed else sd)
            ray.get(worker.update_weights.remote(v, [ref]))
            del ref
        else:
            load = worker.receive_weights.remote(v, 1, tensor_meta(sd), bucket_bytes)
            src.send(sd, bucket_bytes)
            ray.get(load)
        dt = time.perf_counter() - t
        rise = ray.get(worker.__ray_call__.remote(_stop_sampler))
        if v > 0:
            seconds.append(dt)
            rises.append(rise)
    ray.kill(worker)
    return {
        "seconds": sorted(seconds)[len(seconds) // 2],
        "rise_mib": max(r[0] for r in rises) / 2**20,
        "anon_rise_mib": max(r[1] for r in rises) / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="zoo name or saved embedder folder")
    ap.add_argument("--bucket-mb", type=int, default=16, help="collective bucket size (rollout.sync_bucket_mb)")
    ap.add_argument("--repeats", type=int, default=3, help="updates per cell (median time, largest rise)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from actors.weight_sync import plan_buckets, tensor_meta
    from orchestrator.rl_actors import VLLM_VENV
    from rime_model import Embedder
    from rime_model.zoo import BUILDERS, ensure_zoo_model

    model = str(ensure_zoo_model(args.model)) if args.model in BUILDERS else args.model
    export = {k: v.detach().clone() for k, v in Embedder.load(model).model.state_dict().items()}
    size = sum(v.numel() * v.element_size() for v in export.values())
    meta, bucket = tensor_meta(export), args.bucket_mb << 20
    largest_bucket = max(
        sum(torch.Size(meta[i][1]).numel() * export[meta[i][0]].element_size() for i in idx) for idx in plan_buckets(meta, bucket)
    )
    backends = ["hf"]
    if (VLLM_VENV / "bin" / "python").is_file():
        backends.append("vllm")
    else:
        print(f"[skip] vllm backend: {VLLM_VENV} missing (create it with `bash scripts/setup_vllm.sh`)")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    transports = ("object_store_dict", "object_store", "collective")
    rows = {(b, t): _measure(model, b, t, export, bucket, args.repeats) for b in backends for t in transports}
    ray.shutdown()

    base = rows[("hf", "object_store_dict")]
    print(
        f"\nweight update on one rollout worker ({args.model}: {len(export)} tensors, {size / 2**20:.0f} MiB; "
        f"collective buckets <= {args.bucket_mb} MiB, largest {largest_bucket / 2**20:.0f} MiB; 2 CPUs)"
    )
    print(
        f"{'backend':>8s} {'transport':>17s} {'seconds':>8s} {'vs base':>8s} {'RSS rise MiB':>13s} {'/ model':>8s} "
        f"{'anon rise MiB':>14s} {'/ model':>8s}"
    )
    for (b, t), r in rows.items():
        print(
            f"{b:>8s} {t:>17s} {r['seconds']:8.2f} {r['seconds'] / base['seconds']:7.2f}x "
            f"{r['rise_mib']:13.0f} {r['rise_mib'] * 2**20 / size:7.2f}x "
            f"{r['anon_rise_mib']:14.0f} {r['anon_rise_mib'] * 2**20 / size:7.2f}x"
        )


if __name__ == "__main__":
    main()
