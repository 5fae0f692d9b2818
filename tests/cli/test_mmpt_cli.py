"""MMPT Stage 4 end to end: train.py experiment=mmpt_stage4 debug=smoke builds its tokenizers, base and task shards,
runs the gates, trains, decodes the golden sets and runs the prompt ablation; generate.py and eval.py work from its
checkpoint; a run killed after a checkpoint and resumed ends with the same LoRA, rows and mixture state as an
uninterrupted one (gate C4)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch

from tests.cli.conftest import ROOT, cli_env, run_cli

COMMON = ("experiment=mmpt_stage4", "debug=smoke", "logger=csv", "callbacks.progress_bar=false", "print_config=false")
RESUME = (
    "trainer.deterministic=true",
    "~callbacks.extra",
    "trainer.max_steps=12",
    "trainer.val_check_interval=6",
    "checkpoint_every_n_steps=3",
)


def _state(path):
    ckpt = torch.load(path, weights_only=True)
    dm = next(v for k, v in ckpt.items() if k.endswith("MMPTDataModule"))
    return ckpt["global_step"], ckpt["state_dict"], dm


def test_mmpt_smoke_trains_decodes_golden_sets_and_resumes_exactly(tmp_path, shared_data):
    logs = tmp_path / "logs"
    out = run_cli("train.py", *COMMON, logs=logs, data=shared_data, timeout=1200)
    assert "gate A2: trainable" in out.stdout and "gates A3/A4" in out.stdout
    run_dir = logs / "mmpt_stage4" / "mmpt_stage4-smoke"
    metrics = json.loads((run_dir / "metrics.json").read_text())["final"]
    for task in ("a2t", "i2t", "t2a", "t2i"):
        assert f"val/loss_{task}" in metrics and f"train/loss_{task}" in metrics
        assert metrics[f"val/golden/{task}_decode_rate"] == 1.0  # constrained decoding always decodes
        assert 0.0 <= metrics[f"val/golden/{task}_decode_rate_unconstrained"] <= 1.0
    assert "val/golden/i2t_color_acc" in metrics and "val/golden/a2t_kind_acc" in metrics
    assert "val/ablation/t2a_gap_shuffled" in metrics and "val/ablation/t2i_gap_empty" in metrics
    step8 = run_dir / "qual" / "step_8"
    assert len(list(step8.glob("t2i_*.png"))) == 4 and len(list(step8.glob("t2a_*.wav"))) == 4
    ablation = json.loads((run_dir / "prompt_ablation.json").read_text())
    assert [e["step"] for e in ablation["history"]] == [4, 8] and "t2a_gap_shuffled" in ablation["growth"]
    step, weights, _ = _state(run_dir / "checkpoints" / "last.ckpt")
    assert step == 8 and all("lora_" in k or "trainable_tokens_delta" in k for k in weights)  # no frozen base

    # generate.py: T2I png, T2A wav and captions beside their references; eval.py: losses, golden sets, ablation
    run_cli("generate.py", "experiment=mmpt_stage4", "run=mmpt_stage4-smoke", logs=logs, data=shared_data)
    samples = [json.loads(x) for x in (run_dir / "generate" / "samples.jsonl").read_text().splitlines()]
    assert {r["task"] for r in samples} == {"a2t", "i2t", "t2a", "t2i"} and all(r["ok"] for r in samples)
    assert all("reference" in r for r in samples if r["task"] in ("a2t", "i2t"))
    assert all((run_dir / "generate" / r["file"]).is_file() for r in samples if r["task"] in ("t2a", "t2i"))
    run_cli("eval.py", "experiment=mmpt_stage4", "run=mmpt_stage4-smoke", logs=logs, data=shared_data)
    evaluated = json.loads((run_dir / "eval_val.json").read_text())["metrics"]
    assert evaluated["val/golden/t2a_decode_rate"] == 1.0 and "val/text_nll_delta" in evaluated
    assert (run_dir / "eval_val" / "prompt_ablation.json").is_file()
    assert (run_dir / "eval_val" / "qual" / "golden_summary.json").is_file()

    # C4: a run killed after a checkpoint and resumed ends with the same LoRA, rows and mixture state as an
    # uninterrupted one
    run_cli("train.py", *COMMON, *RESUME, "run=straight", logs=logs, data=shared_data, timeout=900)
    cmd = [sys.executable, str(ROOT / "train.py"), f"paths.log_dir={logs}", f"paths.data_dir={shared_data}"]
    cmd += [*COMMON, *RESUME, "run=killed"]
    killed = logs / "mmpt_stage4" / "killed"
    last = killed / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if last.exists() and torch.load(last, weights_only=True)["global_step"] >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed; make it longer"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(last, weights_only=True)["global_step"]
    assert 3 <= killed_at < 12 and not (killed / "DONE").exists()
    out = run_cli("train.py", *COMMON, *RESUME, "run=killed", logs=logs, data=shared_data, timeout=900)
    assert "resuming" in out.stdout
    step_a, a, dm_a = _state(logs / "mmpt_stage4" / "straight" / "checkpoints" / "last.ckpt")
    step_b, b, dm_b = _state(last)
    assert step_a == step_b == 12 and a.keys() == b.keys()
    diff = {k: (a[k] - b[k]).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert not diff, f"the resumed run (killed at step {killed_at}) differs from the uninterrupted one: {diff}"
    assert dm_a["mixture"] == dm_b["mixture"] and dm_a["mixture"]["step"] == 11
    assert sum(dm_a["mixture"]["drawn"].values()) == 12 * 4  # one task per record, 4 records a batch
