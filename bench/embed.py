"""Embeddings/s of disc and gen modes on a zoo model, batch 1 vs batch B, and the gen/disc cost ratio.

Both modes run in this one process on the same inputs, so the printed ratios compare like with
like. Usage: python bench/embed.py [--model tiny] [--n 32] [--batch 16] [--max-new-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from rime_data.scenes import random_scene, render
from rime_model import GenerationConfig, load_embedder


def _items(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    return [{"text": s.caption()} if i % 2 else {"image": render(s)} for i, s in enumerate(scenes)]


def _rate(fn, n: int) -> float:
    fn()  # warm-up (allocations, lazy inits)
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args()
    torch.manual_seed(0)
    emb = load_embedder(args.model)
    items = _items(args.n)
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens)
    rows = {}
    for mode in ("disc", "gen"):
        for bs in (1, args.batch):
            rows[(mode, bs)] = _rate(lambda: emb.embed(items, mode=mode, batch_size=bs, generation=gen), args.n)
    print(f"model={args.model} n={args.n} max_new_tokens={args.max_new_tokens} threads={torch.get_num_threads()}")
    print(f"{'mode':6s} {'batch':>5s} {'emb/s':>9s}")
    for (mode, bs), r in rows.items():
        print(f"{mode:6s} {bs:5d} {r:9.2f}")
    b = args.batch
    summary = {
        f"disc batch{b}/batch1 speed-up": rows[("disc", b)] / rows[("disc", 1)],
        f"gen batch{b}/batch1 speed-up": rows[("gen", b)] / rows[("gen", 1)],
        f"gen/disc cost ratio (batch {b})": rows[("disc", b)] / rows[("gen", b)],
        "gen/disc cost ratio (batch 1)": rows[("disc", 1)] / rows[("gen", 1)],
    }
    for k, v in summary.items():
        print(f"{k}: {v:.2f}x")
    print(
        json.dumps(
            {
                "emb_per_s": {f"{m}@{bs}": round(r, 3) for (m, bs), r in rows.items()},
                **{k: round(v, 3) for k, v in summary.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
