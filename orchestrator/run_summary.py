"""What ``rime train`` prints when a run ends: the summary's headline keys as JSON and, when the run was
also evaluated on a transfer split (``data.transfer_path``), Hit@1 in-distribution and on transfer side by
side, with their ratio: the number that says whether what was learnt carries over to pictures and
sentences made differently from the training data."""

from __future__ import annotations

import json
from typing import Any

PRINTED_KEYS = (
    "run_dir",
    "mlflow_run_id",
    "steps",
    "baseline",
    "baseline_transfer",
    "final",
    "final_transfer",
    "model_uri",
    "bad_rows",
)


def transfer_table(final: dict[str, dict[str, float]], transfer: dict[str, dict[str, float]], metric: str = "hit@1") -> str:
    """Rows: the mode pairs both evals scored; columns: in-distribution, transfer, transfer / in-dist."""
    lines = [f"{metric:<14}{'in-dist':>9}{'transfer':>10}{'ratio':>8}"]
    for pair in (p for p in final if p in transfer):
        a, b = final[pair][metric], transfer[pair][metric]
        ratio = f"{b / a:.2f}" if a > 0 else "-"
        lines.append(f"{pair:<14}{a:>9.3f}{b:>10.3f}{ratio:>8}")
    return "\n".join(lines)


def format_summary(summary: dict[str, Any]) -> str:
    """The printed end of a run: the side-by-side table (when there is a transfer eval), then the JSON."""
    out = json.dumps({k: v for k, v in summary.items() if k in PRINTED_KEYS}, indent=2)
    if summary.get("final") and summary.get("final_transfer"):
        out = (
            "final Hit@1, in-distribution vs transfer split:\n"
            + transfer_table(summary["final"], summary["final_transfer"])
            + "\n"
            + out
        )
    return out
