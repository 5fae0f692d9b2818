"""m4_pose through the entry points: a Penn Action folder written here goes through prepare.py."""

from __future__ import annotations

import json

import pytest

from mmsuite.sources.penn_action import write_fake_penn_action
from tests.cli.conftest import run_cli


@pytest.fixture(scope="module")
def m4_logs(tmp_path_factory):
    """One log dir for this module: the smoke image tokenizer that m4_pose needs is trained once."""
    return tmp_path_factory.mktemp("m4_logs")


def test_a_penn_action_folder_goes_through_prepare(tmp_path, shared_data, m4_logs):
    root = tmp_path / "penn"
    write_fake_penn_action(root, n_videos=10, n_frames=8, size=(48, 64), seed=0)
    logs = m4_logs
    proc = run_cli(
        "prepare.py",
        "experiment=m4_pose",
        "debug=smoke",
        "data.source.kind=penn_action",
        f"data.source.root={root}",
        "data.successor.threshold=0.5",
        logs=logs,
        data=shared_data,
    )
    assert "m4 pairs (Penn Action)" in proc.stderr + proc.stdout
    folders = [
        p
        for p in shared_data.glob("m4pairs-*")
        if json.loads((p / "manifest.json").read_text())["source"]["kind"] == "penn_action"
    ]
    assert len(folders) == 1
    manifest = json.loads((folders[0] / "manifest.json").read_text())
    assert manifest["source"]["root"] == str(root)
    splits = manifest["splits"]
    assert splits["train"]["samples"] > 0 and sum(s["samples"] for s in splits.values()) <= 10 * 7
    assert manifest["token_space_sha256"] and manifest["image_tokenizer"]["tokens_per_image"] == 16


def test_generate_writes_the_chain_as_png_and_json(tmp_path, shared_data, m4_logs):
    logs = m4_logs
    run_cli("train.py", "experiment=m4_pose", "debug=smoke", "logger=csv", logs=logs, data=shared_data)
    run_dir = logs / "m4_pose" / "m4_pose-smoke"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics = metrics["final"]
    for key in ("next_frame/psnr_db", "next_frame/baseline_psnr_db", "pose_from_frame/error_ratio"):
        assert f"val/{key}" in metrics, sorted(metrics)
    # the validation sample grid (frame -> pose -> next pose -> next frame) went to the logger
    assert list(run_dir.rglob("val_samples_step*.png")), "no val/samples grid was logged"
    out = tmp_path / "gen"
    run_cli(
        "generate.py",
        "experiment=m4_pose",
        "run=m4_pose-smoke",
        f"out_dir={out}",
        "n_samples=3",
        logs=logs,
        data=shared_data,
    )
    record = json.loads((out / "samples.json").read_text())
    assert record["chain"] == ["coords", "coords_next", "tok_rgb_next"] and len(record["samples"]) == 3
    joints = record["samples"][0]["coords"]
    assert len(joints["generated"]) == len(joints["true"]) == 13
    assert (out / "samples.png").stat().st_size > 0
