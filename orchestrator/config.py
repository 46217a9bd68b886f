"""Typed run configuration: YAML -> frozen pydantic models (``config_schema``), with errors that name the
key and the fix.

Unknown keys, wrong types and out-of-range values are rejected before anything starts (no Ray, no
torch, no model), so a typo never costs a cluster launch. Types and bounds live on the schema's fields;
names from the stage and weight-sync registries and checks that span keys live in ``_check`` here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from rime_model.choices import QUERY_MODES

from .config_schema import (  # noqa: F401  (the schema's classes are this module's API too)
    CheckpointConfig,
    ClusterConfig,
    CMAConfig,
    Config,
    DataConfig,
    EvalConfig,
    LearnerConfig,
    LoraConfig,
    ModelConfig,
    PlumeConfig,
    RefineRLConfig,
    RewardConfig,
    RoleConfig,
    RolloutConfig,
    RunConfig,
    Section,
    TrackingConfig,
)
from .placement import BUILTIN_RESOURCES
from .tracking import NO_TRACKING


class ConfigError(ValueError):
    """A bad config value; the message starts with the dotted key."""


def replace_config(cfg: Config, **sections: Any) -> Config:
    """A copy with whole sections or ``section={key: value}`` updates replaced, validated again."""
    raw = cfg.to_dict()
    for name, value in sections.items():
        raw[name] = value.model_dump() if isinstance(value, BaseModel) else {**raw[name], **value}
    return parse_config(raw)


EVAL_QUERY_MODES = QUERY_MODES  # rime eval's too (orchestrator.evaluate)
EVAL_CAND_MODES = ("disc", "gen", "latent")
# keys that were renamed: a config still using the old name gets the new one in its error
RENAMED = {
    f"{sec}.{old}": f"{sec}.{new}"
    for sec, pairs in {
        "learners": {"num_learners": "num_actors", "cpus_per_learner": "cpus_per_actor", "gpus_per_learner": "gpus_per_actor"},
        "rollout": {"num_workers": "num_actors", "cpus_per_worker": "cpus_per_actor", "gpus_per_worker": "gpus_per_actor"},
    }.items()
    for old, new in pairs.items()
}
_EXPECTED = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "string": "a string",
    "tuple": "a list",
    "dict": "a mapping",
    "model": "a mapping",
}


def _key(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _message(err: dict, sections: dict[str, type[Section]]) -> str:
    """One pydantic error as ``dotted.key: what is wrong; what to do``."""
    loc, kind, value = err["loc"], err["type"], err.get("input")
    key = _key(loc)
    if kind == "extra_forbidden":
        if len(loc) == 1:
            return f"{key}: unknown section; valid sections: {', '.join(sections)}"
        if key in RENAMED:
            return f"{key}: renamed to {RENAMED[key]}; every role section sizes its actors with num_actors, cpus_per_actor, gpus_per_actor"
        where = _key(loc[:-1])
        return f"{key}: unknown key; valid keys in '{where}': {', '.join(sorted(_section_at(sections, loc[:-1]).model_fields))}"
    base = kind.split("_")[0]
    if kind.endswith(("_type", "_parsing")) and base in _EXPECTED:
        return f"{key}: expected {_EXPECTED[base]}, got {type(value).__name__} {value!r}"
    if kind == "literal_error":
        return f"{key}: {value!r} is not one of ({err['ctx']['expected']})"
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<="}
    if kind in bounds:
        limit = next(iter(err["ctx"].values()))
        return f"{key}: must be {bounds[kind]} {limit}, got {value}"
    return f"{key}: {err['msg']}"


def _section_at(sections: dict[str, type[Section]], loc: tuple) -> type[Section]:
    """The schema class at ``loc`` (a section, or a section nested in one: ``model.lora``)."""
    cls = sections[loc[0]]
    for part in loc[1:]:
        cls = cls.model_fields[part].annotation
    return cls


def parse_config(raw: dict | None) -> Config:
    """Validate a config mapping (as loaded from YAML) into ``Config``."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(raw).__name__}")
    sections = {name: f.annotation for name, f in Config.model_fields.items()}
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_message(e.errors()[0], sections)) from None
    _check(cfg)
    return cfg


