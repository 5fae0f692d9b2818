"""The foveated VLM through the entry points: a smoke run end to end (held-out pass losses, cap_ratio with its
interval, both controls, scored greedy captions, attention maps), eval.py and generate.py from its checkpoint,
trainer.max_time stopping a run that the same command then continues, and a video folder through prepare.py."""

from __future__ import annotations

import json

import pytest
import torch

from tests.cli.conftest import run_cli


@pytest.fixture(scope="module")
def fvlm_logs(tmp_path_factory):
    """One log dir for this module: the smoke continuous image tokenizer is trained once."""
    return tmp_path_factory.mktemp("fvlm_logs")


@pytest.fixture(scope="module")
def joint_run(fvlm_logs, shared_data):
    proc = run_cli(
        "train.py", "experiment=fvlm_joint", "debug=smoke", "callbacks.progress_bar=false", "trainer.max_steps=6",
        logs=fvlm_logs, data=shared_data,
    )  # fmt: skip
    return fvlm_logs / "fvlm_joint" / "fvlm_joint-smoke", proc


def test_smoke_run_reports_every_pass_both_controls_and_scored_captions(joint_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = joint_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 6  # between validations: validate_at_end scored the final weights
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


def test_eval_and_generate_rebuild_from_the_checkpoint(joint_run, fvlm_logs, shared_data, tmp_path):
    run_dir, _ = joint_run
    run_cli("eval.py", "experiment=fvlm_joint", "run=fvlm_joint-smoke", logs=fvlm_logs, data=shared_data)
    got = json.loads((run_dir / "eval_val.json").read_text())["metrics"]
    final = json.loads((run_dir / "metrics.json").read_text())["final"]
    for key in ("val/cap_coarse", "val/cap_fine", "val/cap_ratio", "val/cap_autoregressive"):
        assert got[key] == pytest.approx(final[key], rel=1e-5), key
    out = tmp_path / "gen"
    run_cli(
        "generate.py", "experiment=fvlm_joint", "run=fvlm_joint-smoke", "n_samples=2", f"out_dir={out}",
        logs=fvlm_logs, data=shared_data,
    )  # fmt: skip
    captions = json.loads((out / "captions.json").read_text())
    assert captions["passes"] == ["coarse", "fine_2", "autoregressive"] and len(captions["clips"]) == 2
    clip = captions["clips"][0]
    assert clip["truth"].startswith("a") and isinstance(clip["autoregressive"]["caption"], str)
    assert set(clip["autoregressive"]["correct"]) >= {"color", "action", "detail_color", "detail_shape"}
    assert (out / "clip0_attention.png").exists() and (out / "clip1_attention.png").exists()


def test_max_time_stops_cleanly_and_the_same_command_continues(fvlm_logs, shared_data):
    args = (
        "train.py", "experiment=fvlm_joint", "debug=smoke", "run=timed", "callbacks.progress_bar=false",
        "trainer.max_steps=1000", "trainer.max_time={seconds:3}", "checkpoint_every_n_steps=1000",
    )  # fmt: skip
    run_dir = fvlm_logs / "fvlm_joint" / "timed"
    first = run_cli(*args, logs=fvlm_logs, data=shared_data)
    assert "stopped at trainer.max_time" in first.stdout and not (run_dir / "DONE").exists()
    step1 = json.loads((run_dir / "metrics.json").read_text())["global_step"]
    assert 0 < step1 < 1000
    second = run_cli(*args, logs=fvlm_logs, data=shared_data)
    assert "resuming" in second.stdout and "stopped at trainer.max_time" in second.stdout
    step2 = json.loads((run_dir / "metrics.json").read_text())["global_step"]
    assert step2 > step1  # continued from last.ckpt, with a fresh 3 s of its own


def test_a_video_folder_with_captions_goes_through_prepare(tmp_path, fvlm_logs, shared_data):
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
    proc = run_cli("prepare.py", *args, "data.source.fps=5", logs=fvlm_logs, data=shared_data)
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
    (root / "v0.txt").unlink()
    proc = run_cli("prepare.py", *args, "data.source.fps=4", logs=fvlm_logs, data=shared_data, check=False)
    assert proc.returncode != 0 and "v0.txt" in proc.stderr
