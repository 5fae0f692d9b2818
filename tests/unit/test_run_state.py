"""Checkpoint extras: atomic writes and RNG state round trips."""

import random

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from mmsuite.callbacks.run_state import AtomicCheckpointIO, RunState, get_rng_state, set_rng_state


def test_atomic_save_keeps_previous_checkpoint_when_a_save_dies(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def dying_save(obj, f, *a, **k):
        f.write(b"partial bytes of a checkpoint")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    loaded = io.load_checkpoint(path)
    assert loaded["step"] == 1 and torch.equal(loaded["w"], torch.ones(3))


class Evil:
    """Stands for any pickled object: loading it would run code of the pickler's choosing."""


def test_load_refuses_pickled_objects(tmp_path):
    path = tmp_path / "bad.ckpt"
    torch.save({"obj": Evil()}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        AtomicCheckpointIO().load_checkpoint(path)


def test_rng_state_round_trip_is_weights_only_safe(tmp_path):
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    state = get_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    assert torch.equal(expected[0], got[0])
    assert np.array_equal(expected[1], got[1])
    assert expected[2] == got[2]


def test_native_cpu_precision_follows_the_cpu(monkeypatch):
    from mmsuite import run

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert run.native_cpu_precision() == "bf16-mixed"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert run.native_cpu_precision() == "32-true"
    # the resolver is registered for configs
    from omegaconf import OmegaConf

    assert OmegaConf.create({"p": "${native_cpu_precision:}"}).p == "32-true"


class _Tiny(L.LightningModule):
    """A linear model that stops the fit itself after ``stop_at`` steps (as the 4M token budget does)."""

    def __init__(self, stop_at: int | None):
        super().__init__()
        self.layer, self.stop_at, self.validations = torch.nn.Linear(2, 1), stop_at, 0

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.stop_at is not None and self.global_step >= self.stop_at:
            self.trainer.should_stop = True

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.layer(batch[0]).pow(2).mean())

    def on_validation_end(self):
        self.validations += 0 if self.trainer.sanity_checking else 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("stop_at", [3, None])
def test_run_state_records_the_step_of_the_last_validation(tmp_path, stop_at):
    """run.train skips validate_at_end's extra validation when the fit already validated at its last step: Lightning
    validates when a module sets should_stop (the token budget), not when max_steps ends the fit between checks."""
    data = DataLoader(TensorDataset(torch.randn(64, 2)), batch_size=4)
    state = RunState({}, "sha", "rev", "token_space.json")
    module = _Tiny(stop_at)
    trainer = L.Trainer(
        max_steps=5, val_check_interval=100, check_val_every_n_epoch=None, callbacks=[state], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        accelerator="cpu", num_sanity_val_steps=1,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=data, val_dataloaders=data)
    if stop_at is None:  # max_steps ended the fit between validations: validate_at_end has to run
        assert state.last_validated_step is None and module.validations == 0
    else:  # the stop validated the final weights already
        assert state.last_validated_step == trainer.global_step == stop_at and module.validations == 1
