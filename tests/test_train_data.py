"""The trainer's data: generated in the configured style, a transfer split beside it, and a folder of
another style refused instead of silently trained on."""

from __future__ import annotations

import json

import pytest

from orchestrator.config import parse_config
from orchestrator.train import ensure_data, ensure_transfer_data


def _cfg(tmp_path, **data):
    return parse_config(
        {
            "run": {"out_dir": str(tmp_path / "runs")},
            "data": {
                "path": str(tmp_path / "d"),
                "synth_train": 2,
                "synth_val": 0,
                "synth_test": 2,
                "synth_tasks": ["t2i", "referring"],
                **data,
            },
        }
    )


def test_styled_data_and_a_transfer_split_are_generated_where_configured(tmp_path):
    cfg = _cfg(tmp_path, synth_style="randomised", transfer_path=str(tmp_path / "tr"))
    path = ensure_data(cfg)
    prov = [json.loads(x) for x in (path / "train" / "provenance.jsonl").read_text().splitlines()]
    assert prov and {p["style"] for p in prov} == {"randomised"}
    tr = ensure_transfer_data(cfg)
    assert (tr / "test" / "queries.parquet").is_file() and not (tr / "train").exists()
    assert {json.loads(x)["style"] for x in (tr / "test" / "provenance.jsonl").read_text().splitlines()} == {"transfer"}
    assert ensure_transfer_data(_cfg(tmp_path)) is None  # not configured: no transfer eval


def test_a_data_folder_of_another_style_is_refused_with_the_fix(tmp_path):
    ensure_data(_cfg(tmp_path))  # classic
    with pytest.raises(FileExistsError, match=r"data\.path: .* holds classic synth data but data\.synth_style is randomised"):
        ensure_data(_cfg(tmp_path, synth_style="randomised"))
