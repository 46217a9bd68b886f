"""The main job on embedded defaults: tiny model, generated scenes, both embedding modes, one table.

It exists so a fresh machine proves the whole model path in about a minute: the zoo builds the
tiny model offline, scenes are generated, images and captions are embedded in disc and gen mode,
and caption->image retrieval is scored in all four query/candidate mode pairs. It ends by naming the
commands that train, evaluate, serve and submit, so the smoke path leads to the real ones.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np

from rime_data.scenes import random_scene, render
from rime_model import GenerationConfig, load_embedder

NEXT_STEPS = (  # (what, command): printed after the table; the README documents each
    ("CMA + Refine-RL on 2 DeepSpeed learners, MLflow in runs/tiny-cpu", "rime train configs/tiny-cpu.yaml"),
    ("PLUME latent mode and explicit-to-latent curriculum", "rime train configs/plume-tiny.yaml"),
    ("retrieval eval in any query/candidate mode pair", "rime eval --model runs/tiny-cpu/final --data data/synth"),
    ("Ray Serve /v1/embeddings", "rime serve --model runs/tiny-cpu/final"),
    ("the same job on a Ray cluster", "rime submit configs/tiny-cpu.yaml --address http://HEAD:8265"),
)


def hit_at_1(queries: np.ndarray, candidates: np.ndarray) -> float:
    """Fraction of queries whose own candidate (same index) ranks first by cosine similarity."""
    best = (queries @ candidates.T).argmax(axis=1)
    return float((best == np.arange(len(queries))).mean())


def run_quickstart(model: str = "tiny", n_scenes: int = 16, seed: int = 0, out_dir: str | Path = "runs/quickstart") -> dict:
    """Embed ``n_scenes`` generated scenes and their captions in both modes; write a JSON report."""
    t0 = time.perf_counter()
    emb = load_embedder(model, seed=seed)
    t_load = time.perf_counter() - t0
    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(n_scenes)]
    captions = [{"text": s.caption(), "instruction": "Find the picture that matches the description."} for s in scenes]
    images = [{"image": render(s), "instruction": "Represent the picture."} for s in scenes]
    gen = GenerationConfig(max_new_tokens=16)
    vecs, timings = {}, {}
    for side, items in (("query", captions), ("cand", images)):
        for mode in ("disc", "gen"):
            t = time.perf_counter()
            res = emb.embed(items, mode=mode, generation=gen)
            timings[f"{side}_{mode}_s"] = round(time.perf_counter() - t, 3)
            vecs[(side, mode)] = res
    table = {
        f"{qm}->{cm}": hit_at_1(vecs[("query", qm)].vectors, vecs[("cand", cm)].vectors)
        for qm in ("disc", "gen")
        for cm in ("disc", "gen")
    }
    report = {
        "model": model,
        "n_scenes": n_scenes,
        "dim": int(vecs[("query", "disc")].vectors.shape[1]),
        "load_s": round(t_load, 3),
        "timings": timings,
        "caption_to_image_hit@1": table,
        "chance_hit@1": 1.0 / n_scenes,
        "example": {
            "caption": captions[0]["text"],
            "gen_rewrite": vecs[("query", "gen")].rewrite_texts[0],
            "gen_rewrite_tokens": vecs[("query", "gen")].rewrite_token_counts[0],
        },
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    _print(report, out)
    return report


def _print(report: dict, out: Path) -> None:
    print(
        f"\nrime quickstart: model={report['model']} dim={report['dim']} scenes={report['n_scenes']} (load {report['load_s']} s)"
    )
    print(f"  example caption : {report['example']['caption']}")
    print(f"  gen rewrite     : {report['example']['gen_rewrite']!r} ({report['example']['gen_rewrite_tokens']} tokens)")
    print(f"  caption->image Hit@1 (untrained model, chance = {report['chance_hit@1']:.3f}):")
    for pair, v in report["caption_to_image_hit@1"].items():
        print(f"    {pair:10s} {v:.3f}")
    print("  timings (s): " + ", ".join(f"{k}={v}" for k, v in report["timings"].items()))
    for what, command in NEXT_STEPS:
        print(f"  next: {command:70s} # {what}")
    print(f"  report: {out / 'report.json'}")
