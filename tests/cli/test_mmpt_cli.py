"""MMPT Stage 4 end to end, one smoke run shared by every check: train.py experiment=mmpt_stage4 debug=smoke builds
its tokenizers, base and task shards, runs the gates, trains, decodes the golden sets and runs the prompt ablation;
generate.py and eval.py work from its checkpoint; a run of the same command killed after a checkpoint and resumed
ends with the same LoRA, rows and mixture state as that uninterrupted one (gate C4)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from tests.cli.conftest import ROOT, kill_after_checkpoint, run_cli

# deterministic kernels and a checkpoint every 3 steps (between the validations at 4 and 8), so that a run killed
# after any checkpoint resumes onto the uninterrupted run's path
COMMON = (
    "experiment=mmpt_stage4",
    "debug=smoke",
    "logger=csv",
    "callbacks.progress_bar=false",
    "trainer.deterministic=true",
    "checkpoint_every_n_steps=3",
)


def _state(path):
    ckpt = torch.load(path, weights_only=True)
    dm = next(v for k, v in ckpt.items() if k.endswith("MMPTDataModule"))
    return ckpt["global_step"], ckpt["state_dict"], dm


@pytest.fixture(scope="module")
def mmpt_run(tmp_path_factory, shared_data):
    logs = tmp_path_factory.mktemp("mmpt_logs")
    proc = run_cli("train.py", *COMMON, logs=logs, data=shared_data, timeout=900)
    return logs, logs / "mmpt_stage4" / "mmpt_stage4-smoke", proc


def test_mmpt_smoke_runs_the_gates_decodes_golden_sets_and_ablates_prompts(mmpt_run):
    _, run_dir, proc = mmpt_run
    assert "gate A2: trainable" in proc.stdout and "gates A3/A4" in proc.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())["final"]
    for task in ("a2t", "i2t", "t2a", "t2i"):
        assert f"val/loss_{task}" in metrics and f"train/loss_{task}" in metrics
        assert metrics[f"val/golden/{task}_decode_rate"] == 1.0  # constrained decoding always decodes
        assert 0.0 <= metrics[f"val/golden/{task}_decode_rate_unconstrained"] <= 1.0
    assert "val/golden/i2t_color_acc" in metrics and "val/golden/a2t_kind_acc" in metrics
    assert "val/ablation/t2a_gap_shuffled" in metrics and "val/ablation/t2i_gap_empty" in metrics
    assert "val/text_nll_delta" in metrics  # gate C3
    step8 = run_dir / "qual" / "step_8"
    assert len(list(step8.glob("t2i_*.png"))) == 2 and len(list(step8.glob("t2a_*.wav"))) == 2
    ablation = json.loads((run_dir / "prompt_ablation.json").read_text())
    assert [e["step"] for e in ablation["history"]] == [4, 8] and "t2a_gap_shuffled" in ablation["growth"]
    step, weights, _ = _state(run_dir / "checkpoints" / "last.ckpt")
    assert step == 8 and all("lora_" in k or "trainable_tokens_delta" in k for k in weights)  # no frozen base


def test_mmpt_generate_and_eval_work_from_the_checkpoint(mmpt_run, shared_data):
    """generate.py: T2I png, T2A wav and captions beside their references; eval.py: losses, golden sets, ablation."""
    logs, run_dir, _ = mmpt_run
    run_cli("generate.py", "experiment=mmpt_stage4", "debug=smoke", logs=logs, data=shared_data)
    samples = [json.loads(x) for x in (run_dir / "generate" / "samples.jsonl").read_text().splitlines()]
    assert {r["task"] for r in samples} == {"a2t", "i2t", "t2a", "t2i"} and all(r["ok"] for r in samples)
    assert all("reference" in r for r in samples if r["task"] in ("a2t", "i2t"))
    assert all((run_dir / "generate" / r["file"]).is_file() for r in samples if r["task"] in ("t2a", "t2i"))
    run_cli("eval.py", "experiment=mmpt_stage4", "debug=smoke", logs=logs, data=shared_data)
    evaluated = json.loads((run_dir / "eval_val.json").read_text())["metrics"]
    assert evaluated["val/golden/t2a_decode_rate"] == 1.0 and "val/text_nll_delta" in evaluated
    assert (run_dir / "eval_val" / "prompt_ablation.json").is_file()
    assert (run_dir / "eval_val" / "qual" / "golden_summary.json").is_file()


def test_mmpt_killed_run_resumes_with_the_same_lora_rows_and_mixture_state(mmpt_run, shared_data):
    """Gate C4: the smoke command killed after a checkpoint and resumed ends where the uninterrupted run ended."""
    logs, run_dir, _ = mmpt_run
    cmd = [sys.executable, str(ROOT / "train.py"), f"paths.log_dir={logs}", f"paths.data_dir={shared_data}"]
    cmd += [*COMMON, "run=killed"]
    killed = logs / "mmpt_stage4" / "killed"
    last = killed / "checkpoints" / "last.ckpt"
    killed_at = kill_after_checkpoint(cmd, last, min_step=3, timeout=600)
    assert 3 <= killed_at < 8 and not (killed / "DONE").exists()
    out = run_cli("train.py", *COMMON, "run=killed", logs=logs, data=shared_data, timeout=900)
    assert "resuming" in out.stdout
    step_a, a, dm_a = _state(run_dir / "checkpoints" / "last.ckpt")
    step_b, b, dm_b = _state(last)
    assert step_a == step_b == 8 and a.keys() == b.keys()
    diff = {k: (a[k] - b[k]).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert not diff, f"the resumed run (killed at step {killed_at}) differs from the uninterrupted one: {diff}"
    assert dm_a["mixture"] == dm_b["mixture"] and dm_a["mixture"]["step"] == 7
    assert sum(dm_a["mixture"]["drawn"].values()) == 8 * 4  # one task per record, 4 records a batch
