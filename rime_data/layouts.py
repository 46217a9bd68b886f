"""Where a styled scene's objects go: placement schemes that vary position and size while keeping
"left of" unambiguous. Every object owns an x-interval that no other object enters (with a gap), so
the left-to-right order that captions and referring expressions are generated from is what the
picture shows, whatever the layout.

Training layouts: grid (a random grid, one object per column), row (one band, equal slots, sizes
vary), free (uneven slots, sizes and heights vary). Transfer layouts, never used in training:
diagonal (a descending or ascending line) and arc (an arch or a bowl).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from .scenes import COLORS, GRID, SHAPES, Box, Scene, SceneObject

MARGIN = 0.03  # image border left free, fraction of the side
GAP = 0.02  # min clearance between neighbouring objects' x-extents
MAX_SIDE = 0.45  # an object never covers more than this fraction of the side (1-object scenes)

Scale = tuple[float, float]


def _slots(n: int, rng: random.Random, even: bool) -> list[tuple[float, float]]:
    """n consecutive x-intervals across the image, equal or of random relative widths."""
    widths = [1.0] * n if even else [rng.uniform(0.6, 1.4) for _ in range(n)]
    span, x, out = 1 - 2 * MARGIN, MARGIN, []
    for w in widths:
        w = w / sum(widths) * span
        out.append((x, x + w))
        x += w
    return out


def _box(cx: float, cy: float, side: float) -> Box:
    """A square of ``side`` centred at (cx, cy), moved vertically to stay inside the image."""
    cy = min(max(cy, side / 2 + MARGIN / 2), 1 - side / 2 - MARGIN / 2)
    return (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)


def _in_slot(slot: tuple[float, float], side: float, rng: random.Random) -> float:
    """A random x-centre for an object of ``side`` that keeps GAP/2 from the slot's edges."""
    lo, hi = slot[0] + side / 2 + GAP / 2, slot[1] - side / 2 - GAP / 2
    return rng.uniform(lo, hi) if hi > lo else (slot[0] + slot[1]) / 2


def _side(slot: tuple[float, float], scale: Scale, rng: random.Random) -> float:
    return min(rng.uniform(*scale) * (slot[1] - slot[0] - GAP), MAX_SIDE)


def grid(n: int, rng: random.Random, scale: Scale) -> list[Box]:
    cols, rows = rng.randint(max(GRID, n), max(GRID + 1, n)), rng.randint(2, GRID)
    cw, ch = (1 - 2 * MARGIN) / cols, (1 - 2 * MARGIN) / rows
    side = min(rng.uniform(*scale) * (min(cw, ch) - GAP), MAX_SIDE)
    return [
        _box(MARGIN + (c + 0.5) * cw, MARGIN + (rng.randrange(rows) + 0.5) * ch, side) for c in sorted(rng.sample(range(cols), n))
    ]


def row(n: int, rng: random.Random, scale: Scale) -> list[Box]:
    cy = rng.uniform(0.3, 0.7)
    out = []
    for slot in _slots(n, rng, even=True):
        side = _side(slot, scale, rng)
        out.append(_box(_in_slot(slot, side, rng), cy, side))
    return out


def free(n: int, rng: random.Random, scale: Scale) -> list[Box]:
    out = []
    for slot in _slots(n, rng, even=False):
        side = _side(slot, scale, rng)
        out.append(_box(_in_slot(slot, side, rng), rng.uniform(0, 1), side))
    return out


def diagonal(n: int, rng: random.Random, scale: Scale) -> list[Box]:
    slots, down = _slots(n, rng, even=True), rng.random() < 0.5
    side = _side(slots[0], scale, rng)
    ys = [0.5] if n == 1 else [0.15 + 0.7 * i / (n - 1) for i in range(n)]
    return [_box((a + b) / 2, y if down else 1 - y, side) for (a, b), y in zip(slots, ys)]


def arc(n: int, rng: random.Random, scale: Scale) -> list[Box]:
    slots, up = _slots(n, rng, even=True), rng.random() < 0.5
    side = _side(slots[0], scale, rng)
    return [
        _box((a + b) / 2, 0.5 + (-1 if up else 1) * 0.3 * math.sin(math.pi * (i + 0.5) / n), side)
        for i, (a, b) in enumerate(slots)
    ]


LAYOUTS: dict[str, Callable[[int, random.Random, Scale], list[Box]]] = {
    "grid": grid,
    "row": row,
    "free": free,
    "diagonal": diagonal,
    "arc": arc,
}


def styled_scene(
    rng: random.Random,
    layouts: tuple[str, ...],
    counts: tuple[int, ...],
    scale: Scale,
    n_objects: int | None = None,
    kinds: list[tuple[str, str]] | None = None,
) -> Scene:
    """Objects with distinct (shape, colour) pairs placed by a layout drawn from ``layouts``;
    ``kinds`` fixes the objects (left to right), else ``n_objects`` or a count from ``counts``."""
    if kinds is None:
        kinds = rng.sample([(s, c) for s in SHAPES for c in COLORS], n_objects or rng.choice(counts))
    layout = rng.choice(layouts)
    boxes = tuple(LAYOUTS[layout](len(kinds), rng, scale))
    objs = tuple(
        SceneObject(s, c, i, min(GRID - 1, int((b[1] + b[3]) / 2 * GRID))) for i, ((s, c), b) in enumerate(zip(kinds, boxes))
    )
    return Scene(objs, boxes=boxes, layout=layout)
