"""`rime ablate`: arms x start models x seeds trained, scored per query and compared paired.

Most tests run the orchestration with an injected backend that trains nothing (hand-made per-query
reports): which runs train, resume and re-scoring, failures, the files and the numbers written, and
every argument check, in seconds. The real backend is tested in pieces (the `rime train` arguments,
a failing training, a job's logged model, scoring a saved model); test_submit checks the `rime submit
--follow` commands `rime ablate --submit` builds, and runs a submitted training job end to end."""

from __future__ import annotations

import json
import random
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from orchestrator.ablate import run_plan
from orchestrator.ablate_arms import ArmError, LocalBackend, Settings, ensure_test_data, logged_model_uri, rime_args
from orchestrator.ablate_plan import PLUME_ARMS, AblateError, make_plan, parse_arm
from orchestrator.compare import compare_files

ROOT = Path(__file__).resolve().parents[1]
# the smallest PLUME run that trains, evaluates and saves
TRAIN_ARGS = [
    "--set",
    "data.synth_train=8",
    "--set",
    "data.synth_test=4",
    "--set",
    "data.synth_val=0",
    "--set",
    "plume.segments=1",
    "--set",
    "plume.steps_per_stage=2",
    "--set",
    "plume.final_stage_steps=2",
    "--set",
    "learners.num_actors=1",
    "--set",
    "learners.micro_batch_size=4",
    "--set",
    "eval.max_queries_per_task=2",
    "--set",
    "plume.probe_queries_per_task=0",
    "--set",
    "eval.before_training=false",
    "--set",
    "tracking.log_model=false",
    "--set",
    "checkpoint.every_steps=100",
]
QUERIES = [f"referring/test/q{i}" for i in range(12)]


# ------------------------------------------------------------------------ a backend that trains nothing
class FakeBackend:
    """Trains nothing; scores with 0/1 hits drawn from the run's key (so a re-score gives the same report)."""

    note = ""

    def __init__(self, fail_starts: tuple[str, ...] = (), pairs: tuple[str, ...] = ("disc->disc", "latent->latent")):
        self.fail_starts, self.pairs = fail_starts, pairs
        self.trained: list[str] = []
        self.barrier = threading.Barrier(2, timeout=10)  # two failing runs are both under way before either fails

    def train(self, run, log: Path) -> str:
        log.write_text(f"rime train {run.run_name}\n")
        if run.start in self.fail_starts:
            self.barrier.wait()
            raise ArmError(f"training {run.run_name} failed (exit 2), see {log}")
        self.trained.append(run.run_name)
        return f"/models/{run.run_name}/final"

    def score(self, run, model: str, report: Path, log: Path, zero_steps: bool) -> None:
        rng = random.Random(f"{run.key}-{zero_steps}")
        pairs = ("latent->latent",) if zero_steps else self.pairs
        per_query = {
            p: {q: {"task": "referring", "hit@1": float(rng.random() < 0.5), "mrr": rng.random()} for q in QUERIES} for p in pairs
        }
        report.write_text(
            json.dumps({"model": model, "queries_sha1": "f00", "latent_steps": 0 if zero_steps else 8, "per_query": per_query})
        )


def _plan(starts="tiny", seeds="0,1", arms=None, control=None):
    return make_plan("smoke", arms, starts, seeds, control)


@pytest.fixture
def ablated(tmp_path, capsys):
    """The default (PLUME) ablation on one start model and two seeds, two runs at once, already run once."""
    backend = FakeBackend()
    rc = run_plan(_plan(), tmp_path / "out", backend, parallel=2, resamples=200)
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    return tmp_path / "out", backend, cap


def test_the_plan_is_arms_by_start_models_by_seeds_with_the_first_arm_as_reference():
    plan = _plan("tiny,runs/x/final", "0,1")
    assert [a.name for a in plan.arms] == ["nocur", "cur"] and plan.control == "cur"
    assert plan.arm("nocur").overrides == ("plume.curriculum=false", "plume.probe_queries_per_task=0")
    assert plan.arm("cur").overrides == ()
    assert [r.run_name for r in plan.runs()] == [
        "smoke-m0-seed0-nocur",
        "smoke-m0-seed0-cur",
        "smoke-m0-seed1-nocur",
        "smoke-m0-seed1-cur",
        "smoke-m1-seed0-nocur",
        "smoke-m1-seed0-cur",
        "smoke-m1-seed1-nocur",
        "smoke-m1-seed1-cur",
    ]
    assert plan.groups() == ["tiny", "tiny", "runs/x/final", "runs/x/final"] and _plan().groups() is None
    custom = _plan(arms=["full=", "nokl=refine_rl.kl_coef=0 'rollout.backend=hf'"])
    assert custom.control is None and custom.arm("nokl").overrides == ("refine_rl.kl_coef=0", "rollout.backend=hf")
    assert make_plan("x", list(PLUME_ARMS), "tiny", "0,1", None).control is None  # only the default arms imply it


