"""A JSON-driven self-test of the vLLM rollout backend, run in ``.venv-vllm``: ``run_jobs`` on an existing
engine (``tests/test_rollout_vllm.py`` runs it inside a vLLM rollout worker), or ``python -m
actors.rollout_vllm_selftest --selftest SPEC_JSON OUT_JSON`` on a new one. It takes a spec of generate / load jobs (greedy and sampled rollouts, object-store and streamed weight loads, refused
and failing loads) and writes what the engine returned, for the test to compare with the HF path in the
base venv (the two venvs cannot share a process)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from . import rollout_vllm
from .rollout_vllm import VllmRolloutBackend


def _decode_image(b64: str | None):
    if b64 is None:
        return None
    import base64
    import io

    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")


def _stream_load_job(backend: VllmRolloutBackend, job: dict) -> dict:
    """``load_weight_stream`` fed one tensor at a time, each released by the feeder once handed over (as a
    broadcast receiver does). Loads refused up front: ``meta`` lacking any key containing ``leave_out``,
    or declaring the first key containing ``bad_meta`` one row too long. Two loads that fail part-way:
    the first tensor whose key contains ``bad_shape`` sent with one row too many (``meta`` declares it
    right), or the stream raising at tensor ``fail_at`` (a broadcast whose source died); with
    ``break_rollback`` the undo of such a failure fails too (the engine is left unusable: run it last).
    Reports how many tensors were pulled, and the most handed-over tensors still alive at any pull (what
    vLLM holds)."""
    import weakref

    import torch
    from safetensors.torch import load_file

    from actors.weight_sync import tensor_meta

    sd = load_file(job["safetensors"])
    total = len(sd)
    meta = [m for m in tensor_meta(sd) if not (job.get("leave_out") and job["leave_out"] in m[0])]
    bad_meta = next((i for i, m in enumerate(meta) if job.get("bad_meta") and job["bad_meta"] in m[0]), None)
    if bad_meta is not None:
        name, shape, dtype = meta[bad_meta]
        meta[bad_meta] = (name, (shape[0] + 1, *shape[1:]), dtype)
    alive: weakref.WeakSet = weakref.WeakSet()
    stats: dict[str, Any] = {"pulled": 0, "peak_alive": 0, "bad_key": None}

    def items():
        for i, k in enumerate(list(sd)):
            if i == job.get("fail_at"):
                raise RuntimeError(f"the weight source stopped after {i} of {total} tensors")
            stats["peak_alive"] = max(stats["peak_alive"], len(alive))
            v = sd.pop(k)
            if job.get("bad_shape") and job["bad_shape"] in k and stats["bad_key"] is None:
                v = torch.cat([v, v[:1]])  # one row too many
                stats["bad_key"] = k
            alive.add(v)
            stats["pulled"] += 1
            yield k, v
            del v

    def failing_undo(worker: Any) -> None:
        raise RuntimeError("the rollback failed (injected by the selftest)")

    undo = rollout_vllm._abandon_layerwise_reload  # what load_weight_stream calls to roll a reload back
    if job.get("break_rollback"):
        rollout_vllm._abandon_layerwise_reload = failing_undo
    t = time.perf_counter()
    try:
        backend.load_weight_stream(meta, items())
        error = None
    except Exception as e:  # noqa: BLE001 - the test asserts which error and what the engine does next
        error = f"{type(e).__name__}: {e}"
    finally:
        rollout_vllm._abandon_layerwise_reload = undo
    return {
        "kind": job["kind"],
        "name": job.get("name"),
        "seconds": time.perf_counter() - t,
        "num_tensors": total,
        "error": error,
        **stats,
    }


def _run_selftest(spec: dict) -> dict:
    """Run the jobs of ``spec`` on a new engine; see tests/test_rollout_vllm.py for the format."""
    t0 = time.perf_counter()
    backend = VllmRolloutBackend(spec["model_path"], seed=spec.get("seed", 0), max_model_len=spec.get("max_model_len", 1024))
    out = run_jobs(backend, spec)
    out["timings"]["engine_init_s"] = time.perf_counter() - t0
    return out


def run_jobs(backend: VllmRolloutBackend, spec: dict) -> dict:
    """Run the jobs of ``spec`` on ``backend``, an engine that already exists (a rollout worker's, in the tests:
    one engine start serves every check)."""
    import torch
    from safetensors.torch import load_file

    out: dict[str, Any] = {"timings": {}}
    import vllm

    out["versions"] = {"vllm": vllm.__version__, "torch": torch.__version__}
    out["jobs"] = []
    for job in spec["jobs"]:
        kind = job["kind"]
        if kind == "load_weights":
            sd = load_file(job["safetensors"])
            t = time.perf_counter()
            backend.load_weights(sd)
            out["jobs"].append({"kind": kind, "seconds": time.perf_counter() - t, "num_tensors": len(sd)})
            continue
        if kind == "load_weight_stream":
            out["jobs"].append(_stream_load_job(backend, job))
            continue
        prompts = [backend.prompt_text(it["text"], it.get("image_b64"), it.get("instruction")) for it in job["items"]]
        images = [_decode_image(it.get("image_b64")) for it in job["items"]]
        if kind == "prompt_ids":
            out["jobs"].append({"kind": kind, "prompt_ids": backend.prompt_token_ids(prompts, images)})
            continue
        if kind != "generate":
            raise ValueError(f"unknown job kind {kind!r}")
        reps = job.get("repeat", 1)
        t = time.perf_counter()
        for _ in range(reps):
            res = backend.generate(
                prompts,
                images,
                n=job["n"],
                max_new_tokens=job["max_new_tokens"],
                temperature=job["temperature"],
                top_p=job.get("top_p", 1.0),
                seed=job.get("seed"),
                stop_token_ids=job["stop_token_ids"],
            )
        dt = (time.perf_counter() - t) / reps
        ntok = sum(len(ids) for per in res for ids, _ in per)
        out["jobs"].append(
            {
                "kind": kind,
                "name": job.get("name"),
                "seconds": dt,
                "tokens": ntok,
                "tokens_per_s": ntok / dt if dt > 0 else math.inf,
                "samples": [[{"ids": ids, "logprobs": lps} for ids, lps in per] for per in res],
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Run rollout jobs on a vLLM engine and write JSON (test driver).")
    ap.add_argument("--selftest", nargs=2, metavar=("SPEC_JSON", "OUT_JSON"), required=True)
    args = ap.parse_args(argv)
    spec = json.loads(Path(args.selftest[0]).read_text())
    Path(args.selftest[1]).write_text(json.dumps(_run_selftest(spec)))
    return 0


if __name__ == "__main__":  # the guard vLLM needs (its engine may spawn processes)
    raise SystemExit(main())
