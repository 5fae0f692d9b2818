"""Every GPU check of the suite in one go, for a lent GPU: ``benchmarks/gpu.sh`` (this module) within 10 minutes.

    benchmarks/gpu.sh            # on a GPU: run every step, write benchmarks/results/gpu-<step>.json
    benchmarks/gpu.sh --dry      # anywhere (a CPU): check that every step would start, in about a minute

Steps, in order (:data:`STEPS`):

* ``m4``: the m4 bench (``python -m benchmarks.run --only m4``) in bf16 autocast: the small M4 shape and the
  published one (dim 640, 8 + 8 layers, 64,000 FSQ codes): real tokens/s, MFU from the counted FLOPs, peak memory,
  the output side's share of a step, the factorised embedding's logits against a plain table's;
* ``dynamics_gpu16gb``: the dynamics model at the ``gpu16gb`` shape (T=32 B=2, T=64 B=1 with activation
  checkpointing): training frames/s, peak memory per length, sampling frames/s;
* ``fvlm``: the foveated VLM at the notes' shape, batch 32 in bf16 autocast, against the notes' anchor (about 100
  samples/s in about 16 GB on a 4090);
* ``train-<experiment>``: ``train.py experiment=<experiment> hardware=gpu16gb debug=smoke`` for every experiment with
  a GPU profile, in a temporary folder: the profile's trainer (bf16-mixed, one GPU) runs end to end (data, steps,
  validation, checkpoint), two at a time; ``metrics.json`` is copied into the result.

Each step runs in its own process with its share of the deadline (``--budget``, default 570 s); a step that fails or
runs out of time is recorded as such and the others still run. Every result names the device
(``torch.cuda.get_device_name``). ``--dry`` imports every entry point, composes every step's config, builds every
model at a tiny size and checks that the bench functions exist; it writes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BENCH_STEPS = {"m4": 240, "dynamics_gpu16gb": 150, "fvlm": 90}  # bench name -> its time limit in seconds
# every experiment of the config tree, so that a new family is checked as soon as it has one
TRAIN_EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
TRAIN_LIMIT = 240  # seconds for one smoke run on the GPU profile
TRAIN_PARALLEL = 2


def train_overrides(experiment: str) -> list[str]:
    return [f"experiment={experiment}", "hardware=gpu16gb", "debug=smoke"]


STEPS = [*BENCH_STEPS, *(f"train-{e}" for e in TRAIN_EXPERIMENTS)]


def _device() -> dict:
    import torch

    from benchmarks.run import device_info

    info = device_info()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / 2**30, 1))
    return info


def _write(name: str, record: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"gpu-{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def _run(cmd: list[str], limit: float, log: Path, cwd: Path = ROOT) -> tuple[str, float]:
    """Run ``cmd`` with a time limit, output to ``log``; -> (status, seconds)."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(limit, 1))
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the step's own process group: the command and any workers it started
            proc.wait()
            status = f"timed out after {limit:.0f} s"
    return status, time.perf_counter() - t0