def test_every_arm_per_seed_is_trained_scored_and_compared_with_the_reference(ablated):
    out, backend, cap = ablated
    reports = out / "reports"
    assert sorted(backend.trained) == ["smoke-m0-seed0-cur", "smoke-m0-seed0-nocur", "smoke-m0-seed1-cur", "smoke-m0-seed1-nocur"]
    assert cap.err.count("[ablate] train") == 4 and cap.err.count("[ablate] scored") == 4
    assert sorted(p.name for p in reports.glob("*.json")) == [
        "m0-seed0-cur-k0.json",
        "m0-seed0-cur.json",
        "m0-seed0-nocur.json",
        "m0-seed1-cur-k0.json",
        "m0-seed1-cur.json",
        "m0-seed1-nocur.json",
    ]
    res = json.loads((out / "compare.json").read_text())
    s = res["summary"]
    assert s["unit"] == "run" and s["groups"] is None and s["runs"] == 2 and s["pair"] == "latent->latent"
    for seed, run, diff in zip((0, 1), res["runs"], s["diffs"]):  # B = curriculum, A = no curriculum, per seed
        c = compare_files(reports / f"m0-seed{seed}-nocur.json", reports / f"m0-seed{seed}-cur.json", resamples=200)
        assert c.n == run["n"] == 12 and c.diff == pytest.approx(diff) and c.mean_b == pytest.approx(run["mean_b"])
    assert "[ablate] B = cur, A = nocur" in cap.out and "across 2 pairs of runs (the run is the unit)" in cap.out
    # the zero-step control: the curriculum arm's own model at 0 steps (A) against its K (B)
    res = json.loads((out / "latent_steps.json").read_text())
    assert res["summary"]["runs"] == 2 and "the latent steps' own share, in arm cur" in cap.out
    for seed, run in zip((0, 1), res["runs"]):
        a, b = reports / f"m0-seed{seed}-cur-k0.json", reports / f"m0-seed{seed}-cur.json"
        ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
        assert ra["model"] == rb["model"] == f"/models/smoke-m0-seed{seed}-cur/final"
        assert (ra["latent_steps"], rb["latent_steps"]) == (0, 8) and run["pair"] == "latent->latent"
        c = compare_files(a, b, resamples=200)
        assert c.n == run["n"] and c.diff == pytest.approx(run["diff"]) and c.mean_a == pytest.approx(run["mean_a"])


def test_a_rerun_scores_a_missing_control_without_training(ablated, capsys):
    out, _, _ = ablated
    before = json.loads((out / "latent_steps.json").read_text())
    (out / "reports" / "m0-seed1-cur-k0.json").unlink()
    backend = FakeBackend()
    assert run_plan(_plan(), out, backend, resamples=200) == 0
    err = capsys.readouterr().err
    assert backend.trained == [] and "[ablate] train" not in err and "[ablate] scored" not in err
    assert err.count("with 0 latent steps") == 1 and "eval smoke-m0-seed1-cur with 0 latent steps" in err
    assert json.loads((out / "latent_steps.json").read_text())["runs"][1] == before["runs"][1]


def test_a_run_trained_again_gets_a_new_control(ablated, capsys):
    out, _, _ = ablated
    (out / "reports" / "m0-seed0-cur.json").unlink()
    control = out / "reports" / "m0-seed0-cur-k0.json"
    control.write_text(json.dumps({"model": "an older model"}))
    backend = FakeBackend()
    assert run_plan(_plan(), out, backend, resamples=200) == 0
    assert backend.trained == ["smoke-m0-seed0-cur"] and json.loads(control.read_text())["model"] != "an older model"


