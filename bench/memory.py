"""Peak memory of each process for one CMA step and one Refine-RL step, per learner memory option.

The model is Qwen2-VL-2B's architecture, randomly initialised (``rime_model.zoo.build_qwen2_vl_2b_random``,
~2.2B parameters) and saved once as a bf16 embedder folder, or the tiny zoo model (``--model tiny``, a quick
check of the path). Items carry one image each, resized to ``--image-size`` px. Each variant starts fresh actors
on a local Ray cluster: 1 DeepSpeed learner for a CMA step; then the Refine-RL stage on the same learner with
1 HF rollout worker and 1 reward actor (G=2, ``--new-tokens`` new tokens), both holding the model in
``model.dtype`` bfloat16. Before each step every process's peak RSS is reset (``/proc/<pid>/clear_refs``);
after it ``VmHWM`` is that step's peak, the resident model included.

A variant whose static memory alone (full fine-tuning: weights, gradients and Adam's two moments, plus fp32
masters under bf16: 16 bytes per parameter) exceeds the machine's RAM is not started: its estimate is printed
instead. Ratios are to the full fp32 fine-tune (measured where it ran, else its estimate).
Usage: python bench/memory.py [--model qwen2-vl-2b-random|tiny] [--micro-batch 2] [--chunk 1] [--variants ...]
"""

from __future__ import annotations

import argparse
import io
import os
import time
from pathlib import Path

VARIANTS = {  # name -> learner settings (model.lora.rank, learners.precision, gradient checkpointing, GradCache)
    "full-fp32": dict(rank=0, precision="fp32", ckpt=False, grad_cache=False),
    "full-bf16": dict(rank=0, precision="bf16", ckpt=False, grad_cache=False),
    "lora-bf16": dict(rank=8, precision="bf16", ckpt=False, grad_cache=False),
    "lora-bf16-ckpt": dict(rank=8, precision="bf16", ckpt=True, grad_cache=False),
    "lora-bf16-ckpt-gradcache": dict(rank=8, precision="bf16", ckpt=True, grad_cache=True),
}
GB = 1e9


def _kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak(pids: list[int]) -> None:
    """Start a new peak-RSS window for each process (Linux: writing 5 to clear_refs resets VmHWM)."""
    for pid in pids:
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_gb(pid: int) -> float:
    return _kb(pid, "VmHWM") * 1024 / GB


def actor_pid(actor) -> int:
    import ray

    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))


def model_folder(name: str) -> tuple[str, int]:
    """(saved embedder folder, parameter count): the tiny zoo model, or the random 2B built once in bf16."""
    import torch
    from safetensors import safe_open

    from rime_model.zoo import build_qwen2_vl_2b_random, cache_dir, ensure_zoo_model

    if name == "tiny":
        path = ensure_zoo_model("tiny")
    else:
        path = cache_dir() / "bench-qwen2-vl-2b-random-bf16"
        if not (path / "rime_embedder.json").is_file():
            print(f"building the random Qwen2-VL-2B (bf16) into {path} (once)", flush=True)
            emb = build_qwen2_vl_2b_random(dtype=torch.bfloat16)
            emb.save(path)
            del emb
    n = 0
    for f in sorted(Path(path).glob("*.safetensors")):  # shapes from the headers (tied tensors are stored once)
        with safe_open(str(f), "pt") as st:
            n += sum(torch.Size(st.get_slice(k).get_shape()).numel() for k in st.keys())  # noqa: SIM118
    return str(path), n


def make_data(folder: Path, size: int, per_task: int) -> None:
    """Generated t2i / i2t / cls records whose images are re-encoded as ``size`` px JPEGs."""
    import pyarrow.parquet as pq
    from PIL import Image

    from rime_data.synth import write_synth

    write_synth(folder, {"train": per_task}, seed=0, tasks=("t2i", "i2t", "cls"))

    def big(b: bytes | None) -> bytes | None:
        if not b:
            return b
        out = io.BytesIO()
        Image.open(io.BytesIO(b)).convert("RGB").resize((size, size)).save(out, format="JPEG", quality=90)
        return out.getvalue()

    for table, col in (("queries", "qry_image"), ("candidates", "cand_image")):
        path = folder / "train" / f"{table}.parquet"
        t = pq.read_table(path)
        rows = t.to_pylist()
        for r in rows:
            r[col] = big(r[col])
        pq.write_table(t.from_pylist(rows, schema=t.schema), path)


