"""Helpers for subprocess runs of the entry points (train.py, eval.py, prepare.py, generate.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
