"""experiment=m4_pose composes the M4 notes' training config verbatim on GPU profiles; hardware=cpu scales the
model, data and mixture down (fourm.md; conf/experiment/m4_pose.yaml)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import mmsuite.run  # noqa: F401  (registers the config resolvers)

ROOT = Path(__file__).resolve().parents[2]


def _cfg(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=m4_pose", *overrides])
    # the parts under test, not the run paths (those need a HydraConfig)
    get = {"batch_size": "data.batch_size", "clip": "trainer.gradient_clip_val"}
    out = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("modalities", "model", "schedule", "pose")}
    return out | {k: OmegaConf.select(cfg, v) for k, v in get.items()}


@pytest.mark.parametrize("hardware", ["gpu16gb", "rtx4090", "ddp"])
def test_gpu_profiles_are_the_notes_config_verbatim(hardware):
    cfg = _cfg(f"hardware={hardware}")
    mods = cfg["modalities"]["list"]
    assert [m["name"] for m in mods] == ["tok_rgb", "coords", "tok_rgb_next", "coords_next"]
    assert [m["length"] for m in mods] == [256, 39, 256, 39]
    m = cfg["model"]
    assert m["masking"]["input_alphas"] == [1.5, 1.5, 0.5, 0.5]
    assert m["masking"]["target_alphas"] == [0.5, 0.5, 1.5, 1.5]
    assert m["masking"]["input_tokens_range"] == [96, 256] and m["masking"]["target_tokens_range"] == [39, 256]
    assert m["loss"]["weighting"] == "modality"  # 4M's per-modality mean
    assert (m["optim"]["lr"], m["optim"]["weight_decay"]) == (0.002, 0.05)
    assert cfg["schedule"]["total_tokens"] == 3.0e9 and cfg["schedule"]["warmup_tokens"] == 5.0e8
    assert cfg["batch_size"] == 96 and cfg["clip"] == 1.0
    assert cfg["pose"]["bins"] == 8192


def test_cpu_profile_scales_down_and_trains_the_evaluated_tasks():
    cfg = _cfg("hardware=cpu")
    m = cfg["model"]
    assert [mod["length"] for mod in cfg["modalities"]["list"]] == [64, 39, 64, 39]
    assert m["loss"]["weighting"] == "token"
    # the all-to-all component keeps the notes' alphas; the others are "forecast the pose" and "frame -> pose"
    assert m["masking"]["input_alphas"][0] == [1.5, 1.5, 0.5, 0.5]
    assert m["masking"]["target_alphas"] == [[0.5, 0.5, 1.5, 1.5], [0, 0, 0, 1], [0, 1, 0, 0]]
    assert m["masking"]["weights"] == [0.2, 0.4, 0.4]
    # the next_pose task reads frame + pose (103 tokens): the input range must reach it
    assert m["masking"]["input_tokens_range"][1] >= 64 + 39
    # restoring the notes' mixture and weighting on cpu: the masking reads the alphas group, 4M's loss mean
    notes = _cfg(
        "hardware=cpu",
        "model.masking.input_alphas=${alphas.input_alphas}",
        "model.masking.target_alphas=${alphas.target_alphas}",
        "model.masking.weights=${alphas.weights}",
        "model.loss.weighting=modality",
    )
    assert notes["model"]["masking"]["input_alphas"] == [1.5, 1.5, 0.5, 0.5]
    assert notes["model"]["loss"]["weighting"] == "modality"
