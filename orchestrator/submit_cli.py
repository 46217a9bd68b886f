"""The ``rime submit``, ``rime jobs`` and ``rime profile`` commands: argument parsing and printing around
``orchestrator.submit`` (what a job is, checked before it exists) and ``orchestrator.jobs`` (the Ray Jobs
client), so neither of those imports the other's command-line side."""

from __future__ import annotations

import shlex
import sys

from .jobs import cmd_jobs, follow, submit
from .profiles import check_fits, load_profile, profile_overrides
from .submit import DEFAULT_ADDRESS, JobSpec, build_job, normalize_address


def _print_warnings(spec: JobSpec) -> None:
    for w in spec.warnings:
        print(f"rime submit: warning: {w}", file=sys.stderr)


def cmd_submit(args) -> int:
    address = normalize_address(args.address)
    spec = build_job(
        args.config,
        args.set,
        profile=args.profile,
        working_dir=args.working_dir,
        env=args.env,
        resume=args.resume,
        overwrite=args.overwrite,
        python=args.python,
        submission_id=args.submission_id,
    )
    _print_warnings(spec)
    if args.dry_run:
        import json

        print(
            json.dumps(
                {
                    "address": address,
                    "submission_id": spec.submission_id,
                    "entrypoint": spec.entrypoint,
                    "runtime_env": spec.runtime_env,
                    "metadata": spec.metadata,
                },
                indent=2,
            )
        )
        return 0
    job_id = submit(spec, address, args.entrypoint_num_cpus, args.timeout)
    print(f"submitted job {job_id} to {address}")
    print(f"  logs:   rime jobs logs {job_id} --address {address} --follow")
    print(f"  status: rime jobs status {job_id} --address {address}")
    sys.stdout.flush()
    if not args.follow:
        return 0
    from ray.job_submission import JobSubmissionClient

    try:
        status = follow(JobSubmissionClient(address), job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running (rime jobs stop {job_id} --address {address})", file=sys.stderr)
        return 130
    print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def cmd_profile(args) -> int:
    prof = load_profile(args.profile)
    if args.check_config:
        from .config import load_config

        load_config(args.check_config, profile_overrides(prof))
    placed = check_fits(prof)
    if args.sets:
        print(" ".join(f"--set {shlex.quote(s)}" for s in profile_overrides(prof)))
        return 0
    tot = prof.total
    print(f"{prof.name}: {prof.description}".rstrip(": "))
    print(f"  cluster: {tot['CPU']:g} CPU, {tot['GPU']:g} GPU in {sum(n.count for n in prof.nodes)} node(s)")
    for node, roles in placed.items():
        print(f"  {node}: {', '.join(roles) or '(driver only)'}")
    print("  overrides: " + " ".join(f"--set {shlex.quote(s)}" for s in profile_overrides(prof)))
    return 0


def add_parsers(sub) -> None:
    """Register ``submit``, ``jobs`` and ``profile`` on the ``rime`` CLI's subparsers."""
    s = sub.add_parser("submit", help="run `rime train CONFIG` on a Ray cluster through the Ray Jobs API")
    s.add_argument("config")
    s.add_argument(
        "--address", default=None, help=f"Ray dashboard address (default $RAY_API_SERVER_ADDRESS, else {DEFAULT_ADDRESS})"
    )
    s.add_argument("--profile", default=None, help="clusters/profiles/<size>.yaml: roles -> resources, as config overrides")
    s.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value (after the profile)"
    )
    s.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="env var for the job (MLFLOW_TRACKING_URI is forwarded by default)",
    )
    s.add_argument("--working-dir", default=None, help="folder uploaded to the cluster (default: the current directory)")
    s.add_argument("--follow", action="store_true", help="stream the job's logs until it ends; exit 0 only if it SUCCEEDED")
    s.add_argument("--resume", action="store_true")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--python", default="python", help="Python on the head that has rime's dependencies (default: python)")
    s.add_argument("--submission-id", default=None)
    s.add_argument("--entrypoint-num-cpus", type=float, default=0.0, help="CPUs reserved for the driver (default 0)")
    s.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the dashboard to answer")
    s.add_argument("--dry-run", action="store_true", help="validate and print the job without submitting")
    s.set_defaults(func=cmd_submit)

    j = sub.add_parser("jobs", help="list, inspect, stop and read logs of Ray jobs (same API as rime submit)")
    jsub = j.add_subparsers(dest="jobs_command", required=True)
    for name, help_ in (
        ("list", "all jobs on the cluster"),
        ("status", "a job's status"),
        ("logs", "a job's logs"),
        ("stop", "stop a running job"),
    ):
        c = jsub.add_parser(name, help=help_)
        if name != "list":
            c.add_argument("job_id")
        if name in ("status", "stop"):
            c.add_argument("--wait", type=float, default=0, metavar="SECONDS", help="wait up to SECONDS for the job to end")
        if name == "logs":
            c.add_argument("--follow", action="store_true")
        c.add_argument("--address", default=None)
        c.add_argument("--timeout", type=float, default=5.0)
    j.set_defaults(func=cmd_jobs)

    p = sub.add_parser("profile", help="show how a cluster profile places the roles, or print it as --set overrides")
    p.add_argument("profile")
    p.add_argument("--sets", action="store_true", help="print only the --set overrides")
    p.add_argument("--check-config", default=None, metavar="CONFIG", help="also validate CONFIG with the overrides")
    p.set_defaults(func=cmd_profile)
