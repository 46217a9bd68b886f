"""Ray Serve embedding API over real HTTP, in disc, gen and PLUME latent modes: same vectors as the
in-process embedder, 4xx on bad requests with the field named, the replica still serving afterwards."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from rime_data.scenes import png_bytes, random_scene, render


def _post(url: str, body, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url + "/v1/embeddings", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(ray_local, tiny_latent_dir):
    from ray import serve

    from actors.serve_app import EmbedderServer
    from orchestrator.learner_group import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = EmbedderServer.options(num_replicas=1).bind(
        model=tiny_latent_dir, model_name="rime-tiny", max_new_tokens=5, limits={"max_items": 4, "max_body_bytes": 200_000}
    )
    serve.run(app, name="rime-test", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _b64(img: Image.Image) -> str:
    return base64.b64encode(png_bytes(img)).decode()


@pytest.mark.parametrize("mode", ["disc", "gen", "latent"])
def test_http_vectors_equal_in_process(server, tiny_latent, mode):
    import random

    img = render(random_scene(random.Random(1)))
    items = [
        {"text": "a red circle"},
        {"image": _b64(img)},
        {"text": "what is this?", "image": "data:image/png;base64," + _b64(img)},
    ]
    status, body = _post(server, {"input": items, "mode": mode, "return_rewrite": True})
    assert status == 200, body
    got = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    local_items = [{"text": "a red circle"}, {"image": img}, {"text": "what is this?", "image": img}]
    from rime_model import GenerationConfig

    want = tiny_latent.embed(local_items, mode=mode, generation=GenerationConfig(max_new_tokens=5))
    np.testing.assert_allclose(got, want.vectors, atol=1e-4)
    assert body["model"] == "rime-tiny" and body["mode"] == mode and [d["index"] for d in body["data"]] == [0, 1, 2]
    if mode == "gen":
        assert [d["rewrite"] for d in body["data"]] == want.rewrite_texts
    status, b64 = _post(server, {"input": "a red circle", "encoding_format": "base64", "mode": mode})
    assert status == 200
    vec = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vec, want.vectors[0], atol=1e-4)


def _huge_header_png(side: int) -> str:
    """A 1x1 PNG whose header claims side x side pixels: a few bytes that would decode to GBs."""
    import struct
    import zlib

    png = png_bytes(Image.new("RGB", (1, 1)))
    ihdr = bytearray(png[12:29])  # chunk type + 13 data bytes; width and height lead the data
    ihdr[4:12] = struct.pack(">II", side, side)
    return base64.b64encode(png[:12] + bytes(ihdr) + struct.pack(">I", zlib.crc32(bytes(ihdr))) + png[33:]).decode()


def test_bad_requests_get_4xx_naming_the_field(server):
    bad_png = base64.b64encode(b"this is not a png").decode()
    cases = [
        ({"input": ["ok", {"image": _huge_header_png(10_000)}]}, None, 400, "input[1].image"),
        ({"input": [{"text": "ok", "instruction": "find <gen_emb>"}]}, None, 400, "input[0].instruction"),
        (None, b"{not json", 400, "body"),
        ({"input": "x", "mode": "telepathy"}, None, 400, "mode"),
        ({"input": [{"image": bad_png}]}, None, 400, "input[0].image"),
        ({"input": [{"image": "%%%"}]}, None, 400, "input[0].image"),
        ({"input": ["a"] * 5}, None, 413, "input"),
        ({"input": "x" * 300_000}, None, 413, "body"),
        ({"input": []}, None, 400, "input"),
        ({"input": "x", "encoding_format": "hex"}, None, 400, "encoding_format"),
        ({"inputs": "x"}, None, 400, "inputs"),
    ]
    for body, raw, status, field in cases:
        got_status, got = _post(server, body, raw)
        assert got_status == status, (body, got)
        assert got["error"]["param"] == field and got["error"]["message"].startswith(field), got
    status, huge = _post(server, {"input": [{"image": _huge_header_png(10_000)}]})
    assert "10000x10000 is 100M pixels, over the 40M limit" in huge["error"]["message"]
    status, ok = _post(server, {"input": "still serving"})
    assert status == 200 and len(ok["data"][0]["embedding"]) == 128


def test_models_and_health(server):
    with urllib.request.urlopen(server + "/v1/models", timeout=30) as r:
        models = json.loads(r.read())
    m = models["data"][0]
    assert m["id"] == "rime-tiny" and m["dimensions"] == 128 and m["modes"] == ["disc", "gen", "latent"]
    assert m["latent_adapter"] is True and m["latent_steps"] == 8
    with urllib.request.urlopen(server + "/health", timeout=30) as r:
        assert json.loads(r.read()) == {"status": "ok"}
