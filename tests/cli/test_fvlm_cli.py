"""The foveated VLM through the entry points, on as few runs as the checks allow (each one costs seconds of imports):
a 1 ms ``trainer.max_time`` makes each command train one step and stop (Lightning validates a run that stops early),
so two runs of the same command test the clean stop, the continuation and the held-out figures; a video folder goes
through prepare.py. The plain smoke runs are tests/cli/test_train_cli.py's test_every_experiment_runs_with_smoke
(fvlm_joint and fvlm_coarse_only); generate.py's fvlm path and a missing caption file are unit tests
(tests/unit/test_fvlm_module.py), eval.py's rebuild is test_train_cli's."""

from __future__ import annotations

import json

import pytest
import torch

from tests.cli.conftest import run_cli

TIMED = ("experiment=fvlm_joint", "debug=smoke", "run=timed", "trainer.max_time={milliseconds: 1}")


@pytest.fixture(scope="module")
def timed_run(tmp_path_factory, shared_data):
    """The same command twice: ``(logs, run_dir, [(stdout, metrics.json) of each command])``."""
    logs = tmp_path_factory.mktemp("fvlm_logs")
    run_dir = logs / "fvlm_joint" / "timed"
    commands = []
    for _ in range(2):
        proc = run_cli("train.py", *TIMED, logs=logs, data=shared_data)
        commands.append((proc.stdout, json.loads((run_dir / "metrics.json").read_text())))
    return logs, run_dir, commands


def test_max_time_stops_cleanly_and_the_same_command_continues(timed_run):
    _, run_dir, [(out1, metrics1), (out2, metrics2)] = timed_run
    assert "(new run)" in out1 and "stopped at trainer.max_time (step 1)" in out1
    assert metrics1["global_step"] == 1
    assert "resuming" in out2 and "stopped at trainer.max_time (step 2)" in out2  # its own 1 ms, from step 1
    assert metrics2["global_step"] == 2
    assert not (run_dir / "DONE").exists()  # a chunk, not a finished run


def test_validation_reports_every_pass_both_controls_scored_captions_and_attention_maps(timed_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir, [_, (_, metrics)] = timed_run
    final = metrics["final"]
    for key in (
        "train/cap_coarse", "train/cap_fine_2", "train/rec_fine_2", "val/cap_coarse", "val/cap_fine_1",
        "val/cap_fine_2", "val/cap_fine", "val/rec_coarse", "val/cap_autoregressive", "val/cap_shuffled",
        "val/attn_entropy_fine_2", "val/attn_max_coarse", "val/glimpse_corr_fine_2",
        "val/caption/autoregressive/detail_shape", "val/caption/coarse/color", "val/caption/majority/action",
    ):  # fmt: skip
        assert key in final, key
    for name in ("cap_ratio", "cap_ratio_shuffled"):
        assert final[f"val/{name}_lo"] <= final[f"val/{name}"] <= final[f"val/{name}_hi"]
    assert final["val/cap_ratio"] == pytest.approx(final["val/cap_coarse"] / final["val/cap_fine"], rel=1e-4)
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    assert {"val/attention/coarse", "val/attention/fine_2"} <= set(acc.Tags()["images"])
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert any(k.startswith("net.lm.") for k in ckpt["state_dict"])


def test_a_video_folder_with_captions_goes_through_prepare(tmp_path, shared_data):
    """A missing caption file is a unit test (tests/unit/test_fvlm_module.py)."""
    pytest.importorskip("av")
    from mmsuite.datamodules.shards import decode_sample, iter_raw_samples
    from mmsuite.sources import toyworld
    from mmsuite.sources.video import write_video

    root = tmp_path / "videos"
    cfg = toyworld.ToyWorldConfig(image_size=48, frames=20, detail=True)
    for i in range(5):
        clip = toyworld.make_clip(cfg, i)
        write_video(root / f"v{i}.mp4", clip.frames, fps=10)
        (root / f"v{i}.txt").write_text(clip.caption + "\n")
    args = ["experiment=fvlm_joint", "debug=smoke", "data.source.kind=video", f"data.source.root={root}"]
    proc = run_cli("prepare.py", *args, "data.source.fps=5", logs=tmp_path / "logs", data=shared_data)
    assert "fvlm clips (videos)" in proc.stderr + proc.stdout
    folders = [p for p in shared_data.glob("fvlm-video-*") if (p / "manifest.json").exists()]
    assert len(folders) == 1
    manifest = json.loads((folders[0] / "manifest.json").read_text())
    # 20 frames at 10 fps = 2 s; at 5 fps -> 10 frames -> one 8-frame clip per video
    assert sum(s["samples"] for s in manifest["splits"].values()) == 5
    assert manifest["feature_shape"] == [65, 64] and manifest["latent_shape"] == [8, 4, 4]
    sample = decode_sample(next(iter_raw_samples(str(next(folders[0].glob("train-*.tar"))))))
    assert sample["features"].shape == (8, 65, 64) and sample["features"].dtype.name == "float16"
    assert sample["caption"].startswith("a ") and sample["attributes"]["video"].startswith("v")
    assert list(folders[0].glob("text_bpe-*/tokenizer.json"))  # trained on the train captions
