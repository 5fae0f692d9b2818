"""Checkpoint extras: atomic writes and RNG state round trips."""

import errno
import json
import os
import random
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from mmsuite.callbacks.run_state import (
    AtomicCheckpointIO,
    RunDirLock,
    RunState,
    choose_resume_checkpoint,
    get_rng_state,
    remove_stale_temp_files,
    resume_config_differences,
    set_rng_state,
)

ROOT = Path(__file__).resolve().parents[2]


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


# ---------------------------------------------------------------------------------------------------
# the run dir: temp files, the fallback checkpoint, the resume config check, the lock, rank detection
# ---------------------------------------------------------------------------------------------------
def test_a_failed_save_leaves_no_temp_file_and_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def disk_full(obj, f, *a, **k):
        f.write(b"the first bytes of a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]
    assert io.load_checkpoint(path)["step"] == 1


def test_stale_temp_files_are_removed(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    stale = [tmp_path / "checkpoints" / ".last.ckpt.tmp-4242", tmp_path / ".config.yaml.tmp-4242"]
    for p in stale:
        p.write_bytes(b"half")
    keep = [tmp_path / "checkpoints" / "last.ckpt", tmp_path / "config.yaml"]
    for p in keep:
        p.write_bytes(b"whole")
    assert sorted(remove_stale_temp_files(tmp_path)) == sorted(stale)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in keep)


def _save(path, step: int) -> None:
    AtomicCheckpointIO().save_checkpoint({"global_step": step, "mmsuite": {"config": {"step": step}}}, path)


def test_a_damaged_last_ckpt_falls_back_to_the_newest_good_step_checkpoint(tmp_path):
    for step in (4, 8, 12):
        _save(tmp_path / f"step{step:07d}.ckpt", step)
    _save(tmp_path / "last.ckpt", 12)
    path, extra = choose_resume_checkpoint(tmp_path)
    assert path == tmp_path / "last.ckpt" and extra["config"] == {"step": 12}

    last = tmp_path / "last.ckpt"
    last.write_bytes(last.read_bytes()[:100])  # truncated
    (tmp_path / "step0000012.ckpt").write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning) as record:
        path, extra = choose_resume_checkpoint(tmp_path)
    assert path == tmp_path / "step0000008.ckpt" and extra["config"] == {"step": 8}
    message = str(record[0].message)
    assert str(last) in message and str(path) in message and "step0000012.ckpt" in message

    torch.save({"state_dict": {}}, tmp_path / "step0000008.ckpt")  # loads, but mmsuite did not write it
    with pytest.warns(UserWarning, match="step0000004.ckpt"):
        assert choose_resume_checkpoint(tmp_path)[0] == tmp_path / "step0000004.ckpt"

    (tmp_path / "step0000004.ckpt").unlink()
    with pytest.raises(SystemExit, match="no checkpoint .* can be resumed from"):
        choose_resume_checkpoint(tmp_path)
    assert choose_resume_checkpoint(tmp_path / "empty") is None


