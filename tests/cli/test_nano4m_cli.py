"""nano4m end to end: train.py experiment=nano4m debug=smoke trains its smoke tokenizers, builds the token shards
and reports the image -> caption and caption -> image attribute metrics."""

from __future__ import annotations

import json

from tests.cli.conftest import run_cli


def test_nano4m_smoke_reports_caption_and_image_attribute_metrics(tmp_path, shared_data):
    logs = tmp_path / "logs"
    run_cli("train.py", "experiment=nano4m", "debug=smoke", "logger=csv", logs=logs, data=shared_data)
    metrics = json.loads((logs / "nano4m" / "nano4m-smoke" / "metrics.json").read_text())["final"]
    want = [f"{m}_{k}" for m in ("loss", "acc") for k in ("tok_rgb", "caption", "audio")]
    for task in ("image_to_caption", "caption_to_image"):
        for attr in ("color", "action"):
            want += [f"{task}/{attr}_acc", f"{task}/{attr}_majority_acc", f"{task}/{attr}_chance"]
        want += [f"{task}/both_acc", f"{task}/token_acc"]
    want += ["image_to_caption/exact_caption", "caption_to_image/probe_real_color_acc"]
    missing = [k for k in want if f"val/{k}" not in metrics]
    assert not missing, (missing, sorted(metrics))
    assert metrics["val/image_to_caption/color_chance"] == 1 / 8
    assert all(0.0 <= metrics[f"val/{k}"] <= 1.0 for k in want if "loss" not in k)
    manifest = json.loads(next(shared_data.glob("nano4m-*/manifest.json")).read_text())
    assert [r["name"] for r in manifest["token_space"]["ranges"]][:4] == ["text", "specials", "image", "audio_q0"]
