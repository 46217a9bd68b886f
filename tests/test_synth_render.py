"""Styled rendering: each randomisation knob changes the pixels as it says and never the ground truth.

Ground truth here is what captions and referring expressions are generated from: each object's named
colour (read at its box, nearest palette colour) and the left-to-right order of the objects.
"""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest

from rime_data.layouts import GAP, LAYOUTS, styled_scene
from rime_data.looks import Look, draw_look, pixel_box, render_look
from rime_data.scenes import COLORS, SHAPES, Scene, SceneObject
from rime_data.styles import RANDOMISED, TRANSFER


def _nearest(rgb) -> str:
    return min(COLORS, key=lambda c: sum((int(a) - b) ** 2 for a, b in zip(rgb, COLORS[c])))


def _scene() -> Scene:
    """Three objects in a row with fixed boxes: red circle, blue square, yellow triangle."""
    kinds = [("circle", "red"), ("square", "blue"), ("diamond", "yellow")]
    boxes = ((0.05, 0.35, 0.3, 0.6), (0.38, 0.3, 0.63, 0.55), (0.7, 0.4, 0.95, 0.65))
    return Scene(tuple(SceneObject(s, c, i, 1) for i, (s, c) in enumerate(kinds)), boxes=boxes, layout="row")


def _look(scene: Scene, **kw) -> Look:
    base = dict(
        size=120,
        background=(240, 240, 240),
        texture="flat",
        texture_amp=0,
        texture_period=1,
        texture_angle=0.0,
        colours=tuple(COLORS[o.color] for o in scene.objects),
        fills=("solid",) * len(scene.objects),
        line=2,
        degrade="none",
        strength=0.0,
        seed=7,
    )
    return Look(**{**base, **kw})


def _px(scene: Scene, look: Look) -> np.ndarray:
    img = render_look(scene, look)
    assert img.size == (look.size, look.size) and img.mode == "RGB"
    return np.asarray(img)


def _centre(box, size: int) -> tuple[int, int]:
    x0, y0, x1, y1 = pixel_box(box, size)
    return int((y0 + y1) / 2), int((x0 + x1) / 2)


def _assert_ground_truth(scene: Scene, px: np.ndarray, at_edge: bool = False) -> None:
    """Every object's colour reads back at its box; boxes are left to right in ``col`` order."""
    size = px.shape[0]
    for o, box in zip(scene.objects, scene.boxes):
        y, x = _centre(box, size)
        if at_edge:  # hollow: the colour is on the line; the square's left edge, 1 px in
            x = int(pixel_box(box, size)[0]) + 1
        assert _nearest(px[y, x]) == o.color, (o, px[y, x])
    order = sorted(zip(scene.objects, scene.boxes), key=lambda ob: ob[1][0])
    assert [o.col for o, _ in order] == sorted(o.col for o in scene.objects)


def test_base_look_draws_named_colours_on_the_background():
    s = _scene()
    px = _px(s, _look(s))
    assert tuple(px[0, 0]) == (240, 240, 240)
    for o, box in zip(s.objects, s.boxes):
        assert tuple(px[_centre(box, 120)]) == COLORS[o.color]
    _assert_ground_truth(s, px)


def test_size_changes_the_picture_not_the_content():
    s = _scene()
    small, large = _px(s, _look(s, size=96)), _px(s, _look(s, size=208))
    assert small.shape == (96, 96, 3) and large.shape == (208, 208, 3)
    _assert_ground_truth(s, small)
    _assert_ground_truth(s, large)


def test_colour_jitter_moves_pixels_but_never_across_a_colour_name():
    s = _scene()
    jittered = tuple(tuple(min(255, max(0, v + d)) for v, d in zip(COLORS[o.color], (20, -20, 20))) for o in s.objects)
    px = _px(s, _look(s, colours=jittered))
    for box, rgb in zip(s.boxes, jittered):
        assert tuple(px[_centre(box, 120)]) == rgb
    _assert_ground_truth(s, px)
    # every jitter the ranges can draw keeps the nearest named colour
    for seed in range(300):
        look = draw_look(np.random.default_rng(seed), RANDOMISED, s)
        for o, rgb in zip(s.objects, look.colours):
            assert max(abs(a - b) for a, b in zip(rgb, COLORS[o.color])) <= RANDOMISED.colour_jitter
            assert _nearest(rgb) == o.color


def test_background_tint_and_textures_change_only_the_background():
    s = _scene()
    flat = _px(s, _look(s))
    tinted = _px(s, _look(s, background=(200, 212, 228)))
    assert tuple(tinted[0, 0]) == (200, 212, 228)
    for texture, period in (("noise", 3), ("stripes", 6), ("checker", 4)):
        px = _px(s, _look(s, texture=texture, texture_amp=10, texture_period=period, texture_angle=0.7))
        corner = px[:20, :20].astype(int)
        assert corner.std() > 1 and np.abs(corner - 240).max() <= 10, texture  # varies, within the amplitude
        for box in s.boxes:  # objects are drawn over the texture, untouched
            y, x = _centre(box, 120)
            assert (px[y, x] == flat[y, x]).all(), texture
        _assert_ground_truth(s, px)