def test_after_a_failed_run_no_new_run_starts_and_the_scored_reports_stay(ablated, capsys):
    out, _, _ = ablated
    compare_before = (out / "compare.json").read_text()
    rc = run_plan(_plan("tiny,no-such-model"), out, FakeBackend(fail_starts=("no-such-model",)), parallel=2)
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "train smoke-m0" not in err and err.count("[ablate] train smoke-m1") == 2  # the two running ones, not seed 1's
    assert "training smoke-m1-seed0-nocur failed" in err and "2 run(s) failed" in err and "re-run to continue" in err
    assert len(list((out / "reports").glob("*.json"))) == 6 and (out / "compare.json").read_text() == compare_before


def test_a_second_start_model_trains_only_its_runs_and_groups_the_pairs(ablated, capsys):
    out, _, _ = ablated
    backend = FakeBackend()
    assert run_plan(_plan("tiny,runs/other/final", "0"), out, backend, resamples=200) == 0
    cap = capsys.readouterr()
    assert backend.trained == ["smoke-m1-seed0-nocur", "smoke-m1-seed0-cur"] and cap.err.count("[ablate] train") == 2
    for name in ("compare.json", "latent_steps.json"):
        s = json.loads((out / name).read_text())["summary"]
        assert s["unit"] == "group" and s["groups"] == ["tiny", "runs/other/final"] and s["runs"] == 2
    assert "the group is the unit" in cap.out and (out / "reports" / "m1-seed0-cur-k0.json").is_file()


def test_three_arms_are_each_compared_with_the_first(tmp_path, capsys):
    plan = _plan(arms=["full=", "nokl=refine_rl.kl_coef=0", "nonce=refine_rl.lambda_nce=0"])
    out = tmp_path / "out"
    assert run_plan(plan, out, FakeBackend(pairs=("disc->disc",)), pair="disc->disc", metric="mrr", resamples=200) == 0
    stdout = capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.json")) == ["compare-nokl.json", "compare-nonce.json"]
    for arm in ("nokl", "nonce"):
        res = json.loads((out / f"compare-{arm}.json").read_text())
        assert res["summary"]["metric"] == "mrr" and f"[ablate] B = {arm}, A = full" in stdout
        for seed, run in zip((0, 1), res["runs"]):
            c = compare_files(
                out / "reports" / f"m0-seed{seed}-full.json",
                out / "reports" / f"m0-seed{seed}-{arm}.json",
                pair="disc->disc",
                metric="mrr",
                resamples=200,
            )
            assert c.diff == pytest.approx(run["diff"]) and run["only_a"] is None  # a graded metric: no McNemar


def test_reports_that_cannot_be_compared_fail_after_scoring(tmp_path, capsys):
    assert run_plan(_plan(), tmp_path / "out", FakeBackend(), pair="gen->gen") == 1
    assert "rime ablate: compare.json: A: pair 'gen->gen' not in the report" in capsys.readouterr().err


def test_a_report_that_names_no_model_cannot_get_its_control(ablated, capsys):
    out, _, _ = ablated
    (out / "reports" / "m0-seed0-cur.json").write_text("{}")
    (out / "reports" / "m0-seed0-cur-k0.json").unlink()
    assert run_plan(_plan(), out, FakeBackend()) == 1
    assert "cannot read the model it scored" in capsys.readouterr().err


