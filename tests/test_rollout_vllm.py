"""The vLLM rollout backend (actors/rollout_vllm.py) against rime's HF path, on a REAL vLLM engine.

vLLM lives in ``.venv-vllm`` (``bash scripts/setup_vllm.sh``; docs/decisions.md §1), the tests run in
``.venv``, so the vLLM side runs where production runs it: in a ``RolloutWorker(backend="vllm")`` Ray
actor started from here with the runtime_env ``orchestrator.rl_actors`` builds (``.venv-vllm``'s
interpreter). Besides the worker's own API, the JSON-driven jobs of ``actors.rollout_vllm_selftest``
(generate / load jobs, results out as plain data) run inside that actor on the worker's engine. Without
a working ``.venv-vllm`` every vLLM test here skips, saying how to create it.

The model is the zoo ``tiny`` Qwen2-VL, briefly fine-tuned (in a tmp dir) on the ideal rewrites of
the test items so that, like a trained run's ``final/``, its distributions are peaked and greedy
rewrites end with ``</rewrite><gen_emb>`` (the stop path is exercised, not only ``max_new_tokens``).
One engine serves every test of the module (engine start is 25-60 s here; the vLLM tests run in file
order, the last one leaves the engine unusable); never two engines at once.
"""

from __future__ import annotations

import base64
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
VLLM_PY = REPO / ".venv-vllm" / "bin" / "python"
SETUP_HINT = "create it with `bash scripts/setup_vllm.sh` (~4 min, ~2.7 GB)"
MAX_NEW = 16
# Max |logprob_vLLM - logprob_HF| over every sampled token, both fp32 on CPU. Measured: 2.1e-6
# (406 tokens: greedy, T=1 and T=0.7/top_p=0.9 samples, text and image prompts, before and after a
# weight update); vLLM's fused qkv / gate-up GEMMs (oneDNN), its CPU attention and RMSNorm kernels
# round differently from HF's eager ops by a few fp32 ulps, and the log-softmax over 151,936 logits
# adds a few more. 1e-4 keeps a 50x margin yet is far below what a real bug gives: processed
# (temperature-0.7) logprobs would differ by ~0.1-10, an off-by-one position by O(1).
LOGPROB_ATOL = 1e-4


@pytest.fixture(scope="module")
def vllm_version(ray_local) -> str:
    """vLLM's version, imported by the pre-flight probe of a Refine-RL run (``check_vllm_python``: the rollout
    workers' runtime_env, inside their placement group); the module skips, saying why, without it."""
    from ray.util.placement_group import placement_group, remove_placement_group

    from orchestrator.config import parse_config
    from orchestrator.rl_actors import check_vllm_python

    if not VLLM_PY.exists():
        reason = f"{VLLM_PY} not found: the vLLM rollout backend needs .venv-vllm; {SETUP_HINT}"
        print(reason)
        pytest.skip(reason)
    pg = placement_group([{"CPU": 0.01}])
    try:
        ray_local.get(pg.ready(), timeout=60)
        return check_vllm_python(parse_config({"rollout": {"backend": "vllm"}}), pg, 0)
    except RuntimeError as e:  # it names the interpreter and why vllm does not import there
        reason = f"{e}; {SETUP_HINT}"
        print(reason)
        pytest.skip(reason)
    finally:
        remove_placement_group(pg)


@pytest.fixture(scope="module")
def vllm_worker(vllm_version, trained_path, ray_local):
    """The production rollout worker on the trained model: ``RolloutWorker(backend="vllm")`` started from
    this (.venv) process with the runtime_env ``orchestrator.rl_actors`` builds, so in ``.venv-vllm``. Its
    engine is the module's only one."""
    from actors.rollout import RolloutWorker
    from orchestrator.config import parse_config
    from orchestrator.rl_actors import rollout_runtime_env

    env = rollout_runtime_env(parse_config({"rollout": {"backend": "vllm"}}))
    worker = ray_local.remote(RolloutWorker).options(num_cpus=0.25, runtime_env=env).remote(str(trained_path), "vllm")
    yield worker
    ray_local.kill(worker)


