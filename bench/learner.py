"""Learner throughput (pairs/s) on the tiny model: 1 vs 2 learners, and ZeRO stage 1/2/3.

All configurations run in this one process against the same local Ray cluster and the same
pairs; ratios are printed against the 1-learner ZeRO-1 baseline.
Usage: python bench/learner.py [--steps 5] [--micro-batch 8]
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--micro-batch", type=int, default=8)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from orchestrator.config import parse_config
    from orchestrator.learner_group import LearnerGroup
    from orchestrator.pairs import make_pairs
    from rime_data.synth import synth_split
    from rime_model.zoo import ensure_zoo_model

    d = synth_split("train", 20, seed=0)
    pairs = make_pairs(d.queries, d.candidates)
    path = str(ensure_zoo_model("tiny"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    results = {}
    for n, zero in ((1, 1), (2, 1), (2, 2), (2, 3)):
        cfg = parse_config({"learners": {"num_actors": n, "zero_stage": zero, "micro_batch_size": args.micro_batch}})
        group = LearnerGroup(cfg, path, {"lambda_cma": 1.0, "temperature": 0.02, "ce_weight": 1.0})
        mb = args.micro_batch

        def step(i: int) -> None:
            start = (i * n * mb) % (len(pairs) - n * mb)
            group.call("train_step", per_rank=[([pairs[start + r * mb : start + (r + 1) * mb]],) for r in range(n)])

        step(0)  # warm-up
        t = time.perf_counter()
        for i in range(1, args.steps + 1):
            step(i)
        results[(n, zero)] = args.steps * n * mb / (time.perf_counter() - t)
        group.shutdown()
    ray.shutdown()
    base = results[(1, 1)]
    print(f"tiny model, micro-batch {args.micro_batch} pairs per learner, {args.steps} timed steps, 2 CPUs")
    print(f"{'learners':>8s} {'zero':>4s} {'pairs/s':>8s} {'vs 1xZeRO1':>10s}")
    for (n, zero), r in results.items():
        print(f"{n:8d} {zero:4d} {r:8.2f} {r / base:9.2f}x")


if __name__ == "__main__":
    main()
