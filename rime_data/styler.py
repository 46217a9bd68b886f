"""What one task's records look like in a given style: its scenes, pictures and sentences.

The task builders in synth.py decide *what* a record says (objects, relations, answers); a Styler
decides *how* it is shown. ``classic`` returns today's grid scenes, 84-px renders and canonical
sentences and draws nothing extra from the task's rng, so classic data stays byte-identical. The
other styles draw layouts, looks and templates from their StyleRanges and log each draw
(``provenance``), so a written split can be audited against the ranges it was meant to use.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np

from .layouts import styled_scene
from .looks import draw_look, render_look
from .scenes import Scene, SceneObject, png_bytes, random_scene, render
from .styles import STYLE_RANGES, check_style
from .templates import canonical, phrase

CLASSIC_COUNTS = (1, 2, 3)
CLASSIC_SIZE = 84


class Styler:
    def __init__(self, style: str, rng: random.Random, image_size: int | None = None) -> None:
        self.style, self.rng = check_style(style), rng
        self.ranges = STYLE_RANGES.get(style)
        if self.ranges is not None and image_size is not None:
            raise ValueError(
                f"image_size: only the classic style takes one; {style!r} draws sizes from "
                f"{self.ranges.sizes[0]}-{self.ranges.sizes[1]} px (rime_data/styles.py)"
            )
        self.image_size = image_size or CLASSIC_SIZE
        self.provenance: list[dict] = []

    @property
    def classic(self) -> bool:
        return self.ranges is None

    def counts(self) -> tuple[int, ...]:
        """The object counts a scene may have."""
        return CLASSIC_COUNTS if self.classic else self.ranges.n_objects

    def scene(self, n_objects: int | None = None) -> Scene:
        """A random scene of ``n_objects`` (else a count from ``counts()``)."""
        if self.classic:
            return random_scene(self.rng, n_objects)
        r = self.ranges
        return styled_scene(self.rng, r.layouts, r.n_objects, r.object_scale, n_objects=n_objects)

    def single(self, shape: str, colour: str) -> Scene:
        """A one-object scene (the referring tasks' corpus)."""
        if self.classic:
            return Scene((SceneObject(shape, colour, 1, 1),), background=self.rng.randrange(3))
        r = self.ranges
        return styled_scene(self.rng, r.layouts, r.n_objects, r.object_scale, kinds=[(shape, colour)])

    def image(self, scene: Scene) -> bytes:
        """The scene's picture as PNG bytes; styled looks come from a per-picture seeded Generator."""
        if self.classic:
            return png_bytes(render(scene, self.image_size))
        look = draw_look(np.random.default_rng(self.rng.getrandbits(63)), self.ranges, scene)
        data = png_bytes(render_look(scene, look))
        self.provenance.append(
            dict(
                image=hashlib.sha1(data).hexdigest()[:16],
                size=look.size,
                layout=scene.layout,
                texture=look.texture,
                fills=list(look.fills),
                degrade=look.degrade,
            )
        )
        return data

    def say(self, form: str, **fields: str) -> str:
        """A sentence of ``form``: canonical in classic, else from the style's template pool."""
        if self.classic:
            return canonical(form, **fields)
        text, template = phrase(self.rng, form, self.ranges.templates, **fields)
        self.provenance.append(dict(form=form, template=template, text=text))
        return text
