"""The procedural benchmark: seeded, split without leakage, valid records, and a real rewrite gap."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from rime_data.fingerprint import fingerprint
from rime_data.metrics import aggregate, query_metrics
from rime_data.schema import CANDIDATE_SCHEMA, QUERY_SCHEMA, validate_candidate, validate_query
from rime_data.synth import EXTRA_TASKS, TASKS, synth_split, write_synth
from rime_data.text_baseline import bow_embed


def _bow_hit1(texts: list[str], queries: list[dict], candidates: list[dict], task: str) -> float:
    """Hit@1 of a bag-of-words reading: each text against the candidates' captions (``rewrite``)."""
    scores = bow_embed(texts) @ bow_embed([c["rewrite"] for c in candidates]).T
    ids = [c["cand_id"] for c in candidates]
    rows = [(task, query_metrics(s, [1.0 if i in q["positive_ids"] else 0.0 for i in ids])) for s, q in zip(scores, queries)]
    return aggregate(rows)["all"]["hit@1"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    write_synth(out, {"train": 60, "val": 15, "test": 60}, seed=0)
    return out


def test_schema_and_validity(data_dir):
    for split in ("train", "val", "test"):
        q = pq.read_table(data_dir / split / "queries.parquet")
        c = pq.read_table(data_dir / split / "candidates.parquet")
        assert q.schema.equals(QUERY_SCHEMA) and c.schema.equals(CANDIDATE_SCHEMA)
        qs, cs = q.to_pylist(), c.to_pylist()
        assert len(qs) == {"train": 60, "val": 15, "test": 60}[split] * len(TASKS)
        assert all(validate_query(r) is None for r in qs) and all(validate_candidate(r) is None for r in cs)
        ids = {r["cand_id"] for r in cs}
        assert len(ids) == len(cs)
        assert all(set(r["positive_ids"]) <= ids for r in qs)
        assert all(r["rewrite"] and len(r["reasoning"]) >= 4 for r in qs)


# The classic style is the main job's data: these digests (rime_data.fingerprint: every record's
# fields, images by decoded pixels) were taken from the generator before styles existed, and must not
# move while the main job's numbers are pinned to it. Styled data has its own pins (test_synth_styles.py).
CLASSIC_FINGERPRINTS = {
    ("train", 12, 0, TASKS + EXTRA_TASKS): "6cb573b7ed1f907bdfbe9136395783677ba25261",
    ("val", 5, 3, TASKS): "fdc4f3a3e31ad27441d75f3c5f1a6f8418a7e579",
    ("test", 7, 1, TASKS + EXTRA_TASKS): "52286c567f971c656c16e175bb2f6e6ddce8f27f",
}


@pytest.mark.parametrize("args", list(CLASSIC_FINGERPRINTS))
def test_classic_data_is_unchanged(args):
    assert fingerprint(synth_split(*args)) == CLASSIC_FINGERPRINTS[args]
    assert fingerprint(synth_split(*args, style="classic", image_size=84)) == CLASSIC_FINGERPRINTS[args]


def test_fingerprint_sees_every_change():
    d = synth_split("val", 3, seed=0)
    base = fingerprint(d)
    d.queries[0]["qry_text"] += " "
    assert fingerprint(d) != base
    d = synth_split("val", 3, seed=0, image_size=85)  # a different picture, same texts
    assert fingerprint(d) != base


def test_deterministic_by_seed():
    a, b, c = synth_split("val", 5, seed=1), synth_split("val", 5, seed=1), synth_split("val", 5, seed=2)
    assert a.queries == b.queries and a.candidates == b.candidates
    assert a.queries != c.queries


def test_no_leakage_between_splits(data_dir):
    def keys(split):
        rows = pq.read_table(data_dir / split / "queries.parquet").to_pylist()
        return {(r["task"], r["qry_text"], r["qry_image"]) for r in rows}

    train, val, test = keys("train"), keys("val"), keys("test")
    assert not (train & test) and not (train & val) and not (val & test)


def test_referring_gap_raw_query_vs_oracle_rewrite(data_dir):
    """Text-only baseline: the raw referring text names the anchor, the oracle rewrite names the target."""
    qs = [r for r in pq.read_table(data_dir / "test" / "queries.parquet").to_pylist() if r["task"] == "referring"]
    cs = [r for r in pq.read_table(data_dir / "test" / "candidates.parquet").to_pylist() if r["task"] == "referring"]
    raw = _bow_hit1([q["qry_text"] for q in qs], qs, cs, "referring")
    oracle = _bow_hit1([q["rewrite"] for q in qs], qs, cs, "referring")
    print(f"\nreferring task, text-only BoW baseline: raw query Hit@1 = {raw:.3f}, oracle rewrite Hit@1 = {oracle:.3f}")
    assert oracle >= 0.95
    assert raw <= 0.2
    assert oracle - raw >= 0.7


def test_referring_compose_answer_combines_two_relations():
    """The opt-in two-relation task: the answer takes the shape of one referred object and the colour of
    another, each resolved by one reasoning segment, and the default benchmark does not include it."""
    import re

    from rime_data.synth import EXTRA_TASKS

    assert "referring_compose" in EXTRA_TASKS and "referring_compose" not in TASKS
    d = synth_split("test", 80, seed=3, tasks=("referring_compose",))
    cands = {c["cand_id"]: c for c in d.candidates}
    assert len(cands) == 30 and len(d.queries) == 80
    for q in d.queries:
        first, second, third, last = q["reasoning"]
        (o1,) = re.fullmatch(r"The object (?:left|right) of the \w+ \w+ is the (\w+ \w+)\.", second).groups()
        (o2,) = re.fullmatch(r"The object (?:left|right) of the \w+ \w+ is the (\w+ \w+)\.", third).groups()
        assert o1 != o2 and o1 in first and o2 in first  # two different objects of the scene
        colour, shape = o2.split()[0], o1.split()[1]
        assert q["rewrite"].split()[-2:] == [colour, shape] and last == f"So the answer is {q['rewrite']}."
        assert [cands[i]["rewrite"] for i in q["positive_ids"]] == [q["rewrite"]]
    # the text names only anchors, so reading it literally rarely retrieves the answer
    raw = _bow_hit1([q["qry_text"] for q in d.queries], d.queries, d.candidates, "rc")
    print(f"\nreferring_compose, text-only BoW baseline: raw query Hit@1 = {raw:.3f}")
    assert raw <= 0.25
    with pytest.raises(ValueError, match="choose from .*referring_compose"):
        synth_split("test", 1, tasks=("referring_twice",))


def test_referring_chain_answer_follows_three_facts_around_the_ring():
    """The opt-in text-only chain task: each reasoning segment is one of the query's facts, the three
    follow each other from the named object, and the answer is where they end; the facts are shuffled,
    so the answer's own fact sits anywhere in the text, and a literal reading does not find it."""
    import re
    from collections import Counter

    from rime_data.synth_common import CHAIN_HOPS, CHAIN_OBJECTS, EXTRA_TASKS

    assert "referring_chain" in EXTRA_TASKS and "referring_chain" not in TASKS
    d = synth_split("test", 200, seed=5, tasks=("referring_chain",))
    cands = {c["cand_id"]: c for c in d.candidates}
    assert len(cands) == 30 and len(d.queries) == 200
    assert all(c["cand_text"] == c["rewrite"] and not c.get("cand_image") for c in cands.values())
    offsets = Counter()
    for q in d.queries:
        assert not q.get("qry_image")  # text only, queries and corpus: nothing depends on the vision tower
        facts = re.findall(r"After the (\w+ \w+) comes the (\w+ \w+)\.", q["qry_text"])
        nxt = dict(facts)
        assert len(nxt) == CHAIN_OBJECTS and set(nxt.values()) == set(nxt)  # a ring: a permutation of the objects
        names = list(nxt)
        assert len({n.split()[0] for n in names}) == len({n.split()[1] for n in names}) == CHAIN_OBJECTS
        (start,) = re.search(r"three places after the (\w+ \w+)\.$", q["qry_text"]).groups()
        *hops, last = q["reasoning"]
        at = start
        for hop in hops:
            assert hop == f"After the {at} comes the {nxt[at]}."
            at = nxt[at]
        assert len(hops) == CHAIN_HOPS and q["rewrite"].endswith(at) and last == f"So the answer is {q['rewrite']}."
        assert [cands[i]["rewrite"] for i in q["positive_ids"]] == [q["rewrite"]]
        offsets[facts.index((at, nxt[at]))] += 1  # where the answer's own fact sits in the shuffled text
    # shuffled facts: the answer's fact is not at a fixed place in the text
    assert len(offsets) == CHAIN_OBJECTS and max(offsets.values()) < 0.35 * len(d.queries)
    # the text names every object of the ring, so reading it literally does not find the answer
    raw = _bow_hit1([q["qry_text"] for q in d.queries], d.queries, d.candidates, "rch")
    print(f"\nreferring_chain, text-only BoW baseline: raw query Hit@1 = {raw:.3f}")
    assert raw <= 0.25
