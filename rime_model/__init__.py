"""rime's model package: the RIME embedder (disc / gen / latent modes), its prompt encoding, tokens and model zoo.

The names below load lazily (PEP 562) so that torch-free submodules, such as ``rime_model.curriculum``
which config validation uses, can be imported without paying for torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Embedder": "embedder",
    "EmbeddingResult": "embedder",
    "GenerationConfig": "embedder",
    "ModelBatch": "encoding",
    "PromptEncoder": "encoding",
    "Rewrite": "encoding",
    "EmbedInput": "inputs",
    "InputError": "inputs",
    "PromptTemplate": "prompts",
    "SpecialTokens": "tokens",
    "ensure_zoo_model": "zoo",
    "load_embedder": "zoo",
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from .embedder import Embedder, EmbeddingResult, GenerationConfig
    from .encoding import ModelBatch, PromptEncoder, Rewrite
    from .inputs import EmbedInput, InputError
    from .prompts import PromptTemplate
    from .tokens import SpecialTokens
    from .zoo import ensure_zoo_model, load_embedder


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rime_model' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
