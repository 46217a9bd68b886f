"""Refine-RL reward functions against hand-computed values; verl's GRPO/RLOO through the adapter."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from actors.batches import RewardRequest
from rewards.advantages import group_advantages
from rewards.functions import RewardConfig, anchor_outcome_reward, length_penalty, total_reward


def test_outcome_reward_hand_computed():
    pos = torch.tensor([1.0, 0.0])
    negs = F.normalize(torch.tensor([[0.0, 1.0], [1.0, 1.0]]), dim=-1)
    g = F.normalize(torch.tensor([[1.0, 0.2], [0.0, 1.0]]), dim=-1)
    out = anchor_outcome_reward(g, pos, negs, top_k=1, neg_temperature=0.5)
    # rewrite 0: cos to pos, negs
    c_pos = float(g[0] @ pos)
    c_neg = [float(g[0] @ negs[0]), float(g[0] @ negs[1])]
    w = [math.exp(c / 0.5) for c in c_neg]
    neg_term = sum(wi * ci for wi, ci in zip(w, c_neg)) / sum(w)
    assert out["acc"][0].item() == 1.0
    assert out["reward"][0].item() == pytest.approx(c_pos - neg_term, rel=1e-5)
    # rewrite 1 points at a negative: not in top-1, so no reward whatever its margin
    assert out["acc"][1].item() == 0.0 and out["reward"][1].item() == 0.0
    assert out["margin"][1].item() < 0


def test_denser_outcomes_separate_rewrites_that_all_miss():
    """``reward.outcome``: with every rewrite of a group outside the top 1, the gated reward gives each 0 (a
    zero-variance group: no advantage), ``margin`` ranks the near miss above the far one, and ``rank`` gives
    1 / (the positive's rank) for each; a hit gets 1 under ``rank``."""
    pos = torch.tensor([1.0, 0.0, 0.0])
    negs = F.normalize(torch.tensor([[0.6, 0.8, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), dim=-1)
    g = F.normalize(torch.tensor([[0.8, 0.6, 0.0], [0.1, 1.0, 0.9], [1.0, 0.1, 0.0]]), dim=-1)
    # rewrite 0: positive 2nd (behind neg 0); rewrite 1: positive last (4th); rewrite 2: a hit
    gated = anchor_outcome_reward(g, pos, negs, neg_temperature=0.5)
    assert gated["rank"].tolist() == [2.0, 4.0, 1.0] and gated["acc"].tolist() == [0.0, 0.0, 1.0]
    assert gated["reward"][:2].tolist() == [0.0, 0.0]
    margin = anchor_outcome_reward(g, pos, negs, neg_temperature=0.5, outcome="margin")
    assert margin["reward"].tolist() == pytest.approx(gated["margin"].tolist())
    assert margin["reward"][0] > margin["reward"][1]  # the near miss earns more
    rank = anchor_outcome_reward(g, pos, negs, neg_temperature=0.5, outcome="rank")
    assert rank["reward"].tolist() == pytest.approx([0.5, 0.25, 1.0])
    assert anchor_outcome_reward(g, pos, torch.zeros(0, 3), outcome="rank")["reward"].tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match=r"reward\.outcome: 'mrr' is not one of gated_margin, margin, rank"):
        anchor_outcome_reward(g, pos, negs, outcome="mrr")
    cfg = RewardConfig(outcome="rank", format_weight=0.0)
    total = total_reward(g, pos, negs, torch.ones(3, dtype=torch.bool), torch.full((3,), 5), cfg)
    assert total["reward"].tolist() == pytest.approx([0.5, 0.25, 1.0])


def test_reward_outcome_is_checked_at_config_load():
    from orchestrator.config import ConfigError, parse_config

    assert parse_config({"reward": {"outcome": "rank"}}).reward.outcome == "rank"
    with pytest.raises(ConfigError, match=r"reward\.outcome"):
        parse_config({"reward": {"outcome": "mrr"}})


def test_top_k_and_no_negatives():
    pos = torch.tensor([1.0, 0.0])
    negs = torch.tensor([[0.0, 1.0]])
    g = F.normalize(torch.tensor([[1.0, 1.1]]), dim=-1)  # closer to the negative: rank 2
    assert anchor_outcome_reward(g, pos, negs, top_k=1)["acc"].item() == 0.0
    assert anchor_outcome_reward(g, pos, negs, top_k=2)["acc"].item() == 1.0
    alone = anchor_outcome_reward(g, pos, torch.zeros(0, 2))
    assert alone["reward"].item() == pytest.approx(float(g[0] @ pos))


def test_format_and_length_terms():
    cfg = RewardConfig(format_weight=0.2, length_weight=0.5, length_target=10)
    g = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    out = total_reward(
        g, torch.tensor([1.0, 0.0]), torch.tensor([[0.0, 1.0]]), torch.tensor([True, False]), torch.tensor([5, 30]), cfg
    )
    assert out["format"].tolist() == pytest.approx([0.2, 0.0])
    assert out["length"].tolist() == pytest.approx([0.0, -0.5 * 20 / 10])
    assert out["reward"].tolist() == pytest.approx((out["outcome"] + out["format"] + out["length"]).tolist())
    assert length_penalty(torch.tensor([50]), 0.0, 10).item() == 0.0


def test_grpo_and_rloo_through_verl():
    r = torch.tensor([1.0, 0.0, 0.5, 2.0, 2.0, 2.0])
    groups = ["a", "a", "a", "b", "b", "b"]
    adv = group_advantages(r, groups, [3, 5, 1, 2, 2, 2], "grpo")
    a = r[:3]
    want = (a - a.mean()) / (a.std() + 1e-6)
    torch.testing.assert_close(adv[:3], want, rtol=1e-4, atol=1e-5)
    assert adv[3:].abs().max().item() < 1e-4  # identical rewards carry no signal
    rloo = group_advantages(r, groups, [3, 5, 1, 2, 2, 2], "rloo")
    assert rloo[0].item() == pytest.approx(1.0 - (0.0 + 0.5) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="not registered"):
        group_advantages(r, groups, [1] * 6, "nope")


def test_policy_loss_clips_asymmetrically_and_adds_kl():
    from rime_model.policy_loss import PolicyLossConfig, policy_loss

    old = torch.zeros(2, 2)
    lp = torch.log(torch.tensor([[1.5, 1.0], [0.5, 1.0]])).requires_grad_(True)  # ratios 1.5, 1, 0.5, 1
    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    adv = torch.tensor([1.0, -1.0])
    cfg = PolicyLossConfig(clip_ratio_low=0.2, clip_ratio_high=0.28, kl_coef=0.0)
    loss, m = policy_loss(lp, old, None, adv, mask, cfg)
    # token losses: -min(r*A, clip(r)*A): row0 (A=+1): -min(1.5, 1.28) = -1.28, -1 ; row1 (A=-1): -min(-0.5, -0.8) = 0.8, 1
    assert loss.item() == pytest.approx((-1.28 - 1.0 + 0.8 + 1.0) / 4, rel=1e-5)
    assert m["actor/pg_clipfrac"] == pytest.approx(0.5)
    with_kl, m2 = policy_loss(lp, old, old, adv, mask, PolicyLossConfig(kl_coef=0.04))
    assert m2["actor/kl"] > 0 and with_kl.item() == pytest.approx(loss.item() + 0.04 * m2["actor/kl"], rel=1e-5)


def test_estimators_that_read_verls_algo_config_run_and_the_rest_fail_before_actors():
    """reinforce_plus_plus and grpo_passk read verl's AlgoConfig (gamma, std norm), which rime supplies; a
    name verl lists but rime cannot feed (gae needs values) fails in the pre-flight check with its key."""
    from orchestrator.config import ConfigError, load_config
    from orchestrator.stages.refine_rl import check_rl_objective

    r, groups = torch.tensor([1.0, 0.0, 0.5, 0.2]), [0, 0, 1, 1]
    rpp = group_advantages(r, groups, [2, 3, 1, 2], "reinforce_plus_plus")
    assert rpp[0] > 0 > rpp[1] and rpp[2] > rpp[3]  # batch-whitened returns keep each group's order
    passk = group_advantages(r, groups, [2, 3, 1, 2], "grpo_passk")
    assert passk[1].item() == 0.0 and passk[0] > 0  # only the best of a group gets credit
    check_rl_objective(load_config("configs/tiny-cpu.yaml", ["refine_rl.estimator=reinforce_plus_plus"]))
    with pytest.raises(ConfigError, match="refine_rl.estimator: 'gae' cannot run on rime's one-reward-per-rewrite"):
        check_rl_objective(load_config("configs/tiny-cpu.yaml", ["refine_rl.estimator=gae"]))
    with pytest.raises(ConfigError, match="refine_rl.policy_loss/kl_type: 'nope'"):
        check_rl_objective(load_config("configs/tiny-cpu.yaml", ["refine_rl.policy_loss=nope"]))


def test_dr_grpo_normalises_by_a_constant_horizon_not_the_micro_batchs_longest_rewrite():
    """seq-mean-token-sum-norm: a sample's gradient must not depend on how long its neighbours are."""
    from rime_model.policy_loss import PolicyLossConfig, policy_loss

    def grad(width: int, factor: int | None) -> float:
        lp = torch.zeros(2, width, requires_grad=True)
        mask = torch.zeros(2, width)
        mask[0, :2] = 1.0
        mask[1, :width] = 1.0  # the neighbour sets the span
        cfg = PolicyLossConfig(loss_agg_mode="seq-mean-token-sum-norm", kl_coef=0.0, loss_scale_factor=factor)
        loss, _ = policy_loss(lp, torch.zeros(2, width), None, torch.tensor([1.0, 1.0]), mask, cfg)
        loss.backward()
        return lp.grad[0, 0].item()

    assert grad(4, 34) == pytest.approx(grad(16, 34)) == pytest.approx(-1 / 2 / 34)
    assert grad(4, None) != pytest.approx(grad(16, None))  # verl's fallback, which the stage no longer uses


def test_reward_pool_keeps_negatives_when_a_querys_own_list_has_none(tiny, tmp_path):
    """A query whose own candidate list holds only its positive would be scored with no negative
    (acc ≡ 1, no hard-negative term): the service ranks it against its task corpus instead, counts
    it, and reports the share of rewrites scored without negatives. Its candidates are the training
    stream's checked set, so a corrupt candidate (counted by the stream) is not in any pool."""
    import pyarrow.parquet as pq

    from orchestrator.pairs import PairStream
    from rewards.anchor_service import AnchorRewardService
    from rime_data.synth import write_synth

    write_synth(tmp_path / "d", {"train": 4}, seed=0, tasks=("referring", "vqa"))
    c_path = tmp_path / "d/train/candidates.parquet"
    cands = pq.read_table(c_path).to_pylist()
    bad = next(c for c in cands if c["task"] == "referring" and c["cand_image"])
    bad["cand_image"] = b"broken"
    pq.write_table(pq.read_table(c_path).from_pylist(cands, schema=pq.read_schema(c_path)), c_path)
    stream = PairStream(tmp_path / "d", "train", 0, 8, tmp_path / "errors.jsonl")
    assert stream.bad_candidates == 1 and bad["cand_id"] not in stream.cands
    svc = AnchorRewardService(
        str(tiny.save(tmp_path / "m")),
        list(stream.cands.values()),
        {"top_k": 1, "neg_temperature": 0.05, "format_weight": 0.1, "length_weight": 0.0, "length_target": 24},
    )
    q = next(
        r
        for r in pq.read_table(tmp_path / "d/train/queries.parquet").to_pylist()
        if r["task"] == "referring" and r["positive_ids"][0] != bad["cand_id"]
    )
    pos = q["positive_ids"][0]
    corpus = {c["cand_id"] for c in cands if c["task"] == "referring"} - {bad["cand_id"]}
    item = {"text": q["qry_text"], "image": q["qry_image"], "instruction": q["qry_inst"] or None}
    request = RewardRequest(item, [[1, 2, 3]], [False], q["positive_ids"], [pos], q["task"], q["query_id"])
    pool, p = svc.pool(request)
    assert p == pos and set(pool) == corpus and svc.cache_info()["own_list_without_negatives"] == 1
    out = svc.score([request])
    assert out[0].terms["no_negatives"] == [0.0]


def test_policy_query_encoder_follows_the_synced_weights_while_the_anchors_stay_frozen(tiny, tmp_path, ray_local):
    """``reward.query_encoder: policy``: the weights Refine-RL sends through the object store (read-only
    views of the shared object) go into the (query, rewrite) encoder only, so the rewards move while
    every anchor stays the starting model's. ``frozen`` ignores the update."""
    import pyarrow.parquet as pq

    from actors.weight_sync import ObjectStoreWeights
    from rewards.anchor_service import AnchorRewardService
    from rime_data.synth import write_synth

    ray = ray_local
    write_synth(tmp_path / "d", {"train": 3}, seed=0, tasks=("t2i", "referring"))
    cands = pq.read_table(tmp_path / "d/train/candidates.parquet").to_pylist()
    queries = pq.read_table(tmp_path / "d/train/queries.parquet").to_pylist()[:3]
    requests = [
        RewardRequest(
            {"text": q["qry_text"], "image": q["qry_image"], "instruction": q["qry_inst"] or None},
            [[11, 12, 13], [14, 15]],
            [True, False],
            q["positive_ids"],
            q["cand_ids"],
            q["task"],
            q["query_id"],
        )
        for q in queries
    ]
    rcfg = {"top_k": 1, "neg_temperature": 0.05, "format_weight": 0.1, "length_weight": 0.0, "length_target": 24}
    path = str(tiny.save(tmp_path / "m"))
    g = torch.Generator().manual_seed(0)
    export, seen = {}, set()
    for k, v in tiny.model.state_dict().items():  # tied tensors once, as the learner exports them
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            export[k] = v + 0.05 * v.float().std() * torch.randn(v.shape, generator=g) if v.numel() > 1 else v.clone()
    ref = ray.put(ObjectStoreWeights(export))

    def terms(out):
        return [r.terms["pos_sim"] for r in out], [r.anchor for r in out]

    for encoder in ("policy", "frozen"):
        svc = AnchorRewardService(path, cands, rcfg, query_encoder=encoder)
        before, anchors = terms(svc.score(requests))
        assert svc.update_weights(1, [ref]) == (1 if encoder == "policy" else 0)
        svc.cache.clear()  # anchors recomputed after the update: still the frozen encoder's
        after, anchors_after = terms(svc.score(requests))
        assert anchors_after == anchors
        if encoder == "policy":
            assert after != before
            assert all(torch.equal(p, export[k]) for k, p in svc.query_emb.model.state_dict().items() if k in export)
            assert svc.anchor_emb is not svc.query_emb
        else:
            assert after == before and svc.anchor_emb is svc.query_emb


def test_each_refine_rl_ablation_switch_removes_exactly_its_term(tiny):
    """refine_rl.pg_weight=0 / kl_coef=0 / lambda_nce=0 each drop their term of the learner's loss and keep
    the others unchanged (the ablations of docs/refine-rl.md), on a hand-made scored batch: two queries x
    two sampled rewrites, random anchors, a perturbed copy of the model as the KL reference."""
    import types

    from actors.batches import ScoredBatch
    from actors.stage_losses import LEARNER_LOSSES
    from orchestrator.config import load_config
    from orchestrator.refine_rl import stage_config
    from rime_model import GenerationConfig, load_embedder
    from rime_model.rollout_ops import sample_rollouts

    queries = [{"text": "a red circle"}, {"text": "two blue squares"}]
    rollouts = sample_rollouts(tiny, tiny.prepare(queries), 2, GenerationConfig(max_new_tokens=5, do_sample=True, seed=1))
    anchors = torch.nn.functional.normalize(torch.randn(4, tiny.dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    batch = ScoredBatch(
        [q for q in queries for _ in range(2)],
        [ids for ids, _ in rollouts],
        [lps for _, lps in rollouts],
        [1.0, -0.5, 0.8, 0.3],  # not zero-mean: the surrogate is -mean(A) at ratio 1
        anchors.tolist(),
        [0, 0, 1, 1],
    )
    ref = load_embedder("tiny")
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in ref.model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))

    def loss_terms(*overrides: str) -> dict:
        cfg = stage_config(load_config("configs/tiny-cpu.yaml", list(overrides)))
        learner = types.SimpleNamespace(emb=tiny, ref=ref, lora=None, stage_cfg=cfg, engine=types.SimpleNamespace(device="cpu"))
        return {
            k: float(v.detach() if isinstance(v, torch.Tensor) else v)
            for k, v in LEARNER_LOSSES["refine-rl"].terms(learner, batch).items()
        }

    full = loss_terms()
    pg, kl, nce = full["pg_loss"], full["kl"], full["nce"]
    assert abs(pg) > 1e-6 and kl > 0 and nce > 0
    assert full["loss"] == pytest.approx(pg + 0.04 * kl + 0.1 * nce, rel=1e-5)
    no_pg = loss_terms("refine_rl.pg_weight=0")
    assert no_pg["loss"] == pytest.approx(0.04 * kl + 0.1 * nce, rel=1e-5) and no_pg["pg_loss"] == pytest.approx(pg)
    no_kl = loss_terms("refine_rl.kl_coef=0")
    assert no_kl["loss"] == pytest.approx(pg + 0.1 * nce, rel=1e-5) and "kl" not in no_kl
    assert loss_terms("refine_rl.lambda_nce=0")["loss"] == pytest.approx(pg + 0.04 * kl, rel=1e-5)


def test_adv_norm_none_only_centres_and_task_scales_each_task_alike():
    """refine_rl.adv_norm on hand-made groups: group = GRPO (each group's std), none = centred only (Dr.
    GRPO), task = centred, then unit std over each task's rewrites; other estimators refuse the switch."""
    from orchestrator.config import ConfigError, load_config
    from orchestrator.stages.refine_rl import check_rl_objective

    r = torch.tensor([1.0, 0.0, 0.6, 0.4, 10.0, 0.0, 2.0, 2.0])  # groups of 2; task b's rewards 10x larger
    groups, lengths = [0, 0, 1, 1, 2, 2, 3, 3], [1] * 8
    tasks = ["a"] * 4 + ["b"] * 4
    grpo = group_advantages(r, groups, lengths, "grpo")
    assert grpo[2].item() == pytest.approx(grpo[0].item(), rel=1e-4)  # the small gap blown up to the large one's size
    none = group_advantages(r, groups, lengths, "grpo", "none")
    torch.testing.assert_close(none, torch.tensor([0.5, -0.5, 0.1, -0.1, 5.0, -5.0, 0.0, 0.0]))
    task = group_advantages(r, groups, lengths, "grpo", "task", tasks)
    for rows in (slice(0, 4), slice(4, 8)):
        assert task[rows].std(unbiased=False).item() == pytest.approx(1.0, rel=1e-4)
    torch.testing.assert_close(task[:4] / task[0], none[:4] / none[0])  # the order within a task is kept
    assert task[6].item() == 0.0 and abs(task[4].item()) < 1.5 and abs(none[4].item()) == 5.0  # b's scale is gone
    with pytest.raises(ValueError, match="one task per rewrite"):
        group_advantages(r, groups, lengths, "grpo", "task")
    with pytest.raises(ConfigError, match="refine_rl.adv_norm: 'none' applies to the grpo estimator, not 'rloo'"):
        check_rl_objective(load_config("configs/tiny-cpu.yaml", ["refine_rl.estimator=rloo", "refine_rl.adv_norm=none"]))
    check_rl_objective(load_config("configs/tiny-cpu.yaml", ["refine_rl.adv_norm=task"]))
    with pytest.raises(ConfigError, match="refine_rl.adv_norm"):
        load_config("configs/tiny-cpu.yaml", ["refine_rl.adv_norm=batch"])
