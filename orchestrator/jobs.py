"""The Ray Jobs API side of ``rime submit`` / ``rime jobs``: a client for a checked dashboard address,
submitting a ``JobSpec``, following and waiting on a job, and the ``rime jobs list/status/logs/stop``
handler.

It sits apart from ``orchestrator.submit`` (address checks, building the job, the CLI parsers), which
needs no Ray client until a job is actually sent; ``submit`` imports this module only inside the
handlers that talk to a cluster.
"""

from __future__ import annotations

import asyncio
import sys
import time

from .submit import JobSpec, SubmitError, check_address, normalize_address

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def client_for(address: str, timeout_s: float = 5.0):
    """A JobSubmissionClient, after checking the address answers like a Ray dashboard."""
    check_address(address, timeout_s)
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # noqa: BLE001 - the SDK raises bare ConnectionError/RuntimeError
        raise SubmitError(f"--address {address}: {e}") from None


def submit(spec: JobSpec, address: str, entrypoint_num_cpus: float = 0.0, timeout_s: float = 5.0) -> str:
    client = client_for(address, timeout_s)
    try:
        return client.submit_job(
            entrypoint=spec.entrypoint,
            runtime_env=spec.runtime_env,
            submission_id=spec.submission_id,
            metadata=spec.metadata,
            entrypoint_num_cpus=entrypoint_num_cpus or None,
        )
    except Exception as e:  # noqa: BLE001
        raise SubmitError(f"submission to {address} failed: {e}") from None


def follow(client, job_id: str, out=None) -> str:
    """Stream the job's logs until it ends; returns its final status."""
    out = out or sys.stdout

    async def _tail():
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(_tail())
    return wait(client, job_id, timeout_s=60)


def wait(client, job_id: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(1.0)


# --------------------------------------------------------------------------- CLI handler
def cmd_jobs(args) -> int:
    address = normalize_address(args.address)
    client = client_for(address, args.timeout)
    if args.jobs_command == "list":
        jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
        print(f"{'submission_id':44} {'status':10} {'started':19} entrypoint")
        for j in jobs:
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.start_time / 1000)) if j.start_time else "-"
            ep = j.entrypoint if len(j.entrypoint) <= 80 else j.entrypoint[:77] + "..."
            print(f"{str(j.submission_id or j.job_id):44} {str(j.status.value):10} {started:19} {ep}")
        return 0
    job_id = args.job_id
    try:
        info = client.get_job_info(job_id)
    except Exception as e:  # noqa: BLE001
        raise SubmitError(f"job {job_id}: not found at {address} ({str(e).splitlines()[0][:200]})") from None
    if args.jobs_command == "status":
        status = wait(client, job_id, args.wait) if args.wait else str(info.status.value)
        print(f"{job_id}: {status}" + (f" ({info.message})" if info.message and status != "RUNNING" else ""))
        return 0 if status != "FAILED" else 1
    if args.jobs_command == "logs":
        if args.follow:
            status = follow(client, job_id)
            print(f"job {job_id}: {status}")
        else:
            sys.stdout.write(client.get_job_logs(job_id))
        return 0
    if args.jobs_command == "stop":
        stopped = client.stop_job(job_id)
        status = wait(client, job_id, args.wait) if args.wait else str(client.get_job_status(job_id).value)
        print(f"{job_id}: {'stop requested' if stopped else 'already finished'}; status {status}")
        return 0
    raise SubmitError(f"unknown jobs command {args.jobs_command}")  # pragma: no cover - argparse restricts it
