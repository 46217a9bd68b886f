"""What ``rime ablate`` trains and compares: arms x start models x seeds, checked before anything runs.

The run (one arm, one start model, one seed) is the unit an ablation trains and scores; a pair is the
reference arm A and another arm B on the same start model and seed, and pairs that share a start model
form a group (``rime compare --groups``). Report file names are fixed by the plan alone, so a re-run
finds what an earlier one scored and does only the rest.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

# PLUME's curriculum ablation, the default: A = fully latent from the first step (its probe measures
# explicit reasoning it never trains, so it is off), B = the curriculum. `cur` also gets the zero-step control.
PLUME_ARMS = ("nocur=plume.curriculum=false plume.probe_queries_per_task=0", "cur=")
PLUME_CONTROL = "cur"
# set per run by the plan: an arm or a train argument that set them would break the run <-> report mapping
RESERVED_KEYS = ("run.name", "run.seed", "run.out_dir", "model.spec")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
CONTROL_SUFFIX = "-k0"


class AblateError(ValueError):
    """A bad ``rime ablate`` argument; the message names the argument and the fix."""


@dataclass(frozen=True)
class Arm:
    """A named list of ``section.key=value`` overrides, applied last to each of its runs."""

    name: str
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class PlannedRun:
    """One trained run: the arm's overrides on the i-th start model with one seed."""

    ablation: str
    start_index: int
    start: str
    seed: int
    arm: Arm

    @property
    def key(self) -> str:
        """The report's file stem (``m0-seed1-cur``): stable across re-runs of the same ablation."""
        return f"m{self.start_index}-seed{self.seed}-{self.arm.name}"

    @property
    def run_name(self) -> str:
        return f"{self.ablation}-{self.key}"


@dataclass(frozen=True)
class Task:
    """What one run still needs: training (and its report), and/or its zero-step control report."""

    run: PlannedRun
    train: bool
    control: bool


@dataclass(frozen=True)
class Comparison:
    """One paired comparison across every (start model, seed): report A against report B per pair."""

    title: str
    pair: str  # the mode pair it is always on, or "" for the one asked for (--pair)
    path: Path  # where `rime compare --json`'s object goes
    reports: list[tuple[Path, Path]]  # (A, B) per pair, in ``Plan.cells`` order


@dataclass(frozen=True)
class Plan:
    name: str
    arms: tuple[Arm, ...]  # arms[0] is the reference A; every other arm is a B compared with it
    starts: tuple[str, ...]
    seeds: tuple[int, ...]
    control: str | None  # the arm also scored with 0 latent steps, or None

    def runs(self) -> list[PlannedRun]:
        """Every run, start model by start model, seed by seed, arm by arm (the order they are trained in)."""
        return [
            PlannedRun(self.name, i, start, seed, arm)
            for i, start in enumerate(self.starts)
            for seed in self.seeds
            for arm in self.arms
        ]

    def run(self, start_index: int, seed: int, arm: str) -> PlannedRun:
        return PlannedRun(self.name, start_index, self.starts[start_index], seed, self.arm(arm))

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)

    @property
    def cells(self) -> list[tuple[int, int]]:
        """(start index, seed) of every pair, in order: what the comparisons are listed and grouped by."""
        return [(i, seed) for i in range(len(self.starts)) for seed in self.seeds]

    def groups(self) -> list[str] | None:
        """One label per pair, its start model; None with one start model (then the run is the unit)."""
        return [self.starts[i] for i, _ in self.cells] if len(self.starts) > 1 else None

    def todo(self, reports: Path) -> list[Task]:
        """The runs whose report, or zero-step control, is missing under ``reports``. A run trained again
        gets a new control too: the old one scored another model."""
        out = []
        for r in self.runs():
            train = not report_path(reports, r).is_file()
            control = r.arm.name == self.control and (train or not control_path(reports, r).is_file())
            if train or control:
                out.append(Task(r, train, control))
        return out

    def comparisons(self, out: Path) -> list[Comparison]:
        """Every arm B against the reference A (compare.json with two arms, compare-<B>.json with more), then
        the zero-step control: the control arm at 0 latent steps (A) against its own K (B)."""
        reports, ref = out / "reports", self.arms[0]
        found = []
        for arm in self.arms[1:]:
            name = "compare.json" if len(self.arms) == 2 else f"compare-{arm.name}.json"
            found.append(
                Comparison(
                    f"B = {arm.name}, A = {ref.name}",
                    "",
                    out / name,
                    [
                        (report_path(reports, self.run(i, s, ref.name)), report_path(reports, self.run(i, s, arm.name)))
                        for i, s in self.cells
                    ],
                )
            )
        if self.control:
            runs = [self.run(i, s, self.control) for i, s in self.cells]
            found.append(
                Comparison(
                    f"the latent steps' own share, in arm {self.control}: B = its K latent steps, A = 0 steps",
                    "latent->latent",
                    out / "latent_steps.json",
                    [(control_path(reports, r), report_path(reports, r)) for r in runs],
                )
            )
        return found


