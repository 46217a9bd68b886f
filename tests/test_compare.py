"""`rime compare`: paired statistics of two eval reports, checked on hand-made per-query rows."""

from __future__ import annotations

import json
import math

import pytest

from orchestrator.cli import main
from orchestrator.compare import CompareError, compare_reports, format_runs_summary, mcnemar_exact, summarize_runs


def _report(hits: dict[str, float], pair: str = "latent->latent") -> dict:
    return {"per_query": {pair: {q: {"task": "t", "hit@1": h, "mrr": 0.5 + h / 2} for q, h in hits.items()}}}


def test_mcnemar_exact_matches_the_binomial_tail():
    assert mcnemar_exact(1, 9) == pytest.approx(2 * (1 + 10) / 2**10)
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 12) == pytest.approx(2 / 2**12) and mcnemar_exact(12, 0) == mcnemar_exact(0, 12)


def test_paired_comparison_counts_discordant_queries_and_leaves_out_unshared_ones():
    # 40 queries: both right on 10, only B right on 12, only A right on 2, both wrong on 16; A has one extra id
    a = {f"q{i}": float(i < 10 or 22 <= i < 24) for i in range(40)} | {"extra": 1.0}
    b = {f"q{i}": float(i < 22) for i in range(40)}
    c = compare_reports(_report(a), _report(b), resamples=2000)
    assert c.n == 40 and c.not_shared == 1
    assert (c.mean_a, c.mean_b) == (pytest.approx(12 / 40), pytest.approx(22 / 40))
    assert c.diff == pytest.approx(10 / 40) and (c.only_a, c.only_b) == (2, 12)
    assert c.p_mcnemar == pytest.approx(2 * sum(math.comb(14, i) for i in range(3)) / 2**14)
    assert c.ci_low < c.diff < c.ci_high and c.ci_low > 0  # a clear win: the interval excludes 0
    same = compare_reports(_report(a), _report(a))
    assert same.diff == 0 and same.ci_low == same.ci_high == 0 and same.p_mcnemar == 1.0
    graded = compare_reports(_report(a), _report(b), metric="mrr")  # not 0/1: no McNemar
    assert graded.p_mcnemar is None and graded.diff == pytest.approx(5 / 40)


def test_compare_errors_say_what_to_do(tmp_path, capsys):
    with pytest.raises(CompareError, match="--per-query"):
        compare_reports({"pairs": {}}, _report({"q": 1.0}))
    with pytest.raises(CompareError, match=r"pair 'disc->disc' not in the report.*--pair"):
        compare_reports(_report({"q": 1.0}), _report({"q": 1.0}), pair="disc->disc")
    with pytest.raises(CompareError, match="share no query ids"):
        compare_reports(_report({"q": 1.0}), _report({"r": 1.0}))
    (tmp_path / "a.json").write_text(json.dumps(_report({"q0": 0.0, "q1": 1.0})))
    (tmp_path / "b.json").write_text(json.dumps(_report({"q0": 1.0, "q1": 1.0})))
    assert main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--json"]) == 0
    out = capsys.readouterr().out
    assert "on 2 shared queries" in out and "only A right: 0, only B right: 1" in out
    assert json.loads(out.strip().splitlines()[-1])["diff"] == pytest.approx(0.5)
    assert main(["compare", str(tmp_path / "a.json"), str(tmp_path / "missing.json")]) == 2
    assert "B: cannot read report" in capsys.readouterr().err


def _hits(n_right: int, n: int = 20) -> dict[str, float]:
    return {f"q{i}": float(i < n_right) for i in range(n)}


