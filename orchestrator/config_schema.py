"""The run configuration's schema: one frozen pydantic model per YAML section, types and bounds on the fields.

Strict types (``true`` is not a number, ``"two"`` is not an integer), ``extra="forbid"`` (a typo is an
error, not a silently ignored key). Every role section sizes its actors the same way: ``num_actors``,
``cpus_per_actor``, ``gpus_per_actor``, ``node_resource``. Loading, messages and the checks that span keys
are in ``orchestrator.config``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from rime_model.choices import (
    LORA_TARGET_MODULES,
    AdapterAnchor,
    AdvNorm,
    QueryEncoder,
    RewardOutcome,
    RolloutBackend,
    TorchDType,
)

if TYPE_CHECKING:  # annotations only: validation stays torch-free and imports the schedule lazily
    from rime_model.curriculum import CurriculumSchedule


def _number(v: Any) -> Any:
    """PyYAML (YAML 1.1) reads 5e-4 (no dot) as a string: numbers fields accept it."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def _names(v: Any) -> Any:
    """A list of names, also as one comma-separated string (``--set eval.query_modes=disc,gen``)."""
    if isinstance(v, str):
        return tuple(x.strip() for x in v.split(",") if x.strip())
    return tuple(v) if isinstance(v, list) else v


def _ints(v: Any) -> Any:
    """A list of integers, also as one comma-separated string (``--set cma.matryoshka_dims=64,128``)."""
    if isinstance(v, str):
        parts = [x.strip() for x in v.split(",") if x.strip()]
        return tuple(int(x) if x.lstrip("+-").isdigit() else x for x in parts)
    return tuple(v) if isinstance(v, list) else v


