"""LoRA through peft (``model.lora``, ``rime_model/lora.py``): the merged export is the adapted model, the
adapter-disabled model is the base (Refine-RL's KL reference), saves are merged with the adapter beside
them, a stage start merges and restarts the adapter without changing the model; and on real learners a
LoRA CMA step, then a Refine-RL step whose rollout worker holds the learner's merged weights."""

from __future__ import annotations

import json

import pytest
import torch

from orchestrator.config import ConfigError, apply_overrides, config_yaml, parse_config


def _batch(emb):
    """A teacher-forced rollout batch whose tokens include rime's special tokens (their rows train)."""
    from rime_data.synth import synth_split

    d = synth_split("train", 2, seed=0, tasks=("t2i", "i2t"))
    items = emb.prepare([{"text": r.get("qry_text"), "image": r.get("qry_image")} for r in d.queries[:3]])
    words = emb.enc.token_ids("a red circle")
    t = emb.token_id
    ids = [words + [t["rewrite_end"]], [t["rewrite_start"], *words], words[:2]]
    return emb.enc.rollout_batch(items, ids)


@torch.no_grad()
def _forward(emb, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(action log-probs through the lm head, gen embeddings)."""
    from rime_model.rollout_ops import action_logprobs

    h = emb.hidden_states(batch)
    return action_logprobs(emb, h, batch.labels)[0], emb.encode(batch, hidden=h)


def _copy(emb):
    """Another embedder on a copy of ``emb``'s model (its tokenizer and settings shared): cheaper than a load."""
    import copy

    out = copy.copy(emb)
    out.model = copy.deepcopy(emb.model)
    return out


@pytest.fixture(scope="module")
def base(zoo_cache):
    from rime_model import Embedder, ensure_zoo_model

    path = ensure_zoo_model("tiny")
    return str(path), Embedder.load(path)


@pytest.fixture(scope="module")
def adapted(base):
    """The tiny model with a rank-4 adapter whose B and token rows are moved off their start (a fresh
    adapter is the identity, which would hide merge bugs). Shared by the tests below in file order."""
    from rime_model.lora import LoraSettings, attach_lora

    emb = _copy(base[1])
    lora = attach_lora(emb, LoraSettings(rank=4, alpha=8.0), seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lora.lora_layers():
            b = layer.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=g) * 0.05)
        for p in lora.embedding_params():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    emb.model.eval()
    return emb, lora


def test_only_the_adapter_and_the_special_token_rows_train(adapted):
    emb, lora = adapted
    trainable = [n for n, p in emb.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n or "trainable_tokens_delta" in n for n in trainable)
    assert not any("visual" in n for n in trainable)  # model.lora.vision: false
    (rows,) = lora.embedding_params()
    assert rows.shape == (len(lora.token_ids), emb.dim) and set(lora.token_ids) == set(emb.token_id.values())


def test_merged_export_is_the_adapted_model(adapted, base):
    """A rollout worker's plain model loading the merged export computes what the adapted learner does,
    through the (tied) lm head too; it differs from the base model."""
    from actors.rollout import load_exported

    emb, lora = adapted
    plain0 = base[1]
    plain = _copy(plain0)
    load_exported(plain.model, lora.merged_state_dict())  # names and shapes checked, as on a rollout worker
    batch = _batch(emb)
    got, want, before = _forward(plain, batch), _forward(emb, batch), _forward(plain0, batch)
    for a, b, c in zip(got, want, before):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(a, c, atol=1e-4)


def test_the_reference_is_the_base_model(adapted, base):
    """With the adapter disabled the learner's model is the base, bit for bit (Refine-RL's KL reference)."""
    emb, lora = adapted
    batch = _batch(emb)
    with lora.disabled():
        ref = _forward(emb, batch)
    for a, b in zip(ref, _forward(base[1], batch)):
        assert torch.equal(a, b)


@pytest.fixture(scope="module")
def saved(adapted, base, tmp_path_factory):
    """The adapted model saved (before the stage-start test restarts its adapter), and loaded back."""
    from rime_model import Embedder

    emb, lora = adapted
    out = lora.save(emb, tmp_path_factory.mktemp("lora") / "saved", start_model=base[0])
    return out, Embedder.load(out)


