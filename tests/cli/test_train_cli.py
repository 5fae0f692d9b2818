"""End-to-end runs of train.py / eval.py / prepare.py / generate.py on the smoke toy world."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.cli.conftest import ROOT, cli_env, kill_after_checkpoint, run_cli

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


CASES = [(e, ()) for e in EXPERIMENTS] + [("image_tokenizer", ("tokenizer=continuous",))]


# the families that log perf/tokens_per_s too; the others log samples/s only
TOKEN_FAMILIES = {"m4_pose", "nano4m", "dynamics", "dynamics_shortcut", "mmpt_stage4", "fvlm_joint", "fvlm_coarse_only"}


@pytest.mark.parametrize(("experiment", "extra"), CASES)
def test_every_experiment_runs_with_smoke(experiment, extra, smoke_runs):
    run_dir, proc = smoke_runs(experiment, *extra)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 8
    for name in ("config.yaml", "token_space.json", "overrides.json", "commands.log", "DONE", "checkpoints/last.ckpt"):
        assert (run_dir / name).exists(), name
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    extra = ckpt["mmsuite"]
    assert extra["token_space_sha256"] == json.loads((run_dir / "token_space.json").read_text())["sha256"]
    assert extra["config"]["name"] == experiment and extra["git_rev"] and "torch" in extra["rng"]
    check_what_a_researcher_watches(experiment, run_dir)
    check_the_console(experiment, run_dir, proc)


def check_what_a_researcher_watches(experiment: str, run_dir: Path) -> None:
    """TensorBoard's own reader finds grad norm, throughput, step time (no MFU on a CPU), the hyperparameters with
    the final metrics, and nano4m's generated images, sounds and captions."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    guidance = {"scalars": 0, "images": 0, "audio": 0, "tensors": 0}
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance=guidance)
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    watched = {"train/grad_norm", "perf/samples_per_s", "perf/step_time_s"}
    watched |= {"perf/tokens_per_s"} if experiment in TOKEN_FAMILIES else set()
    assert watched <= scalars, sorted(scalars)
    assert all(v.value > 0 for tag in watched for v in acc.Scalars(tag)) and "perf/mfu" not in scalars
    hp = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(hp["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["name"].string_value == experiment and "model._target_" in start.hparams
    metric_infos = plugin_data_pb2.HParamsPluginData.FromString(hp["_hparams_/experiment"]).experiment.metric_infos
    assert "val/loss" in {m.name.tag for m in metric_infos}
    if experiment == "nano4m":
        assert "val/caption_to_image" in acc.Tags()["images"]
        assert "val/caption_to_audio/0" in acc.Tags()["audio"]
        assert acc.Audio("val/caption_to_audio/0")[-1].encoded_audio_string[:4] == b"RIFF"
        assert {"val/image_to_caption/text_summary", "val/caption_to_audio/prompts/text_summary"} <= set(
            acc.Tags()["tensors"]
        )


def check_the_console(experiment: str, run_dir: Path, proc) -> None:
    """A short summary instead of the config, the known harmless warnings filtered, one bar over the whole run,
    and train.log holding it all."""
    log = (run_dir / "train.log").read_text()
    for text in (f"[mmsuite] run dir: {run_dir} (new run)", f"experiment  {experiment} (seed 1234)", "finished"):
        assert text in log and text in proc.stdout, text
    assert "keep_step_checkpoints:" not in proc.stdout  # the config is in config.yaml; print_config=true prints it
    for quieted in ("Your `IterableDataset` has `__len__` defined", "GPU available:", "💡 Tip", "Total FLOPs"):
        assert quieted not in proc.stdout + proc.stderr + log, quieted
    bars = [line for line in log.splitlines() if line.startswith("train:")]
    assert len(bars) == 1 and "| 8/8 [" in bars[0], bars  # the final state only, sized to the run
    assert (run_dir / "config.yaml").is_file()
    for drawn in drawn_pieces(proc.stdout):  # nothing (dynamics' step lines, ...) is printed into a bar's line
        assert not BAR.search(drawn) or drawn.endswith("]"), drawn


BAR = re.compile(r"\| *\d+/[\d?]+ \[")  # tqdm's "| 3/8 [" (Lightning's bar format)


def drawn_pieces(stream: str) -> list[str]:
    """What a terminal draws, piece by piece: the text between carriage returns and newlines (cursor moves dropped)."""
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", stream)
    return [piece.strip() for piece in re.split(r"[\r\n]", text) if piece.strip()]


def test_command_line_beats_the_debug_preset(tmp_path, shared_data):
    """debug=smoke data.batch_size=3 trains with batch 3: the training stream deals the train frames in batches of
    3 (batches per epoch = frames // 3, one rank, no workers) and the checkpoint's config holds 3."""
    args = ("debug=smoke", "data.batch_size=3", "run=b3", "callbacks.progress_bar=false")
    run_cli("train.py", *args, logs=tmp_path, data=shared_data)
    run_dir = tmp_path / "image_tokenizer" / "b3"
    plan = json.loads((run_dir / "data_plan_rank0.json").read_text())
    dataset = Path(plan["epoch0_shards_by_worker"][0][0]).parent
    train_clips = json.loads((dataset / "manifest.json").read_text())["splits"]["train"]["samples"]
    assert plan["batches_per_epoch"] == train_clips * 16 // 3 != train_clips * 16 // 8  # 16 frames a clip
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["mmsuite"]["config"]["data"]["batch_size"] == 3 and ckpt["global_step"] == 8


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.batch_size=abc", "data.batch_size"),
        ("data.batch_size=0", "data.batch_size must be >= 1, got 0"),
        ("data.batch_size=-4", "data.batch_size must be >= 1, got -4"),
        ("model.net.dimm=8", "model.net.dimm"),
        ("+model.net.dimm=8", "model.net.dimm: unknown setting"),
    ],
)
def test_bad_settings_stop_naming_the_key_before_anything_is_written(override, message, tmp_path, shared_data):
    proc = run_cli("train.py", "debug=smoke", override, logs=tmp_path, data=shared_data, check=False)
    assert proc.returncode != 0 and message in proc.stdout + proc.stderr, proc.stderr[-2000:]
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "train.log"]  # but Hydra's own job log
    assert not written, written


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, shared_data):
    """One finished smoke run of the main experiment, shared by the tests that only read it."""
    logs = tmp_path_factory.mktemp("logs")
    proc = run_cli("train.py", "debug=smoke", "print_config=true", logs=logs, data=shared_data)
    return logs, logs / "image_tokenizer" / "image_tokenizer-smoke", proc


