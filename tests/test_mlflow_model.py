"""The trained embedder logged as an MLflow pyfunc model loads back and returns the same embeddings."""

from __future__ import annotations

import numpy as np
import pandas as pd


def test_pyfunc_round_trip(tiny_latent, tmp_path):
    import mlflow

    from orchestrator.mlflow_model import log_embedder_model

    tiny = tiny_latent
    saved = tiny.save(tmp_path / "emb")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("t")
    with mlflow.start_run():
        uri = log_embedder_model(str(saved))
    model = mlflow.pyfunc.load_model(uri)
    texts = ["a red circle", "a blue square left of a green cross"]
    got = model.predict(pd.DataFrame({"text": texts}), params={"mode": "disc"})
    np.testing.assert_allclose(got, tiny.embed(texts).vectors, atol=1e-5)
    gen = model.predict(pd.DataFrame({"text": texts}), params={"mode": "gen", "max_new_tokens": 4})
    assert gen.shape == (2, 128)
    latent = model.predict(pd.DataFrame({"text": texts}), params={"mode": "latent", "latent_steps": 3})
    np.testing.assert_allclose(latent, tiny.embed(texts, mode="latent", steps=3).vectors, atol=1e-5)
