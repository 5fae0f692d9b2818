"""benchmarks/run.py's dynamics bench (quick): the figures exist and are sane; untimed."""

from __future__ import annotations

import json
import math

import torch

from benchmarks import run


def test_dynamics_bench_quick():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = run.bench_dynamics(quick=True)
    finally:
        torch.set_num_threads(before)
    lengths = ("T16_B4", "T32_B2") if res["device_type"] == "cpu" else ("T32_B2", "T64_B1")
    keys = [f"train_{x}_{f}" for x in lengths for f in ("frames_per_s", "s_per_step")]
    keys += ["sample_k4_frames_per_s", "sample_k64_frames_per_s", "sample_speedup_k4_vs_k64", "params_M"]
    for key in keys:
        assert isinstance(res[key], float) and math.isfinite(res[key]) and res[key] > 0, (key, res.get(key))
    assert res["sample_speedup_k4_vs_k64"] > 1  # 4 passes a frame against 64
    assert res["hardware_profile"] in ("cpu", "gpu16gb") and res["peak_memory_method"]
    json.dumps(res)
    assert "| dynamics (quick) | sample_k4_frames_per_s |" in run.table({"dynamics": {"quick": True, **res}})


def test_dynamics_gpu16gb_bench_runs_that_profiles_lengths_here():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = run.bench_dynamics_gpu16gb(quick=True)  # a tiny net, but the profile's latents and lengths
    finally:
        torch.set_num_threads(before)
    assert res["hardware_profile"] == "gpu16gb" and "dynamics_gpu16gb" in run.BENCHES
    for x in ("T32_B2", "T64_B1"):
        assert math.isfinite(res[f"train_{x}_frames_per_s"]) and res[f"train_{x}_frames_per_s"] > 0
    assert res["train_T64_B1_peak_memory_mib"] >= 0  # the long batch's peak, measured first
    if res["device_type"] == "cpu":  # a second peak on a CPU would hide under the first's resident set
        assert "train_T32_B2_peak_memory_mib" not in res
    assert res["train_T64_checkpointing"] and not res["train_T32_checkpointing"]  # checkpointing on the long batch
