"""``rime data mine-negatives``: its options and handler (the work is ``rime_data.mine_negatives``).
Kept free of heavy imports: the parser is built for every ``rime`` command."""

from __future__ import annotations

import argparse
import json
import sys


def _margin(value: str) -> float | None:
    """A margin as a number >= 0, or ``off``."""
    if value.strip().lower() in ("off", "none"):
        return None
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'off', got {value!r}") from None


def add_parser(dsub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    m = dsub.add_parser(
        "mine-negatives",
        help="write each query's top-k non-positive candidates under a frozen model (hard_negatives column)",
    )
    m.add_argument("--model", required=True, help="zoo name, hf:<repo-or-path>, saved embedder folder or MLflow URI")
    m.add_argument("--data", required=True, help="dataset folder with <split>/queries.parquet and candidates.parquet")
    m.add_argument("--split", default="train")
    m.add_argument("--k", type=int, default=8, help="negatives per query (fewer where the pool has fewer)")
    m.add_argument(
        "--absolute-margin",
        "--margin",
        type=_margin,
        default=0.05,
        help="drop candidates scoring above (positive score - MARGIN): likely unlabelled positives ('off' = no rule)",
    )
    m.add_argument(
        "--relative-margin",
        type=_margin,
        default=None,
        help="drop candidates scoring above (1 - R) x the positive's score (default off)",
    )
    m.add_argument("--out", default=None, help="dataset folder to write (default: --data, in place)")
    m.add_argument("--workers", type=int, default=2, help="embedder actors in the Ray Data pool")
    m.add_argument("--num-cpus", type=float, default=0.25, help="CPUs per embedder actor")
    m.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per embedder actor")
    m.add_argument("--batch-size", type=int, default=16)
    m.set_defaults(func=run)
    return m


def run(args: argparse.Namespace) -> int:
    from rime_data.mine_negatives import MineConfig, mine_negatives

    from .logs import quiet_ray_data

    quiet_ray_data(False)  # Ray Data's progress reports stay in its log; the summary is the output
    cfg = MineConfig(
        k=args.k,
        absolute_margin=args.absolute_margin,
        relative_margin=args.relative_margin,
        workers=args.workers,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        batch_size=args.batch_size,
    )
    summary = mine_negatives(args.model, args.data, split=args.split, out=args.out, cfg=cfg)
    print(json.dumps(summary))
    if summary["bad_rows"]:
        print(
            f"rime data mine-negatives: {summary['bad_rows']} row(s) not mined; reasons in {summary['errors_file']}",
            file=sys.stderr,
        )
    return 0
