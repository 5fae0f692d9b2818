"""What a checkpoint carries beyond weights, and how it is written.

* :class:`AtomicCheckpointIO` writes ``*.ckpt`` to a temp file, fsyncs, and renames it into place, so a
  kill during saving leaves the previous ``last.ckpt`` loadable.
* :class:`RunState` stores the resolved config, token-space sha256, git revision, RNG states and the last
  validation metrics under ``checkpoint["mmsuite"]``; on resume it checks the token space and restores the
  RNG states right before the next training batch. It also shields the training RNG stream from
  validation, so a run that validated at a different moment still draws the same random numbers.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from mmsuite.tokenizers.token_space import check_same


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        # Checkpoints hold only tensors and plain containers: never unpickle code.
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


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
