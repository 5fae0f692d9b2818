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
