"""Embeddings/s of disc and gen modes on a zoo model, batch 1 vs batch B: gen in one pass (``<gen_emb>`` read
from the generation's KV cache, the default) vs two passes (generate, then teacher-force prompt + rewrite
again), and the gen/disc cost ratio of each.

Every configuration runs in this one process on the same inputs, so the printed ratios compare like with
like; configurations are interleaved over ``--repeats`` rounds and each keeps its best round, so a load
spike from other processes does not land on one configuration only. The tokens fed after the generation (one pass) are printed too: 1 per well-formed rewrite a trained
model writes; an untrained model's rewrites often re-tokenise differently, so more of them are fed again.
Usage: python bench/embed.py [--model tiny] [--n 32] [--batch 16] [--max-new-tokens 16] [--image-size 84]
[--repeats 3] [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import random
import time

import numpy as np
import torch

from rime_data.scenes import random_scene, render
from rime_model import GenerationConfig, load_embedder
from rime_model.gen_embed import generate_and_embed


def _items(n: int, size: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    return [{"text": s.caption()} if i % 2 else {"image": render(s, size)} for i, s in enumerate(scenes)]


def _load(args: argparse.Namespace):
    dtype = getattr(torch, args.dtype)
    if args.model != "qwen2-vl-2b-random":
        return load_embedder(args.model, dtype=dtype, device=args.device)
    from rime_model.zoo import build_qwen2_vl_2b_random  # the paper's size, random weights: timing only

    return build_qwen2_vl_2b_random(None, dtype=dtype, device=args.device)


def _sync(device: str | None) -> None:
    if device and device.startswith("cuda"):
        torch.cuda.synchronize()


def _seconds(fn, device: str | None) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="zoo name (tiny, small), saved folder, hf:<path> or qwen2-vl-2b-random")
    ap.add_argument("--n", type=int, default=32, help="inputs (half image, half text)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=84, help="rendered scene size in pixels")
    ap.add_argument("--device", default=None, help="cuda on a GPU machine; default CPU")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds; each configuration keeps its best")
    args = ap.parse_args()
    torch.manual_seed(0)
    emb = _load(args)
    items = _items(args.n, args.image_size)
    one = GenerationConfig(max_new_tokens=args.max_new_tokens)
    two = GenerationConfig(max_new_tokens=args.max_new_tokens, one_pass=False)
    runs = {"disc": ("disc", None), "gen": ("gen", one), "gen-2pass": ("gen", two)}
    configs = {(name, bs): (mode, gen) for name, (mode, gen) in runs.items() for bs in (1, args.batch)}
    best = {key: float("inf") for key in configs}
    with torch.inference_mode():
        for rnd in range(args.repeats + 1):  # round 0 warms up (allocations, lazy inits)
            for (name, bs), (mode, gen) in configs.items():
                secs = _seconds(lambda: emb.embed(items, mode=mode, batch_size=bs, generation=gen), args.device)
                if rnd:
                    best[(name, bs)] = min(best[(name, bs)], secs)
        prepared = emb.prepare(items)
        chunks = [prepared[i : i + args.batch] for i in range(0, len(prepared), args.batch)]
        fed = [f for c in chunks for f in (generate_and_embed(emb.model, emb.enc, c, one).fed_tokens or [])]
        one_res = emb.embed(items, mode="gen", batch_size=args.batch, generation=one)
        two_res = emb.embed(items, mode="gen", batch_size=args.batch, generation=two)
    rows = {key: args.n / secs for key, secs in best.items()}
    max_diff = float(np.abs(one_res.vectors - two_res.vectors).max())
    rewrite_len = float(np.mean(one_res.rewrite_token_counts))
    print(
        f"model={args.model} n={args.n} max_new_tokens={args.max_new_tokens} image_size={args.image_size} "
        f"device={args.device or 'cpu'} dtype={args.dtype} threads={torch.get_num_threads()} best of {args.repeats}"
    )
    print(f"{'mode':10s} {'batch':>5s} {'emb/s':>9s}")
    for (name, bs), r in rows.items():
        print(f"{name:10s} {bs:5d} {r:9.2f}")
    b = args.batch
    summary = {
        f"disc batch{b}/batch1 speed-up": rows[("disc", b)] / rows[("disc", 1)],
        f"gen batch{b}/batch1 speed-up": rows[("gen", b)] / rows[("gen", 1)],
        "gen one-pass/two-pass speed-up (batch 1)": rows[("gen", 1)] / rows[("gen-2pass", 1)],
        f"gen one-pass/two-pass speed-up (batch {b})": rows[("gen", b)] / rows[("gen-2pass", b)],
        "gen/disc cost ratio (batch 1)": rows[("disc", 1)] / rows[("gen", 1)],
        f"gen/disc cost ratio (batch {b})": rows[("disc", b)] / rows[("gen", b)],
        "gen-2pass/disc cost ratio (batch 1)": rows[("disc", 1)] / rows[("gen-2pass", 1)],
        f"gen-2pass/disc cost ratio (batch {b})": rows[("disc", b)] / rows[("gen-2pass", b)],
    }
    for k, v in summary.items():
        print(f"{k}: {v:.2f}x")
    print(
        f"one pass: mean rewrite {rewrite_len:.1f} tokens, mean {np.mean(fed):.2f} tokens fed after the generation "
        f"(max {max(fed)}); max |one-pass - two-pass| = {max_diff:.2e}"
    )
    print(
        json.dumps(
            {
                "emb_per_s": {f"{m}@{bs}": round(r, 3) for (m, bs), r in rows.items()},
                **{k: round(v, 3) for k, v in summary.items()},
                "mean_rewrite_tokens": round(rewrite_len, 2),
                "mean_fed_tokens": round(float(np.mean(fed)), 2),
                "max_abs_diff_one_vs_two_pass": max_diff,
            }
        )
    )


if __name__ == "__main__":
    main()
