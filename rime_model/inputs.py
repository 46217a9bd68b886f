"""What an embedder accepts, and validation that names the offending item and field.

Anything that reaches the model passes through ``normalize_inputs``: a bad item raises
``InputError`` with its index and field, so a caller (a data pipeline, the server) can count and
report it instead of failing a whole batch blindly.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

ImageLike = Image.Image | bytes | bytearray | str | Path
# Decoded-size limit, checked from the header before decoding: Qwen2-VL resizes to at most ~12.8M
# pixels, so a larger image only costs memory (PIL's own bomb check allows ~179M, ~0.5 GB as RGB).
MAX_IMAGE_PIXELS = 40_000_000


class InputError(ValueError):
    """A bad embedder input; ``index`` and ``field`` say which item and which part."""

    def __init__(self, index: int | None, field: str, message: str):
        self.index = index
        self.field = field
        where = f"inputs[{index}].{field}" if index is not None else field
        super().__init__(f"{where}: {message}")


@dataclass
class EmbedInput:
    """One item to embed: text, image, or both, with the task instruction."""

    text: str | None = None
    image: ImageLike | None = None
    instruction: str | None = None


def load_image(image: ImageLike, index: int | None = None) -> Image.Image:
    """Decode an image given as PIL, encoded bytes, a base64 data URL or a file path, as RGB."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (bytes, bytearray)):
        return _decode(bytes(image), index)
    if isinstance(image, (str, Path)):
        s = str(image)
        if s.startswith("data:"):
            try:
                payload = s.split(",", 1)[1]
                return _decode(base64.b64decode(payload, validate=True), index)
            except (IndexError, binascii.Error) as e:
                raise InputError(index, "image", f"bad base64 data URL ({e}); send 'data:image/png;base64,<b64>'") from e
        p = Path(s)
        if not p.is_file():
            raise InputError(index, "image", f"file not found: {s!r}; give an existing path, bytes or a PIL image")
        return _decode(p.read_bytes(), index)
    raise InputError(
        index, "image", f"unsupported type {type(image).__name__}; pass a PIL.Image, encoded bytes, a data URL or a path"
    )


def open_image(data: bytes, index: int | None = None) -> Image.Image:
    """Decode encoded image bytes (not yet converted to RGB), refusing corrupt data and images whose
    header claims more than ``MAX_IMAGE_PIXELS`` before any pixel is decoded."""
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as e:  # none of the errors below: PIL's own, larger size limit
        raise InputError(index, "image", f"{e}; downscale it") from e
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(index, "image", f"cannot decode image bytes ({e}); send PNG/JPEG/WebP bytes") from e
    w, h = img.size
    if w * h > MAX_IMAGE_PIXELS:
        raise InputError(
            index,
            "image",
            f"{w}x{h} is {w * h / 1e6:.0f}M pixels, over the {MAX_IMAGE_PIXELS / 1e6:.0f}M "
            "limit (a few KB of PNG can decode to GBs); downscale it, the model resizes to far less anyway",
        )
    try:
        img.load()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(index, "image", f"cannot decode image bytes ({e}); send PNG/JPEG/WebP bytes") from e
    return img


def _decode(data: bytes, index: int | None) -> Image.Image:
    return open_image(data, index).convert("RGB")


def reserved_in(text: str, reserved: Iterable[str]) -> str | None:
    """The first of the model's control tokens that ``text`` contains, or None: such text would move the
    position an embedding is read from (inputs, rewrites and training rows are all checked with this)."""
    return next((tok for tok in reserved if tok and tok in text), None)


def normalize_inputs(
    inputs: Iterable[Any], default_instruction: str, reserved_tokens: Iterable[str] = ()
) -> list[tuple[str, Image.Image | None, str]]:
    """Turn user items into (text, decoded image or None, instruction) triples, validating each.

    Accepts ``EmbedInput``, plain strings, PIL images, or dicts with ``text``/``image``/``instruction``.
    Text that contains one of the model's control tokens is refused: it would shift the position
    the embedding is read from.
    """
    if isinstance(inputs, (str, EmbedInput, dict, Image.Image)):
        raise InputError(None, "inputs", "expected a list of items, got a single item; wrap it in a list")
    reserved = [t for t in reserved_tokens if t]
    out: list[tuple[str, Image.Image | None, str]] = []
    for i, item in enumerate(inputs):
        if isinstance(item, str):
            item = EmbedInput(text=item)
        elif isinstance(item, Image.Image):
            item = EmbedInput(image=item)
        elif isinstance(item, dict):
            unknown = set(item) - {"text", "image", "instruction"}
            if unknown:
                raise InputError(i, sorted(unknown)[0], "unknown field; allowed: text, image, instruction")
            item = EmbedInput(**item)
        elif not isinstance(item, EmbedInput):
            raise InputError(i, "item", f"unsupported type {type(item).__name__}; pass a str, dict or EmbedInput")
        text = item.text
        if text is not None and not isinstance(text, str):
            raise InputError(i, "text", f"must be a string, got {type(text).__name__}")
        text = (text or "").strip()
        if not text and item.image is None:
            raise InputError(i, "text", "empty: give non-empty text, an image, or both")
        image = load_image(item.image, i) if item.image is not None else None
        instruction = item.instruction if item.instruction is not None else default_instruction
        if not isinstance(instruction, str):
            raise InputError(i, "instruction", f"must be a string, got {type(instruction).__name__}")
        for field, value in (("text", text), ("instruction", instruction)):  # both go into the prompt
            tok = reserved_in(value, reserved)
            if tok:
                raise InputError(i, field, f"contains the reserved control token {tok!r}; remove it")
        out.append((text, image, instruction.strip()))
    if not out:
        raise InputError(None, "inputs", "empty list: give at least one item")
    return out
