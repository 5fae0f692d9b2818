"""benchmarks/gpu.sh, the one script of every GPU check: its dry mode on a CPU checks that every step would start."""

import subprocess
import sys

from benchmarks import gpu

from .conftest import ROOT, cli_env


def test_gpu_script_dry_checks_every_step_and_writes_nothing():
    results = ROOT / "benchmarks" / "results"
    before = sorted(results.iterdir()) if results.exists() else []
    env = dict(cli_env(), PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for e in gpu.TRAIN_EXPERIMENTS:  # every experiment's GPU profile is composed and its smoke model built
        assert f"train.py experiment={e} hardware=gpu16gb debug=smoke: config + model: ok" in proc.stdout
    assert "m4 published config + tiny model: ok" in proc.stdout
    assert "dynamics gpu16gb config + tiny model: ok" in proc.stdout
    n = proc.stdout.count(": ok (")
    assert f"[gpu --dry] {n}/{n} checks ok" in proc.stdout
    assert (sorted(results.iterdir()) if results.exists() else []) == before


def test_gpu_script_dry_reports_a_step_that_would_not_start(monkeypatch, capsys):
    monkeypatch.setattr(gpu, "TRAIN_EXPERIMENTS", ["no_such_experiment"])
    assert gpu.dry() == 1
    out = capsys.readouterr().out
    assert "experiment=no_such_experiment hardware=gpu16gb debug=smoke: config + model: FAILED" in out
    n = out.count(": ok (")
    assert f"[gpu --dry] {n}/{n + 1} checks ok" in out


def test_gpu_script_without_cuda_points_to_dry(monkeypatch, capsys):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert gpu.run_gpu(budget=1.0) == 2
    assert "--dry" in capsys.readouterr().err
