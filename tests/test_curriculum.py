"""PLUME's explicit-to-latent curriculum: the step -> phase schedule, segment handling and the
teacher-forced text each phase leaves."""

from __future__ import annotations

import pytest

from rime_model.curriculum import CurriculumSchedule, Phase, continuation_text, split_segments
from rime_model.prompts import PromptTemplate
from rime_model.tokens import SpecialTokens


def test_schedule_replaces_segments_left_to_right_and_drops_the_answer_last():
    s = CurriculumSchedule(steps_per_stage=10, segments=4, latent_steps=8)
    assert s.total_steps == 50 and s.per_segment == 2
    assert s.at(0) == Phase(stage=0, latent_steps=0, replaced=0, keep_answer=True)
    assert s.at(9).stage == 0 and s.at(10) == Phase(1, 2, 1, True)
    assert [s.at(10 * k).latent_steps for k in range(5)] == [0, 2, 4, 6, 8]
    assert s.at(44) == Phase(4, 8, 4, True)  # first half of the last stage keeps the answer
    assert s.at(45) == Phase(4, 8, 4, False) and s.at(49) == Phase(4, 8, 4, False)
    assert [t for t in range(50) if s.stage_changes_at(t)] == [10, 20, 30, 40]  # optimizer resets
    with pytest.raises(ValueError):
        s.at(50)


def test_no_curriculum_is_fully_latent_from_the_first_step_with_the_same_budget():
    s = CurriculumSchedule(steps_per_stage=10, segments=4, latent_steps=8, curriculum=False)
    assert s.total_steps == 50
    assert s.at(0) == Phase(4, 8, 4, True) and s.at(24).keep_answer and not s.at(25).keep_answer
    assert not any(s.stage_changes_at(t) for t in range(50))


def test_longer_final_stage_keeps_the_budget_equal_between_the_arms():
    cur = CurriculumSchedule(steps_per_stage=10, segments=4, latent_steps=8, final_stage_steps=60)
    flat = CurriculumSchedule(steps_per_stage=10, segments=4, latent_steps=8, curriculum=False, final_stage_steps=60)
    assert cur.total_steps == flat.total_steps == 100
    assert cur.at(39).stage == 3 and cur.at(40) == Phase(4, 8, 4, True)
    assert cur.at(69).keep_answer and not cur.at(70).keep_answer and not cur.at(99).keep_answer  # 30 answer-free steps
    assert flat.at(49).keep_answer and not flat.at(50).keep_answer
    assert [t for t in range(100) if cur.stage_changes_at(t)] == [10, 20, 30, 40]


def test_first_stage_skips_the_early_stages_and_their_budget():
    cur = CurriculumSchedule(steps_per_stage=10, segments=4, latent_steps=8, final_stage_steps=20, first_stage=1)
    flat = CurriculumSchedule(
        steps_per_stage=10, segments=4, latent_steps=8, curriculum=False, final_stage_steps=20, first_stage=1
    )
    assert cur.total_steps == flat.total_steps == 3 * 10 + 20
    assert cur.at(0) == Phase(1, 2, 1, True) and cur.at(9).stage == 1 and cur.at(10) == Phase(2, 4, 2, True)
    assert cur.at(30) == Phase(4, 8, 4, True) and cur.at(39).keep_answer and not cur.at(40).keep_answer
    assert [t for t in range(50) if cur.stage_changes_at(t)] == [10, 20, 30]  # none at step 0: Adam is fresh there
    assert flat.at(0) == Phase(4, 8, 4, True) and not flat.at(25).keep_answer
    last = CurriculumSchedule(steps_per_stage=10, segments=4, latent_steps=8, first_stage=4)  # = the ablation
    assert last.total_steps == 10 and last.at(0) == Phase(4, 8, 4, True) and not last.at(5).keep_answer


def test_last_stage_ends_the_curriculum_early_without_a_final_stage():
    cot = CurriculumSchedule(steps_per_stage=10, segments=4, latent_steps=8, final_stage_steps=60, last_stage=0)
    assert cot.total_steps == 10 and cot.end_stage == 0  # explicit reasoning only: a CoT start model
    assert all(cot.at(t) == Phase(0, 0, 0, True) for t in range(10))
    mid = CurriculumSchedule(steps_per_stage=10, segments=4, latent_steps=8, first_stage=1, last_stage=2)
    assert mid.total_steps == 20 and mid.at(19) == Phase(2, 4, 2, True)
    assert [t for t in range(20) if mid.stage_changes_at(t)] == [10]
    full = CurriculumSchedule(steps_per_stage=10, segments=4, latent_steps=8, last_stage=4)
    assert full.total_steps == CurriculumSchedule(steps_per_stage=10).total_steps == 50


