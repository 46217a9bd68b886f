"""What the embedding service's batch queues hold, and what an item costs in tokens.

A batch is bounded by items (``max_batch_size``) and, as TEI does, by tokens (``max_batch_tokens``):
a few long or image-heavy items must not make one batch whose activations do not fit, and many short
ones should still fill a batch. Ray Serve's ``@serve.batch`` takes one size budget and a
``batch_size_fn``; ``BatchBudget`` folds both bounds into that one budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from PIL import Image


@dataclass
class QueuedItem:
    """One decoded item waiting in a mode's batch queue, with its token cost."""

    item: dict[str, Any]  # text, image (PIL), instruction: what Embedder.embed takes
    tokens: int
    cost: int  # its share of the batch budget (BatchBudget.cost)


def batch_cost(queued: list[QueuedItem]) -> int:
    """``@serve.batch``'s ``batch_size_fn``."""
    return sum(q.cost for q in queued)


def image_tokens(image_processor: Any, image: Image.Image) -> int:
    """Tokens the vision tower turns ``image`` into (Qwen2-VL-style processors: resized into
    [min_pixels, max_pixels], one token per merged patch); a 28x28-pixel token where the processor does
    not say."""
    side = getattr(image_processor, "patch_size", 14) * getattr(image_processor, "merge_size", 2)
    size = getattr(image_processor, "size", None)
    lo = getattr(image_processor, "min_pixels", None) or getattr(size, "shortest_edge", None) or 0
    hi = getattr(image_processor, "max_pixels", None) or getattr(size, "longest_edge", None) or math.inf
    pixels = min(max(image.width * image.height, lo), hi)
    return max(1, math.ceil(pixels / (side * side)))


def item_tokens(enc: Any, item: dict[str, Any]) -> int:
    """Text, instruction and image tokens of one item (the prompt template's few fixed tokens left out)."""
    n = len(enc.token_ids(item.get("text") or "")) + len(enc.token_ids(item.get("instruction") or ""))
    if item.get("image") is not None:
        n += image_tokens(enc.processor.image_processor, item["image"])
    return n


@dataclass(frozen=True)
class BatchBudget:
    """``max_batch_size`` items and ``max_batch_tokens`` tokens per batch, as one ``@serve.batch`` budget: in
    units of 1/max_batch_size token an item costs ``max(tokens * max_batch_size, max_batch_tokens)`` against a
    budget of ``max_batch_tokens * max_batch_size``, so a batch stops at whichever bound it reaches first
    (integers, so no rounding lets one item too many in)."""

    max_batch_size: int
    max_batch_tokens: int | None = None

    @property
    def budget(self) -> int:
        return self.max_batch_tokens * self.max_batch_size if self.max_batch_tokens else self.max_batch_size

    def cost(self, tokens: int) -> int:
        if not self.max_batch_tokens:
            return 1
        return max(tokens * self.max_batch_size, self.max_batch_tokens)

    def fits(self, tokens: int) -> bool:
        """Whether one item can ever be batched (a longer one would fail inside the queue)."""
        return not self.max_batch_tokens or tokens <= self.max_batch_tokens
