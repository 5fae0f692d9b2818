"""make bench: speed figures of the platform, written to benchmarks/results/<name>.json plus a table.

Each benchmark measures its own ratio in one process where it can (e.g. Lightning vs a bare loop on the
same model and batches), so that figures taken on a busy or different machine still compare.

    python -m benchmarks.run [--only toyworld,shards,...] [--quick] [--threads N]

The table (results/summary.md) covers every results/*.json, not only the benches of this invocation, so that
``--only x`` refreshes the rows of x and keeps the others; rows measured with ``--quick`` say so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
CONF = Path(__file__).resolve().parents[1] / "conf"
# keys of a result that describe the set-up rather than measure it: kept in the JSON, left out of the table
CONFIG_KEYS = frozenset(
    {"batch", "image_size", "steps", "clips", "clip_s", "sample_rate", "n_q", "bins", "captions", "vocab_size"}
)


def device_info() -> dict:
    info = {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def timed(fn, repeat: int = 3) -> float:
    """Best wall-clock of ``repeat`` calls (seconds)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# ---------------------------------------------------------------------------------------------------
def bench_toyworld(quick: bool) -> dict:
    from mmsuite.sources import toyworld

    out = {}
    for size in (64, 128):
        cfg = toyworld.ToyWorldConfig(image_size=size, frames=16, seed=0)
        n = 8 if quick else 32
        sec = timed(lambda cfg=cfg, n=n: [toyworld.make_clip(cfg, i) for i in range(n)])
        out[f"frames_per_s_{size}px"] = n * cfg.frames / sec
    return out


def _bench_dataset(root: Path, n_clips: int) -> Path:
    from mmsuite.datamodules.clips import build_toyworld

    return build_toyworld(
        root / "bench",
        {"image_size": 64, "frames": 16, "seed": 0},
        n_clips,
        {"train": 0.8, "val": 0.1, "test": 0.1},
        samples_per_shard=8,
        workers=2,
    )


def bench_shards(quick: bool) -> dict:
    from mmsuite.datamodules.shards import ShardStream, split_shards

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = _bench_dataset(Path(tmp), 64 if quick else 160)
        shards = split_shards(root, "train")
        n_samples = sum(s.count for s in shards)

        def read(num_workers: int) -> float:
            stream = ShardStream(
                shards,
                batch_size=32,
                expand=lambda s: list(s["frames"]),
                collate=lambda xs: {"image": torch.from_numpy(np.stack(xs))},
                items_per_sample=16,
                seed=0,
                train=True,
                num_workers=num_workers,
                shuffle_buffer=16,
            )
            loader = torch.utils.data.DataLoader(
                stream,
                batch_size=None,
                num_workers=num_workers,
                multiprocessing_context="fork" if num_workers else None,
            )
            t0 = time.perf_counter()
            n = sum(b["image"].shape[0] for b in loader)
            return n / 16 / (time.perf_counter() - t0)  # clips (shard samples) per second

        for w in (1, 2):
            out[f"samples_per_s_{w}_workers"] = max(read(w) for _ in range(2))
        out["frames_per_sample"] = 16
        out["samples_in_split"] = n_samples
        out["speedup_2_vs_1_workers"] = out["samples_per_s_2_workers"] / out["samples_per_s_1_workers"]
    return out


def _default_tokenizer_net():
    from omegaconf import OmegaConf

    from mmsuite.tokenizers.image import ImageAutoencoder

    net = OmegaConf.load(CONF / "model" / "image_tokenizer.yaml").net
    tok = OmegaConf.load(CONF / "tokenizer" / "fsq_toy.yaml")
    kwargs = OmegaConf.to_container(net, resolve=False)
    kwargs.update(levels=list(tok.levels), downsample=int(tok.downsample))
    return ImageAutoencoder(**kwargs), kwargs


def bench_tokenizer(quick: bool) -> dict:
    from mmsuite.tokenizers.image import ImageTokenizer

    net, kwargs = _default_tokenizer_net()
    tok = ImageTokenizer(net, image_size=64)
    images = torch.randint(0, 256, (64, 64, 64, 3), dtype=torch.uint8)
    ids = tok.encode(images)
    rep = 2 if quick else 4
    return {
        "encode_images_per_s": len(images) / timed(lambda: tok.encode(images), rep),
        "decode_images_per_s": len(images) / timed(lambda: tok.decode(ids), rep),
        "batch": len(images),
        "image_size": 64,
        "net": kwargs,
    }