def test_schedule_rejects_bad_settings():
    with pytest.raises(ValueError, match=r"plume.last_stage: must be -1 \(to the end\) or in plume.first_stage"):
        CurriculumSchedule(steps_per_stage=10, first_stage=2, last_stage=1)
    with pytest.raises(ValueError, match="no-curriculum ablation"):
        CurriculumSchedule(steps_per_stage=10, curriculum=False, last_stage=0)
    with pytest.raises(ValueError, match="plume.first_stage"):
        CurriculumSchedule(steps_per_stage=10, segments=4, first_stage=5)
    with pytest.raises(ValueError, match="multiple of plume.segments"):
        CurriculumSchedule(steps_per_stage=10, segments=4, latent_steps=6)
    with pytest.raises(ValueError, match="steps_per_stage"):
        CurriculumSchedule(steps_per_stage=1)
    with pytest.raises(ValueError, match="final_stage_steps"):
        CurriculumSchedule(steps_per_stage=10, final_stage_steps=1)


def test_split_segments_merges_pads_and_reports():
    four = ["a.", "b.", "c.", "d."]
    assert split_segments(four, 4) == (four, True)
    assert split_segments(["1", "2", "3", "4", "5", "6"], 4) == (["1", "2 3", "4", "5 6"], True)
    assert split_segments(["x.", "y."], 4) == (["x.", "y.", "", ""], False)
    assert split_segments(None, 4) == (["", "", "", ""], False)


def test_continuation_text_per_phase():
    t, tok = PromptTemplate(), SpecialTokens()
    segs = ["S1.", "S2.", "S3.", "S4."]
    assert (
        continuation_text(t, tok, segs, Phase(0, 0, 0, True), "a red circle")
        == "<eot>S1. S2. S3. S4.</think>\na red circle<gen_emb>"
    )
    assert continuation_text(t, tok, segs, Phase(3, 6, 3, True), "a red circle") == "<eot>S4.</think>\na red circle<gen_emb>"
    final = continuation_text(t, tok, segs, Phase(4, 8, 4, False), "a red circle")
    assert final == "<eot></think>\n<gen_emb>" == t.latent_suffix(tok)  # the last phase is exactly inference's layout


def test_explicit_reasoning_score_on_hand_made_outputs():
    from rime_model.curriculum import score_explicit_reasoning

    segs = ["The image shows a red circle.", "The anchor is the red circle.", "", "So the answer is a red circle."]
    s = score_explicit_reasoning(
        "The image  shows a red circle. The anchor is the blue square. So the answer is a red circle.",
        " a red circle",
        segs,
        "a red circle",
    )
    assert s.answer_correct and s.segments_exact == (True, False, False, True)  # an empty segment never counts
    s = score_explicit_reasoning("", "a blue square", segs, "a red circle")
    assert not s.answer_correct and s.segments_exact == (False,) * 4


def test_probe_counts_rows_without_reasoning(tmp_path, tiny):
    """A query with no reasoning cannot be probed: it is counted in ``no_reasoning``, never dropped silently."""
    import pyarrow.parquet as pq

    from orchestrator.plume_probe import explicit_reasoning_probe
    from rime_data.schema import QUERY_SCHEMA, write_table
    from rime_data.synth import write_synth

    write_synth(tmp_path, {"test": 3}, seed=0, tasks=("referring",))
    path = tmp_path / "test" / "queries.parquet"
    rows = pq.read_table(path).to_pylist()
    rows[1]["reasoning"] = None
    write_table(rows, QUERY_SCHEMA, path)
    res = explicit_reasoning_probe(tiny, tmp_path, "test", queries_per_task=3, segments=4, max_new_tokens=8)
    assert (res["n"], res["skipped"], res["no_reasoning"]) == (2, 0, 1)
    assert set(res["metrics"]) == (
        {"plume/explicit_answer_acc", "plume/explicit_latent_hit1"} | {f"plume/explicit_segment{i}_exact" for i in range(4)}
    )
    assert res["metrics"]["plume/explicit_latent_hit1"] in (0.0, 0.5, 1.0)  # Hit@1 over the 2 probed queries
