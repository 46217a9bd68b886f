"""``rime ablate``: an A/B(/C...) ablation as one command, for PLUME's curriculum as for Refine-RL's losses.

Every arm (a named list of config overrides) is trained from every start model with every seed, each
run is scored per query on the same fresh test queries, and every arm B is compared with the first
arm A, paired per seed and across seeds with the start model as the group (``rime compare --groups``):
a single pair says little, since the training seed moves Hit@1 more than the test queries do, and
pairs fine-tuned from one checkpoint are not independent.

Everything checkable is checked before the first run trains (arguments, each arm's config, the
training arguments, the ``--submit`` address); reports are named by the plan alone, so a re-run
skips what is scored. The work is in ``ablate_plan`` (what runs), ``ablate_arms`` (training and
scoring one run) and here (checking, running the plan, comparing).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from .ablate_arms import ArmError, Backend, LocalBackend, Settings, ensure_test_data, rime_args, rime_command
from .ablate_plan import AblateError, Plan, Task, check_not_reserved, control_path, make_plan, report_path

METRICS = ["hit@1", "hit@5", "ndcg@5", "mrr"]
EPILOG = """\
Arms: --arm NAME=OVERRIDES, repeated; OVERRIDES are section.key=value separated by spaces (quote the
whole argument), e.g. --arm full= --arm nokl=refine_rl.kl_coef=0 --arm 'nonce=refine_rl.lambda_nce=0'.
The first arm is the reference A; every other arm B is compared with it (B - A). Without --arm:
PLUME's curriculum ablation,
  --arm 'nocur=plume.curriculum=false plume.probe_queries_per_task=0' --arm cur= --zero-step-control cur
Each run is `rime train CONFIG --set run.name=NAME-m<i>-seed<s>-<arm> --set run.seed=<s>
--set run.out_dir=RUNS_DIR --set model.spec=<start i> [--set ...] [TRAIN_ARGS] [the arm's overrides]`,
scored like `rime eval --per-query` in the config's eval.query_modes x eval.cand_modes.

