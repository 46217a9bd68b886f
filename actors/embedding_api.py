"""The OpenAI-shaped ``/v1/embeddings`` request: parsing and validation, independent of Ray Serve.

Extends OpenAI's body (``input``: string or list, ``model``, ``encoding_format``) with multimodal
items (``{"text": …, "image": <base64 or data URL>, "instruction": …}``), ``mode`` (disc | gen |
latent) and ``return_rewrite``. Every problem becomes an ``ApiError`` with an HTTP status and the
JSON path of the offending field, so a client knows what to fix and the replica keeps serving.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from rime_model.choices import MODES


class ApiError(Exception):
    """A client error: HTTP ``status``, the JSON ``field`` path and a message saying the fix."""

    def __init__(self, status: int, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.status, self.field, self.message = status, field, message

    def body(self) -> dict:
        return {
            "error": {
                "message": f"{self.field}: {self.message}",
                "type": "invalid_request_error",
                "param": self.field,
                "code": self.status,
            }
        }


@dataclass(frozen=True)
class Limits:
    max_items: int = 64
    max_body_bytes: int = 8 * 1024 * 1024
    max_text_chars: int = 8192


@dataclass(frozen=True)
class ServedModel:
    """What a request is checked against: the model's size, the Matryoshka sizes it was trained for and the
    modes this deployment serves."""

    dim: int
    matryoshka_dims: tuple[int, ...] = ()
    modes: tuple[str, ...] = MODES


@dataclass
class EmbeddingRequest:
    items: list[dict]
    mode: str
    encoding_format: str
    return_rewrite: bool
    model: str | None
    dimensions: int | None = None


def parse_body(raw: bytes, limits: Limits) -> dict:
    if len(raw) > limits.max_body_bytes:
        raise ApiError(
            413, "body", f"{len(raw)} bytes exceeds the {limits.max_body_bytes}-byte limit; send fewer or smaller items"
        )
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, "body", f'not valid JSON ({e}); send a JSON object like {{"input": "text"}}') from e
    if not isinstance(body, dict):
        raise ApiError(400, "body", "must be a JSON object with an 'input' field")
    return body


def _image_bytes(value: Any, path: str) -> bytes | str:
    if not isinstance(value, str) or not value:
        raise ApiError(400, path, "must be a non-empty base64 string or a data: URL")
    if value.startswith("data:"):
        return value  # the embedder decodes data URLs (and names the item if they are bad)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, path, f"not valid base64 ({e}); send base64 of PNG/JPEG bytes or a data: URL") from e


def parse_dimensions(value: Any, served: ServedModel) -> int | None:
    """OpenAI's ``dimensions``: a Matryoshka size the model was trained for (or its full size); the vectors are
    cut to it and re-normalised. Other sizes would be truncations the model never learnt: refused."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ApiError(400, "dimensions", f"must be a positive integer, got {value!r}")
    if value == served.dim or value in served.matryoshka_dims:
        return None if value == served.dim else value
    if served.matryoshka_dims:
        sizes = sorted({*served.matryoshka_dims, served.dim})
        raise ApiError(400, "dimensions", f"{value} is not a size this model was trained for; use one of {sizes}")
    raise ApiError(
        400,
        "dimensions",
        f"{value}: this model was not trained with Matryoshka sizes (cma.matryoshka_dims), so only its full size "
        f"{served.dim} is available; omit dimensions",
    )


def parse_request(body: dict, limits: Limits, served: ServedModel) -> EmbeddingRequest:
    """Validate the body's fields; raise ``ApiError`` naming the first bad one."""
    unknown = set(body) - {"input", "model", "encoding_format", "mode", "return_rewrite", "user", "dimensions"}
    if unknown:
        raise ApiError(
            400,
            sorted(unknown)[0],
            "unknown field; allowed: input, model, encoding_format, mode, return_rewrite, dimensions, user",
        )
    if "input" not in body:
        raise ApiError(400, "input", "missing; give a string, or a list of strings / {text, image, instruction} objects")
    raw = body["input"]
    raw_items = [raw] if isinstance(raw, (str, dict)) else raw
    if not isinstance(raw_items, list) or not raw_items:
        raise ApiError(400, "input", "must be a string, an object, or a non-empty list of them")
    if len(raw_items) > limits.max_items:
        raise ApiError(413, "input", f"{len(raw_items)} items exceed the limit of {limits.max_items}; split the request")
    items = []
    for i, it in enumerate(raw_items):
        path = f"input[{i}]"
        if isinstance(it, str):
            it = {"text": it}
        if not isinstance(it, dict):
            raise ApiError(400, path, "must be a string or an object with text / image / instruction")
        bad = set(it) - {"text", "image", "instruction"}
        if bad:
            raise ApiError(400, f"{path}.{sorted(bad)[0]}", "unknown field; allowed: text, image, instruction")
        for key in ("text", "instruction"):
            if key in it and it[key] is not None:
                if not isinstance(it[key], str):
                    raise ApiError(400, f"{path}.{key}", "must be a string")
                if len(it[key]) > limits.max_text_chars:
                    raise ApiError(413, f"{path}.{key}", f"longer than {limits.max_text_chars} characters")
        item = {"text": it.get("text"), "instruction": it.get("instruction")}
        if it.get("image") is not None:
            item["image"] = _image_bytes(it["image"], f"{path}.image")
        items.append(item)
    mode = body.get("mode", "disc")
    if mode not in MODES:
        raise ApiError(400, "mode", f"{mode!r} is not one of {MODES}")
    if mode not in served.modes:
        raise ApiError(400, "mode", f"{mode!r} is not served by this deployment (its modes: {list(served.modes)})")
    dimensions = parse_dimensions(body.get("dimensions"), served)
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise ApiError(400, "encoding_format", f"{fmt!r} is not 'float' or 'base64'")
    ret = body.get("return_rewrite", False)
    if not isinstance(ret, bool):
        raise ApiError(400, "return_rewrite", "must be true or false")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "model", "must be a string")
    return EmbeddingRequest(items, mode, fmt, ret, model, dimensions)


def encode_vector(vec: np.ndarray, fmt: str) -> list[float] | str:
    """OpenAI's encodings: a float list, or base64 of little-endian float32 bytes."""
    v = np.asarray(vec, dtype="<f4")
    return base64.b64encode(v.tobytes()).decode() if fmt == "base64" else v.tolist()


def response(vectors: list[np.ndarray], req: EmbeddingRequest, model_name: str, rewrites: list | None, tokens: int) -> dict:
    data = []
    for i, v in enumerate(vectors):
        row = {"object": "embedding", "index": i, "embedding": encode_vector(v, req.encoding_format)}
        if req.return_rewrite and rewrites is not None:
            row["rewrite"] = rewrites[i].text
            row["rewrite_tokens"] = rewrites[i].num_tokens
        data.append(row)
    return {
        "object": "list",
        "data": data,
        "model": model_name,
        "mode": req.mode,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