def test_print_config_prints_the_whole_config_and_train_log_keeps_it(smoke_run):
    _, run_dir, proc = smoke_run
    for line in (
        "keep_step_checkpoints: 1",
        "  _target_: mmsuite.lightning_modules.image_tokenizer.ImageTokenizerModule",
    ):
        assert line in proc.stdout and line in (run_dir / "train.log").read_text(), line


def test_finished_run_is_not_retrained(smoke_run, shared_data):
    logs, run_dir, _ = smoke_run
    before = (run_dir / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    proc = run_cli("train.py", "debug=smoke", logs=logs, data=shared_data)
    assert "is finished" in proc.stdout
    assert (run_dir / "checkpoints" / "last.ckpt").stat().st_mtime_ns == before
    assert len((run_dir / "commands.log").read_text().splitlines()) == 1


def test_resume_modes(smoke_run, shared_data, tmp_path):
    logs, run_dir, _ = smoke_run
    proc = run_cli("train.py", "debug=smoke", "resume=never", logs=logs, data=shared_data, check=False)
    assert proc.returncode != 0 and "resume=never" in proc.stderr + proc.stdout
    proc = run_cli("train.py", "debug=smoke", "resume=must", "run=fresh", logs=tmp_path, data=shared_data, check=False)
    assert proc.returncode != 0 and "no checkpoint" in proc.stderr + proc.stdout


def test_tensorboard_holds_scalars_and_images(smoke_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir, _ = smoke_run
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss", "val/loss", "val/psnr", "val/codebook_usage"} <= scalars
    assert acc.Tags()["images"], "no image summaries"
    assert len(acc.Scalars("train/loss")) >= 2


def test_eval_reproduces_checkpoint_validation_metrics(smoke_run, shared_data):
    logs, run_dir, _ = smoke_run
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    stored = torch.load(ckpt, weights_only=True)["mmsuite"]["val_metrics"]
    proc = run_cli("eval.py", "experiment=image_tokenizer", f"ckpt_path={ckpt}", logs=logs, data=shared_data)
    assert "val/psnr" in proc.stdout
    bars = [piece for piece in drawn_pieces(proc.stdout) if BAR.search(piece)]  # the training bar's style
    assert bars and all(piece.startswith("val:") for piece in bars) and "| 2/2 [" in bars[-1], bars
    assert "from the checkpoint" not in proc.stdout + proc.stderr  # eval.py names the checkpoint itself
    assert proc.stdout.count("val/psnr") == 1  # the metrics said once, by eval.py (no Lightning table)
    got = json.loads((run_dir / "eval_val.json").read_text())["metrics"]
    for key in ("val/psnr", "val/loss", "val/codebook_usage"):
        assert got[key] == pytest.approx(stored[key], rel=1e-4, abs=1e-5), key


def test_generate_writes_reconstructions(smoke_run, shared_data, tmp_path):
    logs, run_dir, _ = smoke_run
    run_cli(
        "generate.py",
        "experiment=image_tokenizer",
        f"ckpt_path={run_dir / 'checkpoints/last.ckpt'}",
        f"out_dir={tmp_path / 'gen'}",
        "n_samples=4",
        logs=logs,
        data=shared_data,
    )
    assert list((tmp_path / "gen").glob("*.png"))


def test_eval_and_generate_take_a_debug_preset(smoke_run, shared_data):
    """debug=smoke points eval.py and generate.py at the smoke run's checkpoint, as it points train.py at its run."""
    logs, run_dir, _ = smoke_run
    proc = run_cli("eval.py", "experiment=image_tokenizer", "debug=smoke", logs=logs, data=shared_data)
    assert str(run_dir / "checkpoints" / "last.ckpt") in proc.stdout
    assert "val/psnr" in json.loads((run_dir / "eval_val.json").read_text())["metrics"]
    run_cli("generate.py", "experiment=image_tokenizer", "debug=smoke", "n_samples=2", logs=logs, data=shared_data)
    assert list((run_dir / "generate").glob("*.png"))


def test_token_space_mismatch_stops_with_both_hashes(smoke_run, shared_data):
    logs, run_dir, _ = smoke_run
    proc = run_cli(
        "train.py",
        "debug=smoke",
        "tokenizer=fsq_64k",
        "tokenizer.downsample=8",
        logs=logs,
        data=shared_data,
        check=False,
    )
    err = proc.stderr + proc.stdout
    assert proc.returncode != 0
    saved = json.loads((run_dir / "token_space.json").read_text())["sha256"]
    assert "token space mismatch" in err and saved in err and str(run_dir / "token_space.json") in err


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


def test_resume_after_sigkill_gives_identical_weights(tmp_path, shared_data):
    common = [
        "debug=smoke",
        "trainer.deterministic=true",
        "trainer.max_steps=40",
        "trainer.val_check_interval=10",
        "checkpoint_every_n_steps=3",
        "callbacks.progress_bar=false",
    ]
    run_cli("train.py", *common, "run=straight", logs=tmp_path, data=shared_data)

    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        f"paths.log_dir={tmp_path}",
        f"paths.data_dir={shared_data}",
        *common,
        "run=killed",
    ]
    run_dir = tmp_path / "image_tokenizer" / "killed"
    last = run_dir / "checkpoints" / "last.ckpt"
    killed_at = kill_after_checkpoint(cmd, last, min_step=9, timeout=240)
    assert 9 <= killed_at < 40 and not (run_dir / "DONE").exists()

    out = run_cli("train.py", *common, "run=killed", logs=tmp_path, data=shared_data)
    assert "resuming" in out.stdout
    assert sorted(p.name for p in (tmp_path / "image_tokenizer").iterdir()) == ["killed", "straight"]
    assert len((run_dir / "commands.log").read_text().splitlines()) == 2
    a = _weights(tmp_path / "image_tokenizer" / "straight" / "checkpoints" / "last.ckpt")
    b = _weights(last)
    assert a.keys() == b.keys()
    diff = {k: (a[k] - b[k]).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert not diff, f"resumed run differs from the uninterrupted one (killed at step {killed_at}): {diff}"


def test_corrupt_shard_stops_or_is_skipped(tmp_path):
    data = tmp_path / "data"
    run_cli("prepare.py", "debug=smoke", logs=tmp_path, data=data)
    (dataset,) = list(data.iterdir())
    shard = dataset / "train-000002.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    proc = run_cli("train.py", "debug=smoke", logs=tmp_path, data=data, check=False)
    assert proc.returncode != 0
    assert str(shard) in proc.stderr + proc.stdout
    run_cli("train.py", "debug=smoke", "data.on_corrupt=skip", "run=skip", logs=tmp_path, data=data)
    metrics = json.loads((tmp_path / "image_tokenizer" / "skip" / "metrics.json").read_text())
    assert metrics["corrupt_shards_skipped"] == [str(shard)]


def test_wandb_offline(tmp_path, shared_data):
    run_cli(
        "train.py",
        "debug=smoke",
        "logger=wandb",
        logs=tmp_path,
        data=shared_data,
        extra_env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )
    run_dir = tmp_path / "image_tokenizer" / "image_tokenizer-smoke"
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    offline = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert offline and list(offline[0].glob("*.wandb"))


def test_a_live_run_dir_refuses_a_second_run_and_a_killed_runs_leftovers_are_cleared(tmp_path, shared_data):
    args = ["debug=smoke", "run=live", "checkpoint_every_n_steps=2", "callbacks.progress_bar=false"]
    cmd = [sys.executable, str(ROOT / "train.py"), f"paths.log_dir={tmp_path}", f"paths.data_dir={shared_data}", *args]
    run_dir = tmp_path / "image_tokenizer" / "live"
    last = run_dir / "checkpoints" / "last.ckpt"
    first = subprocess.Popen(
        [*cmd, "trainer.max_steps=100000"], cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 240
        while time.time() < deadline and first.poll() is None and not last.exists():
            time.sleep(0.1)
        assert first.poll() is None and last.exists(), "the first run did not get going"
        second = run_cli(
            "train.py", *args, "trainer.max_steps=100000", logs=tmp_path, data=shared_data, check=False, timeout=180
        )
        err = second.stdout + second.stderr
        assert second.returncode != 0 and "is in use by another run" in err
        assert f"pid {first.pid} on host {socket.gethostname()}" in err and "train.py" in err, err[-2000:]
        assert first.poll() is None, "the refused run disturbed the first one"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert len((run_dir / "commands.log").read_text().splitlines()) == 1  # the refused run wrote nothing
    step = torch.load(last, weights_only=True)["global_step"]
    torn = run_dir / "checkpoints" / f".last.ckpt.tmp-{first.pid}"  # as a kill in the middle of a save leaves it
    torn.write_bytes(b"the first half of a checkpoint")

    end = (step // 4 + 1) * 4  # a few more steps, up to the next validation (optimized_metric needs one)
    third = run_cli("train.py", *args, f"trainer.max_steps={end}", logs=tmp_path, data=shared_data)
    assert "taking over" in third.stderr and f"pid {first.pid}" in third.stderr
    assert f"removed {torn}" in third.stdout and not torn.exists()
    assert (run_dir / "DONE").exists() and (run_dir / "run.lock").read_text() == ""


def test_a_config_error_writes_nothing_into_the_run_dir(tmp_path, shared_data):
    bad = run_cli(
        "train.py", "debug=smoke", "tokenizer=diffusers_vq", "print_config=false", logs=tmp_path, data=shared_data,
        check=False,
    )  # fmt: skip
    assert bad.returncode != 0
    run_dir = tmp_path / "image_tokenizer" / "image_tokenizer-smoke"
    assert not run_dir.exists() or not any(run_dir.iterdir()), sorted(run_dir.iterdir())
    # so the corrected command starts cleanly instead of meeting the failed one's token space
    run_cli("train.py", "debug=smoke", "trainer.max_steps=4", logs=tmp_path, data=shared_data)
    assert (run_dir / "DONE").exists()


def test_resume_refuses_a_changed_config_and_falls_back_from_a_damaged_last_ckpt(tmp_path, shared_data):
    args = ["debug=smoke", "callbacks.progress_bar=false"]
    run_cli("train.py", *args, logs=tmp_path, data=shared_data)  # 8 steps, checkpoints at 4 and 8
    run_dir = tmp_path / "image_tokenizer" / "image_tokenizer-smoke"
    ckpts = run_dir / "checkpoints"
    (run_dir / "DONE").unlink()  # as if it had been killed after its last save

    changed = run_cli("train.py", *args, "model.optim.lr=0.01", logs=tmp_path, data=shared_data, check=False)
    err = changed.stdout + changed.stderr
    assert changed.returncode != 0 and "resume refused" in err
    assert "model.optim.lr: 0.002 in the checkpoint, 0.01 now" in err and "run=NEW_NAME" in err
    assert len((run_dir / "commands.log").read_text().splitlines()) == 1

    assert sorted(p.name for p in ckpts.glob("step*.ckpt")) == ["step0000008.ckpt"]  # keep_step_checkpoints=1
    last = ckpts / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # damaged: truncated
    resumed = run_cli(
        "train.py", *args, "trainer.max_steps=10", "hardware.threads=1", "print_config=false",  # may change
        logs=tmp_path, data=shared_data,
    )  # fmt: skip
    assert f"{last} cannot be loaded; resuming from {ckpts / 'step0000008.ckpt'}" in resumed.stderr
    assert f"(resuming {ckpts / 'step0000008.ckpt'})" in resumed.stdout
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 10
    assert torch.load(last, weights_only=True)["global_step"] == 10