# ---------------------------------------------------------------------- data and model
def make_items(root: Path) -> list[dict]:
    """Three text and three image queries of the generated benchmark (qry_image = PNG bytes)."""
    from rime_data.schema import read_table
    from rime_data.synth import write_synth

    write_synth(root, {"test": 24}, seed=0)
    rows = read_table(root / "test" / "queries.parquet").to_pylist()
    text = [r for r in rows if not r["qry_image"]][:3]
    image = [r for r in rows if r["qry_image"]][:3]
    assert len(text) == 3 and len(image) == 3, "synth split lacks text or image queries"
    return [
        {"text": r["qry_text"] or "", "image": r["qry_image"], "instruction": r["qry_inst"], "rewrite": r["rewrite"]}
        for r in text + image
    ]


def _inputs(items):
    out = []
    for it in items:
        d = {"text": it["text"], "instruction": it["instruction"]}
        if it["image"]:
            d["image"] = it["image"]
        out.append(d)
    return out


@pytest.fixture(scope="module")
def synth_items(tmp_path_factory):
    return make_items(tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="module")
def trained_path(tmp_path_factory, zoo_cache, synth_items) -> Path:
    return train_tiny(synth_items, tmp_path_factory.mktemp("trained") / "model")


def train_tiny(synth_items: list[dict], out: Path) -> Path:
    """Zoo tiny, fine-tuned for a few seconds on the items' ideal rewrites (a stand-in for a trained
    run's ``final/``: peaked distributions, rewrites that close with ``</rewrite><gen_emb>``)."""
    from rime_model import Embedder, ensure_zoo_model
    from rime_model.losses import completion_ce

    torch.manual_seed(0)
    emb = Embedder.load(ensure_zoo_model("tiny"))
    items = emb.prepare(_inputs(synth_items))
    rewrites = [it["rewrite"] for it in synth_items]
    opt = torch.optim.Adam(emb.model.parameters(), lr=5e-3)
    emb.model.train()
    batch = emb.enc.gen_batch(items, rewrites)
    for _ in range(24):  # ~30 s on 2 idle cores; leaves a mix of stopped and truncated rewrites
        loss = completion_ce(emb.hidden_states(batch), batch.labels, emb.model.lm_head)
        opt.zero_grad()
        loss.backward()
        opt.step()
    emb.model.eval()
    return emb.save(out)


def _perturbed_state_dict(path: Path, scale: float = 0.05, seed: int = 1) -> dict[str, torch.Tensor]:
    """HF-named state dict (as the learner exports it) with Gaussian noise on every parameter.

    Noise goes on ``named_parameters`` (tied embedding/lm head perturbed once, consistently), then
    the full ``state_dict()`` is exported with independent copies."""
    from rime_model import Embedder

    emb = Embedder.load(path)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in emb.model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * (p.float().std() if p.numel() > 1 else 1.0))
    return {k: v.detach().clone().contiguous() for k, v in emb.model.state_dict().items()}


# ---------------------------------------------------------------------- HF reference
def _hf_greedy(emb, items) -> list[list[int]]:
    from rime_model import GenerationConfig

    return [
        r.token_ids
        for r in emb.generate_rewrites(emb.prepare(_inputs(items)), generation=GenerationConfig(max_new_tokens=MAX_NEW))
    ]


def _hf_prompts(emb, items) -> list[dict]:
    """rime's HF gen-prompt encoding of each item alone (batch 1)."""
    return [emb.enc.gen_prompt_batch(emb.prepare(_inputs([it]))) for it in items]


