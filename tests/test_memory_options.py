"""Learner memory options: gradient checkpointing changes memory, not gradients; bf16 learners run on CPU.

``learners.gradient_checkpointing`` recomputes activations in the backward pass, so the CMA gradients must be
the ones without it. ``learners.precision: bf16`` trains bf16 weights with DeepSpeed's fp32 master weights in
the optimizer, and what leaves the learner (rollout sync, saved embedders) loads into an fp32 model.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from orchestrator.config import ConfigError, parse_config
from orchestrator.pairs import make_pairs
from rime_data.synth import synth_split

CMA = {"lambda_cma": 1.0, "temperature": 0.05, "ce_weight": 1.0}


def _pairs(n: int):
    d = synth_split("train", 6, seed=0, tasks=("t2i", "i2t", "cls"))
    return make_pairs(d.queries, d.candidates)[:n]


def test_gradient_checkpointing_leaves_the_cma_gradients_unchanged(tiny):
    """Same loss, same gradients (language model and vision tower) with checkpointing on as off, in train mode."""
    from actors.memory_options import enable_gradient_checkpointing
    from actors.stage_losses import LEARNER_LOSSES

    emb = copy.copy(tiny)  # the session's embedder with its own model: the shared one stays as it is
    emb.model = copy.deepcopy(tiny.model).train()
    learner = SimpleNamespace(emb=emb, stage_cfg=CMA)
    pairs = _pairs(2)

    def loss_and_grads() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        emb.model.zero_grad(set_to_none=True)
        loss = LEARNER_LOSSES["cma"].terms(learner, pairs)["loss"]
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in emb.model.named_parameters() if p.grad is not None}

    loss_off, grads_off = loss_and_grads()
    text_layers = len(emb.model.model.language_model.layers)
    assert enable_gradient_checkpointing(emb.model) > text_layers  # the vision tower's blocks checkpoint too
    assert emb.model.model.visual.blocks[0].gradient_checkpointing
    loss_on, grads_on = loss_and_grads()
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-6, atol=0)
    assert grads_on.keys() == grads_off.keys() and any("visual" in k for k in grads_on)
    for k in grads_off:
        torch.testing.assert_close(grads_on[k], grads_off[k], rtol=1e-5, atol=1e-7, msg=k)


def test_memory_options_that_cannot_run_are_refused_at_load_naming_the_key():
    with pytest.raises(ConfigError, match=r"learners\.precision: fp16 needs GPU learners .*learners\.precision=bf16"):
        parse_config({"learners": {"precision": "fp16"}})
    parse_config({"learners": {"precision": "fp16", "gpus_per_actor": 1.0}})
    with pytest.raises(ConfigError, match=r"learners\.gradient_checkpointing: the plume stage .*=false"):
        parse_config({"run": {"stages": ["plume"]}, "learners": {"gradient_checkpointing": True}})
    parse_config({"run": {"stages": ["cma", "refine-rl"]}, "learners": {"precision": "bf16", "gradient_checkpointing": True}})


@pytest.fixture(scope="module")
def bf16_learner(ray_local, zoo_cache):
    """One bf16 learner (ZeRO-1, gradient checkpointing on) on the session's Ray cluster."""
    from orchestrator.learner_group import LearnerGroup
    from rime_model.zoo import ensure_zoo_model

    cfg = parse_config(
        {
            "run": {"stages": ["cma", "refine-rl"]},
            "learners": {
                "num_actors": 1,
                "micro_batch_size": 4,
                "precision": "bf16",
                "gradient_checkpointing": True,
                "lr": 1e-3,
                "warmup_steps": 1,
            },
            "rollout": {"max_new_tokens": 6},
        }
    )
    model = str(ensure_zoo_model("tiny"))
    group = LearnerGroup(cfg, model, CMA)
    yield cfg, model, group
    group.shutdown()


def test_a_bf16_learner_trains_a_cma_step_with_fp32_master_weights(bf16_learner):
    import ray

    def dtypes(learner) -> dict[str, list]:
        """Runs inside the learner actor (``__ray_call__``; nested, so Ray ships it by value)."""
        return {
            "params": sorted({str(p.dtype) for p in learner.engine.module.parameters()}),
            "masters": sorted({str(t.dtype) for t in learner.engine.optimizer.single_partition_of_fp32_groups}),
            "checkpointing": learner.emb.model.model.language_model.layers[0].gradient_checkpointing,
        }

    _, _, group = bf16_learner
    before = group.call("param_checksum")[0]
    terms = group.call("train_step", per_rank=[([_pairs(4)],)])[0]
    assert np.isfinite(terms["loss"]) and np.isfinite(terms["grad_norm"]) and terms["grad_norm"] > 0
    assert group.call("param_checksum")[0] != before
    got = ray.get(group.actors[0].__ray_call__.remote(dtypes))
    assert got == {"params": ["torch.bfloat16"], "masters": ["torch.float32"], "checkpointing": True}


def test_a_bf16_learner_takes_a_refine_rl_step(bf16_learner, tiny):
    """Behaviour log-probs from an fp32 rollout model, an fp32 KL reference, a bf16 policy: finite loss and KL."""
    from actors.batches import ScoredBatch
    from orchestrator.refine_rl import stage_config
    from rime_model import GenerationConfig
    from rime_model.rollout_ops import sample_rollouts

    cfg, model, group = bf16_learner
    queries = [p.q for p in _pairs(2)]
    rollouts = sample_rollouts(tiny, tiny.prepare(queries), 2, GenerationConfig(max_new_tokens=6, do_sample=True, seed=1))
    anchors = torch.nn.functional.normalize(torch.randn(4, tiny.dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    batch = ScoredBatch(
        [q for q in queries for _ in range(2)],
        [ids for ids, _ in rollouts],
        [lps for _, lps in rollouts],
        [1.0, -1.0, 0.5, -0.5],
        anchors.tolist(),
        [0, 0, 1, 1],
    )
    group.call("begin_stage", "refine-rl", stage_config(cfg), 1e-4, 1, model)
    terms = group.call("train_step", per_rank=[([batch],)])[0]
    assert all(np.isfinite(terms[k]) for k in ("loss", "nce", "kl", "grad_norm")), terms
    assert terms["response_tokens"] == sum(len(ids) for ids, _ in rollouts)


def test_a_bf16_learners_exports_load_into_fp32_models(bf16_learner, tiny, tmp_path):
    """Rollout sync sends the bf16 weights (an fp32 rollout model takes them exactly); a saved embedder loads in
    fp32 (what Embedder.load asks for) with the same values, and embeds finite vectors."""
    from actors.rollout import load_exported
    from rime_model import Embedder

    group = bf16_learner[2]
    weights = group.call("export_weights")[0]
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.bfloat16}
    rollout = copy.deepcopy(tiny.model)  # an fp32 rollout model of the same start model
    load_exported(rollout, weights)
    saved = Embedder.load(group.call("save_embedder", str(tmp_path / "emb"))[0])
    assert {p.dtype for p in saved.model.parameters()} == {torch.float32}
    for name, w in saved.model.state_dict().items():
        torch.testing.assert_close(w, rollout.state_dict()[name], rtol=0, atol=0, msg=name)
        if name in weights:
            torch.testing.assert_close(w, weights[name].float(), rtol=0, atol=0, msg=name)
    vecs = saved.embed([{"text": "a red circle"}, _pairs(1)[0].t]).vectors
    assert vecs.dtype == np.float32 and np.isfinite(vecs).all()
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