OUT gets reports/m<i>-seed<s>-<arm>.json (and -k0.json: the zero-step control), logs/, and
compare.json (two arms) or compare-<arm>.json per arm B (three or more), plus latent_steps.json with
the zero-step control; each holds `rime compare --json`'s {"runs": [...], "summary": {...}}. Re-running
skips every run whose report exists (a run trained again is also re-scored at 0 steps); after a failed
run no new run starts, the running ones finish and keep their reports, and the exit status is 1.
With --submit, RUNS_DIR is made absolute (the job runs in an uploaded copy of the checkout), a local
start model goes by its absolute path, and with MLFLOW_TRACKING_URI an http(s) server each run is
scored from the models:/ URI its job logged (else from RUNS_DIR/<run>/final, which must be visible
here). Stopping rime ablate does not stop a submitted job: `rime jobs stop ID --address ADDRESS`.
"""


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``rime ablate`` on the CLI's subparsers (the caller sets ``func``)."""
    a = sub.add_parser(
        "ablate",
        help="train arms (config overrides) x start models x seeds, score each run per query, "
        "compare every arm with the first, paired and across seeds",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    a.add_argument("--name", required=True, help="names the runs (NAME-m<i>-seed<s>-<arm>) and the default --out")
    a.add_argument(
        "--start",
        required=True,
        metavar="M1[,M2...]",
        help="start models, anything model.spec takes; the pairs of one start model are a group",
    )
    a.add_argument("--seeds", required=True, metavar="S1[,S2...]", help="run seeds; start models x seeds >= 2 pairs")
    a.add_argument(
        "--arm",
        action="append",
        default=None,
        metavar="NAME=OVERRIDES",
        help="an arm (repeat; the first is the reference A); default: PLUME's curriculum ablation (below)",
    )
    a.add_argument(
        "--zero-step-control",
        default=None,
        metavar="ARM|none",
        help="also score ARM's latent mode with 0 latent steps and compare it with itself at its own K "
        "(latent_steps.json): the latent steps' own share (default: cur with the default arms, else none)",
    )
    a.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value in every run (before the arm's own overrides)",
    )
    a.add_argument("--config", default="configs/plume-referring.yaml", help="training config of every arm (default: %(default)s)")
    a.add_argument(
        "--test-data", default="data/synth-ref-test1000", help="fresh test queries, generated when missing (default: %(default)s)"
    )
    a.add_argument(
        "--test-queries", type=_positive, default=1000, help="queries per task scored, and generated (default: %(default)s)"
    )
    a.add_argument("--tasks", default="referring", help="tasks scored, and generated: a comma list (default: %(default)s)")
    a.add_argument("--runs-dir", default="runs", help="where the training runs go (default: %(default)s)")
    a.add_argument("--out", default=None, help="reports, logs and comparisons (default runs/ablations/NAME)")
    a.add_argument(
        "--pair", default="latent->latent", help="query->candidate mode pair compared; quote it in a shell (default: %(default)s)"
    )
    a.add_argument("--metric", default="hit@1", choices=METRICS, help="per-query metric compared (default: %(default)s)")
    a.add_argument(
        "--parallel",
        type=_positive,
        default=1,
        metavar="N",
        help="runs trained at once (default: 1); on GPUs join one Ray cluster (cluster.address=auto) so Ray places them",
    )
    a.add_argument(
        "--submit",
        default=None,
        metavar="ADDRESS",
        help="a Ray dashboard (http://HEAD:8265): every run trains as a Ray job (rime submit --follow)",
    )
    a.add_argument(
        "train_args",
        nargs="*",
        metavar="-- TRAIN_ARGS",
        help="after --: more arguments for every `rime train` (or `rime submit`, e.g. --profile P)",
    )
    return a


def say(msg: str) -> None:
    """Progress on stderr (results go to stdout), without breaking the progress bar."""
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)


# ------------------------------------------------------------------------ checking
def _parse_rime(argv: list[str], what: str) -> argparse.Namespace:
    """``argv`` as the ``rime`` CLI would parse it, or AblateError: unknown train arguments fail here, not per run."""
    from .cli import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            ns, unknown = build_parser().parse_known_args(argv)
    except SystemExit:
        raise AblateError(f"{what}: {err.getvalue().strip().splitlines()[-1]}") from None
    if unknown:
        hint = " (--profile and --env are `rime submit`'s: use --submit)" if argv[0] == "train" else ""
        raise AblateError(f"{what}: `rime {argv[0]}` has no argument {' '.join(unknown)}{hint}")
    return ns


def prepare(args: argparse.Namespace) -> tuple[Plan, Settings]:
    """Parse and check every argument, each arm's config and the --submit address; creates nothing."""
    plan = make_plan(args.name, args.arm, args.start, args.seeds, args.zero_step_control)
    if not Path(args.config).is_file():
        raise AblateError(f"--config {args.config}: file not found; give the training config of the arms")
    submit = _address(args.submit, reach=False) if args.submit else None
    runs_dir = str(Path(args.runs_dir).resolve()) if submit else args.runs_dir
    s = Settings(
        args.config,
        runs_dir,
        args.test_data,
        args.test_queries,
        tuple(t for t in args.tasks.split(",") if t),
        (),
        (),
        (*(a for v in args.set for a in ("--set", v)), *args.train_args),
        submit,
    )
    user = _parse_rime([*rime_command(s), *s.train_args], "the training arguments")
    for ov in user.set:
        check_not_reserved(ov.split("=", 1)[0], "--set" if ov in args.set else "the --set after --")
    s = _check_arms(plan, s)
    _check_pair(plan, s, args.pair)
    if not (Path(s.test_data) / "test" / "queries.parquet").is_file():
        from rime_data.synth import EXTRA_TASKS, TASKS

        bad = [t for t in s.tasks if t not in TASKS + EXTRA_TASKS]
        if bad or not s.tasks:
            raise AblateError(
                f"--tasks {args.tasks}: {bad[0] if bad else 'none'} is not a task --test-data "
                f"{s.test_data} can be generated with; choose from {','.join(TASKS + EXTRA_TASKS)}"
            )
    if submit:
        _address(args.submit, reach=True)
    return plan, s


