"""How ``rime ablate`` trains and scores one run for real: ``rime train`` (or ``rime submit --follow``) as a
subprocess, then ``rime eval --per-query``'s code in this process.

Each arm trains in its own process because each ``rime train`` starts (or joins) its own Ray; the
evaluation needs no Ray, so it runs here, one at a time, while other arms keep training.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .ablate_plan import PlannedRun

CONTROL_MODES = (("latent",), ("latent",))  # the zero-step control: latent->latent, the only pair it is compared on
EVAL_BATCH_SIZE, EVAL_MAX_NEW_TOKENS = 16, 32  # `rime eval`'s defaults, which scored the former script's reports


class ArmError(RuntimeError):
    """One run could not be trained or scored; the message names its log."""


class Backend(Protocol):
    """What the ablation needs from the outside world (tests inject one that trains nothing)."""

    note: str  # appended to the "train" progress line, e.g. ", as a Ray job"

    def train(self, run: PlannedRun, log: Path) -> str:
        """Train ``run`` (output in ``log``); return the model to score: a folder or a ``models:/`` URI."""

    def score(self, run: PlannedRun, model: str, report: Path, log: Path, zero_steps: bool) -> None:
        """Score ``model`` per query into ``report``; ``zero_steps``: latent->latent with 0 latent steps."""


@dataclass(frozen=True)
class Settings:
    """Everything about training and scoring that is the same for every run of an ablation."""

    config: str
    runs_dir: str
    test_data: str
    test_queries: int
    tasks: tuple[str, ...]
    query_modes: tuple[str, ...]  # what each arm is scored in: its config's eval modes
    cand_modes: tuple[str, ...]
    train_args: tuple[str, ...]  # after `--`: to every `rime train` (or `rime submit`)
    submit: str | None = None  # a Ray dashboard address: arms train as Ray jobs


def start_spec(start: str, submit: bool) -> str:
    """A job runs in an uploaded copy of the checkout, which leaves runs/ out: a local folder goes by its absolute path."""
    return str(Path(start).resolve()) if submit and Path(start).exists() else start


def rime_command(s: Settings) -> list[str]:
    """``rime train CONFIG``, or ``rime submit CONFIG`` to the dashboard, following the job to its end."""
    return ["submit", s.config, "--address", s.submit, "--follow"] if s.submit else ["train", s.config]


def rime_args(s: Settings, run: PlannedRun) -> list[str]:
    """The ``rime`` arguments that train ``run``: the shared train args, then the arm's overrides (they win)."""
    sets = [
        f"run.name={run.run_name}",
        f"run.seed={run.seed}",
        f"run.out_dir={s.runs_dir}",
        f"model.spec={start_spec(run.start, bool(s.submit))}",
    ]
    return [
        *rime_command(s),
        "--overwrite",
        *(a for v in sets for a in ("--set", v)),
        *s.train_args,
        *(a for v in run.arm.overrides for a in ("--set", v)),
    ]


def logged_model_uri(log_text: str) -> str | None:
    """The ``models:/`` URI the job's `rime train` printed last (its summary's model_uri), if any."""
    found = re.findall(r'"model_uri": "([^"]+)"', log_text)
    return found[-1] if found else None


class LocalBackend:
    """Trains with a ``rime`` subprocess per run, scores in this process (one eval at a time)."""

    def __init__(self, settings: Settings):
        self.s = settings
        self.note = ", as a Ray job" if settings.submit else ""
        self._eval_lock = threading.Lock()  # torch in two threads would fight over the same cores

    def train(self, run: PlannedRun, log: Path) -> str:
        argv = [sys.executable, "-m", "orchestrator.cli", *rime_args(self.s, run)]
        with open(log, "w") as f:
            rc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
        if rc != 0:
            raise ArmError(f"training {run.run_name} failed (exit {rc}), see {log}")
        model = str(Path(self.s.runs_dir) / run.run_name / "final")
        if self.s.submit and os.environ.get("MLFLOW_TRACKING_URI", "").startswith(("http://", "https://")):
            # the job logged its embedder to the tracking server this machine also sees: score that
            uri = logged_model_uri(log.read_text(errors="replace"))
            if uri:
                return uri
            if not Path(model).is_dir():
                raise ArmError(
                    f"the job of {run.run_name} logged no model (tracking.log_model=false?) and {model} is not "
                    "visible here; keep tracking.log_model=true or put --runs-dir on shared storage"
                )
        return model

    def score(self, run: PlannedRun, model: str, report: Path, log: Path, zero_steps: bool) -> None:
        what = run.run_name + (" with 0 latent steps" if zero_steps else "")
        qmodes, cmodes = CONTROL_MODES if zero_steps else (self.s.query_modes, self.s.cand_modes)
        with self._eval_lock:
            try:
                result = self._evaluate(model, qmodes, cmodes, 0 if zero_steps else None)
            except Exception as e:  # noqa: BLE001 - any failure fails this run only; the traceback goes to its log
                log.write_text(traceback.format_exc())
                raise ArmError(f"eval of {what} failed ({type(e).__name__}: {str(e)[:300]}), see {log}") from None
        from .eval_report import format_table, write_report

        params = {
            "model": model,
            "data": self.s.test_data,
            "split": "test",
            "query_mode": ",".join(qmodes),
            "cand_mode": ",".join(cmodes),
        }
        if result.latent_steps is not None:  # as `rime eval` writes it: two evals of one model at two K differ here
            params["latent_steps"] = result.latent_steps
        tmp = report.with_name(report.name + ".tmp")
        write_report(result, tmp, params, per_query=True)
        os.replace(tmp, report)  # a report exists only once complete: resuming trusts it
        log.write_text(f"{format_table(result)}\nlatent steps: {result.latent_steps}\nreport: {report}\n")

    def _evaluate(self, model: str, qmodes: tuple[str, ...], cmodes: tuple[str, ...], latent_steps: int | None):
        from rime_model import GenerationConfig, load_embedder

        from .evaluate import evaluate

        emb = load_embedder(model)
        return evaluate(
            emb,
            self.s.test_data,
            split="test",
            query_modes=qmodes,
            cand_modes=cmodes,
            batch_size=EVAL_BATCH_SIZE,
            generation=GenerationConfig(max_new_tokens=EVAL_MAX_NEW_TOKENS),
            tasks=self.s.tasks,
            max_queries_per_task=self.s.test_queries,
            latent_steps=latent_steps,
        )


def ensure_test_data(s: Settings, say) -> None:
    """Generate the fresh test queries when ``s.test_data`` has none (the arms never trained on them)."""
    if (Path(s.test_data) / "test" / "queries.parquet").is_file():
        return
    from rime_data.synth import write_synth

    say(f"[ablate] generating {s.test_queries} test queries per task ({','.join(s.tasks)}) in {s.test_data}")
    write_synth(s.test_data, {"test": s.test_queries}, tasks=s.tasks)
