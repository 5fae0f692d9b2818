"""The run dir's durable state: what a checkpoint carries beyond weights, how it is written, which one a rerun
resumes from, and the lock that gives the run dir one writer.

* :func:`atomic_open` writes a file to a temp name, fsyncs, and renames it into place; a failed write (a full
  disk, an exception) removes its temp file. :class:`AtomicCheckpointIO` writes ``*.ckpt`` through it, so a kill
  during saving leaves the previous ``last.ckpt`` loadable; :func:`remove_stale_temp_files` clears what a kill
  left behind.
* :class:`RunState` stores the resolved config, token-space sha256, git revision, RNG states and the last
  validation metrics under ``checkpoint["mmsuite"]``; on resume it checks the token space and restores the
  RNG states right before the next training batch. It also shields the training RNG stream from
  validation, so a run that validated at a different moment still draws the same random numbers.
* :func:`choose_resume_checkpoint` picks ``last.ckpt``, or the newest good ``step*.ckpt`` when ``last.ckpt`` is
  damaged; :func:`resume_config_differences` lists what a resumed run changed beyond :data:`RESUME_MAY_CHANGE`.
* :class:`RunDirLock` lets one run at a time write into a run dir.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import re
import shlex
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path
from typing import IO, Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from mmsuite.tokenizers.token_space import check_same

TEMP_MARK = ".tmp-"  # a file being written: .<name>.tmp-<pid>
LOCK_FILE = "run.lock"


# ---------------------------------------------------------------------------------------------------
# writing files whole or not at all
# ---------------------------------------------------------------------------------------------------
@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """A file object whose content appears at ``path`` only once it is complete and on disk."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, an error, Ctrl-C: leave no temp file behind
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def remove_stale_temp_files(run_dir: Path) -> list[Path]:
    """Delete the temp files that killed writers left in ``run_dir`` and its ``checkpoints/``.

    Called with the run dir's lock held, before this run writes anything: no other process writes here then,
    so every temp file belongs to a writer that is gone.
    """
    stale = [p for d in (run_dir, run_dir / "checkpoints") for p in d.glob(f".*{TEMP_MARK}*") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path) as f:
            torch.save(checkpoint, f)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        # Checkpoints hold only tensors and plain containers: never unpickle code.
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