def _check_arms(plan: Plan, s: Settings) -> Settings:
    """Each arm's run, parsed and its config validated as `rime train` (or `rime submit`) would; returns ``s``
    with the eval modes of the reference arm's config (what every run is scored in)."""
    from .config import load_config

    ref = None
    for arm in plan.arms:
        ns = _parse_rime(rime_args(s, plan.run(0, plan.seeds[0], arm.name)), f"--arm {arm.name}")
        try:
            arm_cfg = load_config(s.config, ns.set)
            if s.submit:
                from .submit import build_job

                build_job(s.config, ns.set, profile=ns.profile, working_dir=ns.working_dir, env=ns.env)
        except (ValueError, RuntimeError) as e:  # ConfigError, ProfileError, SubmitError: they name the key
            raise AblateError(f"--arm {arm.name}: {e}") from None
        ref = arm_cfg if ref is None else ref
    return replace(s, query_modes=tuple(ref.eval.query_modes), cand_modes=tuple(ref.eval.cand_modes))


def _check_pair(plan: Plan, s: Settings, pair: str) -> None:
    q, sep, c = pair.partition("->")
    scored = f"query modes {','.join(s.query_modes)} x candidate modes {','.join(s.cand_modes)}"
    if not sep or q not in s.query_modes or c not in s.cand_modes:
        pairs = ", ".join(f"{a}->{b}" for a in s.query_modes for b in s.cand_modes)
        raise AblateError(
            f"--pair {pair}: the runs are scored in {scored} (the config's eval.query_modes and "
            f"eval.cand_modes); pick one of {pairs}, or --set those"
        )
    if plan.control and not ("latent" in s.query_modes and "latent" in s.cand_modes):
        raise AblateError(
            f"--zero-step-control {plan.control}: it is compared latent->latent, but the runs are scored in "
            f"{scored}; --set eval.query_modes and eval.cand_modes to include latent, or give none"
        )


def _address(given: str, reach: bool) -> str:
    """The dashboard's normalized address; ``reach``: once it answers (checked last: it may take seconds)."""
    from .submit import SubmitError, check_address, normalize_address

    try:
        address = normalize_address(given)
        if reach:
            check_address(address)
    except SubmitError as e:  # its message names --address, which is ours --submit
        raise AblateError(f"{str(e).replace('--address', '--submit')}; or drop --submit to train locally") from None
    return address


# ------------------------------------------------------------------------ running
def run_plan(
    plan: Plan,
    out: Path,
    backend: Backend,
    *,
    parallel: int = 1,
    pair: str = "latent->latent",
    metric: str = "hit@1",
    resamples: int = 10_000,
) -> int:
    """Train and score what is missing (``parallel`` runs at once), then compare; the exit status."""
    reports, logs = out / "reports", out / "logs"
    reports.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    tasks = plan.todo(reports)
    n = len(plan.runs())
    say(
        f"[ablate] {plan.name}: {n} runs ({len(plan.arms)} arms x {len(plan.starts)} start models x {len(plan.seeds)} "
        f"seeds); {sum(t.train for t in tasks)} to train, {sum(t.control and not t.train for t in tasks)} to re-score at 0 steps"
    )
    failed = execute(tasks, backend, reports, logs, parallel)
    if failed:
        say(f"rime ablate: {failed} run(s) failed (above); the runs scored so far are kept, re-run to continue")
        return 1
    return compare(plan, out, pair, metric, resamples)


