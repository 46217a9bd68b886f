"""Typed run configuration: YAML -> frozen dataclasses, with errors that name the key and the fix.

Unknown keys, wrong types and out-of-range values are rejected before anything starts (no Ray,
no model), so a typo never costs a cluster launch.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .placement import BUILTIN_RESOURCES
from .tracking import NO_TRACKING

if TYPE_CHECKING:  # annotations only: validation stays torch-free and imports the schedule lazily
    from rime_model.curriculum import CurriculumSchedule


class ConfigError(ValueError):
    """A bad config value; the message starts with the dotted key."""


@dataclass(frozen=True)
class RunConfig:
    name: str = "tiny-cpu"
    seed: int = 0
    out_dir: str = "runs"  # the run directory is <out_dir>/<name>
    stages: tuple[str, ...] = ("cma",)


@dataclass(frozen=True)
class ModelConfig:
    spec: str = "tiny"  # zoo name, hf:<repo-or-path>, or a saved embedder folder
    dtype: str = "float32"
    freeze_vision: bool = False  # on real checkpoints the vision tower is usually frozen


@dataclass(frozen=True)
class DataConfig:
    path: str = "data/synth"  # dataset folder; generated there when missing and synth_* > 0
    synth_train: int = 200  # queries per task per split when generating
    synth_val: int = 20
    synth_test: int = 40
    synth_tasks: tuple[str, ...] = ("t2i", "i2t", "cls", "vqa", "composed", "referring")
    train_split: str = "train"
    eval_split: str = "test"
    shuffle_buffer: int = 512
    batch_by_task: bool = True  # one task per batch: hard in-batch negatives (VLM2Vec-style sampling)


@dataclass(frozen=True)
class ClusterConfig:
    address: str = ""  # "" = start a local Ray in-process; "auto" or ray://… to join one
    num_cpus: int = 0  # local Ray only; 0 = all cores
    placement_timeout_s: float = 60.0
    # true on a cluster whose autoscaler adds nodes (ray_cluster.yaml, KubeRay with autoscaling): the
    # check of the roles against the resources present now is skipped, and the placement group's pending
    # demand makes the autoscaler scale up within placement_timeout_s
    autoscaling: bool = False


@dataclass(frozen=True)
class LearnerConfig:
    num_learners: int = 2
    cpus_per_learner: float = 0.5
    gpus_per_learner: float = 0.0
    # a custom Ray resource every learner bundle asks a sliver of, pinning the role to the node type that
    # advertises it (ray_cluster.yaml: learner_pool); "" = any node with the CPUs/GPUs
    node_resource: str = ""
    zero_stage: int = 1
    offload_optimizer: bool = False
    precision: str = "fp32"  # fp32 | bf16 | fp16
    micro_batch_size: int = 8  # pairs per learner per micro-batch
    grad_accum_steps: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 10
    torch_threads: int = 1


@dataclass(frozen=True)
class CMAConfig:
    steps: int = 200
    lambda_cma: float = 1.0
    temperature: float = 0.02
    ce_weight: float = 1.0
    embedding_lr: float = 0.0  # the (tied) token embedding's learning rate; 0 = learners.lr


@dataclass(frozen=True)
class RolloutConfig:
    """Rollout workers (Refine-RL): who samples the G rewrites per query, and how."""

    backend: str = "hf"  # hf | vllm (vllm: GPU clusters; on CPU needs `bash scripts/setup_vllm.sh`)
    # vllm: the Python of a venv with vLLM and this ray on every rollout node ("" = this checkout's
    # .venv-vllm, which scripts/setup_vllm.sh makes; the GPU profiles name /opt/rime-vllm/bin/python,
    # which ray_cluster.yaml and clusters/Dockerfile build). Checked on a rollout node before any actor.
    vllm_python: str = ""
    vllm_max_model_len: int = 1024  # prompt + rewrite tokens per sequence (training images are <= 448 px)
    vllm_dtype: str = ""  # "" = the learners' precision (bf16 -> bfloat16); float32 | bfloat16 | float16
    # share of the GPU's memory vLLM takes; 0 = 0.9 x gpus_per_worker, so engines that share a GPU by
    # fractions (the 1gpu profile) leave the learners' and reward model's memory alone
    vllm_gpu_memory_utilization: float = 0.0
    vllm_enforce_eager: bool = True  # false: CUDA graphs (faster decoding, more memory, slower start)
    num_workers: int = 2
    cpus_per_worker: float = 0.1
    gpus_per_worker: float = 0.0
    node_resource: str = ""  # as learners.node_resource (ray_cluster.yaml: rollout_pool, where vLLM is installed)
    group_size: int = 4  # G rewrites per query (METHOD.md: 8 on real models)
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off (vLLM's default); HF generate's implicit 50 is overridden either way
    batch_size: int = 16  # prompts per generate call (hf backend)
    torch_threads: int = 1
    max_restarts: int = 3  # Ray restarts a dead worker and re-issues its rollouts
    # Learner -> rollout weight sync: object_store (ray.put once, every worker fetches) or collective
    # (learner rank 0 broadcasts in a group with the workers: NCCL when both sides have GPUs, else gloo).
    weight_sync: str = "object_store"
    sync_bucket_mb: int = 256  # collective: flat buffers of at most this size per broadcast call
    sync_timeout_s: float = 120.0  # collective: a member that stops answering fails the sync after this


@dataclass(frozen=True)
class RewardConfig:
    """The frozen discriminative-anchor reward service and the reward's weights (METHOD.md, Stage 2)."""

    num_actors: int = 1
    cpus_per_actor: float = 0.1
    gpus_per_actor: float = 0.0
    node_resource: str = ""  # as learners.node_resource
    query_encoder: str = "frozen"  # frozen | policy: which weights embed (query, rewrite)
    top_k: int = 1  # acc = positive within the top k of the candidates
    neg_temperature: float = 0.05  # softmax over hard negatives
    format_weight: float = 0.1
    length_weight: float = 0.0
    length_target: int = 24
    max_restarts: int = 3