def test_save_writes_the_merged_model_and_the_adapter_beside_it(adapted, base, saved):
    """The folder loads as a plain embedder holding the merged weights; ``lora_adapter/`` is peft's format,
    names the start model, and applied to it gives the same model."""
    from peft import PeftModel

    from rime_model.lora import ADAPTER_DIR

    emb, lora = adapted
    path = base[0]
    out, loaded = saved
    merged = lora.merged_state_dict()
    have = loaded.model.state_dict()
    assert all(torch.equal(have[k], v) for k, v in merged.items())
    adapter = out / ADAPTER_DIR
    assert (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == path
    again = _copy(base[1])
    again.model = PeftModel.from_pretrained(again.model, str(adapter)).merge_and_unload()
    batch = _batch(emb)
    for a, b in zip(_forward(again, batch), _forward(loaded, batch)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_stage_start_merges_and_restarts_the_adapter_without_changing_the_model(adapted, saved):
    """``restart`` (Learner.begin_stage): the merged weights stay bit for bit what they were, and the
    adapter-disabled model is now the model the previous stage saved (the next stage's start model)."""
    emb, lora = adapted
    before = {k: v.clone() for k, v in lora.merged_state_dict().items()}
    batch = _batch(emb)
    lora.restart()
    after = lora.merged_state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(not layer.lora_B["default"].weight.any() for _, layer in lora.lora_layers())
    on = _forward(emb, batch)
    with lora.disabled():
        off = _forward(emb, batch)
    for a, b, c in zip(on, off, _forward(saved[1], batch)):
        assert torch.equal(a, b) and torch.equal(b, c)


def test_target_modules_select_linear_layers_and_name_the_key_when_none_match(base):
    from rime_model.lora import LoraSettings, target_linears

    model = base[1].model
    text = target_linears(model, LoraSettings(rank=4))
    assert text and not any("visual" in n for n in text) and all(n.rsplit(".", 1)[1].endswith("_proj") for n in text)
    assert "lm_head" not in text
    both = target_linears(model, LoraSettings(rank=4, vision=True))
    assert set(text) < set(both) and any("visual" in n for n in both)
    assert len(target_linears(model, LoraSettings(rank=4, target_modules=("self_attn.q_proj",)))) == 2  # 2 layers
    with pytest.raises(
        ValueError, match=r"model\.lora\.target_modules: \['qproj'\] match no linear layer of the language model .*'q_proj'"
    ):
        target_linears(model, LoraSettings(rank=4, target_modules=("qproj",)))


def test_lora_config_is_a_nested_section_with_checked_keys():
    cfg = parse_config(apply_overrides({}, ["model.lora.rank=8", "model.lora.target_modules=q_proj,v_proj"]))
    assert cfg.model.lora.rank == 8 and cfg.model.lora.target_modules == ("q_proj", "v_proj")
    assert cfg.flat()["model.lora.rank"] == 8 and cfg.flat()["model.lora.target_modules"] == "q_proj,v_proj"
    assert "  lora:\n    rank: 8\n" in config_yaml(cfg)
    assert parse_config({}).model.lora.rank == 0  # off by default
    for raw, match in [
        ({"model": {"lora": {"rnk": 8}}}, r"model\.lora\.rnk: unknown key; valid keys in 'model\.lora': alpha, dropout, rank"),
        ({"model": {"lora": {"rank": -1}}}, r"model\.lora\.rank: must be >= 0"),
        ({"model": {"lora": {"rank": 8, "dropout": 1.0}}}, r"model\.lora\.dropout: must be in \[0, 1\)"),
        ({"model": {"lora": {"rank": 8, "target_modules": []}}}, r"model\.lora\.target_modules: \[\] adapts nothing"),
        ({"model": {"lora": {"rank": 8}}, "learners": {"zero_stage": 3}}, r"model\.lora: .*zero_stage 3 is not supported"),
        ({"model": {"freeze_vision": True, "lora": {"rank": 8, "vision": True}}}, r"model\.lora\.vision: true .* freeze"),
        ({"rollout": {"weight_sync": "lora_adapter"}}, r"rollout\.weight_sync: lora_adapter .*model\.lora\.rank is 0"),
        (
            {"model": {"lora": {"rank": 8}}, "rollout": {"weight_sync": "lora_adapter", "backend": "vllm"}},
            r"rollout\.weight_sync: lora_adapter .*only HF rollout workers load one; use rollout\.weight_sync=object_store",
        ),
    ]:
        with pytest.raises(ConfigError, match=match):
            parse_config(raw)


def test_lora_cma_then_refine_rl_on_learners_with_a_synced_rollout_worker(ray_local, zoo_cache, tmp_path):
    """One learner with LoRA: a CMA step, the merged save, Refine-RL from it. The stage start keeps the model;
    the first Refine-RL step's KL is 0 (the reference, the adapter disabled, is the stage's start model, which
    the policy still is); the adapter-only weight sync (``lora_adapter``) sends a fraction of the merged
    model's bytes, and after each sync the rollout worker holds the learner's merged weights; a DeepSpeed
    checkpoint of the adapted model round-trips."""
    import ray

    from orchestrator.learner_group import DATA_TASK_CPUS, LearnerGroup
    from orchestrator.pairs import PairStream, make_pairs
    from orchestrator.refine_rl import RefineRL, stage_config
    from rime_data.synth import synth_split, write_synth
    from rime_model.lora import ADAPTER_DIR
    from rime_model.zoo import ensure_zoo_model

    write_synth(tmp_path / "data", {"train": 4}, seed=0, tasks=("t2i", "i2t"))
    cfg = parse_config(
        {
            "run": {"stages": ["cma", "refine-rl"]},
            "model": {"lora": {"rank": 4}},
            "learners": {"num_actors": 1, "micro_batch_size": 4, "cpus_per_actor": 0.4, "lr": 1e-3, "warmup_steps": 1},
            "rollout": {
                "num_actors": 1,
                "group_size": 2,
                "max_new_tokens": 4,
                "cpus_per_actor": 0.05,
                "weight_sync": "lora_adapter",
            },
            "reward": {"num_actors": 1},
            "refine_rl": {"queries_per_step": 2, "lr": 1e-3},
        }
    )
    model = str(ensure_zoo_model("tiny"))
    cma = {"lambda_cma": 1.0, "temperature": 0.05, "ce_weight": 1.0}
    group = LearnerGroup(cfg, model, cma)
    rl = stream = None
    try:
        group.call("begin_stage", "cma", cma, 1e-3, 1, model, embedding_lr=1e-2)
        d = synth_split("train", 4, seed=0, tasks=("t2i", "i2t"))
        start = group.call("param_checksum")[0]
        terms = group.call("train_step", per_rank=[([make_pairs(d.queries, d.candidates)[:4]],)])[0]
        assert terms["lr_embeddings"] == pytest.approx(1e-2)  # the special token rows: their own group
        trained = group.call("param_checksum")[0]
        assert trained != start
        cma_dir = str(tmp_path / "cma")
        group.call("save_embedder", cma_dir)  # what the saved folder holds: test_save_writes_the_merged_model...
        assert (tmp_path / "cma" / ADAPTER_DIR / "adapter_config.json").is_file()

        # Refine-RL's first step at lr 0 leaves the model exactly as it is only if the optimizer's fp32 master
        # copy of the adapter was restarted with it (a stale copy would bring CMA's adapter back on top)
        group.call("begin_stage", "refine-rl", stage_config(cfg), 0.0, 1, cma_dir)
        assert group.call("param_checksum")[0] == trained  # adapter merged, a fresh one started: still CMA's model
        stream = PairStream(tmp_path / "data", "train", 0, 64, tmp_path / "errors.jsonl", group_by_task=False)
        rl = RefineRL(cfg, group, stream, cma_dir, reserve_cpus=DATA_TASK_CPUS)
        rl.sync_weights(0)
        merged_bytes = sum(v.numel() * v.element_size() for v in group.call("export_weights")[0].values())
        for step in range(3):
            m = rl.step(step)
            learner = group.call("param_checksum")[0]
            (worker,) = ray.get([w.weights_checksum.remote() for w in rl.actors.rollout])
            assert worker == pytest.approx(learner, rel=1e-12) and m["sync/version"] == step + 1
            assert m["sync/bytes"] < merged_bytes / 5
            print(f"sync bytes: adapter {m['sync/bytes']:.0f}, merged model {merged_bytes}")
            if step == 0:
                assert m["train/kl"] == pytest.approx(0.0, abs=1e-7)  # the reference is the policy's start model
                assert learner == trained
                group.call("reset_optimizer", 1e-3, 1)
        assert m["train/kl"] > 0 and learner != trained  # the policy moved away from the reference

        group.call("save_checkpoint", str(tmp_path / "ckpt"), "t", {"position": {}})
        group.call("load_checkpoint", str(tmp_path / "ckpt"), "t")
        assert group.call("param_checksum")[0] == learner
    finally:
        if rl is not None:
            rl.shutdown()
        if stream is not None:
            stream.close()
        group.shutdown()