def load_mmsuite_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict:
    """The checkpoint at ``path``, loaded weights-only; one without an ``mmsuite`` entry is refused.

    ``mmap=True`` reads the index and the plain entries but maps the tensors: a cheap check that the file is whole.
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    if not isinstance(ckpt, dict) or "mmsuite" not in ckpt:
        raise RuntimeError(f"{path} was not written by mmsuite (no 'mmsuite' entry)")
    return ckpt


# ---------------------------------------------------------------------------------------------------
# which checkpoint a rerun resumes from, and what it may change
# ---------------------------------------------------------------------------------------------------
def step_checkpoints(ckpt_dir: Path) -> list[Path]:
    """The ``step<N>.ckpt`` files of ``ckpt_dir``, newest (highest N) first."""
    found = [
        (int(m.group(1)), p) for p in ckpt_dir.glob("step*.ckpt") if (m := re.fullmatch(r"step(\d+)\.ckpt", p.name))
    ]
    return [p for _, p in sorted(found, reverse=True)]


def choose_resume_checkpoint(ckpt_dir: Path) -> tuple[Path, dict] | None:
    """``last.ckpt`` and its ``mmsuite`` entry; the newest good step checkpoint (with a warning) if it is damaged.

    None when the folder holds no checkpoint; an error naming every file and its fault when none loads.
    """
    last = ckpt_dir / "last.ckpt"
    candidates = ([last] if last.exists() else []) + step_checkpoints(ckpt_dir)
    faults = []
    for path in candidates:
        try:
            extra = load_mmsuite_checkpoint(path, mmap=True)["mmsuite"]
        except Exception as e:  # truncated, not a zip, pickled code, not ours: try the next one
            faults.append(f"  {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        if path != last:
            problem = "cannot be loaded" if last.exists() else "is missing"
            warnings.warn(
                f"{last} {problem}; resuming from {path}, the newest good step checkpoint.\n" + "\n".join(faults),
                stacklevel=2,
            )
        return path, extra
    if faults:
        raise SystemExit(
            f"no checkpoint in {ckpt_dir} can be resumed from:\n" + "\n".join(faults) + "\n"
            "Move the run dir aside to start again, or pass run=NEW_NAME."
        )
    return None


# What a resumed run may change: where it runs, how long it runs, where its files go and how it reports. Everything
# else in the resolved config must equal the checkpoint's, or the resumed run would silently be another run.
# Dotted keys, fnmatch patterns ("*" also crosses dots); values under a paths.* folder compare relative to it.
RESUME_MAY_CHANGE = (
    # where it runs: the profile (what its exp_hw file sets compares where it lands, e.g. data.batch_size)
    "hardware.*",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy*",
    "trainer.precision",
    "data.num_workers",
    "data.build_workers",
    "data.*.train_overrides",  # how a missing tokenizer run would be trained (it names the hardware)
    # how long it runs
    "trainer.max_steps",
    "trainer.max_epochs",
    "trainer.max_time",
    "*schedule.warmup_*",
    "*schedule.total_*",
    # where files go, how the run reports and what it does after fitting
    "paths.*",
    "sweep",
    "resume",
    "print_config",
    "fail_fast",
    "test",
    "validate_at_end",
    "optimized_metric",
    "checkpoint_every_n_steps",
    "keep_step_checkpoints",
    "logger*",
    "callbacks.progress_bar",
    "callbacks.lr_monitor",
    "callbacks.perf",
    "callbacks.peak_flops",
    "callbacks.hparams",
    "trainer.log_every_n_steps",
    "trainer.enable_model_summary",
    "trainer.profiler",
    # how the same model is computed: other kernels, the same math up to rounding
    "model.compile",
    "model.optim.fused",
)
_ABSENT = "<absent>"


def resume_config_differences(saved: dict, now: dict) -> list[tuple[str, Any, Any]]:
    """``(key, checkpoint's value, this command's value)`` for every resolved key that differs and may not."""
    a, b = _flat(saved, saved.get("paths") or {}), _flat(now, now.get("paths") or {})
    return [
        (k, a.get(k, _ABSENT), b.get(k, _ABSENT))
        for k in sorted(a.keys() | b.keys())
        if a.get(k, _ABSENT) != b.get(k, _ABSENT) and not any(fnmatch(k, p) for p in RESUME_MAY_CHANGE)
    ]


def _flat(config: dict, paths: dict) -> dict:
    """Dotted key -> value (lists and empty dicts are values); strings under a paths.* folder made relative to it."""
    roots = [(str(v).rstrip("/"), k) for k, v in paths.items() if isinstance(v, str) and v]
    roots.sort(key=lambda r: -len(r[0]))  # longest first: run_dir lies under log_dir

    def relative(v):
        for root, name in roots:
            if isinstance(v, str) and (v == root or v.startswith(root + "/")):
                return f"${{paths.{name}}}{v[len(root) :]}"
        return v

    out: dict = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update({f"{key}.{k}": v for k, v in _flat(value, {}).items()})
        else:
            out[str(key)] = value
    return {k: relative(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------
# one writer per run dir
# ---------------------------------------------------------------------------------------------------
class RunDirLock:
    """An exclusive ``flock`` on ``<run dir>/run.lock``, held by a run's global rank 0 while it runs.

    flock rather than a pid file: the kernel drops the lock when its holder dies, even by SIGKILL, so a dead
    holder is never mistaken for a live one (no pid guessing, no pid reuse). The file names the holder (pid,
    host, command, start) for the error a second run gets, and is emptied on release: a file that still names a
    holder when the lock is free was left by a killed run, which is reported and taken over.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(os.pread(fd, 1 << 16, 0))
            os.close(fd)
            raise SystemExit(
                f"{self.path.parent} is in use by another run: {holder}.\n"
                f"Wait for it to finish or stop it, or pass run=NEW_NAME (lock: {self.path})"
            ) from None
        left = os.pread(fd, 1 << 16, 0)
        if left.strip():
            warnings.warn(
                f"taking over {self.path}: the run that held it ({_describe_holder(left)}) ended without releasing "
                "it (killed?)",
                stacklevel=2,
            )
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": shlex.join([sys.executable, *sys.argv]),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _describe_holder(raw: bytes) -> str:
    if not raw.strip():
        return "a run that is just starting"
    try:
        h = json.loads(raw)
        return f"pid {h['pid']} on host {h['host']}, started {h['started']}: {h['command']}"
    except (ValueError, KeyError, TypeError):
        return f"an unknown holder ({raw[:200]!r})"


# ---------------------------------------------------------------------------------------------------
# checkpoint extras and RNG states
# ---------------------------------------------------------------------------------------------------
def get_rng_state() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


class RunState(L.Callback):
    def __init__(self, config: dict, token_space_sha256: str, git_rev: str, token_space_path: str):
        self.config = config
        self.token_space_sha256 = token_space_sha256
        self.git_rev = git_rev
        self.token_space_path = token_space_path
        self._pending_rng: dict | None = None
        self._outside_validation: dict | None = None
        self.last_validated_step: int | None = None  # global step of the latest (non-sanity) validation

    @property
    def state_key(self) -> str:
        return "mmsuite_run_state"

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        checkpoint["mmsuite"] = {
            "config": self.config,
            "token_space_sha256": self.token_space_sha256,
            "git_rev": self.git_rev,
            "rng": self._outside_validation or get_rng_state(),
            "val_metrics": metrics,
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        extra = checkpoint.get("mmsuite")
        if extra is None:
            raise RuntimeError("this checkpoint was not written by mmsuite (no 'mmsuite' entry)")
        check_same(
            self.token_space_sha256,
            f"this run's token space ({self.token_space_path})",
            extra["token_space_sha256"],
            f"the checkpoint's token space ({trainer.ckpt_path})",
        )
        self._pending_rng = extra["rng"]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending_rng is not None:
            set_rng_state(self._pending_rng)
            self._pending_rng = None

    # validation must not move the training RNG stream
    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.training or trainer.sanity_checking:
            self._outside_validation = get_rng_state()

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.last_validated_step = trainer.global_step
        if self._outside_validation is not None:
            set_rng_state(self._outside_validation)
            self._outside_validation = None
