"""Keep the vision tower in every training step, even when a micro-batch has no image."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel

    from .encoding import PromptEncoder


def _tensors(x: Any) -> Iterable[torch.Tensor]:
    """Every tensor inside a model output (tensors, tuples, lists and ``ModelOutput`` mappings)."""
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)


@contextmanager
def vision_in_step(model: PreTrainedModel, enc: PromptEncoder, inputs: dict[str, torch.Tensor]) -> Iterator[None]:
    """Within this context, a training forward without images still runs the vision tower, on one
    blank image, and adds 0 x its output to the token embeddings.

    Data-parallel ranks must run the same modules in the same order: DeepSpeed reduces only the
    gradients that exist (ZeRO-1/2 buckets then differ: gloo aborts with "Received data size doesn't
    match", NCCL hangs) and ZeRO-3 gathers each module's weights as it runs. A learner whose
    micro-batch happens to be text-only would skip the tower while another rank runs it. The tower
    runs where a real image's would, right after the token embedding and before the decoder (as
    LLaMA-Factory and ms-swift do for Qwen2-VL's text-only batches), so forward and backward visit
    the same modules in the same order on every rank; values and gradients are unchanged."""
    if not torch.is_grad_enabled() or any(k.startswith("pixel_values") for k in inputs):
        yield
        return
    fired = []

    def add_blank_image(module, args, output):
        if fired:
            return output
        fired.append(True)
        touched = [
            t
            for t in _tensors(model.model.get_image_features(**enc.blank_vision_inputs()))
            if t.is_floating_point() and t.requires_grad
        ]
        if not touched:  # a frozen vision tower (model.freeze_vision): no gradient to keep in step
            return output
        return output + sum(t.float().sum() for t in touched).to(output.dtype) * 0.0

    handle = model.get_input_embeddings().register_forward_hook(add_blank_image)
    try:
        yield
    finally:
        handle.remove()
