"""A digest of generated records, so tests can say "this data did not change" (or did, on purpose)
without storing the data: every field of every row in order, images by their decoded pixels so that
a different PNG encoder (zlib) build does not count as a change of data."""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any, Protocol

import numpy as np
from PIL import Image


class Records(Protocol):
    queries: list[dict]
    candidates: list[dict]


def _cell(v: Any) -> Any:
    if isinstance(v, (bytes, bytearray)):
        px = np.asarray(Image.open(io.BytesIO(v)).convert("RGB"))
        return "px:" + hashlib.sha1(repr(px.shape).encode() + px.tobytes()).hexdigest()
    return v


def fingerprint(data: Records) -> str:
    """sha1 over the queries then the candidates (rows, order, texts, pixels): equal iff the data is."""
    h = hashlib.sha1()
    for kind, rows in (("q", data.queries), ("c", data.candidates)):
        for r in rows:
            h.update(json.dumps([kind, {k: _cell(v) for k, v in sorted(r.items())}], sort_keys=True).encode())
    return h.hexdigest()
