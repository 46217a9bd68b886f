"""rime's model package: the RIME embedder (disc / gen modes), its tokens, prompts and model zoo."""

from .embedder import Embedder, EmbeddingResult, GenerationConfig, ModelBatch, Rewrite
from .inputs import EmbedInput, InputError
from .prompts import PromptTemplate
from .tokens import SpecialTokens
from .zoo import ensure_zoo_model, load_embedder

__all__ = [
    "Embedder", "EmbeddingResult", "GenerationConfig", "ModelBatch", "Rewrite", "EmbedInput",
    "InputError", "PromptTemplate", "SpecialTokens", "ensure_zoo_model", "load_embedder",
]
