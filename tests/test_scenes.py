"""Procedural scenes are seeded and their captions follow the picture."""

from __future__ import annotations

import random

import numpy as np

from rime_data.scenes import COLORS, GRID, random_scene, render


def test_seeded_and_deterministic():
    a = [random_scene(random.Random(5)) for _ in range(3)]
    b = [random_scene(random.Random(5)) for _ in range(3)]
    assert a == b
    assert np.array_equal(np.asarray(render(a[0])), np.asarray(render(b[0])))


def test_caption_is_left_to_right_and_colours_are_drawn():
    rng = random.Random(0)
    for _ in range(20):
        s = random_scene(rng, n_objects=3)
        cols = [o.col for o in s.objects]
        assert len(set(cols)) == 3
        left = min(s.objects, key=lambda o: o.col)
        assert s.caption().startswith(left.a_name)
        px = np.asarray(render(s, size=GRID * 30))
        for o in s.objects:  # the cell centre carries the object's colour (all shapes cover it)
            cy, cx = int((o.row + 0.5) * 30), int((o.col + 0.5) * 30)
            assert tuple(px[cy, cx]) == COLORS[o.color]
