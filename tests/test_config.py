"""Config validation: every error names the key and says what to do."""

from __future__ import annotations

import pytest

from orchestrator.config import ConfigError, load_config, parse_config


def test_shipped_config_parses():
    cfg = load_config("configs/tiny-cpu.yaml")
    assert cfg.learners.num_actors == 2 and cfg.learners.cpus_per_actor == 0.4
    assert cfg.run.stages == ("cma", "refine-rl") and cfg.model.spec == "tiny"
    assert cfg.flat()["learners.zero_stage"] == 1


@pytest.mark.parametrize("name", ["plume-tiny", "plume-referring", "plume-chain"])
def test_shipped_plume_recipes_parse(name):
    """The README's PLUME recipes are configs; a renamed key must fail here, not in a user's run."""
    cfg = load_config(f"configs/{name}.yaml")
    assert cfg.run.stages == ("plume",) and cfg.plume.segments == 4 and cfg.plume.curriculum


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"learners": {"num_actor": 2}}, r"learners\.num_actor: unknown key; valid keys in 'learners'"),
        ({"learners": {"num_learners": 2}}, r"learners\.num_learners: renamed to learners\.num_actors"),
        ({"rollout": {"cpus_per_worker": 0.1}}, r"rollout\.cpus_per_worker: renamed to rollout\.cpus_per_actor"),
        ({"learnerz": {}}, r"learnerz: unknown section"),
        ({"learners": {"num_actors": "two"}}, r"learners\.num_actors: expected an integer, got str"),
        ({"learners": {"lr": True}}, r"learners\.lr: expected a number"),
        ({"learners": {"zero_stage": 4}}, r"learners\.zero_stage: 4 is not one of"),
        ({"learners": {"num_actors": 0}}, r"learners\.num_actors: must be >= 1"),
        ({"run": {"stages": ["cma", "sft"]}}, r"run\.stages: unknown stage 'sft'"),
        ({"cma": {"temperature": 0}}, r"cma\.temperature: must be > 0"),
        ({"checkpoint": {"every_steps": 0}}, r"checkpoint\.every_steps: must be >= 1"),
        ({"eval": {"query_modes": ["disc", "laten"]}}, r"eval\.query_modes: \['disc', 'laten'\] must be a non-empty list from"),
        ({"eval": {"batch_size": 0}}, r"eval\.batch_size: must be >= 1"),
        ({"learners": {"lr": -0.001}}, r"learners\.lr: must be > 0"),
        ({"plume": {"warmup_steps": -1}}, r"plume\.warmup_steps: must be >= 0"),
        ({"data": {"shuffle_buffer": 0}}, r"data\.shuffle_buffer: must be >= 1, got 0 \(1 = no shuffling\)"),
        ({"run": {"stages": []}}, r"run\.stages: \[\]: list each stage to run once"),
        ({"run": {"stages": ["cma", "cma"]}}, r"run\.stages: \['cma', 'cma'\]: list each stage to run once"),
        ({"data": {"synth_tasks": ["t2i", "nosuchtask"]}}, r"data\.synth_tasks: \['nosuchtask'\] not generated tasks"),
        ({"reward": {"cpus_per_actor": -1}}, r"reward\.cpus_per_actor: must be >= 0"),
        ({"learners": {"gpus_per_actor": 1.5}}, r"learners\.gpus_per_actor: 1.5 GPUs: Ray schedules a fraction"),
        (
            {
                "run": {"stages": ["refine-rl"]},
                "learners": {"gpus_per_actor": 0.5},
                "rollout": {"gpus_per_actor": 0.3, "weight_sync": "collective"},
            },
            r"rollout\.weight_sync: collective .* NCCL",
        ),
        ({"model": {"freeze_vision": "yes"}}, r"model\.freeze_vision: expected true or false"),
        ({"learners": {"offload_optimizer": True, "zero_stage": 0}}, r"learners\.offload_optimizer: needs"),
        ({"eval": 3}, r"eval: expected a mapping"),
        ({"learners": {"lr": "fast"}}, r"learners\.lr: expected a number, got str 'fast'"),
        ({"run": {"stages": ["plume"]}, "plume": {"latent_steps": 6}}, r"plume\.latent_steps: 6 must be a positive multiple"),
        ({"run": {"stages": ["plume"]}, "plume": {"top_k": 5}}, r"plume\.top_k: must be in 1\.\.plume\.experts"),
        ({"run": {"stages": ["plume"]}, "plume": {"latent_steps": 32}}, r"plume\.latent_steps: 32 > plume\.max_latent_steps"),
        ({"run": {"stages": ["plume"]}, "plume": {"final_stage_steps": 1}}, r"plume\.final_stage_steps: must be 0"),
        (
            {"run": {"stages": ["plume"]}, "plume": {"first_stage": 5}},
            r"plume\.first_stage: must be in 0\.\.plume\.segments \(4\)",
        ),
        ({"run": {"stages": ["plume"]}, "plume": {"last_stage": 0, "curriculum": False}}, r"plume\.last_stage: 0 ends before"),
        ({"plume": {"target_layout": "both"}}, r"plume\.target_layout: 'both' is not one of"),
        ({"rollout": {"weight_sync": "nccl"}}, r"rollout\.weight_sync: 'nccl' is not one of"),
        ({"cma": {"embedding_lr": -1}}, r"cma\.embedding_lr: must be >= 0"),
        ({"cma": {"matryoshka_dims": [0, 32]}}, r"cma\.matryoshka_dims: \[0, 32\]: \[0\] not >= 1; give distinct prefix sizes"),
        ({"cma": {"matryoshka_dims": [32, 64, 32]}}, r"cma\.matryoshka_dims: .*\[32\] listed twice; give distinct"),
        ({"cma": {"matryoshka_dims": [32, "x"]}}, r"cma\.matryoshka_dims\[1\]: expected an integer, got str"),
        ({"tracking": {"uri": "none"}}, r"tracking\.uri: 'none' would turn tracking off.*leave it empty"),
        ({"tracking": {"uri": " OFF"}}, r"tracking\.uri: ' OFF' would turn tracking off"),
    ],
)
def test_bad_configs_name_the_key(raw, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(raw)


def test_overrides_are_typed_and_checked(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("cma:\n  steps: 5\n")
    cfg = load_config(p, ["cma.steps=7", "learners.lr=0.01", "eval.query_modes=disc,gen", "plume.lr=5e-4"])
    assert cfg.cma.steps == 7 and cfg.learners.lr == 0.01 and cfg.eval.query_modes == ("disc", "gen")
    assert cfg.plume.lr == 5e-4  # YAML 1.1 reads 5e-4 (no dot) as a string; numbers fields accept it
    with pytest.raises(ConfigError, match="use section.key=value"):
        load_config(p, ["steps=3"])
    with pytest.raises(ConfigError, match=r"cma\.stepz: unknown key"):
        load_config(p, ["cma.stepz=3"])
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")


def test_matryoshka_dims_parse_and_are_checked_against_the_start_model(tmp_path):
    """Lists or one comma string; each size must also be below the start model's embedding size, which
    the cma stage reads from the saved model's config (no weights) before Ray starts."""
    import json

    from orchestrator.stages import STAGES

    p = tmp_path / "c.yaml"
    p.write_text("cma:\n  matryoshka_dims: [16, 64]\n")
    assert load_config(p).cma.matryoshka_dims == (16, 64)
    cfg = load_config(p, ["cma.matryoshka_dims=32,8"])
    assert cfg.cma.matryoshka_dims == (32, 8) and cfg.flat()["cma.matryoshka_dims"] == "32,8"
    assert load_config(p, ["cma.matryoshka_dims=[]"]).cma.matryoshka_dims == ()
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen2_vl", "text_config": {"hidden_size": 128}}))
    STAGES["cma"].check_start_model(cfg, str(model))
    too_big = load_config(p, ["cma.matryoshka_dims=[64,128]"])
    with pytest.raises(ConfigError, match=r"cma\.matryoshka_dims: \[64, 128\]: out of range: \[128\]; .* 1\.\.127"):
        STAGES["cma"].check_start_model(too_big, str(model))


def test_validation_stays_torch_free():
    """The CLI validates a config before importing torch (a bad key fails in a second, not after the
    torch import); PLUME's curriculum checks come from rime_model.curriculum, which must keep that true."""
    import subprocess
    import sys

    code = (
        "import sys; from orchestrator.config import load_config; "
        "load_config('configs/plume-tiny.yaml'); "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_defaults_yaml_is_the_resolved_default_config():
    """configs/defaults.yaml lists every key with its default; regenerate it with
    `rime config show > configs/defaults.yaml` when a default or key changes."""
    import contextlib
    import io
    from pathlib import Path

    from orchestrator.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["config", "show"]) == 0
    assert Path("configs/defaults.yaml").read_text() == out.getvalue(), (
        "configs/defaults.yaml is stale: run `rime config show > configs/defaults.yaml`"
    )
    assert load_config("configs/defaults.yaml") == parse_config({})  # and it loads back to the same config


def test_config_show_resolves_overrides_and_names_bad_keys(capsys):
    from orchestrator.cli import main

    assert main(["config", "show", "configs/tiny-cpu.yaml", "--set", "cma.steps=3"]) == 0
    shown = capsys.readouterr().out
    import yaml

    assert yaml.safe_load(shown)["cma"]["steps"] == 3 and yaml.safe_load(shown)["rollout"]["sync_timeout_s"] == 120.0
    assert main(["config", "show", "--set", "learners.num_learners=3"]) == 2
    assert "learners.num_learners: renamed to learners.num_actors" in capsys.readouterr().err
