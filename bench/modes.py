"""Per-sample latency of every embedding mode on ONE model, and the ratios against disc.

Modes, all at batch 1 on the same inputs: ``disc`` (one forward pass), ``latent`` (PLUME: prefix +
K latent steps + suffix), ``gen`` (RIME: a short rewrite, then the teacher-forced embedding pass) and
``cot`` (a long explicit reasoning generation before the embedding, as UME-R1 does, ~400 tokens).
Generation lengths are forced (``min_new_tokens``), so an untrained model does the same work a
trained one would. The paper's reference (one H20): latent 298 ms, CoT 9023 ms, plain 156 ms, i.e.
CoT/latent ~30x and latent/disc ~1.9x.

  python bench/modes.py                                   # tiny zoo model, CPU
  python bench/modes.py --model qwen2-vl-2b-random --device cuda --dtype bfloat16 --image-size 448
      # Qwen2-VL-2B's architecture, randomly initialised (no weights needed to time it); GPU machine
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from rime_data.scenes import random_scene, render
from rime_model import GenerationConfig, load_embedder


def _items(n: int, size: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        s = random_scene(rng)
        out.append(
            {"image": render(s, size), "text": "Find the picture this one refers to."}
            if i % 2 == 0
            else {"text": f"Pictures containing the object left of the {s.objects[0].name}."}
        )
    return out


def _load(args):
    if args.model != "qwen2-vl-2b-random":
        return load_embedder(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    from rime_model.zoo import build_qwen2_vl_2b_random

    tok = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer)
    return build_qwen2_vl_2b_random(tok, dtype=getattr(torch, args.dtype), device=args.device)


def _latency_ms(fn, items: list[dict], device: str | None, repeats: int) -> list[float]:
    fn(items[0])  # warm-up
    out = []
    for _ in range(repeats):
        for it in items:
            if device and device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn(it)
            if device and device.startswith("cuda"):
                torch.cuda.synchronize()
            out.append((time.perf_counter() - t) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="zoo name, saved folder, hf:<path>, or qwen2-vl-2b-random")
    ap.add_argument("--device", default=None, help="cuda on a GPU machine; default CPU")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder for qwen2-vl-2b-random (default: offline Qwen2)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--n", type=int, default=6, help="inputs (half image+text, half text)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--image-size", type=int, default=84)
    ap.add_argument("--latent-steps", type=int, default=8)
    ap.add_argument("--rewrite-tokens", type=int, default=24, help="RIME rewrite length (a few to a few dozen tokens)")
    ap.add_argument("--cot-tokens", type=int, default=400, help="explicit reasoning length (UME-R1 averages ~400)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    emb = _load(args)
    items = _items(args.n, args.image_size)

    def forced(n: int) -> GenerationConfig:
        return GenerationConfig(max_new_tokens=n, extra={"min_new_tokens": n})

    modes = {
        "disc": lambda it: emb.embed([it], mode="disc"),
        "latent": lambda it: emb.embed([it], mode="latent", steps=args.latent_steps),
        "gen": lambda it: emb.embed([it], mode="gen", generation=forced(args.rewrite_tokens)),
        "cot": lambda it: emb.embed([it], mode="gen", generation=forced(args.cot_tokens)),
    }
    lat = {}
    with torch.inference_mode():
        for name, fn in modes.items():
            lat[name] = statistics.median(_latency_ms(fn, items, args.device, args.repeats))
    dev = (
        torch.cuda.get_device_name()
        if args.device and args.device.startswith("cuda")
        else f"CPU x{torch.get_num_threads()} threads"
    )
    print(
        f"model={args.model} device={dev} dtype={args.dtype} n={args.n} K={args.latent_steps} "
        f"rewrite={args.rewrite_tokens} tok, cot={args.cot_tokens} tok"
    )
    labels = {
        "disc": "disc (one pass)",
        "latent": f"latent (K={args.latent_steps})",
        "gen": f"gen ({args.rewrite_tokens}-token rewrite)",
        "cot": f"explicit reasoning ({args.cot_tokens} tok)",
    }
    print(f"{'mode':32s} {'ms/sample':>10s} {'vs disc':>8s}")
    for name, ms in lat.items():
        print(f"{labels[name]:32s} {ms:10.1f} {ms / lat['disc']:7.2f}x")
    summary = {
        "latent/disc": lat["latent"] / lat["disc"],
        "gen/disc": lat["gen"] / lat["disc"],
        "cot/latent": lat["cot"] / lat["latent"],
        "cot/gen": lat["cot"] / lat["gen"],
    }
    print("  ".join(f"{k} {v:.1f}x" for k, v in summary.items()) + "   (paper, H20: latent/disc 1.9x, cot/latent 30x)")
    print(
        json.dumps(
            {
                "ms_per_sample": {k: round(v, 2) for k, v in lat.items()},
                **{k: round(v, 3) for k, v in summary.items()},
                "model": args.model,
                "device": dev,
            }
        )
    )


if __name__ == "__main__":
    main()