def _tail(log: Path, n: int = 40) -> list[str]:
    try:
        return log.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def run_gpu(budget: float) -> int:
    import torch

    if not torch.cuda.is_available():
        print("[gpu] no CUDA device: run benchmarks/gpu.sh --dry on a CPU", file=sys.stderr)
        return 2
    device = _device()
    deadline = time.perf_counter() + budget
    failed = 0
    with tempfile.TemporaryDirectory(prefix="mmsuite-gpu-") as tmp:
        tmp = Path(tmp)
        for name, limit in BENCH_STEPS.items():  # alone on the GPU: these are timings
            left = deadline - time.perf_counter()
            cmd = [sys.executable, "-m", "benchmarks.run", "--only", name, "--prefix", "gpu-", "--threads", "8"]
            status, seconds = _run(cmd, min(limit, left), tmp / f"{name}.log")
            result = RESULTS / f"gpu-{name}.json"
            figures = json.loads(result.read_text()) if status == "ok" and result.exists() else {}
            record = {"device": device, "step": name, "status": status, "seconds": round(seconds, 1), **figures}
            record.setdefault("log_tail", _tail(tmp / f"{name}.log") if status != "ok" else [])
            _write(name, record)
            failed += status != "ok"
            print(f"[gpu] {name}: {status} in {seconds:.0f} s", flush=True)
        pending = list(TRAIN_EXPERIMENTS)
        running: dict[str, tuple[subprocess.Popen, float, Path]] = {}
        while pending or running:
            while pending and len(running) < TRAIN_PARALLEL:
                e = pending.pop(0)
                log = tmp / f"train-{e}.log"
                cmd = [sys.executable, "train.py", *train_overrides(e), f"paths.log_dir={tmp}/logs"]
                cmd += [f"paths.data_dir={tmp}/data-{e}", "print_config=false"]  # own data: no two writers
                out = open(log, "w")
                proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
                out.close()
                running[e] = (proc, time.perf_counter(), log)
            time.sleep(2)
            for e, (proc, t0, log) in list(running.items()):
                over = time.perf_counter() - t0 > TRAIN_LIMIT or time.perf_counter() > deadline
                if proc.poll() is None and not over:
                    continue
                if proc.poll() is None:
                    os.killpg(proc.pid, 9)
                    proc.wait()
                    status = "timed out"
                else:
                    status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
                del running[e]
                metrics = sorted((tmp / "logs" / e).glob("*/metrics.json"))
                record = {
                    "device": device,
                    "step": f"train-{e}",
                    "command": "python train.py " + " ".join(train_overrides(e)),
                    "status": status,
                    "seconds": round(time.perf_counter() - t0, 1),
                    "metrics": json.loads(metrics[0].read_text()) if metrics else None,
                    "log_tail": _tail(log) if status != "ok" else [],
                }
                _write(f"train-{e}", record)
                failed += status != "ok"
                print(f"[gpu] train-{e}: {status} in {record['seconds']:.0f} s", flush=True)
    summary = {"device": device, "budget_s": budget, "steps": STEPS, "failed": failed}
    _write("summary", summary)
    print(f"[gpu] {len(STEPS) - failed}/{len(STEPS)} steps ok; results in {RESULTS}/gpu-*.json", flush=True)
    return 1 if failed else 0


def dry() -> int:
    """Check that every step would start: entry points import, configs compose, models build at a tiny size."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    from benchmarks import run as bench
    from mmsuite import run

    checks = []

    def check(what: str, fn) -> None:
        t0 = time.perf_counter()
        try:
            fn()
            checks.append((what, "ok"))
        except Exception as e:  # report every step, not only the first failure
            checks.append((what, f"FAILED: {type(e).__name__}: {e}"))
        print(f"[gpu --dry] {what}: {checks[-1][1]} ({time.perf_counter() - t0:.1f} s)", flush=True)

    for name in BENCH_STEPS:
        check(f"bench {name} exists", lambda name=name: bench.BENCHES[name])
    check("benchmarks.run arguments", lambda: bench.build_parser().parse_args(["--only", "m4", "--prefix", "gpu-"]))

    def m4(published: bool) -> None:
        cfg = bench._m4_config(quick=True, published=published)
        module = run.build_model(cfg)
        assert sum(p.numel() for p in module.parameters()) > 0
        if published:
            assert int(cfg.model.net.heads) == 2 and cfg.tokenizer.codebook_size == 64000

    check("m4 config + tiny model", lambda: m4(False))
    check("m4 published config + tiny model", lambda: m4(True))

    def dynamics() -> None:
        cfg = bench._dynamics_config("gpu16gb", quick=True)
        assert int(cfg.data.long_seq_len) == 64 and int(cfg.data.long_batch_size) == 1
        run.build_model(cfg)

    check("dynamics gpu16gb config + tiny model", dynamics)

    def train(experiment: str) -> None:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=train_overrides(experiment), return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # the run paths read hydra's runtime settings, as in train.py
        with open_dict(cfg):
            del cfg["hydra"]
        cfg = run.prepare_config(cfg)
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        assert cfg.trainer.accelerator == "gpu" and "bf16" in str(cfg.trainer.precision), cfg.trainer
        run.build_token_space(cfg)
        run.build_model(cfg)  # the smoke model: small enough to build on a CPU

    for e in TRAIN_EXPERIMENTS:
        check(f"train.py {' '.join(train_overrides(e))}: config + model", lambda e=e: train(e))
    check("train.py exists", lambda: (ROOT / "train.py").is_file() or 1 / 0)
    bad = [c for c in checks if c[1] != "ok"]
    print(f"[gpu --dry] {len(checks) - len(bad)}/{len(checks)} checks ok", flush=True)
    return 1 if bad else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="check that every step would start (no GPU needed)")
    ap.add_argument("--budget", type=float, default=570.0, help="seconds for all steps together")
    args = ap.parse_args()
    sys.exit(dry() if args.dry else run_gpu(args.budget))


if __name__ == "__main__":
    main()
