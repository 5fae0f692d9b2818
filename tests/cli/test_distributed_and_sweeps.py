"""Multi-process training (2 CPU processes, gloo) and Hydra multirun sweeps."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from tests.cli.conftest import ROOT, cli_env, run_cli


def test_ddp_cpu_one_run_dir_disjoint_shards_equal_batches(tmp_path, shared_data):
    proc = run_cli(
        "train.py",
        "debug=smoke",
        "hardware=ddp_cpu",
        "callbacks.progress_bar=false",
        logs=tmp_path,
        data=shared_data,
        timeout=400,
    )
    runs = list((tmp_path / "image_tokenizer").iterdir())
    assert [p.name for p in runs] == ["image_tokenizer-smoke"], runs
    run_dir = runs[0]
    plans = [json.loads((run_dir / f"data_plan_rank{r}.json").read_text()) for r in (0, 1)]
    assert [p["world_size"] for p in plans] == [2, 2]
    shards = [{s for role in p["epoch0_shards_by_worker"] for s in role} for p in plans]
    assert shards[0] and shards[1] and not shards[0] & shards[1]
    assert plans[0]["batches_per_epoch"] == plans[1]["batches_per_epoch"] > 0
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 8
    assert proc.stdout.count("[mmsuite] run dir:") == 1  # side effects on rank 0 only


def test_ddp_validation_metrics_equal_the_single_process_ones(tmp_path, shared_data):
    """eval.py of one checkpoint over the whole validation split on 1 and on 2 processes (gloo): the metric objects'
    reduction over ranks gives the single-process values (PSNR and loss means, the codebook histogram). The split
    has an even number of frames, so the two ranks share it with no wrap-around padding (a padded frame would count
    twice). Both in fp32: hardware=cpu picks bf16 autocast on CPUs with native bf16."""
    run_cli(
        "train.py",
        "debug=smoke",
        "trainer.limit_val_batches=1.0",  # stored in the checkpoint's config: eval.py validates on every frame
        "callbacks.progress_bar=false",
        logs=tmp_path,
        data=shared_data,
        timeout=400,
    )
    run_dir = tmp_path / "image_tokenizer" / "image_tokenizer-smoke"
    data = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]
    manifests = [json.loads(p.read_text()) for p in shared_data.glob("toyworld-*/manifest.json")]
    (val_frames,) = {
        m["splits"]["val"]["samples"] * m["source"]["world"]["frames"]
        for m in manifests
        if m["source"]["n_clips"] == data["n_clips"]
        and m["source"]["world"] == {**m["source"]["world"], **data["world"]}
    }
    assert val_frames % 2 == 0 and val_frames > 2 * data["val_batch_size"]  # several batches a rank, no padding
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    got = {}
    for hardware in ("cpu", "ddp_cpu"):
        run_cli(
            "eval.py",
            "experiment=image_tokenizer",
            f"ckpt_path={ckpt}",
            f"hardware={hardware}",
            "trainer.precision=32-true",
            logs=tmp_path,
            data=shared_data,
            timeout=400,
        )
        got[hardware] = json.loads((run_dir / "eval_val.json").read_text())["metrics"]
    for key in ("val/psnr", "val/loss", "val/codebook_usage", "val/perplexity"):
        assert got["ddp_cpu"][key] == pytest.approx(got["cpu"][key], rel=1e-5), key


def test_multirun_sweep_writes_job_dirs_and_summary(tmp_path, shared_data):
    proc = run_cli(
        "train.py",
        "-m",
        "debug=smoke",
        "sweep=lr",
        "model.optim.lr=0.001,0.003",
        "callbacks.progress_bar=false",
        logs=tmp_path,
        data=shared_data,
        timeout=400,
    )
    sweep = tmp_path / "image_tokenizer" / "sweeps" / "lr"
    for job in ("0", "1"):
        assert (sweep / job / "metrics.json").exists() and (sweep / job / "DONE").exists()
    rows = json.loads((sweep / "summary.json").read_text())
    assert [r["overrides"] for r in rows] == [
        ["debug=smoke", "model.optim.lr=0.001"],
        ["debug=smoke", "model.optim.lr=0.003"],
    ] or all("model.optim.lr=" in " ".join(r["overrides"]) for r in rows)
    assert all("val/psnr" in r["final"] for r in rows)
    table = (sweep / "summary.md").read_text()
    assert "model.optim.lr=0.001" in table and "model.optim.lr=0.003" in table and "val/psnr" in table
    assert "model.optim.lr=0.003" in proc.stdout


def test_failed_job_does_not_stop_the_sweep_with_fail_fast_off(tmp_path, shared_data):
    run_cli(
        "train.py",
        "-m",
        "debug=smoke",
        "sweep=bad",
        "fail_fast=false",
        "model.optim.lr=-1.0,0.001",
        "callbacks.progress_bar=false",
        logs=tmp_path,
        data=shared_data,
        timeout=400,
    )
    rows = {r["job"]: r for r in json.loads((tmp_path / "image_tokenizer/sweeps/bad/summary.json").read_text())}
    assert rows["0"]["status"] != "done" and rows["1"]["status"] == "done"


@pytest.mark.parametrize("hardware", ["ddp_cpu", "multinode", "fsdp"])
def test_multirun_with_ddp_stops_with_a_clear_message(tmp_path, shared_data, hardware):
    proc = run_cli(
        "train.py",
        "-m",
        "debug=smoke",
        f"hardware={hardware}",
        "sweep=ddp",
        logs=tmp_path,
        data=shared_data,
        check=False,
    )
    assert proc.returncode != 0
    assert "multirun (-m) cannot run a multi-process strategy" in proc.stdout + proc.stderr


def test_optuna_study_in_sqlite_continues(tmp_path, shared_data):
    args = [
        "hparams_search=optuna_image_tokenizer",
        "debug=smoke",
        "hydra.sweeper.n_trials=2",
        "callbacks.progress_bar=false",
    ]
    run_cli("train.py", *args, logs=tmp_path, data=shared_data, timeout=400)
    db = tmp_path / "image_tokenizer" / "sweeps" / "optuna.db"
    assert db.exists()
    import optuna

    study = optuna.load_study(study_name="image_tokenizer_optuna", storage=f"sqlite:///{db}")
    assert len(study.trials) == 2
    run_cli("train.py", *args, logs=tmp_path, data=shared_data, timeout=400)  # the same command again
    study = optuna.load_study(study_name="image_tokenizer_optuna", storage=f"sqlite:///{db}")
    assert len(study.trials) == 4  # the stopped study was continued, not restarted


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_nodes_share_one_run_dir_and_sync_validation(tmp_path, shared_data):
    """Two torchrun "nodes" on this machine (gloo, loopback): one run dir written by global rank 0 alone, and the
    validation metrics reduced over both ranks' halves equal a one-process eval of the final checkpoint."""
    port = _free_port()
    overrides = [
        f"paths.log_dir={tmp_path}",
        f"paths.data_dir={shared_data}",
        "experiment=image_tokenizer",
        "debug=smoke",
        "hardware=multinode",  # nodes and devices per node from torchrun's environment
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "hardware.threads=1",
        "hardware.num_workers=0",  # the profile's 4 loader workers per process are for GPU nodes
        "trainer.limit_val_batches=null",  # each rank validates its whole half of the validation set
        "callbacks.progress_bar=false",
        "print_config=false",
    ]
    run_cli("prepare.py", "debug=smoke", logs=tmp_path, data=shared_data)  # data before the clock
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc-per-node=1",
                f"--node-rank={rank}",
                "--master-addr=127.0.0.1",
                f"--master-port={port}",
                str(ROOT / "train.py"),
                *overrides,
            ],
            cwd=ROOT,
            env=cli_env() | {"OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for rank in (0, 1)
    ]
    deadline = time.time() + 600  # both nodes together
    try:
        outs = [p.communicate(timeout=max(1.0, deadline - time.time()))[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"node {rank} failed ({p.returncode}):\n{out[-5000:]}"
    assert [p.name for p in (tmp_path / "image_tokenizer").iterdir()] == ["image_tokenizer-smoke"]
    run_dir = tmp_path / "image_tokenizer" / "image_tokenizer-smoke"
    assert (run_dir / "DONE").exists() and (run_dir / "checkpoints" / "last.ckpt").exists()
    assert len((run_dir / "commands.log").read_text().splitlines()) == 1
    assert "[mmsuite] run dir:" in outs[0] and "[mmsuite] run dir:" not in outs[1]  # side effects on node 0 only
    plans = [json.loads((run_dir / f"data_plan_rank{r}.json").read_text()) for r in (0, 1)]
    assert [p["world_size"] for p in plans] == [2, 2]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 8

    # one process, the whole validation set, the same weights: what the two ranks reported together
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    run_cli(
        "eval.py",
        "experiment=image_tokenizer",
        f"ckpt_path={ckpt}",
        "trainer.precision=32-true",
        logs=tmp_path,
        data=shared_data,
    )
    single = json.loads((run_dir / "eval_val.json").read_text())["metrics"]
    for key in ("val/loss", "val/codebook_usage"):
        assert metrics["final"][key] == pytest.approx(single[key], rel=1e-5), key
