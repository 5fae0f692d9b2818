"""The dynamics family through the entry points: smoke training end to end, eval.py rollout flags, a video
folder through prepare.py, and the same short/long sequence on both ranks under hardware=ddp_cpu."""

from __future__ import annotations

import json

import pytest
import torch

from tests.cli.conftest import run_cli


@pytest.fixture(scope="module")
def dyn_logs(tmp_path_factory):
    """One log dir for this module: the smoke continuous image tokenizer is trained once."""
    return tmp_path_factory.mktemp("dyn_logs")


@pytest.fixture(scope="module")
def shortcut_run(dyn_logs, shared_data):
    # 10 steps, validations every 4: the budget ends between validations, and the final weights must still be
    # scored with the rollout (validate_at_end)
    run_cli(
        "train.py", "experiment=dynamics_shortcut", "debug=smoke", "callbacks.progress_bar=false",
        "trainer.max_steps=10", logs=dyn_logs, data=shared_data,
    )  # fmt: skip
    return dyn_logs / "dynamics_shortcut" / "dynamics_shortcut-smoke"


def test_smoke_shortcut_run_trains_evaluates_and_logs_gifs(shortcut_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = json.loads((shortcut_run / "metrics.json").read_text())
    assert metrics["global_step"] == 10
    final = metrics["final"]
    for key in (
        "train/flow_loss",
        "train/boot_loss",
        "val/loss",
        "val/denoise/psnr_k4",
        "val/denoise/psnr_k64",
        "val/copy_last/psnr_h1",
        "val/rollout_k4/psnr_h1_4",
        "val/rollout_k64/psnr_h4",
        "val/rollout_k4/gain_over_copy_h1_4",
        "val/k4_vs_k64/psnr_gap_h1_4",
        "val/k4_vs_k64/speedup",
        "val/rollout_k4/frames_per_s",
    ):
        assert key in final, key
    lengths = json.loads((shortcut_run / "batch_lengths_rank0.json").read_text())
    assert len(lengths) == 10 and {r["length"] for r in lengths} <= {"S", "L"}
    assert all((r["T"], r["B"]) == ((4, 4) if r["length"] == "S" else (8, 2)) for r in lengths)
    acc = EventAccumulator(str(shortcut_run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    gifs = [t for t in acc.Tags()["images"] if t.startswith("val/rollout/")]
    assert gifs and acc.Images(gifs[0])[-1].encoded_image_string[:6] in (b"GIF89a", b"GIF87a")
    ckpt = torch.load(shortcut_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any(k.startswith("_decoder") for k in ckpt["state_dict"])  # the frozen decoder is not saved


def test_eval_takes_context_steps_and_tau_ctx_flags(shortcut_run, dyn_logs, shared_data):
    proc = run_cli(
        "eval.py", "experiment=dynamics_shortcut", "run=dynamics_shortcut-smoke", "rollout.context=2",
        "rollout.horizon=5", "rollout.steps=[2,8]", "rollout.tau_ctx=0.05", logs=dyn_logs, data=shared_data,
    )  # fmt: skip
    got = json.loads((shortcut_run / "eval_val.json").read_text())["metrics"]
    assert "val/rollout_k2/psnr_h5" in got and "val/k2_vs_k8/speedup" in got and "val/rollout_k4/psnr_h1" not in got
    assert "val/copy_last/psnr_h5" in got and "val/rollout_k8" in proc.stdout


def test_a_video_folder_goes_through_prepare(tmp_path, dyn_logs, shared_data):
    pytest.importorskip("av")
    from mmsuite.sources import toyworld
    from mmsuite.sources.video import write_video

    root = tmp_path / "videos"
    cfg = toyworld.ToyWorldConfig(image_size=48, frames=20)
    for i in range(4):
        frames = toyworld.make_clip(cfg, i).frames[:, :, :, :]
        write_video(root / f"cam{i % 2}" / f"v{i}.mp4", frames[:, 4:44], fps=10)  # 40x48: not square
    proc = run_cli(
        "prepare.py", "experiment=dynamics", "debug=smoke", "data.source.kind=video", f"data.source.root={root}",
        "data.source.fps=5", logs=dyn_logs, data=shared_data,
    )  # fmt: skip
    assert "dynamics latents (videos)" in proc.stderr + proc.stdout
    folders = [p for p in shared_data.glob("dynlatents-video-*") if (p / "manifest.json").exists()]
    assert len(folders) == 1
    manifest = json.loads((folders[0] / "manifest.json").read_text())
    # 20 frames at 10 fps = 2 s; at 5 fps -> 10 frames -> one 8-frame clip per video
    assert sum(s["samples"] for s in manifest["splits"].values()) == 4
    assert manifest["source"]["kind"] == "video" and manifest["latent_shape"] == [8, 4, 4]
    from mmsuite.datamodules.shards import decode_sample, iter_raw_samples

    shard = next(folders[0].glob("train-*.tar"))
    sample = decode_sample(next(iter_raw_samples(str(shard))))
    assert sample["latents"].shape == (8, 8, 4, 4) and (sample["actions"] == -1).all()
    assert sample["clip"]["video"].startswith("cam")


def test_ddp_cpu_ranks_train_the_same_short_long_sequence(tmp_path, dyn_logs, shared_data):
    tok = dyn_logs / "image_tokenizer"
    if tok.exists():  # reuse the module's smoke tokenizer instead of training another one
        (tmp_path / "image_tokenizer").symlink_to(tok, target_is_directory=True)
    run_cli(
        "train.py", "experiment=dynamics_shortcut", "debug=smoke", "hardware=ddp_cpu", "callbacks.progress_bar=false",
        "trainer.max_steps=12", logs=tmp_path, data=shared_data, timeout=400,
    )  # fmt: skip
    run_dir = tmp_path / "dynamics_shortcut" / "dynamics_shortcut-smoke"
    ranks = [json.loads((run_dir / f"batch_lengths_rank{r}.json").read_text()) for r in (0, 1)]
    seqs = [[(r["length"], r["T"], r["B"]) for r in rank] for rank in ranks]
    assert len(seqs[0]) == 12 and seqs[0] == seqs[1]
    assert {"S", "L"} == {k for k, _, _ in seqs[0]}
    plans = [json.loads((run_dir / f"data_plan_rank{r}.json").read_text()) for r in (0, 1)]
    assert plans[0]["batches_per_epoch"] == plans[1]["batches_per_epoch"] > 0
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 12