def test_resume_config_differences_skip_hardware_length_paths_and_logging():
    saved = {
        "paths": {"log_dir": "logs", "data_dir": "data", "run_dir": "/w/logs/x/x"},
        "hardware": {"name": "cpu", "threads": 2},
        "trainer": {"max_steps": 100, "devices": 1, "precision": "32-true", "gradient_clip_val": None},
        "schedule": {"warmup_steps": 10, "floor_ratio": 0.1},
        "model": {"optim": {"lr": 0.002}, "schedule": {"warmup_steps": 10, "floor_ratio": 0.1}},
        "data": {"num_workers": 0, "batch_size": 16, "data_dir": "data", "plan_dir": "/w/logs/x/x"},
        "logger": {"tensorboard": {"save_dir": "/w/logs/x/x"}},
        "sweep": "2025-01-01_00-00-00",
        "seed": 1,
    }
    moved = {
        "paths": {"log_dir": "/big/logs", "data_dir": "/big/data", "run_dir": "/big/logs/x/x"},
        "hardware": {"name": "gpu16gb", "threads": 8},
        "trainer": {"max_steps": 500, "devices": 2, "precision": "bf16-mixed", "gradient_clip_val": None},
        "schedule": {"warmup_steps": 50, "floor_ratio": 0.1},
        "model": {"optim": {"lr": 0.002}, "schedule": {"warmup_steps": 50, "floor_ratio": 0.1}},
        "data": {"num_workers": 4, "batch_size": 16, "data_dir": "/big/data", "plan_dir": "/big/logs/x/x"},
        "logger": {},
        "sweep": "2025-02-02_00-00-00",
        "seed": 1,
    }
    assert resume_config_differences(saved, moved) == []
    changed = json.loads(json.dumps(moved))
    changed["model"]["optim"]["lr"] = 0.01
    changed["data"]["batch_size"] = 128
    changed["schedule"]["floor_ratio"] = 0.5
    changed["trainer"]["gradient_clip_val"] = 1.0
    del changed["seed"]
    assert resume_config_differences(saved, changed) == [
        ("data.batch_size", 16, 128),
        ("model.optim.lr", 0.002, 0.01),
        ("schedule.floor_ratio", 0.1, 0.5),
        ("seed", 1, "<absent>"),
        ("trainer.gradient_clip_val", None, 1.0),
    ]
    elsewhere = json.loads(json.dumps(moved))
    elsewhere["data"]["data_dir"] = "/other/data"  # not under paths.data_dir any more: a different data set
    assert [k for k, _, _ in resume_config_differences(saved, elsewhere)] == ["data.data_dir"]


HOLD_LOCK = """
import sys, time
from pathlib import Path
from mmsuite.callbacks.run_state import RunDirLock
RunDirLock(Path(sys.argv[1])).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_run_dir_lock_names_a_live_holder_and_takes_over_a_killed_ones(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        busy = f"in use by another run: pid {holder.pid} on host {socket.gethostname()}, started .*: .*-c"
        with pytest.raises(SystemExit, match=busy):
            RunDirLock(tmp_path).acquire()
    finally:
        holder.kill()  # SIGKILL: the holder cannot release anything
        holder.wait()
    with pytest.warns(UserWarning, match=f"taking over .*pid {holder.pid} .* ended without releasing"):
        lock = RunDirLock(tmp_path)
        lock.acquire()
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert (tmp_path / "run.lock").read_text() == ""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a lock released at the end is taken again without a word
        with RunDirLock(tmp_path):
            pass


@pytest.mark.parametrize(
    ("env", "zero"),
    [
        ({}, True),
        ({"RANK": "0", "GROUP_RANK": "0", "LOCAL_RANK": "0"}, True),  # torchrun, node 0
        ({"RANK": "1", "GROUP_RANK": "1", "LOCAL_RANK": "0"}, False),  # torchrun, node 1's first process
        ({"SLURM_PROCID": "0"}, True),
        ({"SLURM_PROCID": "2"}, False),  # srun, a task of node 1
        ({"LOCAL_RANK": "1", "NODE_RANK": "0"}, False),  # a process Lightning launched
        ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False),
    ],
)
def test_is_rank_zero_under_each_launcher(monkeypatch, env, zero):
    from mmsuite.run import RANK_VARIABLES, is_rank_zero

    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert is_rank_zero() is zero


def test_fsdp_profile_wraps_the_transformer_blocks():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import FSDPStrategy

    import mmsuite.run  # noqa: F401  (registers the settings schemas and resolvers the config tree uses)

    overrides = [
        "experiment=image_tokenizer",  # no exp_hw/image_tokenizer_fsdp.yaml: the profile's keys as they are
        "hardware=fsdp",
        "trainer.strategy.activation_checkpointing_policy=${trainer.strategy.auto_wrap_policy}",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.accelerator == "gpu"
    strategy = instantiate(cfg.trainer.strategy, _convert_="all")
    assert isinstance(strategy, FSDPStrategy) and strategy._state_dict_type == "full"
    wrapped = strategy.kwargs["auto_wrap_policy"]._module_classes
    from mmsuite.lightning_modules.dynamics.model import SpaceTimeBlock
    from mmsuite.nn.transformer import Block, DecoderBlock

    assert {Block, DecoderBlock} <= set(wrapped) and issubclass(SpaceTimeBlock, tuple(wrapped))
    assert all(issubclass(c, torch.nn.Module) for c in wrapped)
    assert set(strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes) == set(wrapped)
