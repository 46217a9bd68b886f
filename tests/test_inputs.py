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
        ([{"text": "ok", "instruction": "find <|image_pad|>"}], "inputs[0].instruction", "reserved control token"),
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


def _png(w: int, h: int) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_oversized_images_are_refused_from_the_header(tiny, monkeypatch):
    """A few KB of PNG can claim a huge canvas: refused as a named input error before decoding, both
    over rime's limit and over PIL's own bomb limit (an exception type PIL keeps apart from OSError)."""
    import rime_model.inputs as inputs

    monkeypatch.setattr(inputs, "MAX_IMAGE_PIXELS", 50 * 50)
    with pytest.raises(InputError, match=r"inputs\[1\]\.image: 60x60 is 0M pixels, over the 0M limit"):
        tiny.embed(["ok", {"image": _png(60, 60)}])
    assert tiny.embed([{"image": _png(50, 50)}]).vectors.shape == (1, tiny.dim)
    monkeypatch.setattr(inputs, "MAX_IMAGE_PIXELS", 10**9)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20 * 20)  # PIL raises past twice its limit
    with pytest.raises(InputError, match=r"inputs\[0\]\.image: .*decompression bomb.*downscale it"):
        tiny.embed([{"image": _png(60, 60)}])


def test_one_embedder_serves_threads_at_once(tiny):
    """Serving runs one thread per mode on one embedder; HF fast tokenizers fail with 'Already borrowed'
    when a padded batch call and another call overlap, unless the embedder serialises them."""
    from concurrent.futures import ThreadPoolExecutor

    texts = ["a red circle", "a much longer text about a blue square left of a green cross"]
    want = tiny.embed(texts).vectors

    def disc(_):
        return tiny.embed(texts, batch_size=2).vectors

    def count(_):
        return sum(len(tiny.enc.token_ids(t * 3)) for t in texts)

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(disc if i % 2 else count, i) for i in range(400)]
        results = [f.result() for f in futures]  # re-raises any thread's error
    for r in results[1::2]:
        assert abs(r - want).max() < 1e-5
    assert set(results[0::2]) == {count(0)}