Num = Annotated[float, BeforeValidator(_number)]
Names = Annotated[tuple[str, ...], BeforeValidator(_names)]
Ints = Annotated[tuple[int, ...], BeforeValidator(_ints)]
Count = Annotated[int, Field(ge=1)]  # something there must be at least one of
NonNeg = Annotated[Num, Field(ge=0)]
Positive = Annotated[Num, Field(gt=0)]
Steps = Annotated[int, Field(ge=0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class RunConfig(Section):
    name: str = "tiny-cpu"
    seed: int = 0
    out_dir: str = "runs"  # the run directory is <out_dir>/<name>
    stages: Names = ("cma",)  # registered stages (orchestrator.stages), in order


class LoraConfig(Section):
    """LoRA through peft on the learners (``rime_model.lora``; docs/training.md, "LoRA"). Saved models are
    merged; the adapter is kept beside them in ``lora_adapter/``."""

    rank: Steps = 0  # 0 = off (full fine-tuning); 8..64 on real models
    alpha: Positive = 16.0  # the update is scaled by alpha / rank
    dropout: Num = 0.0  # on the adapter's input, in [0, 1)
    # linear layers to adapt, by name (q_proj) or dotted suffix (self_attn.q_proj); the vision tower's only
    # with vision: true. The special tokens' embedding rows always train, the rest of the embedding never
    target_modules: Names = LORA_TARGET_MODULES
    vision: bool = False  # adapt the vision tower too


class ModelConfig(Section):
    spec: str = "tiny"  # zoo name, hf:<repo-or-path>, or a saved embedder folder
    # what the frozen and sampling copies hold the model in (reward anchors, HF rollout workers; bfloat16
    # halves them); the learners load it in learners.precision, vLLM in rollout.vllm_dtype
    dtype: TorchDType = "float32"
    freeze_vision: bool = False  # on real checkpoints the vision tower is usually frozen
    lora: LoraConfig = LoraConfig()


def _mix(v: Any) -> Any:
    """``data.mix`` entries as a tuple; an entry may also be one "path:weight" (or "path") string, so
    ``--set data.mix=data/a:2,data/b:1`` works beside the YAML list of {path, weight} mappings."""
    if isinstance(v, str):
        v = [x.strip() for x in v.split(",") if x.strip()]
    if not isinstance(v, (list, tuple)):
        return v
    out = []
    for x in v:
        if isinstance(x, str):
            path, _, weight = x.rpartition(":")
            try:
                x = {"path": path, "weight": float(weight)}
            except ValueError:  # no weight (or a colon inside the path): weight 1
                x = {"path": x}
        out.append(x)
    return tuple(out)


class MixPart(Section):
    """One dataset of ``data.mix``: a rime dataset folder and its sampling weight."""

    path: str
    weight: Positive = 1.0


class DataConfig(Section):
    path: str = "data/synth"  # dataset folder; generated there when missing and synth_* > 0
    synth_train: Steps = 200  # queries per task per split when generating
    synth_val: Steps = 20
    synth_test: Steps = 40
    synth_tasks: Names = ("t2i", "i2t", "cls", "vqa", "composed", "referring")
    # classic = today's fixed renderer and sentences; randomised = rendering and wording drawn from the
    # training ranges (rime_data.styles), so what is learnt can transfer to pictures drawn otherwise
    synth_style: Literal["classic", "randomised"] = "classic"
    # a transfer split (sizes, layouts, textures and wordings outside the training ranges) evaluated after
    # every stage beside eval_split; generated there with synth_test queries per task when missing. "" = none
    transfer_path: str = ""
    train_split: str = "train"
    eval_split: str = "test"
    shuffle_buffer: int = 512  # 1 = no shuffling
    batch_by_task: bool = True  # one task per batch: hard in-batch negatives (VLM2Vec-style sampling)
    # Training datasets mixed by weight (orchestrator.pair_mix): each a rime dataset folder whose train_split
    # is read (e.g. made by `rime data import-train`); every batch comes from one of them, drawn with
    # probability weight / sum. Evaluation stays on data.path's eval_split. [] = train on data.path alone
    mix: Annotated[tuple[MixPart, ...], BeforeValidator(_mix)] = ()


class ClusterConfig(Section):
    address: str = ""  # "" = start a local Ray in-process; "auto" or ray://… to join one
    num_cpus: Steps = 0  # local Ray only; 0 = all cores
    placement_timeout_s: Positive = 60.0
    # true on a cluster whose autoscaler adds nodes (ray_cluster.yaml, KubeRay with autoscaling): the
    # check of the roles against the resources present now is skipped, and the placement group's pending
    # demand makes the autoscaler scale up within placement_timeout_s
    autoscaling: bool = False


class RoleConfig(Section):
    """How many actors a role has and what each asks of Ray (the same keys in every role section)."""

    num_actors: Count = 1
    cpus_per_actor: NonNeg = 0.1
    gpus_per_actor: NonNeg = 0.0
    # a custom Ray resource every bundle of the role asks a sliver of, pinning the role to the node type that
    # advertises it (ray_cluster.yaml: learner_pool / rollout_pool); "" = any node with the CPUs/GPUs
    node_resource: str = ""


class LearnerConfig(RoleConfig):
    num_actors: Count = 2
    cpus_per_actor: NonNeg = 0.5
    zero_stage: Literal[0, 1, 2, 3] = 1
    offload_optimizer: bool = False
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # bf16: fp32 master weights in the optimizer; fp16: GPUs only
    # recompute each block's activations in the backward pass: far less activation memory for ~1 more forward
    gradient_checkpointing: bool = False
    micro_batch_size: Count = 8  # pairs per learner per micro-batch
    grad_accum_steps: Count = 1
    lr: Positive = 2e-4
    weight_decay: NonNeg = 0.0
    grad_clip: NonNeg = 1.0
    warmup_steps: Steps = 10
    torch_threads: Count = 1


class CMAConfig(Section):
    steps: Count = 200
    lambda_cma: NonNeg = 1.0
    temperature: Positive = 0.02
    ce_weight: NonNeg = 1.0
    embedding_lr: NonNeg = 0.0  # the (tied) token embedding's learning rate; 0 = learners.lr
    # Matryoshka representation learning: prefix sizes (distinct, each below the model's embedding size)
    # whose re-normalised leading components are also trained to retrieve; every NCE term is the mean over
    # them and the full size, and the saved model records them (`embed(dims=)`, `rime eval --dims`). [] = off
    matryoshka_dims: Ints = ()
    hard_negatives: Steps = 0  # per query, from its `hard_negatives` column, added to InfoNCE's negatives; 0 = off
    # GradCache: embed each micro-batch's rows (queries, targets, hard negatives) this many at a time without
    # a graph, take the NCE terms on the cached embeddings, back-propagate chunk by chunk: the same gradient
    # at one chunk's activation memory, for ~1 more forward pass. 0 = off (one pass over the micro-batch)
    grad_cache_chunk: Steps = 0


class RolloutConfig(RoleConfig):
    """Rollout workers (Refine-RL): who samples the G rewrites per query, and how."""

    num_actors: Count = 2
    backend: RolloutBackend = "hf"  # vllm: GPU clusters; on CPU needs `bash scripts/setup_vllm.sh`
    # vllm: the Python of a venv with vLLM and this ray on every rollout node ("" = this checkout's
    # .venv-vllm, which scripts/setup_vllm.sh makes; the GPU profiles name /opt/rime-vllm/bin/python,
    # which ray_cluster.yaml and clusters/Dockerfile build). Checked on a rollout node before any actor.
    vllm_python: str = ""
    vllm_max_model_len: Count = 1024  # prompt + rewrite tokens per sequence (training images are <= 448 px)
    vllm_dtype: Literal["", "float32", "bfloat16", "float16"] = ""  # "" = the learners' precision (bf16 -> bfloat16)
    # share of the GPU's memory vLLM takes; 0 = 0.9 x gpus_per_actor, so engines that share a GPU by
    # fractions (the 1gpu profile) leave the learners' and reward model's memory alone
    vllm_gpu_memory_utilization: Num = 0.0  # in [0, 1]
    vllm_enforce_eager: bool = True  # false: CUDA graphs (faster decoding, more memory, slower start)
    group_size: Count = 4  # G rewrites per query (METHOD.md: 8 on real models)
    max_new_tokens: Count = 16
    temperature: NonNeg = 1.0
    top_p: Num = 1.0  # in (0, 1]
    top_k: Steps = 0  # 0 = off (vLLM's default); HF generate's implicit 50 is overridden either way
    batch_size: Count = 16  # prompts per generate call (hf backend)
    torch_threads: Count = 1
    max_restarts: Steps = 3  # Ray restarts a dead worker and re-issues its rollouts
    # Learner -> rollout weight sync, a registered strategy (orchestrator.sync): object_store (ray.put once,
    # every worker fetches), collective (learner rank 0 broadcasts in a group with the workers: NCCL when
    # both sides have GPUs, else gloo) or lora_adapter (model.lora, hf workers: the adapter alone).
    weight_sync: str = "object_store"
    sync_bucket_mb: Count = 256  # collective: flat buffers of at most this size per broadcast call
    sync_timeout_s: Positive = 120.0  # collective: a member that stops answering fails the sync after this


class RewardConfig(RoleConfig):
    """The frozen discriminative-anchor reward service and the reward's weights (METHOD.md, Stage 2)."""

    query_encoder: QueryEncoder = "frozen"  # which weights embed (query, rewrite)
    top_k: Count = 1  # acc = positive within the top k of the candidates
    neg_temperature: Positive = 0.05  # softmax over hard negatives
    # the outcome term: gated_margin = acc@top_k x margin over the softmax-weighted negatives (METHOD.md);
    # margin = the margin ungated (a near miss earns more than a far one); rank = 1 / rank of the positive
    outcome: RewardOutcome = "gated_margin"
    format_weight: Num = 0.1
    length_weight: Num = 0.0
    length_target: Count = 24
    max_restarts: Steps = 3


class RefineRLConfig(Section):
    """GRPO over rewrites: verl's estimators and policy losses, λ·InfoNCE(g, anchors) on the learners."""

    steps: Count = 60
    queries_per_step: Count = 8
    lr: Positive = 2e-5
    embedding_lr: NonNeg = 0.0  # 0 = lr
    warmup_steps: Steps = 5
    estimator: str = "grpo"  # any name in verl's advantage registry (grpo, rloo, reinforce_plus_plus, …)
    # GRPO's scaling of a group's centred rewards: group = its own std (GRPO), none = unscaled (Dr. GRPO),
    # task = the std over the step's rewrites of the same task (rewards/advantages.py)
    adv_norm: AdvNorm = "group"
    policy_loss: str = "vanilla"  # any name in verl's policy-loss registry (vanilla = clipped surrogate, gspo, …)
    clip_ratio_low: NonNeg = 0.2
    clip_ratio_high: NonNeg = 0.28
    loss_agg_mode: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    kl_coef: NonNeg = 0.04
    kl_type: str = "low_var_kl"
    lambda_nce: NonNeg = 0.1
    nce_temperature: Positive = 0.02
    # weight of the policy gradient (the clipped surrogate); 0 = the ablation that keeps only KL + λ·InfoNCE,
    # so a held-out gain can be told apart from the contrastive term's
    pg_weight: NonNeg = 1.0
    # the probe (orchestrator/rl_probe.py): every probe_every steps and before the first, G rewrites of a fixed
    # seeded set of training queries scored as in training (MLflow probe/*); 0 = off
    probe_every: Steps = 10
    probe_queries_per_task: Steps = 2
    max_staleness: Literal[0, 1] = 0  # 1 = rollouts of step t+1 overlap the update of step t (one-step-stale)
    batch_by_task: bool = False


class PlumeConfig(Section):
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
    lr: Positive = 2e-4
    embedding_lr: NonNeg = 0.0  # the (tied) token embedding's learning rate; 0 = lr
    warmup_steps: Steps = 10  # also after each curriculum stage change (Adam state is reset there)
    temperature: Positive = 0.02
    ce_weight: NonNeg = 1.0
    disc_weight: NonNeg = 1.0  # NCE on the disc anchors h(<disc_emb>)
    lambda_bal: NonNeg = 0.1
    experts: Steps = 4  # 0 with shared_expert = the single-MLP ablation
    top_k: int = 2  # in 1..experts (checked with experts)
    shared_expert: bool = True
    expert_mult: Count = 2
    step_embed_dim: Steps = 0  # 0 = hidden size
    max_latent_steps: int = 16
    anchor: AdapterAnchor = "disc"  # what guides the router besides z
    # Targets (positives) in the plume loss: "latent" = as at inference (K latent steps, no text), so
    # NCE(g_q, g_t) stays informative while the query still reads its teacher-forced answer; "phase" =
    # the query's phase with the target's own answer text (both sides then carry the answer early on).
    target_layout: Literal["latent", "phase"] = "latent"
    renormalize: bool = False
    batch_by_task: bool = True
    # GradCache, as cma.grad_cache_chunk: this many pairs' latent passes (query and target) at a time without
    # a graph, the NCE terms and the router balance on the cached embeddings and per-pair router sums, then
    # back-propagation chunk by chunk; the same gradient at one chunk's activation memory. 0 = off
    grad_cache_chunk: Steps = 0
    # At the end of curriculum stage 0: greedy explicit reasoning on this many eval queries per task,
    # scored against the records (plume/explicit_*): can the model write what the curriculum distils? 0 = off
    probe_queries_per_task: Steps = 32
    probe_max_new_tokens: Count = 128

    def schedule(self) -> CurriculumSchedule:
        """The ``rime_model.curriculum.CurriculumSchedule`` these settings describe (ValueError names the key)."""
        from rime_model.curriculum import CurriculumSchedule

        return CurriculumSchedule(
            self.steps_per_stage,
            self.segments,
            self.latent_steps,
            self.curriculum,
            self.final_stage_steps,
            self.first_stage,
            self.last_stage,
        )

    def adapter(self) -> dict:
        """Keyword arguments of ``rime_model.latent.AdapterConfig`` (hidden size comes from the model)."""
        return {
            "num_experts": self.experts,
            "top_k": self.top_k,
            "shared_expert": self.shared_expert,
            "expert_mult": self.expert_mult,
            "step_embed_dim": self.step_embed_dim,
            "max_steps": self.max_latent_steps,
            "anchor": self.anchor,
            "default_steps": self.latent_steps,
            "renormalize": self.renormalize,
        }


class EvalConfig(Section):
    every_steps: Steps = 0  # 0 = only at the end of each stage
    query_modes: Names = ("disc", "gen")
    cand_modes: Names = ("disc", "gen")
    max_queries_per_task: Steps = 40
    max_new_tokens: Count = 16
    batch_size: Count = 32
    before_training: bool = True  # also evaluate the starting model (the baseline)


class CheckpointConfig(Section):
    every_steps: Count = 50
    keep_last: Count = 2


class TrackingConfig(Section):
    uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite:///<run dir>/mlflow.db
    experiment: str = "rime"
    log_model: bool = True


class Config(Section):
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    cluster: ClusterConfig = ClusterConfig()
    learners: LearnerConfig = LearnerConfig()
    cma: CMAConfig = CMAConfig()
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardConfig = RewardConfig()
    refine_rl: RefineRLConfig = RefineRLConfig()
    plume: PlumeConfig = PlumeConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    tracking: TrackingConfig = TrackingConfig()

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name

    def to_dict(self) -> dict:
        return self.model_dump()

    def flat(self) -> dict[str, Any]:
        """``section.key`` -> value (``model.lora.rank`` in a nested section), for MLflow params."""
        return _flat(self.to_dict())


def _flat_item(x: Any) -> str:
    """A list element as a param string: a mapping (a ``data.mix`` entry) as its values joined by ":"."""
    return ":".join(f"{v:g}" if isinstance(v, float) else str(v) for v in x.values()) if isinstance(x, dict) else str(x)


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested sections (``model.lora``) as ``model.lora.rank``; lists as comma-separated strings."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = ",".join(map(_flat_item, v)) if isinstance(v, tuple) else v
    return out
