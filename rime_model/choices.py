"""Choice lists shared by the config, the CLI and the code that acts on them, each defined once as a
``Literal`` (read the values with ``typing.get_args``). Torch-free: config validation imports it."""

from __future__ import annotations

from typing import Literal, get_args

Mode = Literal["disc", "gen", "latent"]  # how an embedding is made (Embedder.embed, Serve, rime embed)
QueryMode = Literal["disc", "gen", "oracle", "latent"]  # rime eval's query side (oracle = the ideal rewrite)
RolloutBackend = Literal["hf", "vllm"]
QueryEncoder = Literal["frozen", "policy"]  # which weights embed (query, rewrite) in the reward service
AdapterAnchor = Literal["disc", "none"]  # what guides PLUME's router besides z
TorchDType = Literal["float32", "bfloat16", "float16"]
AdvNorm = Literal["group", "none", "task"]  # refine_rl.adv_norm (rewards.advantages); none and task: grpo only
RewardOutcome = Literal["gated_margin", "margin", "rank"]  # reward.outcome (rewards.functions)

MODES: tuple[str, ...] = get_args(Mode)
QUERY_MODES: tuple[str, ...] = get_args(QueryMode)
BACKENDS: tuple[str, ...] = get_args(RolloutBackend)
QUERY_ENCODERS: tuple[str, ...] = get_args(QueryEncoder)
ANCHORS: tuple[str, ...] = get_args(AdapterAnchor)
DTYPES: tuple[str, ...] = get_args(TorchDType)
ADV_NORMS: tuple[str, ...] = get_args(AdvNorm)
REWARD_OUTCOMES: tuple[str, ...] = get_args(RewardOutcome)
PRECISION_DTYPE: dict[str, TorchDType] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # learners.precision
# model.lora.target_modules' default: the attention and MLP projections of Qwen2-VL / LLaMA-style language
# models, and of the Qwen2-VL (qkv, proj, fc1, fc2) and CLIP (q/k/v_proj, out_proj, fc1, fc2) vision towers,
# which only model.lora.vision adapts
LORA_TARGET_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "qkv",
    "proj",
    "out_proj",
    "fc1",
    "fc2",
)