def report_path(reports: Path, run: PlannedRun) -> Path:
    return reports / f"{run.key}.json"


def control_path(reports: Path, run: PlannedRun) -> Path:
    return reports / f"{run.key}{CONTROL_SUFFIX}.json"


def parse_seeds(text: str) -> tuple[int, ...]:
    seeds = []
    for s in text.split(","):
        if not re.fullmatch(r"\d+", s.strip()):
            raise AblateError(
                f"--seeds {text}: seed {s.strip()!r} is not a non-negative integer; give them comma-separated, e.g. --seeds 0,1,2"
            )
        if int(s) in seeds:
            raise AblateError(
                f"--seeds {text}: seed {int(s)} is listed twice; list each once (a pair counted twice "
                "would look like two seeds that agree)"
            )
        seeds.append(int(s))
    return tuple(seeds)


def parse_starts(text: str) -> tuple[str, ...]:
    starts = tuple(text.split(","))
    for m in starts:
        if not m or m != m.strip() or " " in m:
            raise AblateError(
                f"--start {text}: start model {m!r} is empty or has a space; give model specs "
                "comma-separated, e.g. --start runs/ref-s0/final,runs/ref-s1/final"
            )
    dupes = sorted({m for m in starts if starts.count(m) > 1})
    if dupes:
        raise AblateError(
            f"--start {text}: a start model is listed twice ({dupes[0]}); list each once, runs from one checkpoint are one group"
        )
    return starts


def parse_arm(text: str) -> Arm:
    """``NAME=KEY=VALUE [KEY=VALUE ...]``: the overrides are split like a shell line, so a value may be quoted."""
    name, sep, rest = text.partition("=")
    if not sep or not _NAME.fullmatch(name):
        raise AblateError(
            f"--arm {text!r}: use NAME=OVERRIDES with NAME of letters, digits, '_', '.', '-', e.g. "
            "--arm nocur=plume.curriculum=false, or --arm cur= for an arm without overrides"
        )
    if name.endswith(CONTROL_SUFFIX):
        raise AblateError(f"--arm {name}: names ending in {CONTROL_SUFFIX} are the zero-step controls' reports; rename it")
    try:
        overrides = tuple(shlex.split(rest))
    except ValueError as e:
        raise AblateError(f"--arm {text!r}: cannot split its overrides ({e}); check the quotes") from None
    for ov in overrides:
        key = ov.split("=", 1)[0]
        if "=" not in ov or "." not in key:
            raise AblateError(
                f"--arm {name}: override {ov!r} is not section.key=value; separate several with spaces, "
                "e.g. --arm 'nocur=plume.curriculum=false plume.probe_queries_per_task=0'"
            )
        check_not_reserved(key, f"--arm {name}")
    return Arm(name, overrides)


def check_not_reserved(key: str, where: str) -> None:
    if key.strip() in RESERVED_KEYS:
        raise AblateError(
            f"{where}: {key.strip()} is set per run by rime ablate (--name, --seeds, --runs-dir, --start); remove it"
        )


def make_plan(name: str, arm_texts: list[str] | None, starts: str, seeds: str, control: str | None) -> Plan:
    """Parse and check the arguments that define the runs. ``arm_texts`` None: PLUME's curriculum ablation,
    with its zero-step control on ``cur`` unless ``control`` says otherwise (``none`` turns it off)."""
    if not _NAME.fullmatch(name):
        raise AblateError(f"--name {name!r}: use letters, digits, '_', '.', '-' (it names the runs and the output folder)")
    arms = tuple(parse_arm(a) for a in (arm_texts or PLUME_ARMS))
    names = [a.name for a in arms]
    if len(arms) < 2:
        raise AblateError(
            f"--arm: {len(arms)} arm given; give at least 2, the first is the reference A "
            "(e.g. --arm cur= --arm nocur=plume.curriculum=false)"
        )
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise AblateError(f"--arm {dupes[0]}: the name is given twice; give each arm its own name")
    if control is None:
        control = PLUME_CONTROL if arm_texts is None else "none"
    if control != "none" and control not in names:
        raise AblateError(
            f"--zero-step-control {control}: not an arm ({', '.join(names)}); name the arm whose latent "
            "mode is scored with 0 latent steps too, or none"
        )
    plan = Plan(name, arms, parse_starts(starts), parse_seeds(seeds), None if control == "none" else control)
    if len(plan.cells) < 2:
        raise AblateError(
            f"--start {starts} --seeds {seeds}: one start model and one seed give one pair, which cannot "
            "tell a seed's noise from an effect; give at least 2 seeds (or 2 start models)"
        )
    return plan
