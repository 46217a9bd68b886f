"""Ray Serve embedding API over real HTTP, driven as users drive it: the official ``openai`` client in every
mode (float and base64), raw JSON for image items and bad requests. Same vectors as the in-process
embedder; API keys (401 without one); Matryoshka ``dimensions``; 4xx naming the field; the replica keeps
serving. Overload, metrics and autoscaling: tests/test_serve_load.py."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from rime_data.scenes import png_bytes, random_scene, render

KEYS = ("key-one", "key-two")  # two accepted keys (rotation)
AUTH = {"Authorization": f"Bearer {KEYS[0]}"}
NAME = "rime-test"


def _post(url: str, body, raw: bytes | None = None, headers: dict | None = AUTH) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(
        url + "/v1/embeddings", data=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _get(url: str, headers: dict | None = AUTH) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def model_dir(tiny_latent_dir, tmp_path_factory) -> str:
    """The PLUME tiny model, saved as trained with Matryoshka sizes 32 and 64 (what ``dimensions`` reads)."""
    from rime_model import Embedder

    emb = Embedder.load(tiny_latent_dir)
    emb.matryoshka_dims = (32, 64)
    return str(emb.save(tmp_path_factory.mktemp("served") / "emb"))


@pytest.fixture(scope="module")
def model(model_dir):
    from rime_model import Embedder

    return Embedder.load(model_dir)


@pytest.fixture(scope="module")
def server(ray_local, model_dir):
    import time

    from ray import serve

    from actors.serve_app import EmbedderServer
    from orchestrator.learner_group import free_port
    from orchestrator.serving import api_key_digests, wait_ready

    t0, port = time.monotonic(), free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = EmbedderServer.options(num_replicas=1, ray_actor_options={"num_cpus": 0.5}).bind(
        model=model_dir,
        model_name=NAME,
        max_new_tokens=5,
        limits={"max_items": 4, "max_body_bytes": 200_000},
        max_batch_tokens=400,
        api_key_sha256=api_key_digests(list(KEYS)),
    )
    serve.run(app, name="rime-test", route_prefix="/")
    t1, url = time.monotonic(), f"http://127.0.0.1:{port}"
    wait_ready(url, timeout_s=120)
    print(f"[test_serve] replica up in {t1 - t0:.1f}s, warmed up {time.monotonic() - t1:.1f}s later")
    yield url
    serve.shutdown()  # the next module starts Serve on its own port


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server + "/v1", api_key=KEYS[1], max_retries=0, timeout=120)


def _b64(img: Image.Image) -> str:
    return base64.b64encode(png_bytes(img)).decode()


TEXTS = ["a red circle", "two blue squares and a green triangle"]


@pytest.mark.parametrize("mode", ["disc", "gen", "latent"])
def test_openai_client_float_and_base64_equal_in_process(client, model, mode):
    from rime_model import GenerationConfig

    want = model.embed([{"text": t} for t in TEXTS], mode=mode, generation=GenerationConfig(max_new_tokens=5)).vectors
    # by default the client asks for base64 and decodes it itself; "float" asks for JSON floats; an explicit
    # "base64" hands the client's caller the strings (little-endian float32)
    for fmt in (None, "float", "base64"):
        kw = {"encoding_format": fmt} if fmt else {}
        got = client.embeddings.create(model=NAME, input=TEXTS, extra_body={"mode": mode}, **kw)
        assert got.model == NAME and [d.index for d in got.data] == [0, 1]
        vecs = [np.frombuffer(base64.b64decode(d.embedding), "<f4") if fmt == "base64" else d.embedding for d in got.data]
        np.testing.assert_allclose(np.array(vecs), want, atol=1e-4)
        # usage: the tokens the model read per item, text and (default) instruction
        assert got.usage.prompt_tokens == sum(
            len(model.enc.token_ids(t)) + len(model.enc.token_ids(i)) for t, _, i in model.prepare(TEXTS)
        )


def test_image_items_over_http_equal_in_process(server, model):
    import random

    from rime_model import GenerationConfig

    img = render(random_scene(random.Random(1)))
    items = [
        {"text": "a red circle"},
        {"image": _b64(img)},
        {"text": "what is this?", "image": "data:image/png;base64," + _b64(img)},
    ]
    local_items = [{"text": "a red circle"}, {"image": img}, {"text": "what is this?", "image": img}]
    for mode in ("disc", "gen"):
        status, body = _post(server, {"input": items, "mode": mode, "return_rewrite": True})
        assert status == 200, body
        want = model.embed(local_items, mode=mode, generation=GenerationConfig(max_new_tokens=5))
        np.testing.assert_allclose(np.array([d["embedding"] for d in body["data"]]), want.vectors, atol=1e-4)
        assert body["model"] == NAME and body["mode"] == mode
        if mode == "gen":
            assert [d["rewrite"] for d in body["data"]] == want.rewrite_texts


def test_api_keys_are_required_except_for_health(server, client):
    import openai

    for headers, why in ((None, "no API key given"), ({"Authorization": "Bearer wrong"}, "the API key is not valid")):
        status, body = _post(server, {"input": "x"}, headers=headers)
        assert status == 401 and body["error"]["code"] == "invalid_api_key" and body["error"]["message"].startswith(why)
        assert _get(server + "/v1/models", headers=headers)[0] == 401
    assert _post(server, {"input": "x"}, headers={"Authorization": f"Bearer {KEYS[1]}"})[0] == 200  # the second key
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).embeddings.create(model=NAME, input="x")
    assert _get(server + "/health", headers=None) == (200, {"status": "ok"})


def test_dimensions_are_the_trained_matryoshka_sizes(server, client, model):
    from rime_model.embedder import truncate

    full = model.embed([{"text": t} for t in TEXTS]).vectors
    got = client.embeddings.create(model=NAME, input=TEXTS, dimensions=32)
    vecs = np.array([d.embedding for d in got.data])
    assert vecs.shape == (2, 32)
    np.testing.assert_allclose(vecs, truncate(full, 32), atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert len(client.embeddings.create(model=NAME, input="x", dimensions=128).data[0].embedding) == 128  # full size
    status, body = _post(server, {"input": "x", "dimensions": 100})
    assert status == 400 and body["error"]["param"] == "dimensions"
    assert "100 is not a size this model was trained for; use one of [32, 64, 128]" in body["error"]["message"]


def test_dimensions_of_a_model_without_matryoshka_sizes_are_refused():
    from actors.embedding_api import ApiError, ServedModel, parse_dimensions

    plain = ServedModel(dim=128)
    assert parse_dimensions(128, plain) is None and parse_dimensions(None, plain) is None
    for bad in (64, 0, True, "64"):
        with pytest.raises(ApiError) as e:
            parse_dimensions(bad, plain)
        assert e.value.status == 400 and e.value.field == "dimensions"
    with pytest.raises(ApiError, match="not trained with Matryoshka sizes .* only its full size 128"):
        parse_dimensions(64, plain)


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
        ({"input": " ".join(["word"] * 500)}, None, 413, "input[0]"),  # over max_batch_tokens=400
        ({"input": []}, None, 400, "input"),
        ({"input": "x", "encoding_format": "hex"}, None, 400, "encoding_format"),
        ({"input": "x", "dimensions": 0}, None, 400, "dimensions"),
        ({"inputs": "x"}, None, 400, "inputs"),
    ]
    for body, raw, status, field in cases:
        got_status, got = _post(server, body, raw)
        assert got_status == status, (body, got)
        assert got["error"]["param"] == field and got["error"]["message"].startswith(field), got
    status, huge = _post(server, {"input": [{"image": _huge_header_png(10_000)}]})
    assert "10000x10000 is 100M pixels, over the 40M limit" in huge["error"]["message"]
    status, long = _post(server, {"input": " ".join(["word"] * 500)})
    assert "tokens exceed max_batch_tokens=400" in long["error"]["message"]
    status, ok = _post(server, {"input": "still serving"})
    assert status == 200 and len(ok["data"][0]["embedding"]) == 128


def test_models_names_the_served_model(server, client):
    status, models = _get(server + "/v1/models")
    m = models["data"][0]
    assert status == 200 and m["id"] == NAME and m["dimensions"] == 128 and m["matryoshka_dims"] == [32, 64]
    assert m["modes"] == ["disc", "gen", "latent"] and m["latent_adapter"] is True and m["latent_steps"] == 8
    assert [x.id for x in client.models.list().data] == [NAME]


def test_served_name_and_autoscaling_fit_the_command_line_and_the_machine():
    from orchestrator.serving import fit_autoscaling, served_name

    assert served_name("runs/x/final/", "rime-tiny", model_flag=True) == "runs/x/final"  # --model X names X
    assert served_name("tiny", "rime-tiny", model_flag=False) == "rime-tiny"  # the config's own model
    scaling = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16}
    opts, note = fit_autoscaling({"ray_actor_options": {"num_cpus": 1}, "autoscaling_config": scaling}, cluster_cpus=2)
    assert opts["autoscaling_config"]["max_replicas"] == 1 and "max_replicas 4 -> 1" in note
    opts, note = fit_autoscaling({"ray_actor_options": {"num_cpus": 1}, "autoscaling_config": scaling}, cluster_cpus=16)
    assert opts["autoscaling_config"]["max_replicas"] == 4 and note is None
    gpu = {"ray_actor_options": {"num_cpus": 4, "num_gpus": 1}, "autoscaling_config": scaling}
    assert fit_autoscaling(gpu, cluster_cpus=2) == (gpu, None)  # GPU replicas: the GPUs bound them
