"""Memory options a learner applies to its model before ``deepspeed.initialize`` (``learners.*``).

Gradient checkpointing keeps only each decoder and vision block's inputs in the forward pass and recomputes
the rest in the backward pass: activation memory falls from O(layers x tokens) to O(tokens) for about one
extra forward pass of compute, which is what lets a 2B model train on long multimodal prompts.
"""

from __future__ import annotations

import torch


def enable_gradient_checkpointing(model: torch.nn.Module) -> int:
    """Turn on HF gradient checkpointing in every submodule that supports it (language model and vision
    tower: ``gradient_checkpointing_enable`` walks all modules); returns how many modules now checkpoint.

    Non-reentrant checkpointing (``use_reentrant=False``): it needs no input that requires grad, works with
    keyword arguments and frozen towers, and gives the same gradients as without checkpointing. The model's
    own ``use_cache`` setting is left alone: the learners' passes ask for no cache, a saved model keeps
    generating with one, and a training pass that does use the KV cache (PLUME's latent steps) is refused
    at config load (``orchestrator.stages.plume``)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"learners.gradient_checkpointing: {type(model).__name__} does not support gradient checkpointing; "
            "set learners.gradient_checkpointing=false"
        )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return sum(bool(getattr(m, "gradient_checkpointing", False)) for m in model.modules())