def execute(tasks: list[Task], backend: Backend, reports: Path, logs: Path, parallel: int) -> int:
    """Run ``tasks`` on ``parallel`` threads; after the first failure none starts. Returns how many failed."""
    from tqdm import tqdm

    stop, failed, lock = threading.Event(), [], threading.Lock()
    bar = tqdm(total=len(tasks), desc="runs", unit="run", file=sys.stderr, disable=None)

    def work(task: Task) -> None:
        if stop.is_set():
            return
        try:
            do_task(task, backend, reports, logs)
        except ArmError as e:
            say(f"rime ablate: {e}")
            with lock:
                failed.append(task)
            stop.set()
        except BaseException:
            stop.set()
            raise
        finally:
            bar.update()

    try:
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            try:
                list(pool.map(work, tasks))
            except BaseException:  # Ctrl-C: the queued runs must not start while the running ones finish
                stop.set()
                raise
    finally:
        bar.close()
    return len(failed)


def do_task(task: Task, backend: Backend, reports: Path, logs: Path) -> None:
    """Train and score one run, and/or score its zero-step control from the model its report names."""
    r = task.run
    report = report_path(reports, r)
    if task.train:
        say(f"[ablate] train {r.run_name} (model.spec={r.start}{backend.note})")
        model = backend.train(r, logs / f"{r.run_name}.log")
        say(f"[ablate] eval {r.run_name} ({model})")
        backend.score(r, model, report, logs / f"eval-{r.run_name}.log", zero_steps=False)
        say(f"[ablate] scored {r.run_name}")
    if task.control:
        try:
            model = json.loads(report.read_text())["model"]  # what the report scored: a folder or a models:/ URI
        except (OSError, ValueError, KeyError) as e:
            raise ArmError(f"{report}: cannot read the model it scored ({e}); delete it to train {r.run_name} again") from None
        say(f"[ablate] eval {r.run_name} with 0 latent steps")
        backend.score(r, model, control_path(reports, r), logs / f"eval-{r.run_name}-k0.log", zero_steps=True)


# ------------------------------------------------------------------------ comparing
def compare(plan: Plan, out: Path, pair: str, metric: str, resamples: int = 10_000) -> int:
    """Every comparison printed (as `rime compare` prints it) and written as `rime compare --json`'s object."""
    from .compare import CompareError, compare_files, format_comparison, format_runs_summary, summarize_runs

    for k, cmp in enumerate(plan.comparisons(out)):
        try:
            comps = [compare_files(a, b, pair=cmp.pair or pair, metric=metric, resamples=resamples) for a, b in cmp.reports]
            summary = summarize_runs(comps, plan.groups())
        except CompareError as e:
            say(f"rime ablate: {cmp.path.name}: {e}")
            return 1
        cmp.path.write_text(json.dumps({"runs": [c.to_dict() for c in comps], "summary": summary.to_dict()}, indent=2) + "\n")
        print(("\n" if k else "") + f"[ablate] {cmp.title}")
        print("\n".join(format_comparison(c, str(a), str(b)) for c, (a, b) in zip(comps, cmp.reports)))
        print(format_runs_summary(summary))
        print(f"[ablate] comparison in {cmp.path}")
    print(f"[ablate] reports in {out / 'reports'}, logs in {out / 'logs'}")
    return 0


def run(args: argparse.Namespace) -> int:
    """``rime ablate``: check everything, make the test data, train and score what is missing, compare."""
    try:
        plan, settings = prepare(args)
    except AblateError as e:
        print(f"rime ablate: {e}", file=sys.stderr)
        return 2
    if settings.submit:
        say(f"[ablate] runs train as Ray jobs on {settings.submit}, writing to {settings.runs_dir}")
    ensure_test_data(settings, say)
    out = Path(args.out or Path("runs") / "ablations" / plan.name)
    return run_plan(plan, out, LocalBackend(settings), parallel=args.parallel, pair=args.pair, metric=args.metric)
