"""Checkpoint extras: atomic writes and RNG state round trips."""

import random

import numpy as np
import pytest
import torch

from mmsuite.callbacks.run_state import AtomicCheckpointIO, get_rng_state, set_rng_state


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