# ------------------------------------------------------------------------ arguments, checked before training
def _ablate(tmp: Path, capsys, monkeypatch, *args: str) -> tuple[int, str]:
    from orchestrator.cli import main

    monkeypatch.chdir(ROOT)  # the default --config is relative to the checkout
    argv = [
        "ablate",
        "--name",
        "x",
        "--runs-dir",
        str(tmp / "runs"),
        "--out",
        str(tmp / "out"),
        "--test-data",
        str(tmp / "test"),
        *args,
    ]
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    assert not any(tmp.iterdir()), "nothing is created before the arguments are checked"
    return rc, err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--start", "tiny", "--seeds", "0"], "one start model and one seed give one pair"),
        (["--start", "tiny", "--seeds", "0,a"], "--seeds 0,a: seed 'a' is not a non-negative integer"),
        (["--start", "tiny", "--seeds", "0,0"], "seed 0 is listed twice"),
        (["--start", "tiny,tiny", "--seeds", "0"], "--start tiny,tiny: a start model is listed twice"),
        (["--start", "tiny,", "--seeds", "0"], "start model '' is empty"),
        (["--start", "tiny"], "the following arguments are required: --seeds"),
        (["--start", "tiny", "--seeds", "0,1", "--parallel", "0"], "argument --parallel: '0' is not a positive integer"),
        (["--start", "tiny", "--seeds", "0,1", "--parallel", "two"], "argument --parallel: 'two' is not a positive integer"),
        (["--start", "tiny", "--seeds", "0,1", "--zero-step-control", "yes"], "--zero-step-control yes: not an arm (nocur, cur)"),
        (["--start", "tiny", "--seeds", "0,1", "--config", "no/such.yaml"], "--config no/such.yaml: file not found"),
        (["--start", "tiny", "--seeds", "0,1", "--arm", "a="], "--arm: 1 arm given; give at least 2"),
        (["--start", "tiny", "--seeds", "0,1", "--arm", "a=", "--arm", "a=x.y=1"], "--arm a: the name is given twice"),
        (
            ["--start", "tiny", "--seeds", "0,1", "--arm", "a=curriculum", "--arm", "b="],
            "override 'curriculum' is not section.key=value",
        ),
        (["--start", "tiny", "--seeds", "0,1", "--arm", "a=plume.nope=1", "--arm", "b="], "--arm a: plume.nope: unknown key"),
        (["--start", "tiny", "--seeds", "0,1", "--arm", "a=run.seed=3", "--arm", "b="], "--arm a: run.seed is set per run"),
        (["--start", "tiny", "--seeds", "0,1", "--set", "model.spec=small"], "--set: model.spec is set per run"),
        (["--start", "tiny", "--seeds", "0,1", "--", "--profile", "p.yaml"], "`rime train` has no argument --profile p.yaml"),
        (
            ["--start", "tiny", "--seeds", "0,1", "--pair", "gen->gen"],
            "--pair gen->gen: the runs are scored in query modes disc,latent",
        ),
        (
            ["--start", "tiny", "--seeds", "0,1", "--set", "eval.cand_modes=disc", "--pair", "disc->disc"],
            "--zero-step-control cur: it is compared latent->latent",
        ),
        (["--start", "tiny", "--seeds", "0,1", "--tasks", "nope"], "--tasks nope: nope is not a task"),
        (
            ["--start", "tiny", "--seeds", "0,1", "--submit", "ray://head:10001"],
            "--submit ray://head:10001: that is a Ray Client address",
        ),
    ],
)
def test_bad_arguments_fail_before_anything_runs(tmp_path, capsys, monkeypatch, args, message):
    rc, err = _ablate(tmp_path, capsys, monkeypatch, *args)
    assert rc == 2 and message in err, err


