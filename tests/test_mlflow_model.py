"""The trained embedder logged as an MLflow pyfunc model loads back and returns the same embeddings."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd


def test_pyfunc_round_trip(tiny_latent, tmp_path):
    import mlflow

    from orchestrator.mlflow_model import log_embedder_model
    from orchestrator.tracking import use_experiment

    tiny = tiny_latent
    saved = tiny.save(tmp_path / "emb")
    use_experiment(f"sqlite:///{tmp_path / 'mlflow.db'}", "t")  # artifacts beside the db, not in the cwd's ./mlruns
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


def test_mlflow_model_uris_load_as_embedders_anywhere_a_model_is_taken(tiny, tmp_path, monkeypatch):
    """`models:/<id>` (what training prints) and `runs:/<run>/embedder` load through load_embedder, so
    `rime serve/eval/embed --model` and `model.spec` take them; the logged model carries rime's code
    and a pinned stack (rime is not on PyPI), and a wrong URI names the fix."""
    import mlflow
    import pytest
    import yaml

    from orchestrator.mlflow_model import log_embedder_model
    from orchestrator.tracking import use_experiment
    from rime_model import load_embedder

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    use_experiment(f"sqlite:///{tmp_path / 'mlflow.db'}", "uris")
    with mlflow.start_run() as run:
        uri = log_embedder_model(str(tiny.save(tmp_path / "final")))
    texts = ["a red circle", "a blue square"]
    for spec in (uri, f"runs:/{run.info.run_id}/embedder"):
        np.testing.assert_allclose(load_embedder(spec).embed(texts).vectors, tiny.embed(texts).vectors, atol=1e-6)
    local = mlflow.artifacts.download_artifacts(uri)
    reqs = open(f"{local}/requirements.txt").read().split()
    assert "rime" not in reqs and any(r.startswith("torch==") for r in reqs) and any(r.startswith("transformers==") for r in reqs)
    code = yaml.safe_load(open(f"{local}/MLmodel"))["flavors"]["python_function"]["code"]
    assert os.path.isfile(f"{local}/{code}/rime_model/embedder.py") and os.path.isfile(
        f"{local}/{code}/orchestrator/mlflow_model.py"
    )
    with pytest.raises(ValueError, match="cannot download 'models:/m-nope'.*MLFLOW_TRACKING_URI"):
        load_embedder("models:/m-nope")
    with pytest.raises(ValueError, match="not an MLflow model"):
        load_embedder(f"runs:/{run.info.run_id}/embedder/artifacts")