def bench_audio_tokenizer(quick: bool) -> dict:
    """The default scratch EnCodec (conf/tokenizer/encodec_toy.yaml, random weights): seconds of audio per second."""
    from omegaconf import OmegaConf

    from mmsuite.tokenizers.audio import AudioTokenizer

    cfg = OmegaConf.load(CONF / "tokenizer" / "encodec_toy.yaml")
    cfg.kmeans_init = False  # usable random codebooks straight away (k-means would wait for a training batch)
    torch.manual_seed(0)
    tok = AudioTokenizer.from_config(cfg)
    clips, clip_s, rep = (2, 0.4, 2) if quick else (8, 1.0, 5)  # whole frames: 0.4 s = 30 hops
    n = int(clip_s * tok.sample_rate)
    wav = 0.1 * torch.randn(clips, tok.channels, n, generator=torch.Generator().manual_seed(0))
    ids = tok.encode(wav, sample_rate=tok.sample_rate)
    audio_s = clips * clip_s
    return {
        "encode_audio_s_per_s": audio_s / timed(lambda: tok.encode(wav, sample_rate=tok.sample_rate), rep),
        "decode_audio_s_per_s": audio_s / timed(lambda: tok.decode(ids, length=n), rep),
        "tokens_per_audio_s": ids.shape[1] / clip_s,
        "clips": clips,
        "clip_s": clip_s,
        "sample_rate": tok.sample_rate,
        "n_q": tok.n_q,
        "bins": tok.bins,
    }


def bench_text_tokenizer(quick: bool) -> dict:
    """Byte-level BPE (conf/tokenizer/text_bpe.yaml) trained on toy-world captions: tokens per second."""
    from omegaconf import OmegaConf

    from mmsuite.sources import toyworld
    from mmsuite.tokenizers.text import TextTokenizer, train_bpe
    from mmsuite.tokenizers.token_space import TokenSpace

    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "tokenizer" / "text_bpe.yaml"), resolve=True)
    world = toyworld.ToyWorldConfig(image_size=32, frames=1, seed=0)  # only the captions are used
    n_train, n_batch, rep = (100, 256, 2) if quick else (400, 2048, 5)
    captions = [toyworld.make_clip(world, i).caption for i in range(n_train + n_batch)]
    train, batch = captions[:n_train], captions[n_train:]
    with tempfile.TemporaryDirectory() as tmp:
        path = train_bpe(train, cfg["vocab_size"], Path(tmp), min_frequency=cfg["min_frequency"])
        space = TokenSpace.from_config(cfg["token_ranges"])
        specials = {role: cfg["specials"][role] for role in ("bos", "eos", "pad")}
        tok = TextTokenizer.from_file(path, space, literal_specials=cfg["literal_specials"], **specials)
    ids = tok.encode_batch(batch)
    n_tokens = sum(len(x) for x in ids)
    return {
        "encode_tokens_per_s": n_tokens / timed(lambda: tok.encode_batch(batch), rep),
        "decode_tokens_per_s": n_tokens / timed(lambda: tok.decode_batch(ids), rep),
        "tokens_per_caption": n_tokens / len(batch),
        "captions": len(batch),
        "vocab_size": tok.vocab_size,
    }


def bench_loop_overhead(quick: bool) -> dict:
    """Lightning's training loop against a bare PyTorch loop: same model, same in-memory batches."""
    import lightning as L

    from mmsuite.lightning_modules.image_tokenizer import ImageTokenizerModule

    _, kwargs = _default_tokenizer_net()
    steps = 10 if quick else 30
    g = torch.Generator().manual_seed(0)
    batches = [{"image": torch.randint(0, 256, (32, 3, 64, 64), dtype=torch.uint8, generator=g)} for _ in range(steps)]
    hp = dict(
        net=kwargs,
        optim={"lr": 1e-3, "betas": [0.9, 0.99], "weight_decay": 0.0},
        schedule={"warmup_steps": 10, "floor_ratio": 0.1},
        loss={"l1": 1.0, "mse": 0.0, "perceptual": 0.0},
    )

    def bare() -> float:
        from mmsuite.nn.schedule import warmup_cosine_scheduler

        torch.manual_seed(0)
        module = ImageTokenizerModule(**hp)
        opt = torch.optim.AdamW(module.parameters(), lr=1e-3, betas=(0.9, 0.99))
        sched = warmup_cosine_scheduler(opt, 10, steps + 1, 0.1)
        module.train()

        def step(i, b):
            out = module.training_step(b, i)  # the same step Lightning runs (self.log is a no-op here)
            loss = out["loss"] if isinstance(out, dict) else out
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()

        step(0, batches[0])  # warm-up, not timed (Lightning's first batch is untimed too)
        t0 = time.perf_counter()
        for i, b in enumerate(batches):
            step(i + 1, b)
        return time.perf_counter() - t0

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 1:
                self.t0 = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            self.elapsed = time.perf_counter() - self.t0

    def lightning() -> float:
        torch.manual_seed(0)
        module = ImageTokenizerModule(**hp)
        timer = Timer()
        trainer = L.Trainer(
            max_steps=steps + 1,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[timer],
            num_sanity_val_steps=0,
            limit_val_batches=0,
        )
        trainer.fit(module, train_dataloaders=_Batches([batches[0], *batches]))
        return timer.elapsed

    # interleave to share any drift of the machine's speed
    bare_t, light_t = [], []
    for _ in range(2 if quick else 3):
        bare_t.append(bare())
        light_t.append(lightning())
    b, lt = min(bare_t), min(light_t)
    return {
        "steps": steps,
        "bare_s_per_step": b / steps,
        "lightning_s_per_step": lt / steps,
        "overhead_pct": 100 * (lt / b - 1),
        "goal_overhead_pct": 5.0,
        "batch": 32,
        "image_size": 64,
    }


