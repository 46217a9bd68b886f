"""The ``rime`` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import json
import sys

# Nothing heavy at import time: rime_model pulls in torch (seconds), so each handler imports what it uses and
# `rime submit` / `jobs` / `profile` with a bad config or address fail in about a second.


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from .quickstart import run_quickstart

    run_quickstart(model=args.model, n_scenes=args.scenes, seed=args.seed, out_dir=args.out)
    return 0


def _cmd_zoo(args: argparse.Namespace) -> int:
    from rime_model.zoo import BUILDERS, ensure_zoo_model

    names = list(BUILDERS) if args.name == "all" else [args.name]
    for name in names:
        print(f"{name}: {ensure_zoo_model(name, seed=args.seed, rebuild=args.rebuild)}")
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from rime_model import GenerationConfig, InputError, load_embedder

    if not args.text and not args.image:
        raise InputError(None, "--text/--image", "give at least one --text or --image")
    n = max(len(args.text), len(args.image))
    items = [
        {
            "text": args.text[i] if i < len(args.text) else None,
            "image": args.image[i] if i < len(args.image) else None,
            **({"instruction": args.instruction} if args.instruction else {}),
        }
        for i in range(n)
    ]
    emb = load_embedder(args.model)
    res = emb.embed(
        items, mode=args.mode, generation=GenerationConfig(max_new_tokens=args.max_new_tokens), steps=args.latent_steps
    )
    for i in range(n):
        row = {
            "index": i,
            "mode": res.mode,
            "dim": int(res.vectors.shape[1]),
            "head": [round(float(x), 5) for x in res.vectors[i][:8]],
        }
        if res.rewrites is not None:
            row["rewrite"] = res.rewrites[i].text
            row["rewrite_tokens"] = res.rewrites[i].num_tokens
        print(json.dumps(row))
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    if args.data_command == "synth":
        from rime_data.synth import TASKS, write_synth

        tasks = tuple(args.tasks.split(",")) if args.tasks else TASKS
        train = args.train if args.train is not None else 0 if args.split_style == "transfer" else 200
        sizes = {"train": train, "val": args.val, "test": args.test}
        counts = write_synth(
            args.out,
            {k: v for k, v in sizes.items() if v > 0},
            seed=args.seed,
            tasks=tasks,
            image_size=args.image_size,
            style=args.split_style,
        )
        print(json.dumps({"out": args.out, "style": args.split_style, "splits": counts}))
        return 0
    if args.data_command == "import-train":
        from rime_data.train_import import import_train

        summary = import_train(args.files, args.image_root, args.out, split=args.split, task=args.task)
    else:
        from rime_data.mmeb import import_mmeb

        summary = import_mmeb(args.files, args.image_root, args.out, split=args.split)
    print(json.dumps(summary))
    if summary["errors"]:
        msg = f"{summary['errors']} row(s) skipped; reasons in {summary['errors_file']}"
        print(f"rime data {args.data_command}: {msg}", file=sys.stderr)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rime_model import GenerationConfig, load_embedder
    from rime_model.zoo import cache_dir

    from .eval_report import format_table, log_to_mlflow, write_report
    from .evaluate import evaluate
    from .tracking import tracking_uri_or_none, use_experiment

    emb = load_embedder(args.model)
    result = evaluate(
        emb,
        args.data,
        split=args.split,
        query_modes=tuple(args.query_mode.split(",")),
        cand_modes=tuple(args.cand_mode.split(",")),
        batch_size=args.batch_size,
        generation=GenerationConfig(max_new_tokens=args.max_new_tokens),
        tasks=tuple(args.tasks.split(",")) if args.tasks else None,
        max_queries_per_task=args.max_queries_per_task,
        cache_dir=cache_dir() / "eval",
        model_tag=_model_tag(args.model),
        latent_steps=args.latent_steps,
        dims=args.dims,
    )
    print(format_table(result, args.metric))
    if result.latent_steps is not None:
        print(f"latent mode: {result.latent_steps} latent step(s)")
    if result.rewrite_tokens_mean is not None:
        print(f"mean rewrite length: {result.rewrite_tokens_mean:.1f} tokens")
    if result.skipped:
        print(f"skipped {len(result.skipped)} row(s) that could not be used (listed in the report)", file=sys.stderr)
    params = {
        "model": args.model,
        "data": args.data,
        "split": args.split,
        "query_mode": args.query_mode,
        "cand_mode": args.cand_mode,
    }
    if result.latent_steps is not None:  # two evals of one model at two K differ only here
        params["latent_steps"] = result.latent_steps
    if result.dims is not None:  # likewise two evals at two truncations
        params["dims"] = result.dims
    report = write_report(result, Path(args.out), params, per_query=args.per_query)
    print(f"report: {report}")
    uri = tracking_uri_or_none(args.mlflow)
    if uri:
        use_experiment(uri, args.experiment)
        print(f"mlflow run: {log_to_mlflow(result, report, params)} ({uri})")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    import json

    from .compare import CompareError, compare_files, format_comparison, format_runs_summary, summarize_runs

    reports = args.reports
    try:
        if len(reports) < 2 or len(reports) % 2:
            raise CompareError(f"give reports in pairs, A B [A2 B2 ...] (one pair per seed); got {len(reports)}")
        pairs = list(zip(reports[0::2], reports[1::2]))
        comps = [
            compare_files(a, b, pair=args.pair, metric=args.metric, resamples=args.resamples, seed=args.seed) for a, b in pairs
        ]
        groups = [g.strip() for g in args.groups.split(",")] if args.groups else None
        summary = summarize_runs(comps, groups) if len(comps) > 1 or groups else None
    except CompareError as e:
        print(f"rime compare: {e}", file=sys.stderr)
        return 2
    print("\n".join(format_comparison(c, a, b) for c, (a, b) in zip(comps, pairs)))
    if summary is not None:
        print(format_runs_summary(summary))
    if args.json:
        out = comps[0].to_dict() if summary is None else {"runs": [c.to_dict() for c in comps], "summary": summary.to_dict()}
        print(json.dumps(out))
    return 0


def _cmd_ablate(args: argparse.Namespace) -> int:
    from .ablate import run

    return run(args)


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .run_summary import format_summary
    from .train import train

    cfg = load_config(args.config, args.set)
    summary = train(cfg, resume=args.resume, overwrite=args.overwrite, verbose=args.verbose)
    print(format_summary(summary))
    return 0


def _cmd_config_show(args: argparse.Namespace) -> int:
    from .config import apply_overrides, config_yaml, load_config, parse_config

    cfg = load_config(args.config, args.set) if args.config else parse_config(apply_overrides({}, args.set))
    source = " ".join(["rime config show", *([args.config] if args.config else []), *(f"--set {s}" for s in args.set)])
    print(f"# {source}: the resolved config, every default included\n" + config_yaml(cfg), end="")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from .serving import run_server

    run_server(
        model=args.model,
        config=args.config,
        host=args.host,
        port=args.port,
        replicas=args.replicas,
        block=not args.no_block,
        model_name=args.model_name,
        api_keys=args.api_key,
    )
    return 0


def _model_tag(spec: str) -> str | None:
    """Identity of a model on disk for the candidate cache (zoo names are seeded and fixed)."""
    from pathlib import Path

    from rime_model.zoo import BUILDERS, ZOO_VERSION

    if spec in BUILDERS:
        return f"zoo:{spec}:v{ZOO_VERSION}"
    weights = sorted(Path(spec).glob("*.safetensors")) if Path(spec).is_dir() else []
    if not weights:
        return None
    return f"{Path(spec).resolve()}:" + ",".join(f"{w.name}:{w.stat().st_size}:{w.stat().st_mtime_ns}" for w in weights)


COMPARE_JSON_HELP = """\
--json prints one line last. One pair: the pair's object
  {pair, metric, n, mean_a, mean_b, diff, ci_low, ci_high, only_a, only_b, p_mcnemar, not_shared}
