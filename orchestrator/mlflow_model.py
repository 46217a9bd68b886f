"""The trained embedder as an MLflow pyfunc model: ``mlflow.pyfunc.load_model(uri).predict(df)``.

Input: a DataFrame with any of ``text``, ``image`` (encoded bytes, a path or a data URL),
``instruction``; params ``mode`` (disc|gen|latent), ``max_new_tokens`` (gen) and ``latent_steps``
(latent; 0 = the model's own K). Output: one float32 vector
per row (L2-normalised).
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd


class EmbedderPyfunc(mlflow.pyfunc.PythonModel):
    """Loads the saved embedder folder logged as the ``embedder`` artifact."""

    def load_context(self, context) -> None:
        from rime_model import load_embedder

        self.emb = load_embedder(context.artifacts["embedder"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        from rime_model import GenerationConfig

        params = params or {}
        cols = [c for c in ("text", "image", "instruction") if c in model_input.columns]
        items = [{c: (r[c] if isinstance(r[c], (str, bytes)) else None) for c in cols} for r in model_input.to_dict("records")]
        res = self.emb.embed(items, mode=params.get("mode", "disc"),
                             generation=GenerationConfig(max_new_tokens=int(params.get("max_new_tokens", 32))),
                             steps=int(params.get("latent_steps", 0)) or None)
        return res.vectors


def log_embedder_model(embedder_dir: str, name: str = "embedder") -> str:
    """Log ``embedder_dir`` as a pyfunc model in the active run; returns its model URI."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    sig = ModelSignature(
        inputs=Schema([ColSpec("string", "text", required=False), ColSpec("binary", "image", required=False),
                       ColSpec("string", "instruction", required=False)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1))]),
        params=ParamSchema([ParamSpec("mode", "string", "disc"), ParamSpec("max_new_tokens", "long", 32),
                            ParamSpec("latent_steps", "long", 0)]),
    )
    info = mlflow.pyfunc.log_model(
        name=name, python_model=EmbedderPyfunc(), artifacts={"embedder": embedder_dir}, signature=sig,
        pip_requirements=["rime"],  # the project itself; its pinned stack comes with it (constraints.txt)
    )
    return info.model_uri