class _Batches:
    """An in-memory iterable of ready batches (a plain list would be read as several dataloaders)."""

    def __init__(self, batches: list):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


BENCHES = {
    "toyworld": bench_toyworld,
    "shards": bench_shards,
    "tokenizer": bench_tokenizer,
    "loop_overhead": bench_loop_overhead,
    "audio_tokenizer": bench_audio_tokenizer,
    "text_tokenizer": bench_text_tokenizer,
}


def device_text(info) -> str:
    """The machine a result was measured on, as the table's Device line names it."""
    if not isinstance(info, dict):
        return "unknown device"
    cpu = f"{info.get('machine')} CPU, {info.get('cpu_count')} cores, {info.get('torch_threads')} torch threads"
    return f"{info.get('gpu') or cpu}; torch {info.get('torch')}"


def load_results(results_dir: Path | None = None) -> dict[str, dict]:
    """Every ``<name>.json`` in ``results_dir`` (default RESULTS): BENCHES in their order, then others by name."""
    found = {}
    for f in sorted(Path(results_dir or RESULTS).glob("*.json")):
        try:
            found[f.stem] = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{f}: not a readable benchmark result ({e}); delete it or rerun that bench") from None
        if not isinstance(found[f.stem], dict):
            raise ValueError(f"{f}: a benchmark result must be a JSON object, got {type(found[f.stem]).__name__}")
    order = [n for n in BENCHES if n in found] + [n for n in found if n not in BENCHES]
    return {n: found[n] for n in order}


def table(results: dict[str, dict]) -> str:
    """The Device line(s) and a markdown table of the numeric figures of ``results`` (name -> saved JSON).

    Rows from ``--quick`` runs get " (quick)" after the benchmark's name; when the results come from more than
    one device, the Device line numbers them and each row names its device as ``[k]``."""
    devices = list(dict.fromkeys(device_text(res.get("device")) for res in results.values()))
    if len(devices) <= 1:
        head = f"Device: {devices[0] if devices else 'none'}"
    else:
        head = "Devices: " + "; ".join(f"[{i + 1}] {d}" for i, d in enumerate(devices))
    lines = [head, "", "| benchmark | figure | value |", "|---|---|---|"]
    for name, res in results.items():
        label = name + (" (quick)" if res.get("quick") else "")
        if len(devices) > 1:
            label += f" [{devices.index(device_text(res.get('device'))) + 1}]"
        for k, v in res.items():
            if k in ("device", "quick") or k in CONFIG_KEYS or isinstance(v, bool) or not isinstance(v, int | float):
                continue
            lines.append(f"| {label} | {k} | {v:.4g} |")
    return "\n".join(lines) + "\n"


def write_summary(results_dir: Path | None = None) -> str:
    """(Re)write ``results_dir/summary.md`` (default RESULTS) from every result JSON there; returns its text."""
    results_dir = Path(results_dir or RESULTS)
    summary = table(load_results(results_dir))
    (results_dir / "summary.md").write_text(summary)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", default="", help="comma-separated subset of " + ",".join(BENCHES))
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (for a quick look)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (and the Rust tokenizers' thread pool)")
    args = ap.parse_args()
    chosen = [n for n in (args.only.split(",") if args.only else BENCHES) if n]
    unknown = [n for n in chosen if n not in BENCHES]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHES)}")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))  # read when tokenizers first goes parallel
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = device_info()
    for name in chosen:
        print(f"[bench] {name} ...", flush=True)
        res = BENCHES[name](args.quick)
        (RESULTS / f"{name}.json").write_text(json.dumps({"device": info, "quick": args.quick, **res}, indent=2) + "\n")
    print("\n" + write_summary())


if __name__ == "__main__":
    main()
