"""Helpers for subprocess runs of the entry points (train.py, eval.py, prepare.py, generate.py)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def cli_env() -> dict:
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("LOCAL_RANK", None)
    return env


def run_cli(
    script: str,
    *overrides: str,
    logs: Path,
    data: Path,
    check: bool = True,
    timeout: int = 300,
    extra_env: dict | None = None,
) -> subprocess.CompletedProcess:
    flags = [o for o in overrides if o.startswith("-")]  # Hydra flags (-m) go before the overrides
    rest = [o for o in overrides if not o.startswith("-")]
    cmd = [sys.executable, str(ROOT / script), *flags, f"paths.log_dir={logs}", f"paths.data_dir={data}", *rest]
    env = cli_env()
    env.update(extra_env or {})
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


@pytest.fixture(scope="session")
def shared_data(tmp_path_factory) -> Path:
    """One data dir for the whole session: the smoke toy world is built once."""
    return tmp_path_factory.mktemp("data")


# the experiments that train a tokenizer themselves: their runs would share a name with the smoke tokenizers that
# the other experiments build in their log dir, so each gets a log dir of its own
TOKENIZER_EXPERIMENTS = {"image_tokenizer", "audio_tokenizer"}


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory, shared_data):
    """``smoke_runs(experiment, *overrides)`` -> (run dir, process) of ``train.py experiment=... debug=smoke``, run once
    per session for every test that reads it; the other experiments share one log dir, so the smoke tokenizers they
    need are trained once."""
    runs: dict[tuple, tuple[Path, subprocess.CompletedProcess]] = {}
    shared_logs = tmp_path_factory.mktemp("smoke_logs")

    def get(experiment: str, *extra: str) -> tuple[Path, subprocess.CompletedProcess]:
        key = (experiment, *extra)
        if key not in runs:
            own = experiment in TOKENIZER_EXPERIMENTS
            logs = tmp_path_factory.mktemp(f"smoke_{experiment}") if own else shared_logs
            proc = run_cli("train.py", f"experiment={experiment}", "debug=smoke", *extra, logs=logs, data=shared_data)
            runs[key] = (logs / experiment / f"{experiment}-smoke", proc)
        return runs[key]

    return get


def kill_after_checkpoint(cmd: list[str], last: Path, min_step: int, timeout: float) -> int:
    """Start ``cmd`` (a train.py command line), SIGKILL its process group once ``last`` holds a checkpoint of at
    least ``min_step`` steps, and return the step the checkpoint holds."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if last.exists() and torch.load(last, weights_only=True)["global_step"] >= min_step:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed; make it longer"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return torch.load(last, weights_only=True)["global_step"]
