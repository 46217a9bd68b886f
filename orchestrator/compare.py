"""Paired comparison of two eval reports on the same queries (``rime compare``).

Ablations in this repo (curriculum vs none, one seed vs another) end within a few points of each
other; an unpaired look at two Hit@1 numbers cannot tell such a gap from noise, a paired one on the
same queries can: the per-query difference's bootstrap interval, and for 0/1 metrics McNemar's exact
test on the queries where exactly one model is right. Both measure the noise of the test queries for
these two trained models only; a training seed moves more than that, so claims need several seeds:
given several (A, B) pairs of runs, one per seed, ``summarize_runs`` treats the run as the unit and
tests the mean of the per-run differences across seeds (Student's t, exact for few runs). Pairs
that share something random (the start checkpoint of a fine-tuning ablation) are not independent:
given a group label per pair, it averages within each group first and makes the group the unit.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import stats


class CompareError(ValueError):
    """A report cannot be compared (no per-query rows, missing pair, no shared queries)."""


@dataclass(frozen=True)
class PairedComparison:
    pair: str
    metric: str
    n: int  # queries scored in both reports
    mean_a: float
    mean_b: float
    diff: float  # mean_b - mean_a
    ci_low: float  # 95% paired bootstrap interval of diff
    ci_high: float
    only_a: int | None  # 0/1 metrics: queries only A gets right
    only_b: int | None
    p_mcnemar: float | None  # exact two-sided McNemar (binomial on the discordant queries)
    not_shared: int  # queries in exactly one report (left out, reported)

    def to_dict(self) -> dict:
        return asdict(self)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: under H0 each discordant query is a fair coin."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def _rows(report: dict, name: str, pair: str, metric: str) -> dict[str, float]:
    if "per_query" not in report:
        raise CompareError(f"{name}: the report has no per-query rows; re-run `rime eval ... --per-query`")
    if pair not in report["per_query"]:
        raise CompareError(
            f"{name}: pair {pair!r} not in the report (it has {sorted(report['per_query'])}); pick one with --pair"
        )
    rows = report["per_query"][pair]
    bad = [q for q, m in rows.items() if metric not in m]
    if bad:
        raise CompareError(f"{name}: metric {metric!r} missing on {len(bad)} queries (e.g. {bad[0]})")
    return {q: float(m[metric]) for q, m in rows.items()}


def compare_reports(
    a: dict, b: dict, pair: str = "latent->latent", metric: str = "hit@1", resamples: int = 10_000, seed: int = 0
) -> PairedComparison:
    """B against A on the queries both scored (the difference is B - A)."""
    ra, rb = _rows(a, "A", pair, metric), _rows(b, "B", pair, metric)
    sa, sb = a.get("queries_sha1"), b.get("queries_sha1")
    if sa and sb and sa != sb:
        raise CompareError(
            f"A and B were scored on different query files (sha1 {sa[:12]} vs {sb[:12]}): a query id "
            "names different queries in different datasets; score both on the same --data and --split"
        )
    shared = sorted(set(ra) & set(rb))
    if not shared:
        raise CompareError("the reports share no query ids: were they run on the same --data and --split?")
    xa = np.array([ra[q] for q in shared])
    xb = np.array([rb[q] for q in shared])
    d = xb - xa
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    lo, hi = np.quantile(boots, [0.025, 0.975])
    binary = metric.startswith("hit@")  # 0/1 per query: McNemar applies
    only_a = int(((xa == 1) & (xb == 0)).sum()) if binary else None
    only_b = int(((xa == 0) & (xb == 1)).sum()) if binary else None
    return PairedComparison(
        pair,
        metric,
        len(shared),
        float(xa.mean()),
        float(xb.mean()),
        float(d.mean()),
        float(lo),
        float(hi),
        only_a,
        only_b,
        mcnemar_exact(only_a, only_b) if binary else None,
        len(set(ra) ^ set(rb)),
    )


def compare_files(path_a: str | Path, path_b: str | Path, **kw) -> PairedComparison:
    reports = []
    for name, p in (("A", path_a), ("B", path_b)):
        try:
            reports.append(json.loads(Path(p).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise CompareError(f"{name}: cannot read report {p}: {e}") from e
    return compare_reports(*reports, **kw)


def format_comparison(c: PairedComparison, name_a: str, name_b: str) -> str:
    lines = [
        f"{c.pair} {c.metric} on {c.n} shared queries"
        + (f" ({c.not_shared} in one report only, left out)" if c.not_shared else ""),
        f"  A {name_a}: {c.mean_a:.4f}",
        f"  B {name_b}: {c.mean_b:.4f}",
        f"  B - A: {c.diff:+.4f} (95% paired bootstrap CI {c.ci_low:+.4f} .. {c.ci_high:+.4f})",
    ]
    if c.p_mcnemar is not None:
        lines.append(f"  only A right: {c.only_a}, only B right: {c.only_b}, exact McNemar p = {c.p_mcnemar:.4f}")
    return "\n".join(lines)


@dataclass(frozen=True)
class RunsSummary:
    """B - A over several pairs of runs (one per seed): the run, or a group of runs, is the unit, not the query."""

    pair: str
    metric: str
    runs: int
    diffs: list[float]  # per pair of runs, B - A on its shared queries
    groups: list[str] | None  # per pair, the label it shares with others (e.g. its start checkpoint); None: none
    unit: str  # "run", or "group": the per-group mean differences are what is tested
    unit_diffs: list[float]  # what the test is over: diffs, or one mean per group in first-seen order
    mean_diff: float  # mean of unit_diffs
    sd: float  # across units
    ci_low: float  # 95% Student-t interval of the mean difference across units
    ci_high: float
    p_t: float  # two-sided one-sample t-test of mean difference = 0 (sign test when every unit is equal)
    b_better: int  # pairs of runs where B - A > 0
    a_better: int
    test: str = "t"  # "t", or "sign" where the units have no spread and the t statistic is undefined

    def to_dict(self) -> dict:
        return asdict(self)


def _group_means(diffs: list[float], groups: list[str]) -> list[float]:
    order = list(dict.fromkeys(groups))
    return [float(np.mean([d for d, g in zip(diffs, groups) if g == label])) for label in order]


def summarize_runs(comparisons: list[PairedComparison], groups: list[str] | None = None) -> RunsSummary:
    """Across-seed test of the per-run differences; needs >= 2 units on the same pair and metric.

    With ``groups`` (one label per comparison) the runs of a group are averaged first and the t-test is
    over the group means: honest when the groups (start checkpoints) move the difference more than the
    run seed does, at the cost of fewer units.
    """
    if len(comparisons) < 2:
        raise CompareError(f"an across-runs summary needs at least 2 pairs of reports, got {len(comparisons)}")
    keys = {(c.pair, c.metric) for c in comparisons}
    if len(keys) != 1:
        raise CompareError(f"the pairs compare different mode pairs or metrics: {sorted(keys)}")
    diffs = [float(c.diff) for c in comparisons]
    if groups is not None:
        if len(groups) != len(comparisons):
            raise CompareError(
                f"--groups gives {len(groups)} labels for {len(comparisons)} pairs of reports; "
                "give one label per pair, in the same order (e.g. --groups ckpt0,ckpt0,ckpt1)"
            )
        if not all(groups):
            raise CompareError(f"--groups has an empty label ({','.join(groups)!r}); name every pair's group")
        if len(set(groups)) < 2:
            raise CompareError(
                f"--groups puts every pair in one group ({groups[0]!r}); a test across groups needs at least 2 different labels"
            )
    units = np.array(diffs if groups is None else _group_means(diffs, groups))
    n, mean, sd = len(units), float(units.mean()), float(units.std(ddof=1))
    test = "t"
    if sd == 0.0:  # every unit moved by the same amount (Hit@k differences are steps of 1/n): no t statistic.
        # A zero-width interval and p = 0 would claim certainty from two equal numbers; the exact sign
        # test is what is left (2 equal units: p = 0.5).
        lo = hi = mean
        test = "sign"
        p = 1.0 if mean == 0.0 else float(stats.binomtest(n, n, 0.5).pvalue)
    else:
        half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
        lo, hi = mean - half, mean + half
        p = float(stats.ttest_1samp(units, 0.0).pvalue)
    d = np.array(diffs)
    return RunsSummary(
        comparisons[0].pair,
        comparisons[0].metric,
        len(diffs),
        diffs,
        None if groups is None else list(groups),
        "run" if groups is None else "group",
        [float(x) for x in units],
        mean,
        sd,
        lo,
        hi,
        p,
        int((d > 0).sum()),
        int((d < 0).sum()),
        test,
    )


def format_runs_summary(s: RunsSummary) -> str:
    lines = [
        f"across {s.runs} pairs of runs (the {s.unit} is the unit): {s.pair} {s.metric}",
        "  B - A per pair: " + ", ".join(f"{x:+.4f}" for x in s.diffs),
    ]
    if s.groups is not None:
        labels = list(dict.fromkeys(s.groups))
        lines.append(
            f"  B - A per group ({len(labels)}, mean of its pairs): "
            + ", ".join(f"{g} {x:+.4f} (n={s.groups.count(g)})" for g, x in zip(labels, s.unit_diffs))
        )
    lines += [
        f"  mean B - A: {s.mean_diff:+.4f} (sd {s.sd:.4f} over {len(s.unit_diffs)} {s.unit}s; "
        + (
            f"95% t interval {s.ci_low:+.4f} .. {s.ci_high:+.4f}; t-test p = {s.p_t:.4f})"
            if s.test == "t"
            else f"no spread, so no t interval; exact sign test p = {s.p_t:.4f})"
        ),
        f"  B better in {s.b_better}, A better in {s.a_better}, tied in {s.runs - s.b_better - s.a_better} pairs",
    ]
    return "\n".join(lines)
