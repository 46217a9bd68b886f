"""The trained embedder as an MLflow pyfunc model: ``mlflow.pyfunc.load_model(uri).predict(df)``.

Input: a DataFrame with any of ``text``, ``image`` (encoded bytes, a path or a data URL),
``instruction``; params ``mode`` (disc|gen|latent), ``max_new_tokens`` (gen) and ``latent_steps``
(latent; 0 = the model's own K). Output: one float32 vector
per row (L2-normalised).
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

import orchestrator
import rime_model


class EmbedderPyfunc(mlflow.pyfunc.PythonModel):
    """Loads the saved embedder folder logged as the ``embedder`` artifact."""

    def load_context(self, context) -> None:
        import torch

        from rime_model import load_embedder

        self.emb = load_embedder(context.artifacts["embedder"], device="cuda" if torch.cuda.is_available() else None)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        from rime_model import GenerationConfig

        params = params or {}
        cols = [c for c in ("text", "image", "instruction") if c in model_input.columns]
        items = [{c: (r[c] if isinstance(r[c], (str, bytes)) else None) for c in cols} for r in model_input.to_dict("records")]
        res = self.emb.embed(
            items,
            mode=params.get("mode", "disc"),
            generation=GenerationConfig(max_new_tokens=int(params.get("max_new_tokens", 32))),
            steps=int(params.get("latent_steps", 0)) or None,
        )
        return res.vectors


def log_embedder_model(embedder_dir: str, name: str = "embedder") -> str:
    """Log ``embedder_dir`` as a pyfunc model in the active run; returns its model URI."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    sig = ModelSignature(
        inputs=Schema(
            [
                ColSpec("string", "text", required=False),
                ColSpec("binary", "image", required=False),
                ColSpec("string", "instruction", required=False),
            ]
        ),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1))]),
        params=ParamSchema(
            [ParamSpec("mode", "string", "disc"), ParamSpec("max_new_tokens", "long", 32), ParamSpec("latent_steps", "long", 0)]
        ),
    )
    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=EmbedderPyfunc(),
        artifacts={"embedder": embedder_dir},
        signature=sig,
        code_paths=[str(Path(m.__file__).parent) for m in (rime_model, orchestrator)],  # the pickle names these
        pip_requirements=pinned_requirements(),
    )
    return info.model_uri


# What loading the model imports (rime's own code travels in code_paths; it is not on PyPI).
RUNTIME_PACKAGES = ("torch", "transformers", "safetensors", "pillow", "numpy", "pandas", "pyyaml", "mlflow")


def pinned_requirements() -> list[str]:
    """This environment's versions of the runtime packages, so `mlflow models serve` or a spark_udf
    rebuilds the stack that produced the embeddings (local version tags such as ``+cpu`` dropped: the
    serving host picks its own torch build)."""
    from importlib.metadata import version

    return [f"{p}=={version(p).split('+')[0]}" for p in RUNTIME_PACKAGES]