@torch.no_grad()
def _hf_logprobs(emb, enc: dict, completion: list[int]) -> list[float]:
    """Teacher-forced temperature-1 logprob of each completion token under the HF model, after the prompt
    ``enc`` (one item's ``_hf_prompts``)."""
    prompt_len = enc["input_ids"].shape[1]
    comp = torch.tensor([completion])
    inputs = dict(enc)
    for key, t in enc.items():  # per-token tensors (input_ids, attention_mask, mm_token_type_ids)
        if t.dim() == 2 and t.shape == enc["input_ids"].shape:
            inputs[key] = torch.cat(
                [t, comp if key == "input_ids" else torch.full_like(comp, 1 if key == "attention_mask" else 0)], dim=1
            )
    logits = emb.model(**inputs, use_cache=False).logits[0, prompt_len - 1 : -1].float()
    lp = torch.log_softmax(logits, dim=-1)
    return lp.gather(1, torch.tensor(completion)[:, None])[:, 0].tolist()


def _wire(items) -> list[dict]:
    return [
        {
            "text": it["text"],
            "instruction": it["instruction"],
            "image_b64": base64.b64encode(it["image"]).decode() if it["image"] else None,
        }
        for it in items
    ]


def _run_selftest(worker, spec: dict) -> dict:
    """The jobs of ``spec`` (format: ``actors.rollout_vllm_selftest``) run inside ``worker`` on its engine."""

    def run(self, spec):  # defined here so that Ray ships it by value (tests/ is not importable in the actor)
        from actors.rollout_vllm_selftest import run_jobs

        engine = self.backend.backend  # VllmBackendAdapter -> VllmRolloutBackend: the worker's engine, not a second one
        return {**run_jobs(engine, spec), "engine_init_s": engine.init_seconds}

    import ray

    return ray.get(worker.__ray_call__.remote(run, spec), timeout=900)


# ---------------------------------------------------------------------- tests
def test_weight_meta_covers_the_checkpoint_and_a_wrong_shape_is_refused_up_front(tiny, tmp_path):
    """No vLLM needed: the learner's state_dict() names (transformers v5 spelling) cover every tensor
    of the saved checkpoint (original spelling) at its shape once canonicalised, read from the
    safetensors headers; a partial export and one with a wrong shape are refused from their metadata."""
    from actors.rollout_vllm import VllmRolloutBackend, _canonical_key, _checkpoint_shapes
    from actors.weight_sync import WeightMismatchError, tensor_meta

    path = tiny.save(tmp_path / "m")
    ckpt = _checkpoint_shapes(path)
    sd = tiny.model.state_dict()
    shapes = {_canonical_key(k): tuple(v.shape) for k, v in sd.items()}
    assert ckpt and all(shapes[k] == shape for k, shape in ckpt.items())
    assert "language_model.model.embed_tokens.weight" in ckpt and any(k.startswith("visual.") for k in ckpt)

    backend = VllmRolloutBackend.__new__(VllmRolloutBackend)  # the check only needs the checkpoint's shapes
    backend._checkpoint_shapes = ckpt
    meta = tensor_meta(sd)
    backend.check_weight_meta(meta)
    with pytest.raises(WeightMismatchError, match="lacks"):
        backend.check_weight_meta([m for m in meta if "layers.1." not in m[0]])
    i = next(i for i, m in enumerate(meta) if "layers.1.mlp.down_proj" in m[0])
    wrong = meta[:i] + [(meta[i][0], (meta[i][1][0] + 1, *meta[i][1][1:]), meta[i][2])] + meta[i + 1 :]
    with pytest.raises(WeightMismatchError, match=r"1 tensors do not match.*layers\.1\.mlp\.down_proj.*sent \(\d+, \d+\)"):
        backend.check_weight_meta(wrong)


