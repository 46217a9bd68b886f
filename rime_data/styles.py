"""The data styles and the ranges each may draw from, in one place so that "transfer settings never
appear in training" is a property of two small objects rather than of scattered constants.

  classic     today's benchmark, byte for byte: 84-px scenes of 1-3 objects on a 3x3 grid, three flat
              backgrounds, fixed colours, one sentence per form (the default until the main job is
              measured on the randomised data).
  randomised  training ranges: sizes, counts, layouts, colour jitter, background tint and texture,
              fill and outline, blur or JPEG, and the train template pool all vary per picture/sentence.
  transfer    evaluation only: sizes, layouts, background textures and templates from outside the
              training ranges (the knobs in DISJOINT_KNOBS), everything else as in training, so a
              transfer score measures what carried over from the content rather than from the renderer.
"""

from __future__ import annotations

from dataclasses import dataclass

STYLES = ("classic", "randomised", "transfer")
# the knobs whose values a transfer picture or sentence never shares with training data
DISJOINT_KNOBS = ("sizes", "layouts", "textures", "templates")
TRAIN_LAYOUTS = ("grid", "row", "free")
TRANSFER_LAYOUTS = ("diagonal", "arc")


@dataclass(frozen=True)
class StyleRanges:
    """What a styled picture or sentence may draw; every draw is uniform over the given range/choices."""

    name: str
    sizes: tuple[int, int]  # image side in px, inclusive
    n_objects: tuple[int, ...]  # objects per scene (the vqa count labels are these)
    layouts: tuple[str, ...]  # placement schemes (rime_data/layouts.py)
    object_scale: tuple[float, float]  # object side as a fraction of the slot its layout gives it
    colour_jitter: int  # max per-channel shift around an object's named colour (keeps names apart)
    backgrounds: tuple[tuple[int, int, int], ...]  # base tints, each then jittered
    background_jitter: int
    textures: tuple[str, ...]  # background texture kinds (rime_data/looks.py)
    texture_amp: tuple[int, int]  # brightness swing of the texture, inclusive
    fills: tuple[str, ...]  # per object: solid | outlined | hollow
    degrades: tuple[str, ...]  # per picture: none | blur | jpeg
    blur_radius: tuple[float, float]
    jpeg_quality: tuple[int, int]
    templates: str  # template pool (rime_data/templates.py)

    def values(self, knob: str) -> set:
        """The set of values a knob can take (an int range expanded), for overlap checks."""
        v = getattr(self, knob)
        if knob == "sizes":
            return set(range(v[0], v[1] + 1))
        if knob == "templates":
            from .templates import TEMPLATES

            return {t.id for ts in TEMPLATES.values() for t in ts if t.pool == v}
        return set(v) if isinstance(v, tuple) else {v}


_BACKGROUNDS = ((245, 245, 245), (225, 225, 215), (200, 210, 225))  # classic's three, jittered below

RANDOMISED = StyleRanges(
    name="randomised",
    sizes=(96, 144),
    n_objects=(1, 2, 3, 4, 5),
    layouts=TRAIN_LAYOUTS,
    object_scale=(0.65, 0.95),
    colour_jitter=20,
    backgrounds=_BACKGROUNDS,
    background_jitter=12,
    textures=("flat", "noise"),
    texture_amp=(0, 12),
    fills=("solid", "outlined", "hollow"),
    degrades=("none", "blur", "jpeg"),
    blur_radius=(0.3, 0.9),
    jpeg_quality=(55, 90),
    templates="train",
)
TRANSFER = StyleRanges(
    name="transfer",
    sizes=(160, 208),
    n_objects=(1, 2, 3, 4, 5),
    layouts=TRANSFER_LAYOUTS,
    object_scale=(0.65, 0.95),
    colour_jitter=20,
    backgrounds=_BACKGROUNDS,
    background_jitter=12,
    textures=("stripes", "checker"),
    texture_amp=(4, 12),
    fills=("solid", "outlined", "hollow"),
    degrades=("none", "blur", "jpeg"),
    blur_radius=(0.3, 0.9),
    jpeg_quality=(55, 90),
    templates="transfer",
)
STYLE_RANGES = {"randomised": RANDOMISED, "transfer": TRANSFER}


def check_style(style: str) -> str:
    if style not in STYLES:
        raise ValueError(f"style: {style!r} is not one of {STYLES}")
    return style


def shared_settings(a: StyleRanges, b: StyleRanges) -> dict[str, set]:
    """The values of DISJOINT_KNOBS that both styles can draw (empty = the split is a true transfer)."""
    return {k: a.values(k) & b.values(k) for k in DISJOINT_KNOBS if a.values(k) & b.values(k)}
