"""MLflow model URIs (``models:/<model id>``, ``runs:/<run id>/embedder``) as embedder folders.

Training logs the embedder as a pyfunc model whose ``embedder`` artifact is the saved folder
(``orchestrator.mlflow_model``). Loading one for serving, eval or as a start model needs that folder,
not the pyfunc: the whole model is downloaded and the folder is found through ``MLmodel``, which
names the artifact's path (``artifacts/<folder name>``), so no path inside the model is guessed.
"""

from __future__ import annotations

from pathlib import Path

MLFLOW_SCHEMES = ("models:/", "runs:/")


def is_mlflow_uri(spec: str) -> bool:
    return str(spec).startswith(MLFLOW_SCHEMES)


def download_embedder(uri: str) -> Path:
    """Download the MLflow model at ``uri`` (tracking server from $MLFLOW_TRACKING_URI) and return its
    embedder folder; a URI that is not a rime model raises ValueError naming what is missing."""
    import mlflow
    import yaml
    from mlflow.exceptions import MlflowException

    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri.rstrip("/")))
    except (MlflowException, OSError) as e:
        raise ValueError(
            f"model: cannot download {uri!r} from the MLflow tracking server "
            f"({str(e).splitlines()[0][:200]}); check MLFLOW_TRACKING_URI and the id "
            "(models:/<model id> as training prints it, or runs:/<run id>/embedder)"
        ) from e
    mlmodel = local / "MLmodel"
    if not mlmodel.is_file():
        raise ValueError(
            f"model: {uri!r} is not an MLflow model (no MLmodel file in it); give the logged model's URI, "
            "models:/<model id> or runs:/<run id>/embedder"
        )
    flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function", {})
    artifact = (flavor.get("artifacts") or {}).get("embedder") or {}
    if not artifact.get("path"):
        raise ValueError(f"model: {uri!r} is an MLflow model without an 'embedder' artifact, so not one rime logged")
    return local / artifact["path"]