@dataclass(frozen=True)
class RefineRLConfig:
    """GRPO over rewrites: verl's estimators and policy losses, λ·InfoNCE(g, anchors) on the learners."""

    steps: int = 60
    queries_per_step: int = 8
    lr: float = 2e-5
    embedding_lr: float = 0.0  # 0 = lr
    warmup_steps: int = 5
    estimator: str = "grpo"  # any name in verl's advantage registry (grpo, rloo, reinforce_plus_plus, …)
    policy_loss: str = "vanilla"  # any name in verl's policy-loss registry (vanilla = clipped surrogate, gspo, …)
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28
    loss_agg_mode: str = "token-mean"
    kl_coef: float = 0.04
    kl_type: str = "low_var_kl"
    lambda_nce: float = 0.1
    nce_temperature: float = 0.02
    max_staleness: int = 0  # 1 = rollouts of step t+1 overlap the update of step t (one-step-stale)
    batch_by_task: bool = False


@dataclass(frozen=True)
class PlumeConfig:
    """PLUME stage: explicit-to-latent curriculum on the learners, and the transition adapter's sizes."""

    steps_per_stage: int = 60  # total steps = segments x steps_per_stage + final_stage_steps, with or without the curriculum
    final_stage_steps: int = 0  # the fully latent last stage (answer dropped in its second half); 0 = steps_per_stage
    curriculum: bool = True  # false = fully latent from the first step (the ablation)
    # Curriculum stage to start at: 1.. skips the all-text stage 0 (and its budget) for a start model that
    # already writes the explicit reasoning; the explicit-reasoning probe then runs on it before step 0
    first_stage: int = 0
    # Curriculum stage to end with (-1 = the fully latent last stage): 0 trains explicit reasoning only
    # (a CoT start model for a later first_stage: 1 run; the probe reads it at the end)
    last_stage: int = -1
    segments: int = 4  # reasoning segments per record, replaced left to right
    latent_steps: int = 8  # K; each replaced segment becomes latent_steps / segments steps
    lr: float = 2e-4
    embedding_lr: float = 0.0  # the (tied) token embedding's learning rate; 0 = lr
    warmup_steps: int = 10  # also after each curriculum stage change (Adam state is reset there)
    temperature: float = 0.02
    ce_weight: float = 1.0
    disc_weight: float = 1.0  # NCE on the disc anchors h(<disc_emb>)
    lambda_bal: float = 0.1
    experts: int = 4  # 0 with shared_expert = the single-MLP ablation
    top_k: int = 2
    shared_expert: bool = True
    expert_mult: int = 2
    step_embed_dim: int = 0  # 0 = hidden size
    max_latent_steps: int = 16
    anchor: str = "disc"  # disc | none: what guides the router besides z
    # Targets (positives) in the plume loss: "latent" = as at inference (K latent steps, no text), so
    # NCE(g_q, g_t) stays informative while the query still reads its teacher-forced answer; "phase" =
    # the query's phase with the target's own answer text (both sides then carry the answer early on).
    target_layout: str = "latent"
    renormalize: bool = False
    batch_by_task: bool = True
    # At the end of curriculum stage 0: greedy explicit reasoning on this many eval queries per task,
    # scored against the records (plume/explicit_*): can the model write what the curriculum distils? 0 = off
    probe_queries_per_task: int = 32
    probe_max_new_tokens: int = 128

    def schedule(self) -> CurriculumSchedule:
        """The ``rime_model.curriculum.CurriculumSchedule`` these settings describe (ValueError names the key)."""
        from rime_model.curriculum import CurriculumSchedule

        return CurriculumSchedule(self.steps_per_stage, self.segments, self.latent_steps, self.curriculum,
                                  self.final_stage_steps, self.first_stage, self.last_stage)

    def adapter(self) -> dict:
        """Keyword arguments of ``rime_model.latent.AdapterConfig`` (hidden size comes from the model)."""
        return {"num_experts": self.experts, "top_k": self.top_k, "shared_expert": self.shared_expert,
                "expert_mult": self.expert_mult, "step_embed_dim": self.step_embed_dim, "max_steps": self.max_latent_steps,
                "anchor": self.anchor, "default_steps": self.latent_steps, "renormalize": self.renormalize}


