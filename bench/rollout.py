"""Rollout throughput and the Refine-RL step's time split, in one process on one local Ray cluster.

1. tokens/s of the rollout backends on the same weights and prompts: ``hf`` always, ``vllm`` when
   ``.venv-vllm`` exists (``bash scripts/setup_vllm.sh``; otherwise a printed reason), at batch 1
   (one prompt per call, G=1) and batched (all prompts in one call, G samples each). Ratios are
   against hf at batch 1.
2. the per-step time split (rollout / reward / learn / sync) of a few Refine-RL steps with
   2 learners, 2 rollout workers and 1 reward actor.
Usage: python bench/rollout.py [--model PATH] [--prompts 16] [--group 4] [--tokens 16] [--steps 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def _queries(n: int) -> list[dict]:
    from rime_data.synth import synth_split

    d = synth_split("train", max(1, n // 3 + 1), seed=0, tasks=("t2i", "i2t", "referring"))
    return [{"text": q.get("qry_text"), "image": q.get("qry_image"), "instruction": q.get("qry_inst")} for q in d.queries[:n]]


def _backend_rates(model: str, backend: str, queries: list[dict], group: int, tokens: int) -> dict[str, float]:
    import ray

    from actors.rollout import RolloutWorker
    from orchestrator.config import parse_config
    from orchestrator.rl_actors import rollout_runtime_env

    cfg = parse_config({"rollout": {"backend": backend, "max_new_tokens": tokens}})
    worker = (
        ray.remote(RolloutWorker)
        .options(num_cpus=0.5, runtime_env=rollout_runtime_env(cfg))
        .remote(model, backend, 2, len(queries))
    )
    sampling = {"max_new_tokens": tokens, "temperature": 1.0, "top_p": 1.0, "seed": 0}
    ray.get(worker.generate.remote(queries[:2], 1, sampling))  # warm-up
    out = {}
    t = time.perf_counter()
    n_tok = sum(ray.get(worker.generate.remote([q], 1, sampling)).tokens for q in queries)
    out["batch 1"] = n_tok / (time.perf_counter() - t)
    t = time.perf_counter()
    n_tok = ray.get(worker.generate.remote(queries, group, sampling)).tokens
    out[f"batch {len(queries)} x G={group}"] = n_tok / (time.perf_counter() - t)
    ray.kill(worker)
    return out


def _step_split(model: str, steps: int, tmp: Path) -> list[dict]:
    from orchestrator.config import parse_config
    from orchestrator.learner_group import DATA_TASK_CPUS, LearnerGroup
    from orchestrator.pairs import PairStream
    from orchestrator.refine_rl import RefineRL, stage_config
    from rime_data.synth import write_synth

    write_synth(tmp / "data", {"train": 10}, seed=0)
    cfg = parse_config(
        {
            "run": {"stages": ["refine-rl"]},
            "refine_rl": {"queries_per_step": 8},
            "learners": {"cpus_per_actor": 0.4},  # + rollout/reward 0.2: 1 CPU stays free for Ray Data
            "rollout": {"num_actors": 2, "group_size": 4, "cpus_per_actor": 0.05},
            "reward": {"num_actors": 1},
        }
    )
    group = LearnerGroup(cfg, model, {"lambda_cma": 1.0, "temperature": 0.02, "ce_weight": 1.0})
    group.call("begin_stage", "refine-rl", stage_config(cfg), cfg.refine_rl.lr, 1, model)
    stream = PairStream(tmp / "data", "train", 0, 64, tmp / "errors.jsonl", group_by_task=False)
    rl = RefineRL(cfg, group, stream, model, reserve_cpus=DATA_TASK_CPUS)
    rows = []
    try:
        rl.sync_weights(0)
        for s in range(steps + 1):
            m = rl.step(s)
            if s:  # step 0 warms caches (candidate anchors, first generate)
                rows.append(m)
    finally:
        rl.shutdown()
        stream.close()
        group.shutdown()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="tiny", help="zoo name or saved embedder folder")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from orchestrator.rl_actors import VLLM_VENV
    from rime_model.zoo import BUILDERS, ensure_zoo_model

    model = str(ensure_zoo_model(args.model)) if args.model in BUILDERS else args.model
    queries = _queries(args.prompts)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rates = {"hf": _backend_rates(model, "hf", queries, args.group, args.tokens)}
    if (VLLM_VENV / "bin" / "python").is_file():
        rates["vllm"] = _backend_rates(model, "vllm", queries, args.group, args.tokens)
    else:
        print(f"[skip] vllm backend: {VLLM_VENV} missing (create it with `bash scripts/setup_vllm.sh`)")
    with tempfile.TemporaryDirectory() as tmp:
        split = _step_split(model, args.steps, Path(tmp))
    ray.shutdown()

    base = rates["hf"]["batch 1"]
    print(f"\nrollout tokens/s ({args.model}, {args.prompts} prompts, max {args.tokens} new tokens, 2 CPUs)")
    print(f"{'backend':>8s} {'setting':>18s} {'tokens/s':>9s} {'vs hf b1':>9s}")
    for backend, r in rates.items():
        for setting, v in r.items():
            print(f"{backend:>8s} {setting:>18s} {v:9.1f} {v / base:8.2f}x")
    keys = ("time/rollout_s", "time/reward_s", "time/learn_s", "time/sync_s", "perf/step_time_s")
    print(
        f"\nRefine-RL step time split (8 queries x G=4, 2 learners, 2 rollout workers, 1 reward actor; mean of {len(split)} steps)"
    )
    total = sum(m["perf/step_time_s"] for m in split) / len(split)
    for k in keys:
        v = sum(m[k] for m in split) / len(split)
        print(f"{k:>18s} {v:7.2f}s {100 * v / total:5.1f}%")
    print(f"{'sync bytes':>18s} {split[-1]['sync/bytes'] / 2**20:7.1f} MiB")


if __name__ == "__main__":
    main()
