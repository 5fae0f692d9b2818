"""nano4m end to end: train.py experiment=nano4m debug=smoke trains its smoke tokenizers, builds the token shards
and reports the image -> caption and caption -> image attribute metrics; generate.py writes, from that checkpoint,
the images, sounds and captions a user looks at and listens to."""

from __future__ import annotations

import json
import wave

import pytest
from PIL import Image

from tests.cli.conftest import run_cli


@pytest.fixture(scope="module")
def nano4m_logs(smoke_runs):
    """The log dir of the session's smoke run (the one test_every_experiment_runs_with_smoke checks too)."""
    run_dir, _ = smoke_runs("nano4m")
    return run_dir.parents[1]


def test_nano4m_smoke_reports_caption_and_image_attribute_metrics(nano4m_logs, shared_data):
    metrics = json.loads((nano4m_logs / "nano4m" / "nano4m-smoke" / "metrics.json").read_text())["final"]
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


def test_generate_writes_images_sounds_and_captions_that_decode(nano4m_logs, shared_data, tmp_path):
    out = tmp_path / "gen"
    run_cli("generate.py", "experiment=nano4m", "debug=smoke", f"out_dir={out}", logs=nano4m_logs, data=shared_data)
    record = json.loads((out / "samples.json").read_text())
    prompts = record["prompts"]
    assert prompts and all(p.split() for p in prompts)
    for name in ("caption_to_image", "image_to_caption"):
        with Image.open(out / record[name]["file"]) as image:
            image.load()
            assert image.width > 96 and image.height >= 96
    assert len(record["image_to_caption"]["captions"]) == len(prompts)
    sounds = record["caption_to_sound"]["files"] + record["sound_to_caption"]["files"]
    assert len(sounds) == 2 * len(prompts)
    for name in sounds:
        with wave.open(str(out / name)) as w:
            assert w.getnframes() > 0 and w.getnchannels() == 1
    assert len(record["sound_to_caption"]["captions"]) == len(prompts)
    chain = record["chain"]  # the experiment's chained example: sound -> caption -> image
    assert chain["given"] == ["audio"] and chain["targets"] == ["caption", "tok_rgb"]
    assert len(chain["caption"]) == len(prompts) and chain["given_files"] == record["sound_to_caption"]["files"]
    with Image.open(out / chain["file"]) as image:
        image.load()
