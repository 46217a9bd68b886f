"""The trainer's one step loop, with a stage and a learner group of the test's own (no Ray, no model):
counters, log cadence, checkpoints and their pruning, resume from the stage step, and a new stage or a new
weight-sync strategy being one class plus one registry entry."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from orchestrator.config import ConfigError, parse_config
from orchestrator.pairs import StreamPosition
from orchestrator.stages import STAGES, Stage, StageSettings, register_stage
from orchestrator.sync import WEIGHT_SYNCS, WeightSync, make_weight_sync, register_weight_sync
from orchestrator.train import Trainer


class CountingStage(Stage):
    """Each step moves the data position by one batch and reports its own index."""

    log_every = 2
    started: list[int] = []

    @classmethod
    def settings(cls, cfg):
        return StageSettings({"unit": True}, lr=1e-3, warmup_steps=0, steps=7)

    def start(self) -> None:
        CountingStage.started.append(self.ctx.state.stage_step)
        self.pos = StreamPosition(0, self.ctx.state.position.offset)

    def step(self, i: int) -> dict[str, float]:
        self.pos = StreamPosition(0, self.pos.offset + 1)
        return {"train/loss": 1.0 / (i + 1), "toy/index": float(i)}

    @property
    def position(self) -> StreamPosition:
        return self.pos

    def log_line(self, i, m):
        return f"toy step {i} loss {m['train/loss']:.3f}"

    def end(self):
        return {"toy_done": True}


@dataclass
class FakeLearners:
    """A learner group's ``call`` as the loop uses it; checkpoints are folders named by tag."""

    size: int = 2
    calls: list[tuple] = field(default_factory=list)

    def call(self, method, *args, **kwargs):
        self.calls.append((method, args))
        if method == "save_checkpoint":
            Path(args[0], args[1]).mkdir(parents=True)
        return [None] * self.size


class FakeTracking:
    def __init__(self):
        self.metrics: list[tuple[int, dict]] = []

    def log_metrics(self, m, step):
        self.metrics.append((step, dict(m)))

    def log_metric(self, k, v, step):
        self.metrics.append((step, {k: v}))

    def log_artifact(self, *a, **k):
        pass


@pytest.fixture
def toy_stage():
    register_stage("toy")(CountingStage)
    yield "toy"
    del STAGES["toy"]


def _trainer(tmp_path, stage):
    cfg = parse_config(
        {"run": {"stages": [stage], "out_dir": str(tmp_path), "name": "loop"}, "checkpoint": {"every_steps": 3, "keep_last": 2}}
    )
    tr = Trainer(cfg)
    tr.mlflow, tr.data_dir = FakeTracking(), tmp_path
    tr.state.stage = stage
    return tr


def test_one_loop_runs_a_registered_stage_with_checkpoints_and_logs(toy_stage, tmp_path, caplog):
    tr, learners = _trainer(tmp_path, toy_stage), FakeLearners()
    CountingStage.started.clear()
    with caplog.at_level("INFO", logger="orchestrator"):
        out = tr._run_stage(toy_stage, learners, "start-model", steps=7)
    assert out == {"toy_done": True} and CountingStage.started == [0]
    assert (tr.state.step, tr.state.stage_step) == (7, 7)
    stepped = [(s, m["toy/index"]) for s, m in tr.mlflow.metrics if "toy/index" in m]
    assert stepped == [(i + 1, float(i)) for i in range(7)]  # one metrics row per step, at the global step
    saved = [a[1] for m, a in learners.calls if m == "save_checkpoint"]
    assert saved == ["step3", "step6", "step7"]  # every 3 stage steps, and the stage's last
    assert sorted(p.name for p in tr.ckpt_dir.iterdir()) == ["step6", "step7"]  # keep_last 2
    assert tr.state.checkpoint == "step7" and tr.state.checkpoint_meta.position == StreamPosition(0, 7)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("toy step")]
    assert lines == ["toy step 1 loss 1.000", "toy step 2 loss 0.500", "toy step 4 loss 0.250", "toy step 6 loss 0.167"]
    assert (tmp_path / "loop" / "state.json").is_file()