@pytest.mark.slow
def test_vllm_rollout_worker_in_ray_actor_from_base_venv(vllm_version, vllm_worker, trained_path, synth_items, ray_local):
    """The production path: a .venv driver starts ``RolloutWorker(backend="vllm")`` with the runtime_env
    ``orchestrator.rl_actors`` builds (``.venv-vllm``'s interpreter, vLLM found there by the pre-flight probe);
    its greedy rollouts equal the HF worker's token for token, before and after a versioned weight update
    through the object store, and after one through the collective sync (a real gloo broadcast from this
    process, as learner rank 0 sends it, in buckets that each worker loads as they arrive). Runs before the
    selftest below: it needs the engine fresh."""
    from actors.rollout import RolloutWorker
    from orchestrator.config import parse_config
    from orchestrator.rl_actors import rollout_runtime_env

    ray = ray_local  # the session's cluster: later tests keep using it, so this test must not restart it
    greedy = {"max_new_tokens": MAX_NEW, "temperature": 0.0, "top_p": 1.0, "seed": 0}
    queries = _inputs(synth_items)
    assert vllm_version.startswith("0.")  # the pre-flight probe
    env = rollout_runtime_env(parse_config({"rollout": {"backend": "hf"}}))
    workers = {
        "vllm": vllm_worker,
        "hf": ray.remote(RolloutWorker).options(num_cpus=0.25, runtime_env=env).remote(str(trained_path), "hf"),
    }
    try:
        exe = ray.get(workers["vllm"].__ray_call__.remote(lambda self: sys.executable), timeout=600)
        assert exe.startswith(str(REPO / ".venv-vllm")), exe

        def ids(out):
            return out.token_ids

        outs = {b: ray.get(w.generate.remote(queries, 1, greedy), timeout=600) for b, w in workers.items()}
        assert ids(outs["vllm"]) == ids(outs["hf"])
        assert outs["vllm"].text == outs["hf"].text
        # a versioned update through the object store, as the Refine-RL driver sends it
        from actors.weight_sync import ObjectStoreWeights

        ref = ray.put(ObjectStoreWeights(_perturbed_state_dict(trained_path)))  # read-only views, as the driver sends
        for w in workers.values():
            assert ray.get(w.update_weights.remote(1, [ref]), timeout=600)["version"] == 1
        outs_p = {b: ray.get(w.generate.remote(queries, 1, greedy), timeout=600) for b, w in workers.items()}
        assert ids(outs_p["vllm"]) == ids(outs_p["hf"]) != ids(outs["hf"])
        assert outs_p["vllm"].version == outs_p["hf"].version == [1] * len(queries)
        # a collective update: this process is rank 0 of a gloo broadcast group with both workers
        from actors.weight_sync import BroadcastGroup, tensor_meta

        sd2 = _perturbed_state_dict(trained_path, seed=2)
        meta, bucket = tensor_meta(sd2), 256 << 10
        store, host, port = BroadcastGroup.open_store(3, 120)
        joins = [w.join_weight_sync.remote(host, port, i + 1, 3, 1, "gloo", 120) for i, w in enumerate(workers.values())]
        src = BroadcastGroup(store, 0, 3, 1, "gloo", 120)
        assert ray.get(joins, timeout=120) == [1, 1]
        loads = [w.receive_weights.remote(2, 1, meta, bucket) for w in workers.values()]
        sent = src.send(sd2, bucket)
        infos = ray.get(loads, timeout=600)
        assert [i["bytes"] for i in infos] == [sent, sent] and [i["version"] for i in infos] == [2, 2]
        outs_c = {b: ray.get(w.generate.remote(queries, 1, greedy), timeout=600) for b, w in workers.items()}
        assert ids(outs_c["vllm"]) == ids(outs_c["hf"]) != ids(outs_p["hf"])
    finally:
        ray.kill(workers["hf"])  # the vLLM worker is the module's (the test below uses its engine)