(diff = mean_b - mean_a; only_a/only_b/p_mcnemar are null for graded metrics).
Several pairs (or --groups): {"runs": [one such object per pair], "summary":
  {pair, metric, runs, diffs, groups, unit, unit_diffs, mean_diff, sd, ci_low, ci_high, p_t,
   b_better, a_better, test}}
where unit is "run" (unit_diffs = diffs) or "group" (unit_diffs = per-group means, first-seen order)
and ci_low..ci_high is the 95% Student-t interval of mean_diff over the units; test is "t", or "sign"
when the units are all equal (no t statistic: p_t is then the exact sign test's p).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rime", description="Generative multimodal embeddings: train (RIME, PLUME) and serve on Ray."
    )
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quickstart", help="build the tiny model, embed generated scenes in disc and gen modes, print a table")
    q.add_argument("--model", default="tiny", help="zoo name, hf:<repo-or-path>, or a saved embedder folder")
    q.add_argument("--scenes", type=int, default=16)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", default="runs/quickstart")
    q.set_defaults(func=_cmd_quickstart)

    z = sub.add_parser("zoo", help="build offline zoo models into the cache (RIME_CACHE, default ~/.cache/rime)")
    z.add_argument("name", choices=["tiny", "small", "all"])
    z.add_argument("--seed", type=int, default=0)
    z.add_argument("--rebuild", action="store_true")
    z.set_defaults(func=_cmd_zoo)

    e = sub.add_parser("embed", help="embed texts and/or images, print one JSON line per item")
    e.add_argument("--model", default="tiny")
    e.add_argument("--mode", choices=["disc", "gen", "latent"], default="disc")
    e.add_argument("--latent-steps", type=int, default=None, help="K of latent mode (default: the model's own, else 8)")
    e.add_argument("--text", action="append", default=[], help="repeatable; paired with --image by position")
    e.add_argument("--image", action="append", default=[], help="image path, repeatable")
    e.add_argument("--instruction", default=None)
    e.add_argument("--max-new-tokens", type=int, default=32)
    e.set_defaults(func=_cmd_embed)

    cf = sub.add_parser("config", help="inspect configs")
    cfsub = cf.add_subparsers(dest="config_command", required=True)
    show = cfsub.add_parser("show", help="print the fully resolved config (every default) as YAML")
    show.add_argument("config", nargs="?", default=None, help="YAML config (default: no file, only the defaults)")
    show.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    show.set_defaults(func=_cmd_config_show)

    t = sub.add_parser("train", help="run the stages of a YAML config (local Ray in-process unless cluster.address)")
    t.add_argument("config")
    t.add_argument("--resume", action="store_true", help="continue the run dir's latest checkpoint (same step, same MLflow run)")
    t.add_argument("--overwrite", action="store_true", help="delete an existing run dir of the same name first")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    t.add_argument(
        "--verbose",
        action="store_true",
        help="also show Ray Data's execution reports and debug lines (always in <run dir>/train.log)",
    )
    t.set_defaults(func=_cmd_train)

    sv = sub.add_parser("serve", help="serve /v1/embeddings on Ray Serve (local Ray in-process, 127.0.0.1 by default)")
    sv.add_argument(
        "--model", default=None, help="zoo name, hf:<repo-or-path>, saved folder or MLflow models:/ URI; overrides the config"
    )
    sv.add_argument("--config", default="configs/serve.yaml", help="Ray Serve config file")
    sv.add_argument("--model-name", default=None, help="name reported by /v1/models and responses (default: --model as given)")
    sv.add_argument(
        "--api-key",
        action="append",
        default=None,
        help="require 'Authorization: Bearer KEY' (repeat for several keys; also $RIME_API_KEY, comma-separated)",
    )
    sv.add_argument("--host", default=None)
    sv.add_argument("--port", type=int, default=None)
    sv.add_argument("--replicas", type=int, default=None, help="fixed replica count instead of the config's autoscaling")
    sv.add_argument("--no-block", action="store_true", help="deploy and return (for scripts)")
    sv.set_defaults(func=_cmd_serve)

    d = sub.add_parser("data", help="make datasets: procedural benchmark, MMEB-V2 and training-pair import, hard negatives")
    dsub = d.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("synth", help="generate the procedural benchmark (train/val/test parquet)")
    s.add_argument("--out", required=True)
    s.add_argument(
        "--train",
        type=int,
        default=None,
        help="queries per task in train (0 = skip split; default 200, 0 with --split-style transfer)",
    )
    s.add_argument("--val", type=int, default=50)
    s.add_argument("--test", type=int, default=50)
    s.add_argument(
        "--tasks",
        default=None,
        help="comma list; default t2i,i2t,cls,vqa,composed,referring (opt-in: referring_compose, referring_chain)",
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=None, help="classic style only (default 84); the others draw sizes")
    s.add_argument(
        "--split-style",
        default="classic",
        choices=["classic", "randomised", "transfer"],
        help="classic: today's fixed rendering and wording (default); randomised: training ranges of size, "
        "layout, look and wording; transfer: val/test only, settings outside the training ranges",
    )
    m = dsub.add_parser("import-mmeb", help="convert MMEB eval files (.jsonl/.parquet) into rime's schema")
    m.add_argument("files", nargs="+")
    m.add_argument("--image-root", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--split", default="test")
    it = dsub.add_parser("import-train", help="convert training pairs (VLM2Vec or query/positive) into rime's schema")
    it.add_argument("files", nargs="+")
    it.add_argument("--image-root", required=True, help="folder the rows' image paths are relative to")
    it.add_argument("--out", required=True)
    it.add_argument("--split", default="train")
    it.add_argument("--task", default=None, help="task of rows without a task column (default: the file's name)")
    from .mine_cli import add_parser as add_mine_parser

    d.set_defaults(func=_cmd_data)
    add_mine_parser(dsub)  # mine-negatives, with its own handler (a subcommand's default wins over data's)

    v = sub.add_parser("eval", help="retrieval eval (Hit@1/5, NDCG@5, MRR) in any query/candidate mode pair")
    v.add_argument("--model", default="tiny")
    v.add_argument("--data", required=True, help="dataset folder with <split>/queries.parquet and candidates.parquet")
    v.add_argument("--split", default="test")
    v.add_argument("--query-mode", default="disc,gen", help="comma list of disc, gen, oracle, latent")
    v.add_argument("--cand-mode", default="disc,gen", help="comma list of disc, gen, latent")
    v.add_argument("--latent-steps", type=int, default=None, help="K of latent mode (default: the model's own, else 8)")
    v.add_argument(
        "--dims",
        type=int,
        default=None,
        help="score the first DIMS components of queries and candidates, re-normalised (Matryoshka; default: all)",
    )
    v.add_argument("--tasks", default=None)
    v.add_argument("--max-queries-per-task", type=int, default=None)
    v.add_argument("--batch-size", type=int, default=16)
    v.add_argument("--max-new-tokens", type=int, default=32)
    v.add_argument("--metric", default="hit@1", choices=["hit@1", "hit@5", "ndcg@5", "mrr"])
    v.add_argument("--out", default="runs/eval/report.json")
    v.add_argument("--mlflow", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI; none = no tracking)")
    v.add_argument("--experiment", default="rime-eval")
    v.add_argument("--per-query", action="store_true", help="also write every query's metrics (for rime compare)")
    v.set_defaults(func=_cmd_eval)

    c = sub.add_parser(
        "compare",
        help="paired comparison of `rime eval --per-query` reports on the same queries: "
        "A B, or A1 B1 A2 B2 ... (one pair per seed) for an across-seed test as well",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=COMPARE_JSON_HELP,
    )
    c.add_argument(
        "reports",
        nargs="+",
        metavar="REPORT",
        help="A B [A2 B2 ...]: baseline then compared report, per pair; differences are B - A",
    )
    c.add_argument(
        "--pair", default="latent->latent", help="query->candidate mode pair; quote it in a shell: --pair 'disc->disc'"
    )
    c.add_argument("--metric", default="hit@1", choices=["hit@1", "hit@5", "ndcg@5", "mrr"])
    c.add_argument("--resamples", type=int, default=10_000, help="paired bootstrap resamples")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument(
        "--groups",
        default=None,
        metavar="G1,G2,...",
        help="one label per pair (e.g. its start checkpoint): average the pairs of a group, then test "
        "across groups, for pairs that share a checkpoint and so are not independent",
    )
    c.add_argument("--json", action="store_true", help="also print the result as one JSON line (shape below)")
    c.set_defaults(func=_cmd_compare)

    from .ablate import add_parser as add_ablate_parser

    add_ablate_parser(sub).set_defaults(func=_cmd_ablate)  # train arms x start models x seeds, then compare

    from .mlflow_server import add_parser as add_mlflow_server_parser
    from .submit_cli import add_parsers as add_submit_parsers

    add_submit_parsers(sub)  # submit, jobs, profile (Ray Jobs API, clusters/profiles)
    add_mlflow_server_parser(sub)  # mlflow-server
    return p


def main(argv: list[str] | None = None) -> int:
    from .logs import setup_console

    args = build_parser().parse_args(argv)
    setup_console(verbose=getattr(args, "verbose", False))
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # rime_model's InputError is a ValueError
        print(f"rime {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