def test_across_seeds_summary_treats_the_run_as_the_unit(tmp_path, capsys):
    # three seeds, B - A = +5/20, +1/20, +3/20: mean 0.15, sd 0.10, t = 0.15 / (0.1 / sqrt 3) = 2.598 on 2 df
    pairs = [(_hits(5), _hits(10)), (_hits(8), _hits(9)), (_hits(2), _hits(5))]
    comps = [compare_reports(_report(a), _report(b), resamples=500) for a, b in pairs]
    s = summarize_runs(comps)
    assert s.runs == 3 and s.diffs == pytest.approx([0.25, 0.05, 0.15])
    assert s.mean_diff == pytest.approx(0.15) and s.sd == pytest.approx(0.10)
    half = 4.302653 * 0.10 / math.sqrt(3)  # t_{0.975, 2 df}
    assert (s.ci_low, s.ci_high) == (pytest.approx(0.15 - half, abs=1e-5), pytest.approx(0.15 + half, abs=1e-5))
    assert s.p_t == pytest.approx(0.1217, abs=5e-4) and (s.b_better, s.a_better) == (3, 0)
    # each seed alone is a clear McNemar win, yet three seeds do not exclude 0: the interval straddles it
    assert comps[0].p_mcnemar < 0.07 and s.ci_low < 0 < s.ci_high
    flat = summarize_runs([comps[1], comps[1]])  # no spread: no t statistic; two equal wins are a sign test's p 0.5
    assert flat.ci_low == flat.ci_high == pytest.approx(0.05) and flat.test == "sign" and flat.p_t == pytest.approx(0.5)
    assert "no spread, so no t interval; exact sign test p = 0.5000" in format_runs_summary(flat)
    assert summarize_runs([comps[1]] * 5).p_t == pytest.approx(2 / 2**5)
    with pytest.raises(CompareError, match="different query files"):
        compare_reports({**_report(pairs[0][0]), "queries_sha1": "aa"}, {**_report(pairs[0][1]), "queries_sha1": "bb"})
    assert compare_reports({**_report(pairs[0][0]), "queries_sha1": "aa"}, {**_report(pairs[0][1]), "queries_sha1": "aa"}).n == 20
    with pytest.raises(CompareError, match="at least 2 pairs"):
        summarize_runs(comps[:1])
    with pytest.raises(CompareError, match="different mode pairs or metrics"):
        summarize_runs([comps[0], compare_reports(_report(pairs[1][0]), _report(pairs[1][1]), metric="mrr")])

    files = []
    for i, (a, b) in enumerate(pairs):
        for name, hits in (("a", a), ("b", b)):
            (tmp_path / f"{name}{i}.json").write_text(json.dumps(_report(hits)))
            files.append(str(tmp_path / f"{name}{i}.json"))
    assert main(["compare", *files, "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("shared queries") == 3 and "across 3 pairs of runs" in out and "B better in 3, A better in 0" in out
    js = json.loads(out.strip().splitlines()[-1])
    assert len(js["runs"]) == 3 and js["summary"]["mean_diff"] == pytest.approx(0.15)
    assert main(["compare", *files[:3]]) == 2
    assert "give reports in pairs" in capsys.readouterr().err


def test_groups_make_the_shared_start_checkpoint_the_unit(tmp_path, capsys):
    # pairs B - A = +0.25 (ckpt x), +0.05 and +0.15 (ckpt y): group means 0.25 and 0.10, tested on 1 df
    pairs = [(_hits(5), _hits(10)), (_hits(8), _hits(9)), (_hits(2), _hits(5))]
    comps = [compare_reports(_report(a), _report(b), resamples=200) for a, b in pairs]
    s = summarize_runs(comps, groups=["x", "y", "y"])
    assert s.unit == "group" and s.runs == 3 and s.unit_diffs == pytest.approx([0.25, 0.10])
    sd = 0.15 / math.sqrt(2)
    assert s.mean_diff == pytest.approx(0.175) and s.sd == pytest.approx(sd)
    half = 12.706205 * sd / math.sqrt(2)  # t_{0.975, 1 df}: two groups leave one degree of freedom
    assert (s.ci_low, s.ci_high) == (pytest.approx(0.175 - half, abs=1e-5), pytest.approx(0.175 + half, abs=1e-5))
    # on 1 df the t distribution is Cauchy: p = 1 - (2 / pi) * atan(t)
    assert s.p_t == pytest.approx(1 - 2 / math.pi * math.atan(0.175 / (sd / math.sqrt(2))), abs=1e-6)
    assert (s.b_better, s.a_better) == (3, 0)  # wins still count pairs of runs
    ungrouped = summarize_runs(comps)
    assert ungrouped.unit == "run" and ungrouped.unit_diffs == ungrouped.diffs and ungrouped.groups is None
    assert s.ci_high - s.ci_low > 3 * (ungrouped.ci_high - ungrouped.ci_low)  # 2 units, not 3: wider
    with pytest.raises(CompareError, match="2 labels for 3 pairs"):
        summarize_runs(comps, groups=["x", "y"])
    with pytest.raises(CompareError, match="empty label"):
        summarize_runs(comps, groups=["x", "", "y"])
    with pytest.raises(CompareError, match="every pair in one group"):
        summarize_runs(comps, groups=["x", "x", "x"])

    files = []
    for i, (a, b) in enumerate(pairs):
        for name, hits in (("a", a), ("b", b)):
            (tmp_path / f"{name}{i}.json").write_text(json.dumps(_report(hits)))
            files.append(str(tmp_path / f"{name}{i}.json"))
    assert main(["compare", *files, "--groups", "x, y,y", "--json"]) == 0
    out = capsys.readouterr().out
    assert "the group is the unit" in out and "x +0.2500 (n=1), y +0.1000 (n=2)" in out and "over 2 groups" in out
    js = json.loads(out.strip().splitlines()[-1])
    assert js["summary"]["groups"] == ["x", "y", "y"] and js["summary"]["mean_diff"] == pytest.approx(0.175)
    assert main(["compare", *files[:2], "--groups", "x"]) == 2  # one pair cannot be summarised
    assert "at least 2 pairs" in capsys.readouterr().err