def test_the_loop_continues_from_the_stage_step_a_resume_restored(toy_stage, tmp_path):
    tr, learners = _trainer(tmp_path, toy_stage), FakeLearners()
    tr.state.step, tr.state.stage_step, tr.state.position = 10, 4, StreamPosition(0, 4)
    CountingStage.started.clear()
    tr._run_stage(toy_stage, learners, "start-model", steps=7)
    assert CountingStage.started == [4] and (tr.state.step, tr.state.stage_step) == (13, 7)
    assert [m["toy/index"] for _, m in tr.mlflow.metrics if "toy/index" in m] == [4.0, 5.0, 6.0]
    assert tr.state.checkpoint_meta.position == StreamPosition(0, 7)  # the stage's data went on from offset 4


def test_unknown_stage_and_sync_names_fail_with_the_registered_choices():
    with pytest.raises(ConfigError, match=r"run\.stages: unknown stage 'distill'; available: \('cma', 'plume', 'refine-rl'\)"):
        parse_config({"run": {"stages": ["distill"]}})
    with pytest.raises(
        ConfigError, match=r"rollout\.weight_sync: 'lora' is not one of \('collective', 'lora_adapter', 'object_store'\)"
    ):
        parse_config({"rollout": {"weight_sync": "lora"}})


def test_a_new_weight_sync_strategy_is_one_class_and_one_registration():
    @register_weight_sync("toy-sync")
    class ToySync(WeightSync):
        def push(self, version):
            self.version = version
            return {"sync/version": float(version)}

        def token(self):
            return {"version": self.version, "ref": None}

    try:
        cfg = parse_config({"rollout": {"weight_sync": "toy-sync"}})  # the config accepts it by name
        sync = make_weight_sync(cfg.rollout.weight_sync, cfg, FakeLearners(), [], [])
        assert isinstance(sync, ToySync) and sync.push(3) == {"sync/version": 3.0} and sync.token()["version"] == 3
        assert sync.recover(RuntimeError("not mine")) is False  # the default: not the strategy's to repair
        with pytest.raises(ValueError, match="registered twice"):
            register_weight_sync("toy-sync")(ToySync)
    finally:
        del WEIGHT_SYNCS["toy-sync"]


def test_a_plume_stage_resumed_mid_curriculum_makes_the_calls_an_uninterrupted_one_makes():
    """What PLUME adds to a resume (the generic checkpoint/stream exactness is test_train's kill test): the
    phase comes from the schedule and the stage step alone, and the optimizer reset of a curriculum stage
    change also happens when the resume lands exactly on it. A run resumed at stage step 6 (the start of
    curriculum stage 3) asks the learners for exactly what steps 6.. of an uninterrupted run ask."""
    from types import SimpleNamespace

    from orchestrator.stages.plume import PlumeStage

    cfg = parse_config(
        {"run": {"stages": ["plume"]}, "plume": {"steps_per_stage": 2, "segments": 4, "probe_queries_per_task": 0}}
    )

    def calls_from(first: int) -> list[tuple]:
        learners = FakeLearners(size=1)
        ctx = SimpleNamespace(cfg=cfg, learners=learners, state=SimpleNamespace(plume_rows_short_reasoning=0))
        stage = PlumeStage(ctx)
        out = []
        for i in range(first, stage.schedule.total_steps):
            args, metrics = stage.step_args(i, [])
            out.append((i, args["phase"]["stage"], metrics["plume/latent_steps"], [c[0] for c in learners.calls]))
            learners.calls.clear()
        return out

    straight, resumed = calls_from(0), calls_from(6)
    assert [c[0] for c in straight if c[3] == ["reset_optimizer"]] == [2, 4, 6, 8]  # one reset per stage change
    assert resumed == straight[6:] and resumed[0] == (6, 3, 6, ["reset_optimizer"])