def test_an_unreachable_submit_address_fails_before_training(tmp_path, capsys, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc, err = _ablate(tmp_path, capsys, monkeypatch, "--start", "tiny", "--seeds", "0,1", "--submit", f"http://127.0.0.1:{port}")
    assert rc == 2 and f"--submit http://127.0.0.1:{port}: cannot connect to a Ray dashboard" in err  # rime's own reason
    assert "drop --submit to train locally" in err


# ------------------------------------------------------------------------ the real backend, in pieces
def _settings(tmp: Path, **kw) -> Settings:
    return Settings(
        **{
            "config": "configs/plume-referring.yaml",
            "runs_dir": str(tmp / "runs"),
            "test_data": str(tmp / "test"),
            "test_queries": 6,
            "tasks": ("referring",),
            "query_modes": ("disc", "latent"),
            "cand_modes": ("disc", "latent"),
            "train_args": ("--set", "plume.segments=1"),
            **kw,
        }
    )


def test_each_run_trains_with_its_seed_start_and_the_arm_overrides_last(tmp_path, monkeypatch):
    from orchestrator.cli import build_parser
    from orchestrator.config import load_config

    monkeypatch.chdir(ROOT)
    plan = _plan()
    argv = rime_args(_settings(tmp_path), plan.run(0, 1, "nocur"))
    assert argv[:3] == ["train", "configs/plume-referring.yaml", "--overwrite"]
    assert argv[-4:] == ["--set", "plume.curriculum=false", "--set", "plume.probe_queries_per_task=0"]
    cfg = load_config("configs/plume-referring.yaml", build_parser().parse_args(argv).set)
    assert (cfg.run.name, cfg.run.seed, cfg.run.out_dir, cfg.model.spec) == (
        "smoke-m0-seed1-nocur",
        1,
        str(tmp_path / "runs"),
        "tiny",
    )
    assert cfg.plume.curriculum is False and cfg.plume.segments == 1
    # as a Ray job: rime submit, following the job; a local start folder goes by its absolute path
    (tmp_path / "start").mkdir()
    monkeypatch.chdir(tmp_path)
    job = rime_args(_settings(tmp_path, submit="http://head:8265"), make_plan("j", None, "start", "0,1", None).run(0, 0, "cur"))
    assert job[:5] == ["submit", "configs/plume-referring.yaml", "--address", "http://head:8265", "--follow"]
    assert f"model.spec={tmp_path / 'start'}" in job


def test_a_failed_training_names_its_log(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    log = tmp_path / "train.log"
    with pytest.raises(ArmError, match=f"training smoke-m0-seed0-cur failed \\(exit 2\\), see {log}"):
        LocalBackend(_settings(tmp_path, config="no/such.yaml")).train(_plan().run(0, 0, "cur"), log)
    assert "config: file not found: no/such.yaml" in log.read_text()


def test_a_job_is_scored_from_the_model_it_logged(tmp_path, monkeypatch):
    """With --submit and an MLflow server, the eval loads the models:/ URI the job printed last."""
    printed = {"text": ""}

    def fake_run(argv, stdout, **kw):
        stdout.write(printed["text"])
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr("orchestrator.ablate_arms.subprocess.run", fake_run)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    backend, run = LocalBackend(_settings(tmp_path, submit="http://head:8265")), _plan().run(0, 0, "cur")
    printed["text"] = '{"model_uri": "models:/m-old"}\n{\n  "run_dir": "/r",\n  "model_uri": "models:/m-1"\n}\n'
    assert backend.train(run, tmp_path / "a.log") == "models:/m-1"
    printed["text"] = '{"model_uri": null}'
    with pytest.raises(ArmError, match="logged no model"):
        backend.train(run, tmp_path / "b.log")
    assert logged_model_uri("nothing") is None
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # no server: the run's folder, which must be visible here
    assert backend.train(run, tmp_path / "c.log") == str(tmp_path / "runs" / "smoke-m0-seed0-cur" / "final")


def test_a_saved_model_is_scored_per_query_and_at_zero_latent_steps(tmp_path, tiny_latent_dir):
    s = _settings(tmp_path)
    said = []
    ensure_test_data(s, said.append)
    assert "generating 6 test queries per task (referring)" in said[0]
    backend, run = LocalBackend(s), _plan().run(0, 0, "cur")
    report, control = tmp_path / "cur.json", tmp_path / "cur-k0.json"
    backend.score(run, tiny_latent_dir, report, tmp_path / "eval.log", zero_steps=False)
    backend.score(run, tiny_latent_dir, control, tmp_path / "eval-k0.log", zero_steps=True)
    rb, ra = json.loads(report.read_text()), json.loads(control.read_text())
    assert rb["model"] == ra["model"] == tiny_latent_dir and (rb["latent_steps"], ra["latent_steps"]) == (8, 0)
    assert sorted(rb["per_query"]) == ["disc->disc", "disc->latent", "latent->disc", "latent->latent"]
    assert sorted(ra["per_query"]) == ["latent->latent"] and rb["n_queries"] == 6
    assert compare_files(control, report, resamples=100).n == 6 and "report:" in (tmp_path / "eval.log").read_text()
    with pytest.raises(ArmError, match="eval of smoke-m0-seed0-cur failed .*, see"):
        backend.score(run, str(tmp_path / "no-such-model"), tmp_path / "x.json", tmp_path / "x.log", zero_steps=False)
    assert not (tmp_path / "x.json").exists() and "Traceback" in (tmp_path / "x.log").read_text()


def test_arm_overrides_split_like_a_shell_line():
    assert parse_arm("a=x.y='two words' z.w=1").overrides == ("x.y=two words", "z.w=1")
    with pytest.raises(AblateError, match="names ending in -k0"):
        parse_arm("cur-k0=")
    with pytest.raises(AblateError, match="use NAME=OVERRIDES"):
        parse_arm("plume.curriculum")
