"""Per-architecture glue: how an image is marked in the prompt and how model + processor load.

The embedder itself is architecture-agnostic; a family only knows its image placeholder, its
control tokens and how to build a processor that works without torchvision (there is no usable
CPU torchvision build here, and Qwen2-VL's stock processor insists on a video processor).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedModel
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin


class Qwen2VLImageTextProcessor(Qwen2VLProcessor):
    """Qwen2-VL processor without the video slot, so it loads with PIL-only image processing."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = "<|image_pad|>"
        self.video_token = "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


@dataclass(frozen=True)
class ModelFamily:
    """What differs between image-text-to-text architectures, as data plus two loaders."""

    name: str
    image_placeholder: str
    control_tokens: tuple[str, ...]
    load_model: Callable[[str, torch.dtype], PreTrainedModel]
    load_image_processor: Callable[[str], object]
    make_processor: Callable[[object, object], ProcessorMixin]

    def load_processor(self, path: str) -> ProcessorMixin:
        tokenizer = AutoTokenizer.from_pretrained(path)
        return self.make_processor(self.load_image_processor(path), tokenizer)

    def save_processor(self, processor: ProcessorMixin, path: str | Path) -> None:
        processor.tokenizer.save_pretrained(str(path))
        processor.image_processor.save_pretrained(str(path))


def _qwen2_vl_model(path: str, dtype: torch.dtype) -> PreTrainedModel:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)


def _qwen2_vl_image_processor(path: str):
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil.from_pretrained(path)


def _llava_model(path: str, dtype: torch.dtype) -> PreTrainedModel:
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype)


def _llava_image_processor(path: str):
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil.from_pretrained(path)


def _llava_processor(image_processor, tokenizer) -> ProcessorMixin:
    from transformers import LlavaProcessor

    from .zoo_small import LLAVA_ADDITIONAL_IMAGE_TOKENS, LLAVA_FEATURE_STRATEGY, LLAVA_PATCH_SIZE

    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=LLAVA_PATCH_SIZE,
        vision_feature_select_strategy=LLAVA_FEATURE_STRATEGY,
        num_additional_image_tokens=LLAVA_ADDITIONAL_IMAGE_TOKENS,
    )


QWEN2_VL = ModelFamily(
    name="qwen2_vl",
    image_placeholder="<|vision_start|><|image_pad|><|vision_end|>",
    control_tokens=("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"),
    load_model=_qwen2_vl_model,
    load_image_processor=_qwen2_vl_image_processor,
    make_processor=lambda ip, tok: Qwen2VLImageTextProcessor(image_processor=ip, tokenizer=tok),
)

LLAVA = ModelFamily(
    name="llava",
    image_placeholder="<image>",
    control_tokens=("<|im_start|>", "<|im_end|>", "<image>"),
    load_model=_llava_model,
    load_image_processor=_llava_image_processor,
    make_processor=_llava_processor,
)

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (QWEN2_VL, LLAVA)}
# HF `model_type` -> family; Qwen2.5-VL shares Qwen2-VL's prompt layout.
MODEL_TYPES: dict[str, str] = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_vl", "llava": "llava"}


def family_for_model_type(model_type: str) -> ModelFamily:
    """The family of an HF config's ``model_type``, or a clear error listing the supported ones."""
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"model_type {model_type!r} is not supported yet; supported: {sorted(MODEL_TYPES)}. "
            "Add a ModelFamily in rime_model/families.py for it."
        )
    return FAMILIES[MODEL_TYPES[model_type]]
