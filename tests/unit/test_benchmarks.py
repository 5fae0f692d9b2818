"""Unit tests for benchmarks/run.py: the tokenizer benches return sane figures, the table merges all results.

Untimed: only that the figures exist, are positive and finite; the speed itself is `make bench`'s business.
"""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import run


def _check_figures(res: dict, figures: tuple[str, ...]) -> None:
    for key in figures:
        assert key in res, f"missing {key} in {sorted(res)}"
        assert isinstance(res[key], int | float) and math.isfinite(res[key]) and res[key] > 0, (key, res[key])
    json.dumps(res)  # what main() writes must be JSON


def test_audio_tokenizer_bench_quick():
    res = run.bench_audio_tokenizer(quick=True)
    _check_figures(res, ("encode_audio_s_per_s", "decode_audio_s_per_s", "tokens_per_audio_s"))
    # encodec_toy: 75 frames/s x 8 codebooks
    assert res["tokens_per_audio_s"] == pytest.approx(600, rel=0.05)
    assert (res["sample_rate"], res["n_q"], res["bins"]) == (24000, 8, 256)


def test_text_tokenizer_bench_quick():
    res = run.bench_text_tokenizer(quick=True)
    _check_figures(res, ("encode_tokens_per_s", "decode_tokens_per_s", "tokens_per_caption"))
    assert 256 < res["vocab_size"] <= 512  # byte alphabet + merges, within text_bpe's range
    assert res["tokens_per_caption"] < 40  # whole words are merged: far fewer tokens than bytes


def _result(quick: bool, threads: int = 2, **figures) -> dict:
    device = {"machine": "x86_64", "python": "3.11", "torch": "2.x", "cpu_count": 2, "torch_threads": threads}
    return {"device": device, "quick": quick, **figures}


def test_summary_merges_every_result_json(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "RESULTS", tmp_path)
    (tmp_path / "toyworld.json").write_text(json.dumps(_result(False, frames_per_s_64px=5000.0)))
    (tmp_path / "audio_tokenizer.json").write_text(json.dumps(_result(True, encode_audio_s_per_s=1.0)))
    (tmp_path / "summary.md").write_text("stale\n")
    # this run's result replaces the older file of the same name; config-like and non-numeric keys stay out
    new = _result(True, encode_audio_s_per_s=42.0, clips=2, sample_rate=24000, net={"channels": 8}, note="x")
    (tmp_path / "audio_tokenizer.json").write_text(json.dumps(new))

    text = run.write_summary()  # RESULTS, i.e. tmp_path
    assert (tmp_path / "summary.md").read_text() == text
    lines = text.splitlines()
    assert lines[0] == "Device: x86_64 CPU, 2 cores, 2 torch threads; torch 2.x"
    assert lines[2:4] == ["| benchmark | figure | value |", "|---|---|---|"]
    assert lines[4:] == [  # BENCHES order; quick rows say so
        "| toyworld | frames_per_s_64px | 5000 |",
        "| audio_tokenizer (quick) | encode_audio_s_per_s | 42 |",
    ]


def test_summary_names_each_rows_device_when_they_differ(tmp_path):
    (tmp_path / "shards.json").write_text(json.dumps(_result(False, threads=1, samples_per_s_1_workers=3.0)))
    (tmp_path / "extra.json").write_text(json.dumps(_result(False, threads=2, figure=1.5)))
    lines = run.table(run.load_results(tmp_path)).splitlines()
    cpu = "x86_64 CPU, 2 cores, {} torch threads; torch 2.x"
    assert lines[0] == f"Devices: [1] {cpu.format(1)}; [2] {cpu.format(2)}"
    assert lines[4:] == ["| shards [1] | samples_per_s_1_workers | 3 |", "| extra [2] | figure | 1.5 |"]


def test_unreadable_result_names_the_file(tmp_path):
    (tmp_path / "toyworld.json").write_text("{not json")
    with pytest.raises(ValueError, match="toyworld.json: not a readable benchmark result"):
        run.load_results(tmp_path)
