"""Paired comparison of two eval reports on the same queries (``rime compare``).

Ablations in this repo (curriculum vs none, one seed vs another) end within a few points of each
other; an unpaired look at two Hit@1 numbers cannot tell such a gap from noise, a paired one on the
same queries can: the per-query difference's bootstrap interval, and for 0/1 metrics McNemar's exact
test on the queries where exactly one model is right. Both measure the noise of the test queries for
these two trained models only; a training seed moves more than that, so claims need several seeds:
given several (A, B) pairs of runs, one per seed, ``summarize_runs`` treats the run as the unit and
tests the mean of the per-run differences across seeds (Student's t, exact for few runs).
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
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def _rows(report: dict, name: str, pair: str, metric: str) -> dict[str, float]:
    if "per_query" not in report:
        raise CompareError(f"{name}: the report has no per-query rows; re-run `rime eval ... --per-query`")
    if pair not in report["per_query"]:
        raise CompareError(f"{name}: pair {pair!r} not in the report (it has {sorted(report['per_query'])}); "
                           "pick one with --pair")
    rows = report["per_query"][pair]
    bad = [q for q, m in rows.items() if metric not in m]
    if bad:
        raise CompareError(f"{name}: metric {metric!r} missing on {len(bad)} queries (e.g. {bad[0]})")
    return {q: float(m[metric]) for q, m in rows.items()}


def compare_reports(a: dict, b: dict, pair: str = "latent->latent", metric: str = "hit@1",
                    resamples: int = 10_000, seed: int = 0) -> PairedComparison:
    """B against A on the queries both scored (the difference is B - A)."""
    ra, rb = _rows(a, "A", pair, metric), _rows(b, "B", pair, metric)
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
    return PairedComparison(pair, metric, len(shared), float(xa.mean()), float(xb.mean()), float(d.mean()),
                            float(lo), float(hi), only_a, only_b,
                            mcnemar_exact(only_a, only_b) if binary else None,
                            len(set(ra) ^ set(rb)))


def compare_files(path_a: str | Path, path_b: str | Path, **kw) -> PairedComparison:
    reports = []
    for name, p in (("A", path_a), ("B", path_b)):
        try:
            reports.append(json.loads(Path(p).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise CompareError(f"{name}: cannot read report {p}: {e}") from e
    return compare_reports(*reports, **kw)


def format_comparison(c: PairedComparison, name_a: str, name_b: str) -> str:
    lines = [f"{c.pair} {c.metric} on {c.n} shared queries" + (f" ({c.not_shared} in one report only, left out)" if c.not_shared else ""),
             f"  A {name_a}: {c.mean_a:.4f}", f"  B {name_b}: {c.mean_b:.4f}",
             f"  B - A: {c.diff:+.4f} (95% paired bootstrap CI {c.ci_low:+.4f} .. {c.ci_high:+.4f})"]
    if c.p_mcnemar is not None:
        lines.append(f"  only A right: {c.only_a}, only B right: {c.only_b}, exact McNemar p = {c.p_mcnemar:.4f}")
    return "\n".join(lines)


@dataclass(frozen=True)
class RunsSummary:
    """B - A over several independent pairs of runs (one per seed): the seed, not the query, is the unit."""

    pair: str
    metric: str
    runs: int
    diffs: list[float]  # per pair of runs, B - A on its shared queries
    mean_diff: float
    sd: float  # across runs
    ci_low: float  # 95% Student-t interval of the mean difference across runs
    ci_high: float
    p_t: float  # two-sided one-sample t-test of mean difference = 0
    b_better: int  # pairs where B - A > 0
    a_better: int

    def to_dict(self) -> dict:
        return asdict(self)


def summarize_runs(comparisons: list[PairedComparison]) -> RunsSummary:
    """Across-seed test of the per-run differences; needs >= 2 pairs on the same pair and metric."""
    if len(comparisons) < 2:
        raise CompareError(f"an across-runs summary needs at least 2 pairs of reports, got {len(comparisons)}")
    keys = {(c.pair, c.metric) for c in comparisons}
    if len(keys) != 1:
        raise CompareError(f"the pairs compare different mode pairs or metrics: {sorted(keys)}")
    d = np.array([c.diff for c in comparisons])
    n, mean, sd = len(d), float(d.mean()), float(d.std(ddof=1))
    if sd == 0.0:  # every run moved by the same amount: the interval is that point
        lo = hi = mean
        p = 1.0 if mean == 0.0 else 0.0
    else:
        half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
        lo, hi = mean - half, mean + half
        p = float(stats.ttest_1samp(d, 0.0).pvalue)
    return RunsSummary(comparisons[0].pair, comparisons[0].metric, n, [float(x) for x in d], mean, sd, lo, hi, p,
                       int((d > 0).sum()), int((d < 0).sum()))


def format_runs_summary(s: RunsSummary) -> str:
    return "\n".join([
        f"across {s.runs} pairs of runs (the run is the unit): {s.pair} {s.metric}",
        "  B - A per pair: " + ", ".join(f"{x:+.4f}" for x in s.diffs),
        f"  mean B - A: {s.mean_diff:+.4f} (sd {s.sd:.4f}; 95% t interval {s.ci_low:+.4f} .. {s.ci_high:+.4f}; "
        f"t-test p = {s.p_t:.4f})",
        f"  B better in {s.b_better}, A better in {s.a_better}, tied in {s.runs - s.b_better - s.a_better}",
    ])