@pytest.mark.slow
def test_vllm_matches_hf_greedy_logprobs_and_weight_sync(vllm_worker, trained_path, synth_items, tmp_path):
    """(a) greedy == HF greedy token for token, text and image items; (b) sampled-token logprobs ==
    HF's teacher-forced temperature-1 logprobs (also when sampled at T=0.7, top_p=0.9: raw, not
    processed); (c) after load_weights(perturbed HF state dict): greedy changes and == HF's on the
    perturbed weights; (d) the streamed load a collective sync uses: metadata that misses a layer or
    declares a wrong shape is refused before one tensor is pulled (the engine still runs the perturbed weights); two loads that fail
    part-way (a tensor whose shape differs from what its metadata declared, a source that dies mid-stream) raise and
    leave an engine that still runs; and a full stream of the original weights, each tensor dropped by
    the feeder once handed over, then brings back the original greedy exactly while vLLM holds only a
    few of them at any time; (f) a part-way failure whose rollback fails too raises EngineUnusableError.
    The jobs run in the module's vLLM rollout worker, on its engine, after a streamed load of the trained
    weights (the test above left others there); the last job leaves the engine unusable."""
    from safetensors.torch import save_file

    from rime_model import Embedder

    emb = Embedder.load(trained_path)
    stop = list(emb.enc.stop_ids)
    perturbed = _perturbed_state_dict(trained_path)
    sd_file = tmp_path / "perturbed.safetensors"
    save_file(perturbed, str(sd_file))
    original_file = tmp_path / "original.safetensors"  # the HF-named state dict, independent copies (tied weights)
    save_file({k: v.detach().clone().contiguous() for k, v in emb.model.state_dict().items()}, str(original_file))

    wire = _wire(synth_items)
    gen = dict(kind="generate", items=wire, max_new_tokens=MAX_NEW, stop_token_ids=stop)
    spec = {
        "model_path": str(trained_path),
        "jobs": [
            {"kind": "load_weight_stream", "name": "stream_trained", "safetensors": str(original_file)},
            {"kind": "prompt_ids", "items": wire},
            dict(gen, name="greedy", n=1, temperature=0.0),
            dict(gen, name="sample_t1", n=3, temperature=1.0, top_p=1.0, seed=7),
            dict(gen, name="sample_t07", n=2, temperature=0.7, top_p=0.9, seed=11),
            {"kind": "load_weights", "safetensors": str(sd_file)},
            dict(gen, name="greedy_perturbed", n=1, temperature=0.0),
            dict(gen, name="sample_perturbed", n=2, temperature=1.0, seed=3),
            {"kind": "load_weight_stream", "name": "stream_partial", "safetensors": str(original_file), "leave_out": "layers.1."},
            {
                "kind": "load_weight_stream",
                "name": "stream_bad_meta",
                "safetensors": str(original_file),
                "bad_meta": "layers.1.mlp.down_proj",
            },
            dict(gen, name="greedy_after_refused", n=1, temperature=0.0),
            {
                "kind": "load_weight_stream",
                "name": "stream_bad_shape",
                "safetensors": str(original_file),
                "bad_shape": "layers.1.mlp.down_proj",
            },
            dict(gen, name="greedy_after_bad_shape", n=1, temperature=0.0),
            {
                "kind": "load_weight_stream",
                "name": "stream_source_died",
                "safetensors": str(original_file),
                "fail_at": len(perturbed) // 2,
            },
            dict(gen, name="greedy_after_source_died", n=1, temperature=0.0),
            {"kind": "load_weight_stream", "name": "stream_full", "safetensors": str(original_file)},
            dict(gen, name="greedy_restored", n=1, temperature=0.0),
            {
                "kind": "load_weight_stream",
                "name": "stream_rollback_fails",
                "safetensors": str(original_file),
                "fail_at": len(perturbed) // 2,
                "break_rollback": True,
            },  # last: it leaves the engine unusable
        ],
    }
    res = _run_selftest(vllm_worker, spec)
    jobs = {j.get("name") or j["kind"]: j for j in res["jobs"]}
    print(
        f"vLLM {res['versions']}, engine init {res['engine_init_s']:.1f} s, load_weights {jobs['load_weights']['seconds']:.2f} s"
    )
    assert jobs["stream_trained"]["error"] is None, jobs["stream_trained"]

    # prompts: vLLM runs exactly the ids of rime's HF processor (image pads expanded the same way)
    prompts = _hf_prompts(emb, synth_items)
    assert jobs["prompt_ids"]["prompt_ids"] == [enc["input_ids"][0].tolist() for enc in prompts]

    # (a) greedy equality, with the stop path exercised
    hf = _hf_greedy(emb, synth_items)
    vl = [per[0]["ids"] for per in jobs["greedy"]["samples"]]
    assert vl == hf
    assert any(ids[-1] in stop and len(ids) < MAX_NEW for ids in hf), "no greedy rewrite hit a stop token"
    assert any(it["image"] for it in synth_items) and any(not it["image"] for it in synth_items)

    # (b) logprobs of every sampled token (greedy ones too) vs HF recomputed at temperature 1
    diffs = []
    for name in ("greedy", "sample_t1", "sample_t07"):
        for enc, per in zip(prompts, jobs[name]["samples"]):
            for s in per:
                assert len(s["ids"]) == len(s["logprobs"]) >= 1
                assert len(s["ids"]) == MAX_NEW or s["ids"][-1] in stop
                ref = _hf_logprobs(emb, enc, s["ids"])
                diffs += [abs(a - b) for a, b in zip(s["logprobs"], ref)]
    print(f"logprob max |vLLM - HF| over {len(diffs)} tokens: {max(diffs):.2e}")
    assert max(diffs) < LOGPROB_ATOL
    n_distinct = len({tuple(s["ids"]) for per in jobs["sample_t1"]["samples"] for s in per})
    assert n_distinct > len(synth_items), "n=3 samples at temperature 1 should not all coincide"

    # (c) in-place weight sync
    emb.model.load_state_dict(perturbed)
    hf_p = _hf_greedy(emb, synth_items)
    vl_p = [per[0]["ids"] for per in jobs["greedy_perturbed"]["samples"]]
    assert vl_p != vl, "greedy outputs did not change after load_weights"
    assert vl_p == hf_p
    diffs_p = [
        abs(a - b)
        for enc, per in zip(prompts, jobs["sample_perturbed"]["samples"])
        for s in per
        for a, b in zip(s["logprobs"], _hf_logprobs(emb, enc, s["ids"]))
    ]
    assert max(diffs_p) < LOGPROB_ATOL

    # (d) streamed load: checked before anything moves, consumed lazily, exact
    partial, full = jobs["stream_partial"], jobs["stream_full"]
    assert "lacks" in partial["error"] and partial["pulled"] == 0
    assert (
        "WeightMismatchError" in jobs["stream_bad_meta"]["error"]
        and "do not match the checkpoint's shapes" in jobs["stream_bad_meta"]["error"]
    )
    assert jobs["stream_bad_meta"]["pulled"] == 0
    assert [per[0]["ids"] for per in jobs["greedy_after_refused"]["samples"]] == vl_p
    # (e) loads that fail part-way: they raise, and the engine, rolled back to a mix of old and new
    # layers, still generates (the "greedy_after_*" jobs ran; without the rollback vLLM fails on meta
    # tensors) and takes the full reload below (without it, the stale buffered tensor fails it again)
    bad, died = jobs["stream_bad_shape"], jobs["stream_source_died"]
    assert bad["error"] and bad["bad_key"] and 0 < bad["pulled"] < bad["num_tensors"], bad
    assert "stopped after" in died["error"] and died["pulled"] == len(perturbed) // 2, died
    for name in ("greedy_after_bad_shape", "greedy_after_source_died"):
        assert all(1 <= len(per[0]["ids"]) <= MAX_NEW for per in jobs[name]["samples"]), name
    assert full["error"] is None and full["pulled"] == full["num_tensors"] == len(perturbed)
    print(f"streamed load: {full['num_tensors']} tensors in {full['seconds']:.2f} s, at most {full['peak_alive']} held by vLLM")
    assert full["peak_alive"] <= full["num_tensors"] // 4, full
    assert [per[0]["ids"] for per in jobs["greedy_restored"]["samples"]] == vl
    # (f) a part-way failure whose rollback fails too is reported as an unusable engine (the rollout worker
    # then exits so that Ray restarts it: tests/test_weight_sync.py), not as an ordinary failed load
    broken = jobs["stream_rollback_fails"]
    assert broken["error"].startswith("EngineUnusableError:") and "undoing it failed too" in broken["error"], broken
    assert "injected by the selftest" in broken["error"] and broken["pulled"] == len(perturbed) // 2
