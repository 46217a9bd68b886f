"""What ``rime eval`` (and the trainer's evals) hand to people and tools: the task x mode-pair table, the
JSON report (``rime compare`` reads its per-query part) and the MLflow run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .evaluate import EvalResult


def format_table(result: EvalResult, metric: str = "hit@1") -> str:
    """Tasks as rows, mode pairs as columns, plus the MMEB average; the header names truncated dims."""
    pairs = list(result.pairs)
    tasks = sorted({t for agg in result.pairs.values() for t in agg["tasks"]})
    width = max([len(p) for p in pairs] + [8])
    head = metric if result.dims is None else f"{metric}, dims {result.dims}"
    lead = max(12, len(head))
    lines = [f"{head:{lead}s}" + "".join(f"{p:>{width + 2}s}" for p in pairs)]
    for t in tasks:
        lines.append(
            f"{t:{lead}s}"
            + "".join(f"{result.pairs[p]['tasks'].get(t, {}).get(metric, float('nan')):>{width + 2}.3f}" for p in pairs)
        )
    lines.append(f"{'ALL (mean)':{lead}s}" + "".join(f"{result.pairs[p]['all'][metric]:>{width + 2}.3f}" for p in pairs))
    return "\n".join(lines)


def log_to_mlflow(result: EvalResult, report_path: Path, params: dict[str, Any], run_name: str = "eval") -> str:
    """Log metrics, params and the JSON report to the current MLflow tracking URI; returns the run id."""
    import mlflow

    with mlflow.start_run(run_name=run_name) as run:
        mlflow.log_params({k: str(v) for k, v in params.items()})
        mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in result.flat_metrics().items()})
        mlflow.log_metric("eval/n_skipped", len(result.skipped))
        mlflow.log_artifact(str(report_path))
        return run.info.run_id


def write_report(result: EvalResult, path: str | Path, extra: dict | None = None, per_query: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**(extra or {}), **result.to_dict(per_query)}, indent=2))
    return path
