"""rime's Qwen2-VL as a vLLM model, for ``actors.rollout_vllm`` (runs in ``.venv-vllm``): the registered
architecture ``RimeQwen2VLForConditionalGeneration`` and the processor it uses. It sits apart from the
backend, which needs only ``register_model()`` (for the engine's ``hf_overrides``) and
``image_text_processor`` (for its tokenizer).

**Images without torchvision.** vLLM's Qwen2-VL multimodal processor asks transformers for a
``Qwen2VLProcessor``, whose ``from_pretrained`` insists on a video processor, and that needs
torchvision (removed: the CUDA-linked wheel breaks imports). The fix is a registered subclass of
vLLM's model, ``RimeQwen2VLForConditionalGeneration`` (``ModelRegistry.register_model`` +
``hf_overrides={"architectures": [...]}``), whose processing info returns rime's own
``Qwen2VLImageTextProcessor`` (the same class the HF path uses, no video slot) built around
``Qwen2VLImageProcessorPil`` from the saved folder, and declares images as the only modality. The
model code, weights and image preprocessing (PIL resize/rescale/normalize, host-side) are then
the HF path's, so pixel values match and image rollouts equal HF's. One more torchvision import
sits at the top of vLLM's ``qwen2_vl.py`` (``smart_resize`` from transformers' torchvision image
processor module); a stand-in module exposing the identical PIL-module function is registered
under that name when torchvision is absent (``_shim_torchvision_image_processor``).
"""

from __future__ import annotations

from functools import lru_cache

ARCH = "RimeQwen2VLForConditionalGeneration"


@lru_cache(maxsize=8)
def image_text_processor(model_path: str):
    """rime's Qwen2-VL processor without a video slot (no torchvision), from a saved embedder."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    from rime_model.families import Qwen2VLImageTextProcessor

    tok = AutoTokenizer.from_pretrained(model_path)
    return Qwen2VLImageTextProcessor(image_processor=Qwen2VLImageProcessorPil.from_pretrained(model_path), tokenizer=tok)


def _shim_torchvision_image_processor() -> None:
    """Let ``vllm.model_executor.models.qwen2_vl`` import without torchvision.

    It does ``from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize``, and
    that transformers module imports torchvision at its top. ``smart_resize`` is byte-identical in
    the PIL module (``image_processing_pil_qwen2_vl``), so when torchvision is absent a stand-in
    module holding only that function is registered under the torchvision module's name.
    """
    import importlib.util
    import sys
    import types

    name = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
    if name in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return
    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as pil

    shim = types.ModuleType(name, "rime stand-in (no torchvision): smart_resize from image_processing_pil_qwen2_vl")
    shim.smart_resize = pil.smart_resize
    sys.modules[name] = shim


@lru_cache(maxsize=1)
def register_model() -> str:
    """Register ``RimeQwen2VLForConditionalGeneration``: vLLM's Qwen2-VL with an image-only processor."""
    _shim_torchvision_image_processor()
    from vllm import ModelRegistry
    from vllm.model_executor.models.qwen2_vl import (
        Qwen2VLDummyInputsBuilder,
        Qwen2VLForConditionalGeneration,
        Qwen2VLMultiModalProcessor,
        Qwen2VLProcessingInfo,
    )
    from vllm.multimodal import MULTIMODAL_REGISTRY

    class RimeQwen2VLProcessingInfo(Qwen2VLProcessingInfo):
        def get_hf_processor(self, **kwargs: object):
            return image_text_processor(str(self.ctx.model_config.model))

        def get_supported_mm_limits(self):
            return {"image": None}

    @MULTIMODAL_REGISTRY.register_processor(
        Qwen2VLMultiModalProcessor, info=RimeQwen2VLProcessingInfo, dummy_inputs=Qwen2VLDummyInputsBuilder
    )
    class RimeQwen2VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
        pass

    RimeQwen2VLForConditionalGeneration.__name__ = ARCH
    RimeQwen2VLForConditionalGeneration.__qualname__ = ARCH
    ModelRegistry.register_model(ARCH, RimeQwen2VLForConditionalGeneration)
    return ARCH
