"""PLUME latent mode: the transition adapter on hand-made inputs, the batched latent pass against one
item at a time and against a cache-free recomputation, persistence, and gradients through the steps."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rime_data.scenes import png_bytes, random_scene, render
from rime_model.latent import ADAPTER_ATTR, AdapterConfig, TransitionAdapter, balance_loss, latent_pass
from rime_model.reasoning import embed_with_reasoning


def _hand_adapter(anchor: str = "disc", renormalize: bool = False) -> tuple[TransitionAdapter, torch.Tensor]:
    """4 experts whose outputs are constant vectors b_m, a router whose logits are (z + c) itself."""
    a = TransitionAdapter(
        AdapterConfig(
            hidden_size=4, num_experts=4, top_k=2, shared_expert=False, step_embed_dim=2, anchor=anchor, renormalize=renormalize
        )
    )
    b = torch.tensor([[1.0, 0, 0, 0], [0, 10.0, 0, 0], [0, 0, 100.0, 0], [0, 0, 0, 1000.0]])
    with torch.no_grad():
        for m, e in enumerate(a.experts):
            e.down.weight.zero_()
            e.down.bias.copy_(b[m])
        a.router.weight.zero_()
        a.router.weight[:, :4] = torch.eye(4)  # logit_m = (z + c)_m; the step embedding has weight 0
        a.router.bias.zero_()
    return a, b


def test_router_picks_top2_of_softmax_and_mixes_expert_outputs():
    a, b = _hand_adapter()
    z = torch.tensor([[3.0, 1.0, 0.0, -1.0]])
    out, probs = a(z, step=0, anchor=torch.zeros(1, 4))
    pi = torch.softmax(z[0], dim=0)
    torch.testing.assert_close(probs[0], pi)
    want = z[0] + pi[0] * b[0] + pi[1] * b[1]  # experts 0 and 1 are the top two; no shared expert
    torch.testing.assert_close(out[0], want)
    # The semantic anchor moves the routing: c pushes expert 2 to the top.
    out_c, probs_c = a(z, step=0, anchor=torch.tensor([[0.0, 0.0, 5.0, 0.0]]))
    pi_c = torch.softmax(z[0] + torch.tensor([0.0, 0.0, 5.0, 0.0]), dim=0)
    torch.testing.assert_close(out_c[0], z[0] + pi_c[2] * b[2] + pi_c[0] * b[0])
    # anchor="none" ignores c; renormalised top-k weights sum to one.
    a_none, _ = _hand_adapter(anchor="none")
    torch.testing.assert_close(a_none(z, 0, torch.tensor([[0.0, 0.0, 5.0, 0.0]]))[0][0], want)
    a_norm, _ = _hand_adapter(renormalize=True)
    top = pi[:2] / pi[:2].sum()
    torch.testing.assert_close(a_norm(z, 0, torch.zeros(1, 4))[0][0], z[0] + top[0] * b[0] + top[1] * b[1])


def test_step_embedding_changes_the_route():
    a, _ = _hand_adapter()
    with torch.no_grad():
        a.router.weight[:, 4:] = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
        a.step_embed.weight.zero_()
        a.step_embed.weight[3, 0] = 50.0  # step 3 sends everything to expert 3
    z = torch.tensor([[3.0, 1.0, 0.0, -1.0]])
    assert set(a(z, 0)[1].topk(2).indices[0].tolist()) == {0, 1}
    assert 3 in a(z, 3)[1].topk(2).indices[0].tolist()
    with pytest.raises(ValueError, match="max_latent_steps"):
        a(z, 16)


def test_balance_loss_hand_computed():
    one_hot = [torch.tensor([[1.0, 0, 0, 0]]), torch.tensor([[0, 1.0, 0, 0]])]
    # mean router prob [.5, .5, 0, 0]; deviations from 1/4: ±.25 -> mean of squares .0625
    assert balance_loss(one_hot).item() == pytest.approx(0.0625)
    assert balance_loss([torch.full((3, 4), 0.25)]).item() == pytest.approx(0.0)
    with pytest.raises(ValueError):
        balance_loss([])


def test_fresh_adapter_is_the_identity_and_single_mlp_variant():
    cfg = AdapterConfig(hidden_size=8)
    a = TransitionAdapter(cfg)
    z = torch.randn(3, 8)
    out, probs = a(z, 2, torch.randn(3, 8))
    torch.testing.assert_close(out, z)
    assert probs.shape == (3, 4) and torch.allclose(probs.sum(-1), torch.ones(3))
    mlp = TransitionAdapter(AdapterConfig(hidden_size=8, num_experts=0))  # PLUME's "single MLP" ablation
    assert mlp(z, 0)[1] is None and mlp.router is None
    with pytest.raises(ValueError, match="top_k"):
        AdapterConfig(hidden_size=8, num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="anchor"):
        AdapterConfig(hidden_size=8, anchor="mean")


def _items():
    rng = random.Random(5)
    s1, s2 = random_scene(rng), random_scene(rng)
    return [
        {"text": "a red circle"},
        {"image": render(s1), "text": "which shape is left of the blue one? " * 2},
        {"image": png_bytes(render(s2))},
        {"text": "a much longer caption " * 6, "instruction": "Represent it."},
    ]


def test_batched_latent_equals_one_at_a_time(tiny_latent):
    """Left-padded prefix, per-row (multimodal rotary) positions: batching changes nothing."""
    items = _items()
    batched = tiny_latent.embed(items, mode="latent", steps=8).vectors
    single = np.stack([tiny_latent.embed([it], mode="latent", steps=8).vectors[0] for it in items])
    np.testing.assert_allclose(batched, single, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    assert batched.shape == (4, 128)


def test_explicit_embedding_is_read_where_stage_0_trains_it(tiny_latent):
    """The probe's explicit->latent score embeds a written (reasoning, answer) exactly where curriculum
    stage 0 teacher-forces it (the learner's stage-0 pass), batched or not; the written answer moves it;
    nothing written is the inference suffix; a count mismatch names ``written``."""
    from rime_model.curriculum import Phase, continuation_text

    emb, items = tiny_latent, _items()[:3]
    written = [
        ("The anchor is the red circle.", "a red circle"),
        ("Left of it is the blue square. So the answer is the blue square.", "a blue square"),
        ("", ""),
    ]
    got = embed_with_reasoning(emb, items, written, batch_size=2).vectors
    single = np.stack([embed_with_reasoning(emb, [it], [w]).vectors[0] for it, w in zip(items, written)])
    np.testing.assert_allclose(got, single, atol=2e-5)
    conts = [emb.enc.token_ids(continuation_text(emb.template, emb.tokens, [r], Phase(0, 0, 0, True), a)) for r, a in written]
    with torch.no_grad():
        stage0 = latent_pass(emb.model, emb.enc, emb.prepare(items), 0, conts).gen_embedding().numpy()
    np.testing.assert_allclose(got, stage0, atol=2e-5)
    np.testing.assert_allclose(got[2], emb.embed(items[2:], mode="latent", steps=0).vectors[0], atol=2e-5)
    other = embed_with_reasoning(emb, items[:1], [(written[0][0], "a green cross")]).vectors[0]
    assert float(other @ got[0]) < 0.999
    with pytest.raises(ValueError, match="written: got 2"):
        embed_with_reasoning(emb, items, written[:2])


def test_kv_cached_steps_equal_a_cache_free_recomputation(tiny_latent):
    emb = tiny_latent
    items = emb.prepare([{"text": "a red circle left of a blue square"}])
    steps = 3
    with torch.no_grad():
        got = latent_pass(emb.model, emb.enc, items, steps).gen_embedding()[0]
        enc = emb.enc.encode_texts([emb.template.latent_prompt("", items[0][2], items[0][0], emb.tokens)], [None])
        embed = emb.model.get_input_embeddings()
        seq = embed(enc["input_ids"])
        h = emb.model.model(inputs_embeds=seq).last_hidden_state
        anchor = h[:, emb.enc.read_positions(enc["input_ids"], "disc_emb")[0]]
        z = h[:, -1]
        for k in range(steps):
            x, _ = emb.latent_adapter(z, k, anchor)
            seq = torch.cat([seq, x.unsqueeze(1)], dim=1)
            z = emb.model.model(inputs_embeds=seq).last_hidden_state[:, -1]  # whole sequence, no cache
        suffix = emb.tokenizer(emb.template.latent_suffix(emb.tokens), add_special_tokens=False).input_ids
        seq = torch.cat([seq, embed(torch.tensor([suffix]))], dim=1)
        want = F.normalize(emb.model.model(inputs_embeds=seq).last_hidden_state[0, -1], dim=-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_anchor_is_the_disc_embedding_and_steps_matter(tiny_latent):
    items = _items()
    with torch.no_grad():
        out = latent_pass(tiny_latent.model, tiny_latent.enc, tiny_latent.prepare(items), 2)
    np.testing.assert_allclose(out.disc_embedding().numpy(), tiny_latent.embed(items, mode="disc").vectors, atol=1e-5)
    assert len(out.latents) == 2 and len(out.router_probs) == 2
    k2 = tiny_latent.embed(items, mode="latent", steps=2).vectors
    k8 = tiny_latent.embed(items, mode="latent").vectors  # the adapter's default_steps (8)
    assert tiny_latent.latent_steps == 8 and np.abs(k2 - k8).max() > 1e-3
    tiny_latent.embed(items[:1], mode="latent", steps=0)  # no latent step: prefix + suffix only
    with pytest.raises(ValueError, match="max_steps"):
        tiny_latent.embed(items[:1], mode="latent", steps=17)


def test_save_load_keeps_the_adapter_out_of_the_model_checkpoint(tiny_latent, tiny_latent_dir, tmp_path):
    from safetensors import safe_open

    from rime_model import Embedder

    folder = Path(tiny_latent_dir)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert not [k for k in f.keys() if k.startswith(ADAPTER_ATTR)]  # noqa: SIM118 - a safetensors handle
    meta = json.loads((folder / "rime_embedder.json").read_text())
    assert meta["latent_adapter"]["num_experts"] == 4 and (folder / "latent_adapter" / "adapter.safetensors").is_file()
    again = Embedder.load(tiny_latent.save(tmp_path / "again"))
    items = _items()[:2]
    np.testing.assert_allclose(
        again.embed(items, mode="latent").vectors, tiny_latent.embed(items, mode="latent").vectors, atol=1e-6
    )


def test_no_adapter_means_identity_transition(tiny, tiny_latent):
    """A model without an adapter still runs latent mode (Coconut's plain continuous thought)."""
    assert tiny.latent_adapter is None and tiny.latent_steps == 8
    vec = tiny.embed(["a red circle"], mode="latent", steps=2).vectors
    assert vec.shape == (1, 128) and math.isclose(float(np.linalg.norm(vec)), 1.0, rel_tol=1e-5)
    with pytest.raises(ValueError, match="already has"):
        tiny_latent.attach_latent_adapter(AdapterConfig(hidden_size=128))


def test_gradients_flow_through_the_latent_steps(tiny_latent_dir):
    from rime_model import Embedder

    emb = Embedder.load(tiny_latent_dir)
    emb.model.train()
    items = emb.prepare(_items()[:2])
    out = latent_pass(emb.model, emb.enc, items, 3)
    (out.gen_embedding().sum() + balance_loss(out.router_probs)).backward()
    a = emb.latent_adapter
    assert a.router.weight.grad.abs().sum() > 0 and a.step_embed.weight.grad[:3].abs().sum() > 0
    assert a.step_embed.weight.grad[3:].abs().sum() == 0  # steps never run get no gradient
    assert all(e.up.weight.grad is not None for e in a.experts)
    visual = [p for n, p in emb.model.named_parameters() if "visual" in n]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in visual)  # the image row reaches the vision tower


def test_a_rollout_model_without_an_adapter_loads_a_plume_learners_export(tiny_latent):
    """Learners of a run that includes the plume stage export the adapter with the model; an HF rollout
    worker's model has none (rollouts never run latent mode) and loads the rest, as vLLM does."""
    import torch

    from actors.rollout import load_exported
    from rime_model import load_embedder

    export = {k: v.clone() for k, v in tiny_latent.model.state_dict().items()}
    assert any(k.startswith("rime_latent_adapter.") for k in export)
    plain = load_embedder("tiny", seed=1)
    load_exported(plain.model, export)
    for k, v in plain.model.state_dict().items():
        assert torch.equal(v, export[k]), k
    from actors.weight_sync import WeightMismatchError

    with pytest.raises(WeightMismatchError, match="does not match the rollout model"):
        load_exported(plain.model, {**export, "not.a.weight": torch.zeros(1)})


def test_a_broadcast_export_loads_bucket_by_bucket_and_a_mismatch_fails_before_any_weight_moves(tiny_latent):
    """The collective sync loads each received bucket into the model before the next arrives (no second
    model copy on the rollout GPU); the names and shapes are checked from the metadata first, so a bad
    export (an extra key, one tensor of another shape) changes nothing."""
    import torch

    from actors.rollout import load_exported_buckets
    from actors.weight_sync import WeightMismatchError, plan_buckets, tensor_meta
    from rime_model import load_embedder

    export = {k: v.clone() for k, v in tiny_latent.model.state_dict().items()}
    meta = tensor_meta(export)
    plan = plan_buckets(meta, 1 << 16)
    assert len(plan) > 3
    fetched = []

    def buckets():
        for idx in plan:
            fetched.append(len(idx))
            yield [(meta[i][0], export[meta[i][0]]) for i in idx]

    plain = load_embedder("tiny", seed=1)
    before = {k: v.clone() for k, v in plain.model.state_dict().items()}
    with pytest.raises(WeightMismatchError, match="does not match the rollout model"):
        load_exported_buckets(plain.model, meta + [("not.a.weight", (1,), "torch.float32")], buckets())
    i = next(i for i, m in enumerate(meta) if "layers.1.mlp.down_proj" in m[0])
    name, shape, dtype = meta[i]
    with pytest.raises(
        WeightMismatchError, match=rf"1 exported tensors do not match .*{re.escape(name)}: sent \({shape[0] + 1},"
    ):
        load_exported_buckets(plain.model, meta[:i] + [(name, (shape[0] + 1, *shape[1:]), dtype)] + meta[i + 1 :], buckets())
    assert fetched == [] and all(torch.equal(v, before[k]) for k, v in plain.model.state_dict().items())
    nbytes = load_exported_buckets(plain.model, meta, buckets())
    assert fetched == [len(idx) for idx in plan] and nbytes == sum(v.numel() * v.element_size() for v in export.values())
    for k, v in plain.model.state_dict().items():
        assert torch.equal(v, export[k]), k


def test_a_plume_stage_keeps_a_matching_saved_adapter_and_replaces_one_that_differs(tiny_latent_dir, caplog):
    """What a learner does with its start model's adapter (``Embedder.use_latent_adapter``): same settings
    (K aside) -> the saved weights go on training; other settings (the single-MLP ablation from a CoT
    model) -> a fresh adapter of the configured shape, which the driver announces before the learners start."""
    import logging

    from orchestrator.config import load_config
    from orchestrator.stages.plume import announce_adapter
    from rime_model import Embedder

    emb = Embedder.load(tiny_latent_dir)
    saved = {k: v.clone() for k, v in emb.latent_adapter.state_dict().items()}
    kept = emb.use_latent_adapter(AdapterConfig(hidden_size=emb.dim, default_steps=4))
    assert kept is emb.latent_adapter and emb.latent_steps == 4
    assert all(torch.equal(v, saved[k]) for k, v in kept.state_dict().items())

    fresh = emb.use_latent_adapter(AdapterConfig(hidden_size=emb.dim, num_experts=0), seed=3)
    assert fresh is emb.latent_adapter and fresh.cfg.num_experts == 0 and fresh.cfg.shared_expert
    assert len([m for m in emb.model.modules() if m is fresh]) == 1  # replaced, not added beside the old one
    assert not any(k.startswith("router") for k in fresh.state_dict())

    with caplog.at_level(logging.INFO, logger="orchestrator.stages.plume"):
        same = load_config("configs/plume-tiny.yaml")
        assert announce_adapter(same, tiny_latent_dir) == {}
        ablation = load_config("configs/plume-tiny.yaml", ["plume.experts=0"])
        assert announce_adapter(ablation, tiny_latent_dir) == {"num_experts": (4, 0)}
    assert "transition adapter differs from the config (num_experts: 4 -> 0)" in caplog.text
