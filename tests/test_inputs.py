"""Bad inputs fail with messages naming the item and the field."""

from __future__ import annotations

import pytest
from PIL import Image

from rime_model import InputError


@pytest.mark.parametrize(
    "items, where, words",
    [
        ([{"text": "ok"}, {"image": "/no/such/file.png"}], "inputs[1].image", "file not found"),
        ([{"text": "ok"}, {"text": "x", "image": 42}], "inputs[1].image", "unsupported type int"),
        ([{"text": "ok"}, {"text": "   "}], "inputs[1].text", "empty"),
        ([{"image": b"not an image"}], "inputs[0].image", "cannot decode"),
        ([{"image": "data:image/png;base64,@@@"}], "inputs[0].image", "bad base64"),
        ([{"text": "x <gen_emb> y"}], "inputs[0].text", "reserved control token"),
        ([{"text": "x", "colour": "red"}], "inputs[0].colour", "unknown field"),
        ([3.5], "inputs[0].item", "unsupported type float"),
        ([], "inputs", "empty list"),
        ("just a string", "inputs", "single item"),
    ],
)
def test_bad_inputs_name_item_and_field(tiny, items, where, words):
    with pytest.raises(InputError) as ei:
        tiny.embed(items)
    assert where in str(ei.value) and words in str(ei.value)


def test_bad_mode_and_rewrite_count(tiny):
    with pytest.raises(ValueError, match="mode"):
        tiny.embed(["x"], mode="latentish")
    with pytest.raises(ValueError, match="rewrites: got 1 for 2"):
        tiny.embed_with_rewrite(["x", "y"], ["only one"])


def test_image_kinds_agree(tiny, tmp_path):
    """PIL, bytes, path and data URL of the same picture give the same vector."""
    import base64
    import io

    img = Image.new("RGB", (64, 64), (200, 30, 30))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    path = tmp_path / "red.png"
    path.write_bytes(buf.getvalue())
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    vecs = tiny.embed([{"image": img}, {"image": buf.getvalue()}, {"image": str(path)}, {"image": url}]).vectors
    for v in vecs[1:]:
        assert abs(float(v @ vecs[0]) - 1.0) < 1e-5