def _registered() -> tuple[dict, tuple[str, ...]]:
    """The stage registry and the weight-sync names (both packages import torch- and Ray-free)."""
    from .stages import STAGES
    from .sync import WEIGHT_SYNCS

    return STAGES, tuple(sorted(WEIGHT_SYNCS))  # sorted: the listed choices do not depend on import order


def _check(cfg: Config) -> None:
    """What one field's type cannot say: names from registries, and checks that span keys."""
    stage_registry, syncs = _registered()
    stages = tuple(stage_registry)
    if cfg.rollout.weight_sync not in syncs:
        raise ConfigError(f"rollout.weight_sync: {cfg.rollout.weight_sync!r} is not one of {syncs}")
    for s in cfg.run.stages:
        if s not in stages:
            raise ConfigError(f"run.stages: unknown stage {s!r}; available: {stages}")
    if not cfg.run.stages or len(set(cfg.run.stages)) != len(cfg.run.stages):
        raise ConfigError(f"run.stages: {list(cfg.run.stages)}: list each stage to run once, in order, e.g. [cma, refine-rl]")
    for key, modes, allowed in (
        ("eval.query_modes", cfg.eval.query_modes, EVAL_QUERY_MODES),
        ("eval.cand_modes", cfg.eval.cand_modes, EVAL_CAND_MODES),
    ):
        if not modes or any(m not in allowed for m in modes):
            raise ConfigError(f"{key}: {list(modes)} must be a non-empty list from {allowed}")
    from rime_data.synth import EXTRA_TASKS, TASKS  # torch-free

    unknown_tasks = [t for t in cfg.data.synth_tasks if t not in TASKS + EXTRA_TASKS]
    if unknown_tasks or not cfg.data.synth_tasks:
        raise ConfigError(f"data.synth_tasks: {unknown_tasks or '[]'} not generated tasks; choose from {TASKS + EXTRA_TASKS}")
    if cfg.data.shuffle_buffer < 1:
        raise ConfigError(f"data.shuffle_buffer: must be >= 1, got {cfg.data.shuffle_buffer} (1 = no shuffling)")
    ro, lc = cfg.rollout, cfg.learners
    roles = {"learners": lc, "rollout": ro, "reward": cfg.reward}
    for sec, role in roles.items():
        if role.gpus_per_actor > 1 and role.gpus_per_actor != int(role.gpus_per_actor):
            raise ConfigError(
                f"{sec}.gpus_per_actor: {role.gpus_per_actor} GPUs: Ray schedules a fraction of one GPU "
                f"or whole GPUs, not {role.gpus_per_actor}"
            )
        v = role.node_resource
        if v and (not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.:-]*", v) or v in BUILTIN_RESOURCES):
            raise ConfigError(
                f"{sec}.node_resource: {v!r} is not a custom Ray resource name; give the name a node type "
                "advertises (ray_cluster.yaml: learner_pool / rollout_pool; `ray start --resources='{\"NAME\": N}'`), "
                'or "" for any node'
            )
    if not 0 <= ro.vllm_gpu_memory_utilization <= 1:
        raise ConfigError(
            f"rollout.vllm_gpu_memory_utilization: must be in [0, 1] (0 = 0.9 x gpus_per_actor), "
            f"got {ro.vllm_gpu_memory_utilization}"
        )
    if not 0 < ro.top_p <= 1:
        raise ConfigError(f"rollout.top_p: must be in (0, 1], got {ro.top_p}")
    if ro.vllm_max_model_len < ro.max_new_tokens + 2:
        raise ConfigError(
            f"rollout.vllm_max_model_len: {ro.vllm_max_model_len} cannot hold a prompt and "
            f"rollout.max_new_tokens ({ro.max_new_tokens}) + 2 end markers"
        )
    if lc.offload_optimizer and lc.zero_stage == 0:
        raise ConfigError("learners.offload_optimizer: needs learners.zero_stage >= 1")
    if lc.precision == "fp16" and lc.gpus_per_actor == 0:  # DeepSpeed's own check fails deep inside each learner
        raise ConfigError(
            "learners.precision: fp16 needs GPU learners (learners.gpus_per_actor > 0), DeepSpeed has no fp16 on CPU; "
            "use learners.precision=bf16 (fp32 master weights) or fp32"
        )
    if cfg.tracking.uri.strip().lower() in NO_TRACKING:
        raise ConfigError(
            f"tracking.uri: {cfg.tracking.uri!r} would turn tracking off, but training always tracks; "
            "leave it empty for sqlite in the run dir (or $MLFLOW_TRACKING_URI), or give a URI"
        )
    _check_lora(cfg)
    for name in cfg.run.stages:  # each stage's own cross-key checks (torch-free)
        stage_registry[name].check_config(cfg)