def test_fill_variants_keep_the_colour_on_the_object():
    s = _scene()
    n = len(s.objects)
    outlined = _px(s, _look(s, fills=("outlined",) * n, line=3))
    _assert_ground_truth(s, outlined)
    x0, y0, x1, y1 = pixel_box(s.boxes[1], 120)  # the blue square: its outline is dark blue
    assert tuple(outlined[int((y0 + y1) / 2), int(x0) + 1]) == tuple(int(v * 0.55) for v in COLORS["blue"])
    hollow = _px(s, _look(s, fills=("hollow",) * n, line=2))
    y, x = _centre(s.boxes[1], 120)
    assert tuple(hollow[y, x]) == (240, 240, 240)  # nothing inside
    _assert_ground_truth(replace(s, objects=s.objects[1:2], boxes=s.boxes[1:2]), hollow, at_edge=True)


@pytest.mark.parametrize("degrade,strength", [("blur", 0.9), ("jpeg", 55.0)])
def test_blur_and_jpeg_change_pixels_but_not_the_content(degrade, strength):
    s = _scene()
    clean = _px(s, _look(s))
    px = _px(s, _look(s, degrade=degrade, strength=strength))
    assert (px != clean).any()
    assert np.abs(px.astype(int) - clean).mean() < 6  # light: a few levels on average
    _assert_ground_truth(s, px)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layouts_keep_left_of_unambiguous(layout):
    """Over many scenes of every count: boxes inside the picture, disjoint x-extents with a gap, in
    ``col`` order; drawn, each object's colour reads back at its box."""
    rng = random.Random(layout)
    for i in range(60):
        n = 1 + i % 5
        s = styled_scene(rng, (layout,), (n,), RANDOMISED.object_scale)
        assert s.layout == layout and len(s.objects) == len(s.boxes) == n
        assert [o.col for o in s.objects] == list(range(n))
        assert len({(o.shape, o.color) for o in s.objects}) == n
        for a, b in zip(s.boxes, s.boxes[1:]):
            assert b[0] - a[2] >= GAP - 1e-9
        assert all(0 <= v <= 1 for box in s.boxes for v in box)
        look = draw_look(np.random.default_rng(i), RANDOMISED, s)
        look = replace(look, fills=("solid",) * n, degrade="none", size=144)
        _assert_ground_truth(s, _px(s, look))


def test_layout_sizes_vary_where_they_should():
    rng = random.Random(0)
    sides = {name: [] for name in LAYOUTS}
    for name in LAYOUTS:
        for _ in range(40):
            s = styled_scene(rng, (name,), (3,), RANDOMISED.object_scale)
            sides[name].append({round(b[2] - b[0], 6) for b in s.boxes})
    # row and free draw a size per object; grid, diagonal and arc use one size per scene
    assert any(len(x) > 1 for x in sides["row"]) and any(len(x) > 1 for x in sides["free"])
    assert all(len(x) == 1 for n in ("grid", "diagonal", "arc") for x in sides[n])


def test_draw_look_stays_in_its_ranges_and_is_seeded():
    s = styled_scene(random.Random(1), RANDOMISED.layouts, (4,), RANDOMISED.object_scale)
    for ranges in (RANDOMISED, TRANSFER):
        looks = [draw_look(np.random.default_rng(seed), ranges, s) for seed in range(200)]
        assert {lk.texture for lk in looks} == set(ranges.textures)
        assert {lk.degrade for lk in looks} == set(ranges.degrades)
        assert {f for lk in looks for f in lk.fills} == set(ranges.fills)
        assert all(ranges.sizes[0] <= lk.size <= ranges.sizes[1] for lk in looks)
        assert draw_look(np.random.default_rng(5), ranges, s) == looks[5]
    a = draw_look(np.random.default_rng(3), TRANSFER, s)
    assert np.array_equal(np.asarray(render_look(s, a)), np.asarray(render_look(s, a)))


def test_object_counts_cover_the_range():
    rng = random.Random(2)
    counts = {
        len(styled_scene(rng, RANDOMISED.layouts, RANDOMISED.n_objects, RANDOMISED.object_scale).objects) for _ in range(100)
    }
    assert counts == set(RANDOMISED.n_objects) == {1, 2, 3, 4, 5}
    one = styled_scene(rng, RANDOMISED.layouts, RANDOMISED.n_objects, RANDOMISED.object_scale, kinds=[(SHAPES[0], "red")])
    assert [(o.shape, o.color) for o in one.objects] == [(SHAPES[0], "red")]
