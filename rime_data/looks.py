"""How a styled scene is drawn: every appearance choice of one picture, drawn from a style's ranges
with a per-picture numpy Generator, then rendered with Pillow.

A ``Look`` holds what varies and what the scene does not decide: image size, background tint and
texture, each object's jittered colour and fill (solid, outlined, hollow), line width, and a light
blur or a JPEG round-trip. None of these changes what the picture shows (names, counts, left/right
order), which is what lets a model trained across them learn the content instead of the renderer.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .scenes import COLORS, Box, Scene
from .styles import StyleRanges

RGB = tuple[int, int, int]
TEXTURES = ("flat", "noise", "stripes", "checker")
FILLS = ("solid", "outlined", "hollow")
DEGRADES = ("none", "blur", "jpeg")


@dataclass(frozen=True)
class Look:
    """One picture's appearance; ``render_look(scene, look)`` is a pure function of the two."""

    size: int
    background: RGB
    texture: str  # flat | noise | stripes | checker
    texture_amp: int  # max brightness swing, 0-255 scale
    texture_period: int  # px: noise block, stripe period or checker square
    texture_angle: float  # radians, stripes only
    colours: tuple[RGB, ...]  # one per object, in scene order
    fills: tuple[str, ...]  # one per object
    line: int  # outline width in px
    degrade: str  # none | blur | jpeg
    strength: float  # blur radius, or JPEG quality
    seed: int  # the texture's noise


def _jitter(rng: np.random.Generator, rgb: RGB, amount: int) -> RGB:
    return tuple(int(v) for v in np.clip(np.asarray(rgb) + rng.integers(-amount, amount + 1, 3), 0, 255))


def draw_look(rng: np.random.Generator, ranges: StyleRanges, scene: Scene) -> Look:
    """Draw every appearance knob uniformly from ``ranges`` (one Generator per picture: seeded)."""
    texture = str(ranges.textures[rng.integers(len(ranges.textures))])
    degrade = str(ranges.degrades[rng.integers(len(ranges.degrades))])
    period = {"noise": (1, 4), "stripes": (4, 10), "checker": (3, 8)}.get(texture, (1, 1))
    return Look(
        size=int(rng.integers(ranges.sizes[0], ranges.sizes[1] + 1)),
        background=_jitter(rng, ranges.backgrounds[rng.integers(len(ranges.backgrounds))], ranges.background_jitter),
        texture=texture,
        texture_amp=int(rng.integers(ranges.texture_amp[0], ranges.texture_amp[1] + 1)),
        texture_period=int(rng.integers(period[0], period[1] + 1)),
        texture_angle=float(rng.uniform(0, np.pi)),
        colours=tuple(_jitter(rng, COLORS[o.color], ranges.colour_jitter) for o in scene.objects),
        fills=tuple(str(ranges.fills[rng.integers(len(ranges.fills))]) for _ in scene.objects),
        line=int(rng.integers(1, 4)),
        degrade=degrade,
        strength=float(rng.uniform(*ranges.blur_radius))
        if degrade == "blur"
        else float(rng.integers(ranges.jpeg_quality[0], ranges.jpeg_quality[1] + 1))
        if degrade == "jpeg"
        else 0.0,
        seed=int(rng.integers(2**63)),
    )


def texture(look: Look) -> np.ndarray:
    """The background's brightness offsets, shape (size, size), in [-amp, amp]."""
    n, p, amp = look.size, look.texture_period, look.texture_amp
    y, x = np.mgrid[0:n, 0:n]
    if look.texture == "noise":  # blocky luminance noise
        blocks = np.random.default_rng(look.seed).integers(-amp, amp + 1, (-(-n // p), -(-n // p)))
        return np.kron(blocks, np.ones((p, p), dtype=np.int64))[:n, :n].astype(np.float64)
    if look.texture == "stripes":
        return amp * np.sin(2 * np.pi * (x * np.cos(look.texture_angle) + y * np.sin(look.texture_angle)) / p)
    if look.texture == "checker":
        return amp * np.where((x // p + y // p) % 2 == 0, 1.0, -1.0)
    if look.texture == "flat":
        return np.zeros((n, n))
    raise ValueError(f"texture: {look.texture!r} is not one of {TEXTURES}")


def _shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill, outline, width: int) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill, outline=outline, width=width)
    elif shape == "square":
        draw.rectangle(box, fill=fill, outline=outline, width=width)
    else:
        cx, cy, w = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 3
        pts = {
            "triangle": [(cx, y0), (x1, y1), (x0, y1)],
            "diamond": [(cx, y0), (x1, cy), (cx, y1), (x0, cy)],
            "cross": [
                (x0 + w, y0),
                (x1 - w, y0),
                (x1 - w, y0 + w),
                (x1, y0 + w),
                (x1, y1 - w),
                (x1 - w, y1 - w),
                (x1 - w, y1),
                (x0 + w, y1),
                (x0 + w, y1 - w),
                (x0, y1 - w),
                (x0, y0 + w),
                (x0 + w, y0 + w),
            ],
        }[shape]
        draw.polygon(pts, fill=fill, outline=outline, width=width)


def pixel_box(box: Box, size: int) -> tuple[float, float, float, float]:
    """A normalised box in pixel coordinates of a ``size``-px picture."""
    return (box[0] * size, box[1] * size, box[2] * size - 1, box[3] * size - 1)


def render_look(scene: Scene, look: Look) -> Image.Image:
    """Draw a styled scene (one with ``boxes``) with the given look."""
    if scene.boxes is None:
        raise ValueError("render_look: the scene has no boxes; classic scenes are drawn by scenes.render")
    bg = np.clip(np.asarray(look.background, dtype=np.float64) + texture(look)[..., None], 0, 255)
    img = Image.fromarray(bg.round().astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for o, box, colour, fill in zip(scene.objects, scene.boxes, look.colours, look.fills):
        dark = tuple(int(v * 0.55) for v in colour)
        if fill == "solid":
            _shape(draw, o.shape, pixel_box(box, look.size), colour, None, 1)
        elif fill == "outlined":
            _shape(draw, o.shape, pixel_box(box, look.size), colour, dark, look.line)
        elif fill == "hollow":  # the colour is carried by a line at least 2 px wide
            _shape(draw, o.shape, pixel_box(box, look.size), None, colour, max(2, look.line))
        else:
            raise ValueError(f"fill: {fill!r} is not one of {FILLS}")
    if look.degrade == "blur":
        img = img.filter(ImageFilter.GaussianBlur(look.strength))
    elif look.degrade == "jpeg":
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(look.strength))
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    elif look.degrade != "none":
        raise ValueError(f"degrade: {look.degrade!r} is not one of {DEGRADES}")
    return img