def _check_lora(cfg: Config) -> None:
    """``model.lora`` against itself and the learners (whether the names match the model is checked when
    the learners wrap it: ``rime_model.lora.target_linears``)."""
    lora = cfg.model.lora
    if cfg.rollout.weight_sync == "lora_adapter" and (lora.rank == 0 or cfg.rollout.backend != "hf"):
        why = "there is no adapter (model.lora.rank is 0)" if lora.rank == 0 else "only HF rollout workers load one"
        raise ConfigError(
            f"rollout.weight_sync: lora_adapter sends the LoRA adapter alone, and {why}; "
            "use rollout.weight_sync=object_store (the merged weights)"
        )
    if lora.rank == 0:
        return
    if not 0 <= lora.dropout < 1:
        raise ConfigError(f"model.lora.dropout: must be in [0, 1), got {lora.dropout}")
    if not lora.target_modules:
        raise ConfigError("model.lora.target_modules: [] adapts nothing; list linear layer names, e.g. [q_proj, v_proj]")
    if cfg.learners.zero_stage == 3:
        raise ConfigError(
            "model.lora: LoRA with learners.zero_stage 3 is not supported yet (each stage start merges the adapter "
            "into the base weights in place, which ZeRO-3 partitions); use learners.zero_stage 0, 1 or 2: the "
            "optimizer state is the adapter's alone, small enough unpartitioned"
        )
    if lora.vision and cfg.model.freeze_vision:
        raise ConfigError(
            "model.lora.vision: true adapts the vision tower that model.freeze_vision: true freezes; set one of them to false"
        )


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read YAML, apply ``section.key=value`` overrides (YAML-typed), validate."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config: file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config: {p} is not valid YAML: {e}") from e
    return parse_config(apply_overrides(raw, overrides or []))


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``section.key=value`` strings (values parsed as YAML) applied onto a raw config mapping; a nested
    section's keys as ``model.lora.rank=8``."""
    for ov in overrides:
        if "=" not in ov or "." not in ov.split("=", 1)[0]:
            raise ConfigError(f"override {ov!r}: use section.key=value, e.g. cma.steps=20")
        key, val = ov.split("=", 1)
        *secs, name = key.split(".")
        node = raw
        for i, sec in enumerate(secs):
            node.setdefault(sec, {})
            if not isinstance(node[sec], dict):
                raise ConfigError(f"{'.'.join(secs[: i + 1])}: expected a mapping")
            node = node[sec]
        node[name] = yaml.safe_load(val)
    return raw


def config_yaml(cfg: Config) -> str:
    """The fully resolved config as YAML, every default included (``rime config show``)."""
    return yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False)


def _plain(v: Any) -> Any:
    """Tuples as lists, nested sections included (YAML's safe dumper knows no tuples)."""
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return list(v) if isinstance(v, tuple) else v


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(config_yaml(cfg))
