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


def test_benches_compose_the_config_train_runs():
    """A bench's model comes from the composed, checked train config: interpolations resolve (a YAML file read alone
    hands the net ``${oc.select:...}`` strings) and a bad key stops the bench naming it."""
    cfg = run.compose("train", ["experiment=image_tokenizer"])
    assert cfg.model.net.latent_channels == 8 and cfg.model.net.levels == [8, 8, 8, 8]  # an oc.select default
    assert cfg.paths.run_dir is None  # a bench has no run folder
    with pytest.raises(ValueError, match=r"model\.net\.bogus"):
        run.compose("train", ["experiment=image_tokenizer", "+model.net.bogus=1"])


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


def test_m4_bench_quick():
    res = run.bench_m4(quick=True)  # the M4 layout and masking at batch 96, a tiny net for the timed steps
    _check_figures(res, ("real_tokens_per_s", "padded_tokens_per_s", "s_per_step", "peak_memory_mib", "params_M"))
    assert res["padded_tokens_per_s"] > res["real_tokens_per_s"]
    for side in ("encoder", "decoder", "compute"):
        ours, full = res[f"pad_share_{side}"], res[f"pad_full_share_{side}"]
        assert 0 <= ours < 1 and 0 <= full < 1, (side, ours, full)
        assert ours < full, (side, ours, full)  # padding to the batch maximum never pads more than to 256/256
    # the notes' Monte-Carlo (sim_budget.py): padded to 256 / 256, 46 % of the encoder and 63 % of the decoder
    assert res["pad_full_lengths"] == [256, 256]
    assert res["pad_full_share_encoder"] == pytest.approx(0.46, abs=0.02)
    assert res["pad_full_share_decoder"] == pytest.approx(0.63, abs=0.02)
    assert res["goal_pad_share"] == 0.10
    assert res["pad_goal_met"] == (res["pad_share_compute"] < 0.10)
    assert res["padding_batch"] == 96 and res["batch"] == 4
    assert res["shape"]["lengths"] == [256, 39, 256, 39]
    assert res["device_type"] in ("cpu", "cuda") and res["device_name"] and res["peak_memory_method"]
    row = "| m4 (quick) | pad_share_compute |"
    assert row in run.table({"m4": {"device": run.device_info(), "quick": True, **res}})
    # the published shape's vocabularies (64,000 FSQ codes, factorised; 8192 pose bins + 3) under the same masking
    assert res["published_shape"]["vocabs"] == [64000, 8195, 64000, 8195]
    assert res["published_real_tokens_per_s"] > 0 and res["published_model_gflop_per_step"] > 0
    assert res["published_logits_share_of_step"] > 0  # a ratio of two timings: above 1 is possible under load
    assert res["published_logits_factorised_vs_table"] > 0 and res["published_goal_logits_factorised_vs_table"] == 1.3
    assert set(res["published_logits_targets"]) == {"tok_rgb", "tok_rgb_next"}


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


def test_fvlm_bench_quick():
    import torch

    full = run._fvlm_config(quick=False)  # what the bench times: the notes' shape
    assert (full.data.clip_frames, full.data.frames, full.features.grid, full.features.dim) == (24, 16, 18, 384)
    assert full.model.net.lm.hidden_size == 576 and full.model.net.lm.vocab_size == run.FVLM_VOCAB
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as `--quick --threads 1`: a tiny model's ops only wait for a second core
    try:
        res = run.bench_fvlm(quick=True)  # a tiny LM over 2 of the frames, batches 1 and 2 on a CPU
    finally:
        torch.set_num_threads(threads)
    assert res["shape"]["features"] == [325, 384] and res["shape"]["frames"] == 2
    assert res["shape"]["stored_frames"] == 24 and res["shape"]["caption_tokens"] == 64
    if res["device_type"] == "cpu":
        _check_figures(res, ("samples_per_s_b1", "samples_per_s_b2", "memory_per_sample_mib"))
        # quick runs both batches in this process: the second peak can add nothing to what the first left resident
        assert res["peak_memory_mib_b2"] >= 0 and res["largest_batch_cpu_estimate"] >= 2
    else:
        _check_figures(res, ("samples_per_s", "peak_memory_mib"))
        assert res["batch"] == 32