def run_variant(name: str, settings: dict, model: str, data: Path, args) -> dict:
    """One CMA step, then one Refine-RL step, on fresh actors; each process's peak per step."""
    from orchestrator.config import parse_config
    from orchestrator.learner_group import DATA_TASK_CPUS, LearnerGroup
    from orchestrator.pairs import PairStream
    from orchestrator.refine_rl import RefineRL, stage_config

    cfg = parse_config(
        {
            "run": {"stages": ["cma", "refine-rl"]},
            "model": {"dtype": "bfloat16", "lora": {"rank": settings["rank"]}},
            "learners": {
                "num_actors": 1,
                "micro_batch_size": args.micro_batch,
                "precision": settings["precision"],
                "gradient_checkpointing": settings["ckpt"],
                "torch_threads": 2,
                "cpus_per_actor": 0.4,
                "warmup_steps": 1,
            },
            "cma": {"grad_cache_chunk": args.chunk if settings["grad_cache"] else 0},
            "rollout": {
                "num_actors": 1,
                "group_size": 2,
                "max_new_tokens": args.new_tokens,
                "torch_threads": 2,
                "weight_sync": "lora_adapter" if settings["rank"] else "object_store",  # LoRA: the adapter alone
            },
            "reward": {"num_actors": 1},
            "refine_rl": {"queries_per_step": args.micro_batch},
        }
    )
    cma = {"lambda_cma": 1.0, "temperature": 0.02, "ce_weight": 1.0, "grad_cache_chunk": cfg.cma.grad_cache_chunk}
    out: dict = {}
    t = time.perf_counter()
    group = LearnerGroup(cfg, model, cma)
    rl = stream = None
    try:
        learner = actor_pid(group.actors[0])
        out["learner_loaded_gb"] = _kb(learner, "VmRSS") * 1024 / GB
        out["start_s"] = time.perf_counter() - t
        stream = PairStream(data, "train", 0, 64, data / "errors.jsonl", group_by_task=False)
        pairs = stream.next_batch(args.micro_batch)
        reset_peak([learner])
        t = time.perf_counter()
        terms = group.call("train_step", per_rank=[([pairs],)])[0]
        out["cma_s"], out["cma_learner_gb"], out["cma_loss"] = time.perf_counter() - t, peak_gb(learner), terms["loss"]
        if args.no_rl:
            return out
        group.call("begin_stage", "refine-rl", stage_config(cfg), cfg.refine_rl.lr, 1, model)
        rl = RefineRL(cfg, group, stream, model, reserve_cpus=DATA_TASK_CPUS)
        rl.sync_weights(0)
        pids = {"learner": learner, "rollout": actor_pid(rl.actors.rollout[0]), "reward": actor_pid(rl.actors.reward[0])}
        reset_peak(list(pids.values()))
        t = time.perf_counter()
        m = rl.step(0)
        out["rl_s"], out["rl_sync_mb"] = time.perf_counter() - t, m["sync/bytes"] / 1e6
        out.update({f"rl_{role}_gb": peak_gb(pid) for role, pid in pids.items()})
        return out
    finally:
        if rl is not None:
            rl.shutdown()
        if stream is not None:
            stream.close()
        group.shutdown()


def static_gb(settings: dict, params: int) -> float:
    """The learner's static memory without activations: full fine-tuning 16 bytes a parameter (fp32: weights,
    gradients, 2 Adam moments; bf16: weights and gradients 2+2, fp32 masters 4, moments 8); LoRA the frozen
    weights in the training precision (the adapter's share is small)."""
    if settings["rank"] == 0:
        return 16 * params / GB
    return (2 if settings["precision"] == "bf16" else 4) * params / GB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2-vl-2b-random", choices=["qwen2-vl-2b-random", "tiny"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--micro-batch", type=int, default=2, help="pairs in the CMA step, queries in the RL step")
    ap.add_argument("--chunk", type=int, default=1, help="cma.grad_cache_chunk of the GradCache variant (rows)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--no-rl", action="store_true", help="the CMA step only")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import tempfile

    import ray

    model, params = model_folder(args.model)
    ram = int(Path("/proc/meminfo").read_text().split()[1]) * 1024 / GB  # MemTotal
    data = Path(tempfile.mkdtemp(prefix="rime-bench-memory-"))
    make_data(data, args.image_size, per_task=max(4, args.micro_batch))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    print(f"{args.model}: {params / 1e9:.2f}B parameters; machine RAM {ram:.1f} GB; {args.image_size}-px images", flush=True)
    results: dict[str, dict] = {}
    for name in args.variants:
        settings = VARIANTS[name]
        need = static_gb(settings, params) + (0 if args.no_rl else 2 * 2 * params / GB)  # + bf16 rollout and reward
        if need > ram:
            results[name] = {"estimate_gb": static_gb(settings, params)}
            print(f"{name}: not run: needs >= {need:.1f} GB before activations, the machine has {ram:.1f} GB", flush=True)
            continue
        results[name] = run_variant(name, settings, model, data, args)
        print(f"{name}: {results[name]}", flush=True)
    ray.shutdown()

    base_name = "full-fp32"
    base = results.get(base_name, {})
    base_gb = base.get("cma_learner_gb") or base.get("estimate_gb") or static_gb(VARIANTS[base_name], params)
    est = "" if "cma_learner_gb" in base else " (its estimate)"
    print(f"\n{args.model}, micro-batch {args.micro_batch}, ratios to full fp32{est}: {base_gb:.1f} GB")
    cols = ["cma_learner_gb", "rl_learner_gb", "rl_rollout_gb", "rl_reward_gb", "cma_s", "rl_s", "rl_sync_mb"]
    print(f"{'variant':26s} " + " ".join(f"{c:>15s}" for c in cols) + f" {'CMA vs fp32':>12s}")
    for name, r in results.items():
        if "estimate_gb" in r:
            print(f"{name:26s} {'>= ' + format(r['estimate_gb'], '.1f') + ' (est.)':>15s}  not run (does not fit)")
            continue
        cells = " ".join(f"{r[c]:15.2f}" if c in r else f"{'-':>15s}" for c in cols)
        print(f"{name:26s} {cells} {r['cma_learner_gb'] / base_gb:11.2f}x")


if __name__ == "__main__":
    main()