@dataclass(frozen=True)
class EvalConfig:
    every_steps: int = 0  # 0 = only at the end of each stage
    query_modes: tuple[str, ...] = ("disc", "gen")
    cand_modes: tuple[str, ...] = ("disc", "gen")
    max_queries_per_task: int = 40
    max_new_tokens: int = 16
    batch_size: int = 32
    before_training: bool = True  # also evaluate the starting model (the baseline)


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 50
    keep_last: int = 2


@dataclass(frozen=True)
class TrackingConfig:
    uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite:///<run dir>/mlflow.db
    experiment: str = "rime"
    log_model: bool = True


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    learners: LearnerConfig = field(default_factory=LearnerConfig)
    cma: CMAConfig = field(default_factory=CMAConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    refine_rl: RefineRLConfig = field(default_factory=RefineRLConfig)
    plume: PlumeConfig = field(default_factory=PlumeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``section.key`` -> value, for MLflow params."""
        return {f"{s}.{k}": (",".join(v) if isinstance(v, tuple) else v) for s, d in self.to_dict().items() for k, v in d.items()}


STAGES = ("cma", "refine-rl", "plume")
EVAL_QUERY_MODES = ("disc", "gen", "oracle", "latent")  # rime eval's too (orchestrator.evaluate)
EVAL_CAND_MODES = ("disc", "gen", "latent")
CHOICES = {
    "rollout.backend": ("hf", "vllm"),
    "rollout.weight_sync": ("object_store", "collective"),
    "rollout.vllm_dtype": ("", "float32", "bfloat16", "float16"),
    "reward.query_encoder": ("frozen", "policy"),
    "plume.anchor": ("disc", "none"),
    "plume.target_layout": ("latent", "phase"),
    "refine_rl.loss_agg_mode": ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"),
    "refine_rl.max_staleness": (0, 1),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "learners.precision": ("fp32", "bf16", "fp16"),
    "learners.zero_stage": (0, 1, 2, 3),
}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (inner, _) = typing.get_args(tp)
        return tuple(_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 5e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp}")  # pragma: no cover - schema bug


def _section(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]}: unknown key; valid keys in '{prefix}': {', '.join(sorted(fields))}")
    kwargs = {}
    for k, v in raw.items():
        kwargs[k] = _coerce(v, hints[k], f"{prefix}.{k}")
    return cls(**kwargs)


def parse_config(raw: dict | None) -> Config:
    """Validate a config mapping (as loaded from YAML) into ``Config``."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(raw).__name__}")
    hints = typing.get_type_hints(Config)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section; valid sections: {', '.join(hints)}")
    cfg = Config(**{k: _section(hints[k], raw.get(k), k) for k in hints})
    _check(cfg)
    return cfg


def _check(cfg: Config) -> None:
    for key, allowed in CHOICES.items():
        sec, name = key.split(".")
        v = getattr(getattr(cfg, sec), name)
        if v not in allowed:
            raise ConfigError(f"{key}: {v!r} is not one of {allowed}")
    for s in cfg.run.stages:
        if s not in STAGES:
            raise ConfigError(f"run.stages: unknown stage {s!r}; available: {STAGES}")
    if not cfg.run.stages or len(set(cfg.run.stages)) != len(cfg.run.stages):
        raise ConfigError(f"run.stages: {list(cfg.run.stages)}: list each stage to run once, in order, e.g. [cma, refine-rl]")
    for key, modes, allowed in (("eval.query_modes", cfg.eval.query_modes, EVAL_QUERY_MODES),
                                ("eval.cand_modes", cfg.eval.cand_modes, EVAL_CAND_MODES)):
        bad = [m for m in modes if m not in allowed]
        if bad or not modes:
            raise ConfigError(f"{key}: {list(modes)} must be a non-empty list from {allowed}")
    from rime_data.synth import EXTRA_TASKS, TASKS  # torch-free

    unknown_tasks = [t for t in cfg.data.synth_tasks if t not in TASKS + EXTRA_TASKS]
    if unknown_tasks or not cfg.data.synth_tasks:
        raise ConfigError(f"data.synth_tasks: {unknown_tasks or '[]'} not generated tasks; choose from {TASKS + EXTRA_TASKS}")
    for k, v in {"learners.lr": cfg.learners.lr, "refine_rl.lr": cfg.refine_rl.lr, "plume.lr": cfg.plume.lr}.items():
        if not v > 0:
            raise ConfigError(f"{k}: must be > 0, got {v}")
    for k, v in {"learners.warmup_steps": cfg.learners.warmup_steps, "refine_rl.warmup_steps": cfg.refine_rl.warmup_steps,
                 "plume.warmup_steps": cfg.plume.warmup_steps, "eval.every_steps": cfg.eval.every_steps,
                 "eval.max_queries_per_task": cfg.eval.max_queries_per_task,
                 "reward.cpus_per_actor": cfg.reward.cpus_per_actor, "reward.gpus_per_actor": cfg.reward.gpus_per_actor,
                 "rollout.cpus_per_worker": cfg.rollout.cpus_per_worker,
                 "rollout.gpus_per_worker": cfg.rollout.gpus_per_worker}.items():
        if v < 0:
            raise ConfigError(f"{k}: must be >= 0, got {v}")
    for k, v in {"checkpoint.every_steps": cfg.checkpoint.every_steps, "eval.batch_size": cfg.eval.batch_size,
                 "eval.max_new_tokens": cfg.eval.max_new_tokens, "data.shuffle_buffer": cfg.data.shuffle_buffer}.items():
        if v < 1:
            raise ConfigError(f"{k}: must be >= 1, got {v}" + (" (1 = no shuffling)" if k == "data.shuffle_buffer" else ""))
    positive = {
        "learners.num_learners": cfg.learners.num_learners, "learners.micro_batch_size": cfg.learners.micro_batch_size,
        "learners.grad_accum_steps": cfg.learners.grad_accum_steps, "cma.steps": cfg.cma.steps,
        "checkpoint.keep_last": cfg.checkpoint.keep_last, "learners.torch_threads": cfg.learners.torch_threads,
    }
    rl = cfg.refine_rl
    positive.update({"refine_rl.steps": rl.steps, "refine_rl.queries_per_step": rl.queries_per_step,
                     "rollout.num_workers": cfg.rollout.num_workers, "rollout.group_size": cfg.rollout.group_size,
                     "rollout.max_new_tokens": cfg.rollout.max_new_tokens, "reward.num_actors": cfg.reward.num_actors,
                     "reward.top_k": cfg.reward.top_k, "rollout.sync_bucket_mb": cfg.rollout.sync_bucket_mb})
    for k, v in positive.items():
        if v < 1:
            raise ConfigError(f"{k}: must be >= 1, got {v}")
    shards = cfg.learners.num_learners * cfg.learners.grad_accum_steps
    if "refine-rl" in cfg.run.stages and (rl.queries_per_step * cfg.rollout.group_size) % shards:
        raise ConfigError(f"refine_rl.queries_per_step: {rl.queries_per_step} queries x rollout.group_size "
                          f"{cfg.rollout.group_size} must split evenly over learners.num_learners x grad_accum_steps = {shards}")
    if "refine-rl" in cfg.run.stages and rl.estimator in ("grpo", "rloo") and cfg.rollout.group_size < 2:
        raise ConfigError(f"rollout.group_size: {rl.estimator} compares rewrites within a group; use >= 2")
    for k, v in {"rollout.temperature": cfg.rollout.temperature, "refine_rl.nce_temperature": rl.nce_temperature,
                 "reward.neg_temperature": cfg.reward.neg_temperature}.items():
        if v < 0 or (v == 0 and k != "rollout.temperature"):
            raise ConfigError(f"{k}: must be > 0, got {v}")
    gpu_fracs = {"learners.gpus_per_learner": cfg.learners.gpus_per_learner, "rollout.gpus_per_worker": cfg.rollout.gpus_per_worker,
                 "reward.gpus_per_actor": cfg.reward.gpus_per_actor}
    for k, v in gpu_fracs.items():
        if v > 1 and v != int(v):
            raise ConfigError(f"{k}: {v} GPUs: Ray schedules a fraction of one GPU or whole GPUs, not {v}")
    shared = [k for k in ("learners.gpus_per_learner", "rollout.gpus_per_worker") if 0 < gpu_fracs[k] < 1]
    if "refine-rl" in cfg.run.stages and cfg.rollout.weight_sync == "collective" and shared \
            and cfg.learners.gpus_per_learner > 0 and cfg.rollout.gpus_per_worker > 0:
        raise ConfigError(f"rollout.weight_sync: collective broadcasts over NCCL, which refuses two members on one "
                          f"GPU, and {shared[0]} is a fraction; use rollout.weight_sync=object_store when roles share GPUs")
    if not 0 <= cfg.rollout.vllm_gpu_memory_utilization <= 1:
        raise ConfigError(f"rollout.vllm_gpu_memory_utilization: must be in [0, 1] (0 = 0.9 x gpus_per_worker), "
                          f"got {cfg.rollout.vllm_gpu_memory_utilization}")
    if cfg.rollout.vllm_max_model_len < cfg.rollout.max_new_tokens + 2:
        raise ConfigError(f"rollout.vllm_max_model_len: {cfg.rollout.vllm_max_model_len} cannot hold a prompt and "
                          f"rollout.max_new_tokens ({cfg.rollout.max_new_tokens}) + 2 end markers")
    if cfg.rollout.top_k < 0:
        raise ConfigError(f"rollout.top_k: must be >= 0 (0 = off), got {cfg.rollout.top_k}")
    if not 0 < cfg.rollout.top_p <= 1:
        raise ConfigError(f"rollout.top_p: must be in (0, 1], got {cfg.rollout.top_p}")
    for k, v in {"cma.embedding_lr": cfg.cma.embedding_lr, "plume.embedding_lr": cfg.plume.embedding_lr,
                 "refine_rl.embedding_lr": rl.embedding_lr}.items():
        if v < 0:
            raise ConfigError(f"{k}: must be >= 0 (0 = the stage's lr), got {v}")
    if cfg.cma.temperature <= 0:
        raise ConfigError(f"cma.temperature: must be > 0, got {cfg.cma.temperature}")
    for k, v in {"learners.node_resource": cfg.learners.node_resource, "rollout.node_resource": cfg.rollout.node_resource,
                 "reward.node_resource": cfg.reward.node_resource}.items():
        if v and (not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.:-]*", v) or v in BUILTIN_RESOURCES):
            raise ConfigError(f"{k}: {v!r} is not a custom Ray resource name; give the name a node type advertises "
                              "(ray_cluster.yaml: learner_pool / rollout_pool; `ray start --resources='{\"NAME\": N}'`), "
                              "or \"\" for any node")
    if cfg.learners.cpus_per_learner < 0 or cfg.learners.gpus_per_learner < 0:
        raise ConfigError("learners.cpus_per_learner/gpus_per_learner: must be >= 0")
    if cfg.learners.offload_optimizer and cfg.learners.zero_stage == 0:
        raise ConfigError("learners.offload_optimizer: needs learners.zero_stage >= 1")
    if cfg.tracking.uri.strip().lower() in NO_TRACKING:
        raise ConfigError(f"tracking.uri: {cfg.tracking.uri!r} would turn tracking off, but training always tracks; "
                          "leave it empty for sqlite in the run dir (or $MLFLOW_TRACKING_URI), or give a URI")
    if "plume" in cfg.run.stages:
        _check_plume(cfg.plume)


def _check_plume(pc: PlumeConfig) -> None:
    """The curriculum checks are the schedule's own (``rime_model.curriculum`` is torch-free, so the CLI
    still validates before importing torch); the adapter's sizes are checked here, by config key."""
    try:
        pc.schedule()
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if pc.latent_steps > pc.max_latent_steps:
        raise ConfigError(f"plume.latent_steps: {pc.latent_steps} > plume.max_latent_steps {pc.max_latent_steps}; raise the latter")
    if pc.experts < 0 or (pc.experts and not 1 <= pc.top_k <= pc.experts):
        raise ConfigError(f"plume.top_k: must be in 1..plume.experts ({pc.experts}), got {pc.top_k}")
    for key in ("expert_mult", "temperature"):
        if getattr(pc, key) <= 0:
            raise ConfigError(f"plume.{key}: must be > 0, got {getattr(pc, key)}")
    if pc.probe_queries_per_task < 0:
        raise ConfigError(f"plume.probe_queries_per_task: must be >= 0 (0 = off), got {pc.probe_queries_per_task}")
    if pc.probe_max_new_tokens < 1:
        raise ConfigError(f"plume.probe_max_new_tokens: must be >= 1, got {pc.probe_max_new_tokens}")
    if pc.step_embed_dim < 0:
        raise ConfigError(f"plume.step_embed_dim: must be >= 0 (0 = hidden size), got {pc.step_embed_dim}")


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read YAML, apply ``section.key=value`` overrides (YAML-typed), validate."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config: file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config: {p} is not valid YAML: {e}") from e
    for ov in overrides or []:
        if "=" not in ov or "." not in ov.split("=", 1)[0]:
            raise ConfigError(f"override {ov!r}: use section.key=value, e.g. cma.steps=20")
        key, val = ov.split("=", 1)
        sec, name = key.split(".", 1)
        raw.setdefault(sec, {})
        if not isinstance(raw[sec], dict):
            raise ConfigError(f"{sec}: expected a mapping")
        raw[sec][name] = yaml.safe_load(val)
    return parse_config(raw)


def dump_config(cfg: Config, path: str | Path) -> None:
    d = cfg.to_dict()
    d = {s: {k: (list(v) if isinstance(v, tuple) else v) for k, v in sec.items()} for s, sec in d.items()}
    Path(path).write_text(yaml.safe_dump(d, sort_keys=False))
