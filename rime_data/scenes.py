"""Procedural scenes of coloured shapes: cheap, seeded images whose content is known exactly.

Each scene holds 1-3 non-overlapping objects on a 3x3 grid of cells, so captions ("a red circle
left of a blue square") and referring expressions ("the object left of the yellow square") can be
generated with their ground truth. Rendering uses only Pillow.

This module is the ``classic`` style. Styled scenes (rime_data/layouts.py) carry normalised
``boxes`` and a ``layout`` name instead of grid cells, and are drawn by rime_data/looks.py; their
``col`` is the object's left-to-right rank, so every relation below holds for both.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "diamond")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
}
BACKGROUNDS = ((245, 245, 245), (225, 225, 215), (200, 210, 225))
GRID = 3


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    col: int  # 0 = left … GRID-1 = right (styled scenes: left-to-right rank)
    row: int  # 0 = top … GRID-1 = bottom (styled scenes: the third of the height its centre is in)

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def a_name(self) -> str:
        return with_article(self.name)


def with_article(phrase: str) -> str:
    """'an orange circle', 'a red square'."""
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


Box = tuple[float, float, float, float]  # normalised (x0, y0, x1, y1), 0..1 of the image side


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: int = 0
    boxes: tuple[Box, ...] | None = None  # styled scenes: one box per object, in ``objects`` order
    layout: str | None = None  # styled scenes: the placement scheme that drew the boxes

    def caption(self) -> str:
        """Left-to-right description, e.g. 'a red circle, a blue square and a green cross'."""
        names = [o.a_name for o in sorted(self.objects, key=lambda o: (o.col, o.row))]
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def random_scene(rng: random.Random, n_objects: int | None = None) -> Scene:
    """1-3 objects with distinct (shape, colour) pairs in distinct columns (so left/right is defined)."""
    n = n_objects or rng.randint(1, 3)
    cols = rng.sample(range(GRID), n)
    kinds = rng.sample([(s, c) for s in SHAPES for c in COLORS], n)
    objs = tuple(SceneObject(s, c, col, rng.randrange(GRID)) for (s, c), col in zip(kinds, cols))
    return Scene(objs, rng.randrange(len(BACKGROUNDS)))


def render(scene: Scene, size: int = 84) -> Image.Image:
    """Draw the scene; each object fills most of its grid cell."""
    img = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    cell = size / GRID
    for o in scene.objects:
        x0, y0 = o.col * cell + cell * 0.12, o.row * cell + cell * 0.12
        x1, y1 = (o.col + 1) * cell - cell * 0.12, (o.row + 1) * cell - cell * 0.12
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif o.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif o.shape == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        elif o.shape == "diamond":
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
        elif o.shape == "cross":
            w = (x1 - x0) / 3
            draw.rectangle((x0 + w, y0, x1 - w, y1), fill=fill)
            draw.rectangle((x0, y0 + w, x1, y1 - w), fill=fill)
    return img


def png_bytes(img: Image.Image) -> bytes:
    """Encoded PNG: records store images as bytes and decode lazily."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
