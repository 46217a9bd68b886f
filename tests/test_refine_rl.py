"""Refine-RL on a real local Ray cluster: rollout workers, the anchor reward service, DeepSpeed learners.

The learners score exactly the tokens the rollout workers sampled (behaviour log-probs match a
recomputation), the rollout weights equal the learners' after every sync under matching version
numbers, and a rollout worker killed mid-step is restarted by Ray with its rollouts re-issued.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch

from orchestrator.config import parse_config, replace_config
from rime_data.synth import write_synth
from rime_model import GenerationConfig
from rime_model.rollout_ops import action_logprobs, sample_rollouts


def _items(tiny, n: int = 3):
    from rime_data.synth import synth_split

    d = synth_split("train", 2, seed=0, tasks=("t2i", "i2t", "referring"))
    rows = d.queries[:n]
    return tiny.prepare(
        [{"text": r.get("qry_text"), "image": r.get("qry_image"), "instruction": r.get("qry_inst")} for r in rows]
    )


def test_learner_recomputes_the_rollout_logprobs(tiny):
    items = _items(tiny)
    rollouts = sample_rollouts(tiny, items, 3, GenerationConfig(max_new_tokens=8, do_sample=True, seed=1))
    assert len(rollouts) == 9
    reps = [it for it in items for _ in range(3)]
    batch = tiny.enc.rollout_batch(reps, [ids for ids, _ in rollouts])
    assert (batch.inputs["input_ids"][:, -1] == tiny.token_id["gen_emb"]).all()  # forced suffix ends every row AT <gen_emb>
    with torch.no_grad():
        logp, entropy, mask = action_logprobs(tiny, tiny.hidden_states(batch), batch.labels)
    assert int(mask.sum()) == sum(len(ids) for ids, _ in rollouts)  # exactly the sampled tokens, no forced ones
    for b, (ids, lps) in enumerate(rollouts):
        got = logp[b][mask[b].bool()]
        torch.testing.assert_close(got, torch.tensor(lps), atol=1e-4, rtol=0)
        assert batch.labels[b][batch.labels[b] != -100].tolist() == ids
    assert (entropy[mask.bool()] > 0).all()


def test_forced_suffix_cases(tiny):
    t = tiny.token_id
    im_end = tiny.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tiny.enc.forced_suffix([5, t["rewrite_end"], t["gen_emb"]]) == []
    assert tiny.enc.forced_suffix([5, t["rewrite_end"]]) == [t["gen_emb"]]
    assert tiny.enc.forced_suffix([5, 6]) == [t["rewrite_end"], t["gen_emb"]]  # truncated at max_new_tokens
    assert tiny.enc.forced_suffix([5, im_end]) == [t["rewrite_end"], t["gen_emb"]]


@pytest.fixture(scope="module")
def rl_actors(ray_local, zoo_cache, tmp_path_factory):
    """2 learners + 2 rollout workers + 1 reward actor on the tiny model and a small synthetic split,
    started once for the module: each weight-sync strategy below takes them over in turn."""
    from orchestrator.learner_group import DATA_TASK_CPUS, LearnerGroup
    from orchestrator.pairs import PairStream
    from orchestrator.refine_rl import RefineRL, stage_config
    from rime_model.zoo import ensure_zoo_model

    tmp = tmp_path_factory.mktemp("rl")
    write_synth(tmp / "data", {"train": 6}, seed=0, tasks=("t2i", "i2t", "referring"))
    cfg = parse_config(
        {
            "run": {"stages": ["refine-rl"]},
            "learners": {"num_actors": 2, "micro_batch_size": 4, "cpus_per_actor": 0.4},
            "rollout": {
                "num_actors": 2,
                "group_size": 2,
                "max_new_tokens": 6,
                "cpus_per_actor": 0.05,
                "sync_bucket_mb": 16,
                "sync_timeout_s": 30,
            },
            "reward": {"num_actors": 1},
            "refine_rl": {"queries_per_step": 4, "lr": 1e-4},
        }
    )
    model = str(ensure_zoo_model("tiny"))
    group = LearnerGroup(cfg, model, {"lambda_cma": 1.0, "temperature": 0.02, "ce_weight": 1.0})
    group.call("begin_stage", "refine-rl", stage_config(cfg), cfg.refine_rl.lr, 1, model)
    stream = PairStream(tmp / "data", "train", 0, 64, tmp / "errors.jsonl", group_by_task=False)
    rl = RefineRL(cfg, group, stream, model, reserve_cpus=DATA_TASK_CPUS)
    yield rl
    rl.shutdown()
    stream.close()
    group.shutdown()


@pytest.fixture(scope="module", params=["object_store", "collective"])
def rl_setup(request, rl_actors):
    """The module's actors under one weight-sync strategy (collective = learner rank 0 broadcasting in a
    gloo group here, the code path that uses NCCL on GPUs); a fresh strategy starts at version 0, as at the
    start of a stage."""
    from orchestrator.sync import make_weight_sync

    rl = rl_actors
    rl.cfg = replace_config(rl.cfg, rollout={"weight_sync": request.param})
    rl.sync = make_weight_sync(request.param, rl.cfg, rl.group, rl.actors.rollout, rl.actors.reward)
    return rl


def _rollout_state(rl):
    import ray

    infos = ray.get([w.info.remote() for w in rl.actors.rollout])
    sums = ray.get([w.weights_checksum.remote() for w in rl.actors.rollout])
    return infos, sums


def test_two_steps_sync_rollout_weights_to_learners(rl_setup):
    rl = rl_setup
    rl.sync_weights(0)
    before = rl.group.call("param_checksum")[0]
    for step in range(2):
        m = rl.step(step)
        learner_sums = rl.group.call("param_checksum")
        infos, sums = _rollout_state(rl)
        assert learner_sums[0] == learner_sums[1]
        assert [i["version"] for i in infos] == [step + 1, step + 1] == [rl.version] * 2
        assert sums == pytest.approx([learner_sums[0]] * 2, rel=1e-12)
        assert m["sync/version"] == step + 1 and m["sync/bytes"] > 1e6
        if rl.cfg.rollout.weight_sync == "collective":
            assert m["sync/group_rebuilds"] == 1.0 and rl.sync.epoch == 1  # built once, reused every step
        for k in (
            "reward/reward_mean",
            "reward/acc_mean",
            "reward/format_mean",
            "train/pg_loss",
            "train/kl",
            "train/entropy",
            "train/pg_clipfrac",
            "train/nce",
            "rollout/tokens_per_s",
            "time/rollout_s",
            "time/reward_s",
            "time/learn_s",
        ):
            assert k in m and m[k] == m[k], k  # present and not NaN
        assert m["train/logprob_mismatch"] < 1e-3  # on-policy: behaviour log-probs == learner's
        assert m["rollout/staleness_mean"] == 0.0
    assert learner_sums[0] != before  # the policy moved


def test_killed_rollout_worker_is_restarted_and_the_step_completes(rl_setup):
    import ray

    rl = rl_setup
    victim = rl.actors.rollout[0]
    pid = ray.get(victim.info.remote())["pid"]
    killed = []

    def kill_once(_rl, _pending):
        if not killed:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    rl.on_rollouts_submitted = kill_once
    try:
        m = rl.step(10)
    finally:
        rl.on_rollouts_submitted = None
    assert killed == [pid]
    if rl.cfg.rollout.weight_sync == "collective":  # the restarted worker was not in the group: rebuilt
        assert rl.sync.epoch >= 2 and ray.get(victim.sync_epoch.remote()) == rl.sync.epoch
    info = ray.get(victim.info.remote())
    assert info["pid"] != pid and info["reconstructed"]
    assert info["version"] == rl.version  # the restarted worker caught up with the current weights
    assert m["rollout/well_formed_frac"] >= 0 and m["train/response_tokens"] > 0
    m2 = rl.step(11)  # and the run goes on
    infos, sums = _rollout_state(rl)
    assert [i["version"] for i in infos] == [rl.version] * 2
    assert sums[0] == pytest.approx(rl.group.call("param_checksum")[0], rel=1e-12)
    assert m2["sync/version"] == rl.version


def test_killed_reward_actor_restarts_on_the_drivers_candidate_set(rl_setup):
    """Reward actors get the training stream's checked candidates through one object-store copy (no actor
    re-reads or re-decodes the corpus); a reward actor killed between steps comes back with the same set."""
    import ray

    rl = rl_setup
    (actor,) = rl.actors.reward
    before = ray.get(actor.cache_info.remote())
    assert before["candidates"] == len(rl.stream.cands) > 0
    os.kill(before["pid"], signal.SIGKILL)
    m = rl.step(20)
    after = ray.get(actor.cache_info.remote())
    assert after["pid"] != before["pid"] and after["candidates"] == before["candidates"]
    assert after["anchor_misses"] > 0 and m["reward/reward_mean"] == m["reward/reward_mean"]  # it scored the step


def test_one_step_stale_pipelining(rl_setup):
    """max_staleness 1: the next batch's rollouts are issued before the update, so they were sampled
    with the previous weights; the clipped ratio then corrects against their behaviour log-probs."""
    rl = rl_setup
    base = rl.cfg
    rl.cfg = replace_config(base, refine_rl={"max_staleness": 1})
    try:
        first = rl.step(20)
        assert rl.pending is not None and rl.pending.version == rl.version - 1  # issued before the update
        second = rl.step(21)
    finally:
        rl.cfg = base
    assert first["rollout/staleness_mean"] == 0.0
    assert second["rollout/staleness_mean"] == 1.0
    assert second["train/logprob_mismatch"] > 0  # behaviour policy != the policy being updated
    assert rl.trained_position == rl.pending.pos_before  # a checkpoint now would replay the pending batch
    rl.step(22)  # drains the pending batch with staleness back at 0 for the next one
    assert rl.pending is None


def test_an_export_the_rollout_workers_cannot_load_fails_the_sync_at_once(rl_setup, monkeypatch):
    """Learners whose export does not fit the rollout model (one tensor of another shape: they started from
    another model) fail the sync from its metadata, before any weight moves. Under collective sync the
    driver asks every worker before it builds a group or broadcasts (so no rebuild and retry of a failure
    that would repeat); through the object store each worker refuses the export and keeps its version."""
    import ray

    from actors.weight_sync import ObjectStoreWeights, WeightMismatchError

    rl = rl_setup
    versions = [i["version"] for i in _rollout_state(rl)[0]]
    if rl.cfg.rollout.weight_sync == "collective":
        real_call = rl.group.call

        def call(method, *args, **kwargs):
            out = real_call(method, *args, **kwargs)
            if method == "weight_meta":
                name, shape, dtype = out[0][1]
                out[0][1] = (name, (shape[0] + 1, *shape[1:]), dtype)
            return out

        monkeypatch.setattr(rl.group, "call", call)
        meta, epoch, rebuilds = rl.sync.meta, rl.sync.epoch, rl.sync.rebuilds
        rl.sync.meta = None
        try:
            with pytest.raises(ray.exceptions.RayTaskError) as e:
                rl.sync_weights(rl.version + 1)
        finally:
            rl.sync.meta = meta
        assert (rl.sync.epoch, rl.sync.rebuilds) == (epoch, rebuilds)  # no group built, no broadcast
    else:
        exports = [a.export_to_object_store.remote() for a in rl.group.actors]  # as a sync does (collective under ZeRO-3)
        sd = ray.get(exports[0]).state_dict()
        name = list(sd)[1]
        sd[name] = torch.zeros(sd[name].shape[0] + 1, *sd[name].shape[1:])
        bad = ray.put(ObjectStoreWeights(sd))
        with pytest.raises(ray.exceptions.RayTaskError) as e:
            ray.get([w.update_weights.remote(rl.version + 1, [bad]) for w in rl.actors.rollout])
    assert isinstance(e.value.cause, WeightMismatchError) and "do not match the rollout model's shapes" in str(e.value.cause)
    infos, sums = _rollout_state(rl)
    assert [i["version"] for i in infos] == versions == [rl.version] * 2  # nothing landed: still the current weights
    assert sums == pytest.approx([rl.group.call("param_checksum")[0]] * 2, rel=1e-12)
