"""make bench: speed figures of the platform, written to benchmarks/results/<name>.json plus a table.

Each benchmark measures its own ratio in one process where it can (e.g. Lightning vs a bare loop on the
same model and batches), so that figures taken on a busy or different machine still compare.

    python -m benchmarks.run [--only toyworld,shards,...,m4,dynamics,dynamics_gpu16gb,fvlm,mmpt] [--quick] [--threads N]
        [--results DIR] [--prefix gpu-]

The table (results/summary.md) covers every results/*.json, not only the benches of this invocation, so that
``--only x`` refreshes the rows of x and keeps the others; rows measured with ``--quick`` say so. ``--results DIR``
writes the JSONs and the table to DIR instead of results/.

A bench that measures an experiment's model or tokenizer takes it from the config that ``train.py`` would run
(:func:`compose`: Hydra's defaults list, interpolations and the settings schemas), never from a YAML file read alone.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
CONF = Path(__file__).resolve().parents[1] / "conf"
# keys of a result that describe the set-up rather than measure it: kept in the JSON, left out of the table
CONFIG_KEYS = frozenset(
    {"batch", "image_size", "steps", "clips", "clip_s", "sample_rate", "n_q", "bins", "captions", "vocab_size"}
    | {"warmup_steps", "padding_batch", "padding_draws", "grad_clip", "available_memory_mib"}
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


def compose(config_name: str, overrides: list[str]):
    """The config ``<config_name>.py <overrides>`` runs with: composed by Hydra from conf/ and its model and data
    settings checked as the entry points check them (a bad key stops the bench naming it). A bench has no run
    folder (``paths.run_dir=null``): it writes nothing beside its results."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from mmsuite.run import prepare_config  # importing mmsuite.run also registers the config's resolvers

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return prepare_config(hydra_compose(config_name, overrides=[*overrides, "paths.run_dir=null"]))


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


def _image_tokenizer_config(quick: bool = False):
    """``experiment=image_tokenizer`` (``quick``: at its smoke sizes, ``scale=smoke``)."""
    return compose("train", ["experiment=image_tokenizer"] + (["scale=smoke"] if quick else []))


def bench_tokenizer(quick: bool) -> dict:
    """The image tokenizer ``experiment=image_tokenizer`` trains (random weights): encode / decode images per second
    at its frame size."""
    from mmsuite.run import build_model
    from mmsuite.tokenizers.image import ImageTokenizer

    cfg = _image_tokenizer_config()
    torch.manual_seed(0)
    module = build_model(cfg)
    size = int(cfg.data.world.image_size)
    tok = ImageTokenizer(module.net, image_size=size)
    images = torch.randint(0, 256, (64, size, size, 3), dtype=torch.uint8)
    ids = tok.encode(images)
    rep = 2 if quick else 4
    return {
        "encode_images_per_s": len(images) / timed(lambda: tok.encode(images), rep),
        "decode_images_per_s": len(images) / timed(lambda: tok.decode(ids), rep),
        "batch": len(images),
        "image_size": size,
        "net": dict(module.hparams["net"]),
    }


def bench_audio_tokenizer(quick: bool) -> dict:
    """The scratch EnCodec ``experiment=audio_tokenizer`` trains (random weights): seconds of audio per second."""
    from omegaconf import OmegaConf

    from mmsuite.tokenizers.audio import AudioTokenizer

    codec = OmegaConf.to_container(compose("train", ["experiment=audio_tokenizer"]).tokenizer, resolve=True)
    codec["kmeans_init"] = False  # usable random codebooks straight away (k-means would wait for a training batch)
    torch.manual_seed(0)
    tok = AudioTokenizer.from_config(codec)
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
    """The byte-level BPE of ``experiment=nano4m`` (its ``text_tokenizer``, conf/tokenizer/text_bpe.yaml) trained on
    toy-world captions: tokens per second."""
    from omegaconf import OmegaConf

    from mmsuite.sources import toyworld
    from mmsuite.tokenizers.text import TextTokenizer, train_bpe
    from mmsuite.tokenizers.token_space import TokenSpace

    cfg = OmegaConf.to_container(compose("train", ["experiment=nano4m"]).text_tokenizer, resolve=True)
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
    """Lightning's training loop against a bare PyTorch loop: the model, optimizer and schedule of
    ``experiment=image_tokenizer``, its batch and frame size, the same in-memory batches. ``quick``: at its smoke
    sizes (``scale=smoke``), fewer steps."""
    import lightning as L

    from mmsuite.nn.schedule import adamw_warmup_cosine
    from mmsuite.run import build_model

    cfg = _image_tokenizer_config(quick)
    steps, repeats = (4, 1) if quick else (30, 3)
    batch, size = int(cfg.data.batch_size), int(cfg.data.world.image_size)
    g = torch.Generator().manual_seed(0)
    batches = [
        {"image": torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g)} for _ in range(steps)
    ]

    def bare() -> float:
        torch.manual_seed(0)
        module = build_model(cfg)
        s = module.settings  # what the module's configure_optimizers builds, over the same number of steps
        optim = adamw_warmup_cosine(module.net.parameters(), s.optim, s.schedule, steps + 1, "bench")
        opt, sched = optim["optimizer"], optim["lr_scheduler"]["scheduler"]
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
        module = build_model(cfg)
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
    for _ in range(repeats):
        bare_t.append(bare())
        light_t.append(lightning())
    b, lt = min(bare_t), min(light_t)
    return {
        "steps": steps,
        "bare_s_per_step": b / steps,
        "lightning_s_per_step": lt / steps,
        "overhead_pct": 100 * (lt / b - 1),
        "goal_overhead_pct": 5.0,
        "batch": batch,
        "image_size": size,
    }


# ---------------------------------------------------------------------------------------------------
# m4: the 4M model at the M4 shape (experiment=m4_pose on a GPU profile = the notes' config verbatim)
M4_OVERRIDES = ["experiment=m4_pose", "hardware=gpu16gb"]
M4_QUICK_NET = ["model.net.dim=32", "model.net.encoder_depth=1", "model.net.decoder_depth=1", "model.net.heads=2"]
# the published M4 model (the notes' d8-8 w640: dim 640, 8 + 8 layers, 10 heads of 64) over the 64,000-code FSQ
# tokenizer with its factorised code embedding and 8192 pose bins
M4_PUBLISHED = [
    "tokenizer=fsq_64k",
    "model.net.dim=640",
    "model.net.encoder_depth=8",
    "model.net.decoder_depth=8",
    "model.net.heads=10",
]
M4_PAD_GOAL = 0.10  # issue 4: share of compute lost to padding < 10 %
M4_LOGITS_GOAL = 1.3  # issue 39: factorised-embedding logits within 1.3x of a plain table's time
# dense bf16 tensor-core peaks (FLOP/s) for the MFU estimate, by a substring of torch.cuda.get_device_name;
# MMSUITE_PEAK_TFLOPS overrides (e.g. for a GPU not listed)
GPU_PEAK_BF16 = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "RTX 4090": 165e12,
    "A10": 125e12,
    "L4": 121e12,
}


def _m4_config(quick: bool, published: bool = False):
    """The composed train config of ``experiment=m4_pose hardware=gpu16gb`` (the M4 notes' modalities, alphas,
    token ranges and batch 96, the model of conf/model/fourm.yaml); ``published``: at the published model shape
    (:data:`M4_PUBLISHED`); ``quick`` shrinks only the net."""
    return compose("train", M4_OVERRIDES + (M4_PUBLISHED if published else []) + (M4_QUICK_NET if quick else []))


def _peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s (:data:`GPU_PEAK_BF16`, ``MMSUITE_PEAK_TFLOPS``), None if unknown."""
    if os.environ.get("MMSUITE_PEAK_TFLOPS"):
        return float(os.environ["MMSUITE_PEAK_TFLOPS"]) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_PEAK_BF16.items() if key in name), None)


def _m4_step_flops(plan, net: dict, vocabs: list[int], segment: np.ndarray) -> float:
    """Model FLOPs of one training step (forward + backward = 3 x forward, 2 FLOPs per multiply-add) at the plan's
    real token counts: FourM's trunk (:func:`_fourm_macs`, attention at the real lengths) and the tied logits of
    each real target over its modality's vocabulary. Padding is not counted, so this is the work an MFU credits."""
    n_in, n_tg = plan.b_in.sum(1).numpy(), plan.b_tg.sum(1).numpy()
    trunk = _fourm_macs(n_in, n_tg, net).sum()
    targets = np.asarray(plan.dec_index)[np.asarray(plan.dec_valid)]
    logits = float(np.asarray(vocabs, dtype=np.float64)[segment[targets]].sum()) * net["dim"]
    return 6.0 * (trunk + logits)


def _fourm_macs(n_enc: np.ndarray, n_dec: np.ndarray, net: dict, w_enc=None, w_dec=None, w_ctx=None) -> np.ndarray:
    """Forward multiply-adds of FourM's trunk for encoder / decoder lengths ``n_enc`` / ``n_dec`` (per sample):
    every linear layer (encoder blocks, context projection, decoder self-, cross-attention and MLP, the cross
    attention's K/V over the encoder tokens) at the token counts ``n``, plus the attention scores and weighted
    sums at the attended lengths ``w`` (default ``n``; ``w_ctx``: the cross-attention's keys, default ``w_enc``).
    Packed FourM (model.net.packed) runs the linear layers on the real tokens only and attention on length
    buckets: ``n`` = real, ``w`` = the bucket maxima (:func:`_bucket_max`). Logits are
    left out: FourM computes them only at real targets, whatever the padding. Backward is ~2x forward for every
    term, so the padding share is the same for a training step."""
    d, r = float(net["dim"]), float(net["mlp_ratio"])
    n, m = n_enc.astype(np.float64), n_dec.astype(np.float64)
    wn = n if w_enc is None else np.broadcast_to(np.asarray(w_enc, dtype=np.float64), n.shape)
    wm = m if w_dec is None else np.broadcast_to(np.asarray(w_dec, dtype=np.float64), m.shape)
    wk = wn if w_ctx is None else np.broadcast_to(np.asarray(w_ctx, dtype=np.float64), n.shape)
    enc = net["encoder_depth"] * ((4 + 2 * r) * d * d * n + 2 * wn * wn * d) + d * d * n
    dec = net["decoder_depth"] * ((6 + 2 * r) * d * d * m + 2 * d * d * n + 2 * wm * wm * d + 2 * wm * wk * d)
    return enc + dec


def _bucket_max(order_by: np.ndarray, values: np.ndarray, groups: int) -> np.ndarray:
    """Per sample, the largest of ``values`` in its bucket, buckets cut as nn.transformer.Packing cuts them:
    samples sorted by ``order_by`` (stable) and split into ``groups`` near-equal parts."""
    out = np.empty(len(values), dtype=np.float64)
    for part in np.array_split(np.argsort(order_by, kind="stable"), min(groups, len(values))):
        out[part] = values[part].max()
    return out


def _m4_padding(masking, batch: int, draws: int, net: dict) -> dict:
    """Padding shares over ``draws`` MaskPlans of ``batch`` samples: padded to the batch maximum (what
    DirichletMasking hands the model) and padded to the token ranges' maxima (nano4M, the notes' 46 % / 63 %)."""
    rng = np.random.default_rng(0)
    full_in, full_tg = masking.input_tokens_range[1], masking.target_tokens_range[1]
    real_in = real_tg = slots_in = slots_tg = 0
    macs_real = macs_ours = macs_full = 0.0
    for _ in range(draws):
        plan = masking(batch, rng)
        n_in, n_tg = plan.b_in.sum(1).numpy(), plan.b_tg.sum(1).numpy()
        w_in, w_tg = plan.enc_index.shape[1], plan.dec_index.shape[1]  # the batch maxima
        real_in, real_tg = real_in + plan.n_real_input, real_tg + plan.n_real_target
        slots_in, slots_tg = slots_in + batch * w_in, slots_tg + batch * w_tg
        macs_real += _fourm_macs(n_in, n_tg, net).sum()
        if net.get("packed", False):  # linear layers on the real tokens, attention on length buckets
            g = int(net.get("attention_groups", 1))
            enc_w = _bucket_max(n_in, n_in, g)  # encoder self-attention: buckets by input length
            dec_w, ctx_w = _bucket_max(n_tg, n_tg, g), _bucket_max(n_tg, n_in, g)  # decoder: by target length
            macs_ours += _fourm_macs(n_in, n_tg, net, enc_w, dec_w, ctx_w).sum()
        else:
            macs_ours += batch * _fourm_macs(np.array([w_in]), np.array([w_tg]), net)[0]
        macs_full += batch * _fourm_macs(np.array([full_in]), np.array([full_tg]), net)[0]
    n = draws * batch
    share = 1 - macs_real / macs_ours
    return {
        "pad_share_encoder": 1 - real_in / slots_in,
        "pad_share_decoder": 1 - real_tg / slots_tg,
        "pad_share_compute": share,
        "pad_full_share_encoder": 1 - real_in / (n * full_in),
        "pad_full_share_decoder": 1 - real_tg / (n * full_tg),
        "pad_full_share_compute": 1 - macs_real / macs_full,
        "goal_pad_share": M4_PAD_GOAL,
        "pad_goal_met": bool(share < M4_PAD_GOAL),
        "real_input_tokens_per_sample": real_in / n,
        "real_target_tokens_per_sample": real_tg / n,
        "pad_full_lengths": [int(full_in), int(full_tg)],
        "packed": bool(net.get("packed", False)),
    }


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


class _PeakMemory:
    """Peak memory of the code run inside ``with``, in MiB (``.mib``), and how it was measured (``.method``).

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was allocated before.
    CPU: the rise of the process's resident set, peak (VmHWM, reset on entry by writing 5 to
    /proc/self/clear_refs) minus VmRSS on entry; where the reset is refused, ``ru_maxrss`` after minus before,
    which only sees a new peak of the process. Python-level tracers (tracemalloc) miss torch's allocations."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated minus memory_allocated before building the model"
            return self
        self.base = _rss_kib("VmRSS") * 1024
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak resident set size (VmHWM) to the current one
            self.method = "peak resident set (VmHWM, reset via /proc/self/clear_refs) minus VmRSS before the model"
            self._peak = lambda: _rss_kib("VmHWM") * 1024
        except OSError:
            import resource

            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.method = "ru_maxrss after minus before (sees only a new process peak)"
            self._peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = self._peak()
        self.mib = max(peak - self.base, 0) / 2**20


def _m4_train(cfg, batch: int, warmup: int, steps: int, device: torch.device) -> dict:
    """Forward + backward + gradient clipping + AdamW step of FourMModule's net and loss at ``batch``, on random
    local token ids (seeded) under fresh DirichletMasking plans (drawn in the timed step, as training_step does);
    bf16 autocast on CUDA (the GPU profiles' bf16-mixed), fp32 on CPU."""
    from omegaconf import OmegaConf

    from mmsuite.lightning_modules.fourm.module import _plan_to
    from mmsuite.run import build_model

    clip = float(OmegaConf.select(cfg, "trainer.gradient_clip_val", default=0.0) or 0.0)
    net_cfg = OmegaConf.to_container(cfg.model.net, resolve=True)
    g = torch.Generator().manual_seed(0)
    with _PeakMemory(device) as mem:
        torch.manual_seed(0)
        module = build_model(cfg).to(device)
        module.train()
        opt = module.configure_optimizers()["optimizer"]
        net = module.net
        cols = [torch.randint(0, v, (warmup + steps, batch, n), generator=g) for v, n in zip(net.vocabs, net.lengths)]
        tokens = torch.cat(cols, dim=2).to(device)  # [steps, B, S] local ids in the concatenated layout
        rng = np.random.default_rng(0)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
        segment = net.segment_host.numpy()
        real = slots = 0
        flops = 0.0

        def step(i: int) -> tuple[int, int, float]:
            plan = _plan_to(module.masking(batch, rng), device)
            with autocast:
                loss = module._losses(net(tokens[i], plan))["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            opt.step()
            real = plan.n_real_input + plan.n_real_target
            slots = batch * (plan.enc_index.shape[1] + plan.dec_index.shape[1])
            return real, slots, _m4_step_flops(plan, net_cfg, net.vocabs, segment)

        for i in range(warmup):
            step(i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for i in range(warmup, warmup + steps):
            r, s, f = step(i)
            real, slots, flops = real + r, slots + s, flops + f
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        share = _m4_logits_share(module, tokens[0], batch, rng, autocast, elapsed / steps)
    peak = _peak_flops(device)
    return {
        "real_tokens_per_s": real / elapsed,
        "model_gflop_per_step": flops / steps / 1e9,
        "achieved_tflop_per_s": flops / elapsed / 1e12,
        **({"mfu": flops / elapsed / peak, "peak_tflop_per_s": peak / 1e12} if peak else {}),
        "logits_share_of_step": share,
        "padded_tokens_per_s": slots / elapsed,
        "s_per_step": elapsed / steps,
        "peak_memory_mib": mem.mib,
        "peak_memory_method": mem.method,
        "params_M": sum(p.numel() for p in net.parameters()) / 1e6,
        "batch": batch,
        "steps": steps,
        "warmup_steps": warmup,
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "grad_clip": clip,
    }


def _m4_logits_share(module, tokens: torch.Tensor, batch: int, rng, autocast, step_s: float) -> float:
    """Share of a training step spent in the output side: the token tables (a factorised table's assembly), the
    tied logits of every real target and their cross-entropy, forward and backward, timed alone on one plan's
    decoder states (computed beforehand, without gradient), divided by the measured step time ``step_s``."""
    from mmsuite.lightning_modules.fourm.module import _plan_to

    net = module.net
    plan = _plan_to(module.masking(batch, rng), tokens.device)
    with torch.no_grad(), autocast:
        y, index, rows, _ = net._states(tokens, plan, net.tables())
    seg, targets = net.segment[index], tokens[rows, index]
    names = net._target_modalities(plan, seg)

    def output_side() -> None:
        with autocast:
            tables = net.tables()
            h = y.detach().requires_grad_()
            out = {net.names[k]: (net.logits(k, h[seg == k], tables), targets[seg == k], None) for k in names}
            loss = module._losses(out)["loss"]
        loss.backward()

    output_side()  # warm-up
    if tokens.device.type == "cuda":
        torch.cuda.synchronize(tokens.device)
    t0 = time.perf_counter()
    output_side()
    if tokens.device.type == "cuda":
        torch.cuda.synchronize(tokens.device)
    module.net.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / step_s


def _m4_logits_vs_table(cfg, n_targets: dict[str, int], device: torch.device, reps: int) -> dict:
    """Factorised image-code embedding against a plain table in what a training step does with it: build the
    tables once, tied logits of both image modalities' targets (``n_targets``) and their cross-entropy, forward and
    backward. Both nets are the published model's output side (no blocks); the two alternate, best of ``reps``."""
    from omegaconf import OmegaConf

    from mmsuite.lightning_modules.fourm.model import FourMNetSettings

    net = OmegaConf.to_container(cfg.model.net, resolve=True)
    mods = OmegaConf.to_container(cfg.model.modalities, resolve=True)
    kw = {**net, "encoder_depth": 0, "decoder_depth": 0}  # the output side only: no blocks
    nets = {e: FourMNetSettings(**{**kw, "image_embedding": e}).build(mods).to(device) for e in ("factorised", "table")}
    g = torch.Generator().manual_seed(0)
    ks = [k for k, name in enumerate(nets["table"].names) if n_targets.get(name)]
    h = {k: torch.randn(n_targets[nets["table"].names[k]], net["dim"], generator=g).to(device) for k in ks}
    t = {k: torch.randint(0, nets["table"].vocabs[k], (len(h[k]),), generator=g).to(device) for k in ks}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def run(model) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with autocast:
            tables = model.tables()
            loss = sum(torch.nn.functional.cross_entropy(model.logits(k, h[k], tables).float(), t[k]) for k in ks)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    best = {e: float("inf") for e in nets}
    for e in nets:
        run(nets[e])  # warm-up
    for r in range(reps):
        for e in nets if r % 2 == 0 else list(nets)[::-1]:
            best[e] = min(best[e], run(nets[e]))
    return {
        "logits_factorised_s": best["factorised"],
        "logits_table_s": best["table"],
        "logits_factorised_vs_table": best["factorised"] / best["table"],
        "goal_logits_factorised_vs_table": M4_LOGITS_GOAL,
        "logits_goal_met": bool(best["factorised"] / best["table"] <= M4_LOGITS_GOAL),
        "logits_targets": {nets["table"].names[k]: len(h[k]) for k in ks},
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bench_m4(quick: bool) -> dict:
    """The 4M model at the M4 shape (experiment=m4_pose hardware=gpu16gb: 256 / 39 / 256 / 39 tokens, the notes'
    alphas and token ranges, batch 96; dim 256, 4 + 4 layers, 4 heads): the share of compute lost to padding
    (goal < 10 %), training throughput in real (non-padding) tokens/s and peak memory.

    Padding shares are over many MaskPlans at the config's batch: padded to the batch maximum (ours) against
    padded to the token ranges' maxima 256 / 256 (nano4M; the notes' 46 % encoder / 63 % decoder), per side as
    slots and compute-weighted by FourM's forward trunk FLOPs (:func:`_fourm_macs`). Throughput: CUDA at the
    config's batch in bf16 autocast; CPU at batch 16 (batch 96 takes ~20 s a step on two cores), fp32.
    ``quick``: the same layout and masking with a tiny net (dim 32, 1 + 1 layers), batch 4, a few draws."""
    from omegaconf import OmegaConf

    from mmsuite.lightning_modules.fourm.masking import DirichletMasking

    cfg = _m4_config(quick)
    net = OmegaConf.to_container(cfg.model.net, resolve=True)
    module_masking = OmegaConf.to_container(cfg.model.masking, resolve=True)
    lengths = [int(m["length"]) for m in OmegaConf.to_container(cfg.model.modalities, resolve=True)]
    masking = DirichletMasking(
        lengths,
        module_masking["input_alphas"],
        module_masking["target_alphas"],
        module_masking["input_tokens_range"],
        module_masking["target_tokens_range"],
        weights=module_masking.get("weights"),
    )
    config_batch = int(cfg.data.batch_size)
    out = _m4_padding(masking, config_batch, 20 if quick else 1000, net)
    out["padding_batch"] = config_batch
    out["padding_draws"] = 20 if quick else 1000

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if quick:
        batch, warmup, steps = 4, 1, 2
    elif device.type == "cuda":
        batch, warmup, steps = config_batch, 5, 20
    else:
        batch, warmup, steps = 16, 2, 6
    out.update(_m4_train(cfg, batch, warmup, steps, device))
    # the same steps with the padded layout (model.net.packed=false): what packing buys in this run
    from omegaconf import open_dict

    padded_cfg = cfg.copy()
    with open_dict(padded_cfg):
        padded_cfg.model.net.packed = False
    padded = _m4_train(padded_cfg, batch, warmup, steps, device)
    out["unpacked_real_tokens_per_s"] = padded["real_tokens_per_s"]
    out["unpacked_peak_memory_mib"] = padded["peak_memory_mib"]
    out["packed_speedup"] = out["real_tokens_per_s"] / padded["real_tokens_per_s"]
    out["device_type"] = device.type
    out["device_name"] = _device_name(device)
    out["shape"] = {"lengths": lengths, **net, "masking": module_masking, "config_batch": config_batch}
    verdict = "met" if out["pad_goal_met"] else "NOT met"
    print(
        f"[bench] m4: padding {100 * out['pad_share_compute']:.1f} % of compute (encoder "
        f"{100 * out['pad_share_encoder']:.1f} %, decoder {100 * out['pad_share_decoder']:.1f} %) at batch "
        f"{config_batch}, against {100 * out['pad_full_share_encoder']:.1f} % / "
        f"{100 * out['pad_full_share_decoder']:.1f} % padded to {out['pad_full_lengths']}; goal < "
        f"{100 * M4_PAD_GOAL:.0f} % {verdict}. {out['real_tokens_per_s']:.0f} real tokens/s "
        f"({out['padded_tokens_per_s']:.0f} with padding) at batch {batch} on {out['device_name']}, "
        f"x{out['packed_speedup']:.2f} vs the padded layout, peak {out['peak_memory_mib']:.0f} MiB "
        f"({out['unpacked_peak_memory_mib']:.0f} padded)",
        flush=True,
    )
    out.update({f"published_{k}": v for k, v in _m4_published(quick, device).items()})
    return out


def _m4_published(quick: bool, device: torch.device) -> dict:
    """The published M4 model (:data:`M4_PUBLISHED`: dim 640, 8 + 8 layers, 10 heads, 64,000 FSQ codes with the
    factorised embedding, 8192 pose bins) under the same masking: real tokens/s, the share of the step in the output
    side (tables, logits, cross-entropy), peak memory, model FLOPs per step and FLOP/s (MFU on a GPU with a known
    peak), and the factorised embedding's logits against a plain table's. CUDA: the config's batch (96), bf16
    autocast; CPU: batch 8, fp32. ``quick``: the published vocabularies with the tiny net, batch 4."""
    from omegaconf import OmegaConf

    cfg = _m4_config(quick, published=True)
    if quick:
        batch, warmup, steps, reps = 4, 1, 1, 1
    elif device.type == "cuda":
        batch, warmup, steps, reps = int(cfg.data.batch_size), 3, 10, 5
    else:
        batch, warmup, steps, reps = 8, 1, 3, 3
    out = _m4_train(cfg, batch, warmup, steps, device)
    # image targets per step at this batch: the mean over draws of the masking
    from mmsuite.lightning_modules.fourm.masking import DirichletMasking

    m = OmegaConf.to_container(cfg.model.masking, resolve=True)
    mods = OmegaConf.to_container(cfg.model.modalities, resolve=True)
    masking = DirichletMasking(
        [int(x["length"]) for x in mods],
        m["input_alphas"],
        m["target_alphas"],
        m["input_tokens_range"],
        m["target_tokens_range"],
        weights=m.get("weights"),
    )
    b_tg = masking.draw_budgets(batch * 64, np.random.default_rng(0)).b_tg.mean(0) * batch
    images = {x["name"]: int(round(n)) for x, n in zip(mods, b_tg) if x["kind"] == "image"}
    out.update(_m4_logits_vs_table(cfg, images, device, reps))
    out["shape"] = {
        **OmegaConf.to_container(cfg.model.net, resolve=True),
        "vocabs": [int(x["vocab"]) for x in mods],
        "batch": batch,
    }
    print(
        f"[bench] m4 published shape ({out['params_M']:.0f}M params, batch {batch}, {out['precision']}): "
        f"{out['real_tokens_per_s']:.0f} real tokens/s, {out['model_gflop_per_step']:.0f} GFLOP a step, "
        f"{out['achieved_tflop_per_s']:.3g} TFLOP/s"
        + (f" (MFU {100 * out['mfu']:.1f} %)" if "mfu" in out else "")
        + f", output side {100 * out['logits_share_of_step']:.0f} % of the step, peak {out['peak_memory_mib']:.0f} "
        f"MiB; factorised-embedding logits x{out['logits_factorised_vs_table']:.2f} a plain table's time "
        f"(goal <= {M4_LOGITS_GOAL})",
        flush=True,
    )
    return out


# ---------------------------------------------------------------------------------------------------
# dynamics: training frames/s at the profile's short and long lengths, peak memory, sampling frames/s
DYN_QUICK_NET = ["model.net.dim=32", "model.net.depth=2", "model.net.heads=2", "model.net.temporal_every=2"]


def _dynamics_config(hardware: str, quick: bool):
    """The composed train config of ``experiment=dynamics_shortcut hardware=<hardware>``; ``quick``: a tiny net."""
    return compose("train", ["experiment=dynamics_shortcut", f"hardware={hardware}"] + (DYN_QUICK_NET if quick else []))


def bench_dynamics(quick: bool, hardware: str | None = None) -> dict:
    """The dynamics model of ``experiment=dynamics_shortcut`` at its profile's shape (``gpu16gb`` on CUDA: the ~60M
    net, T=32 B=2 and T=64 B=1 with activation checkpointing; ``cpu`` otherwise: T=16 B=4 and T=32 B=2): training
    frames/s of a full step (student forward, the no-grad teacher passes on the bootstrap rows, backward, clip,
    AdamW) on random latents, peak memory per length, and cached-rollout sampling frames/s at 4 and 64 steps
    (16 context frames, batch 1). bf16 autocast on CUDA, fp32 on CPU. ``quick``: a tiny net, one timed step.
    ``hardware``: that profile's shape on whatever device this is (``bench_dynamics_gpu16gb``)."""
    from mmsuite.lightning_modules.dynamics.sampling import rollout
    from mmsuite.run import build_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    big_on_cpu = hardware is not None and hardware != "cpu" and device.type == "cpu"
    hardware = hardware or ("gpu16gb" if device.type == "cuda" else "cpu")
    cfg = _dynamics_config(hardware, quick)
    lengths = [
        (int(cfg.data.seq_len), int(cfg.data.batch_size)),
        (int(cfg.data.long_seq_len), int(cfg.data.long_batch_size)),
    ]
    if big_on_cpu:  # the long batch first: the process's resident set only grows, so only the first peak is clean
        lengths = lengths[::-1]
    min_frames = cfg.model.activation_checkpointing.min_frames
    warmup, steps = (1, 1) if quick or big_on_cpu else ((3, 10) if device.type == "cuda" else (2, 6))
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    out: dict = {"device_type": device.type, "device_name": _device_name(device), "hardware_profile": hardware}
    g = torch.Generator().manual_seed(0)
    for nth, (t, b) in enumerate(lengths):
        with _PeakMemory(device) as mem:
            torch.manual_seed(0)
            module = build_model(cfg).to(device)
            module.boot_start = 0  # bootstrap rows from the first step, as after the warm-up
            net = module.net.train()
            opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
            shape = (b, t, net.latent_channels, *net.latent_size)
            checkpoint = min_frames is not None and t >= int(min_frames)
            for i in range(warmup + steps):
                if i == warmup:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    start = time.perf_counter()
                z = torch.randn(shape, generator=g).to(device)
                actions = torch.randint(-1, max(net.num_actions, 1), (b, t), generator=g).to(device)
                with autocast:
                    parts = module._group_losses(z, actions if net.num_actions else None, checkpoint)
                    loss = (parts["flow"] + parts.get("boot", 0.0) + module.anchor * parts.get("anchor", 0.0)) / parts[
                        "n"
                    ]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
                opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = (time.perf_counter() - start) / steps
        out[f"train_T{t}_B{b}_frames_per_s"] = b * t / seconds
        out[f"train_T{t}_B{b}_s_per_step"] = seconds
        if nth == 0 or not big_on_cpu:  # a later length's peak on a CPU hides under the first's resident set
            out[f"train_T{t}_B{b}_peak_memory_mib"] = mem.mib
        out["peak_memory_method"] = mem.method
        out[f"train_T{t}_checkpointing"] = bool(checkpoint)
    out["params_M"] = sum(p.numel() for p in net.parameters()) / 1e6
    net.eval()
    horizon = 2 if quick or big_on_cpu else 8
    context = torch.randn((1, 16, net.latent_channels, *net.latent_size), generator=g).to(device)
    for k in (4, 64):
        with torch.no_grad(), autocast:
            rollout(net, context, 1, k, generator=torch.Generator().manual_seed(0))  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            rollout(net, context, horizon, k, generator=torch.Generator().manual_seed(0))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        out[f"sample_k{k}_frames_per_s"] = horizon / (time.perf_counter() - start)
    out["sample_speedup_k4_vs_k64"] = out["sample_k4_frames_per_s"] / out["sample_k64_frames_per_s"]
    print(
        f"[bench] dynamics ({hardware} shape, {out['params_M']:.2f}M params, {out['device_name']}): "
        + ", ".join(
            f"T={t} B={b} {out[f'train_T{t}_B{b}_frames_per_s']:.1f} frames/s, peak "
            + (f"{out[k]:.0f} MiB" if (k := f"train_T{t}_B{b}_peak_memory_mib") in out else "not measured")
            for t, b in lengths
        )
        + f"; sampling {out['sample_k4_frames_per_s']:.1f} frames/s at 4 steps, "
        + f"{out['sample_k64_frames_per_s']:.2f} at 64",
        flush=True,
    )
    return out


def bench_dynamics_gpu16gb(quick: bool) -> dict:
    """:func:`bench_dynamics` at the ``gpu16gb`` shape (the ~60M net, T=32 B=2 and T=64 B=1 with activation
    checkpointing) on this device. On a CPU it runs in fp32, one warm-up and one timed step per length: its peak
    resident memory bounds from above what the fp32 master weights, AdamW states and activations take, not what a
    GPU's allocator reports under bf16 autocast (bf16 saves half-size activations); no GPU figure comes from it.
    On a CPU the long batch runs first and only its peak is kept (the resident set does not shrink in between)."""
    return bench_dynamics(quick, hardware="gpu16gb")


FVLM_QUICK_NET = [
    "model.net.lm.hidden_size=32", "model.net.lm.num_layers=1", "model.net.lm.num_heads=2",
    "model.net.lm.num_kv_heads=1", "model.net.lm.intermediate_size=64", "model.net.lm.vocab_size=515",
    "model.net.film.channels=[8]", "data.frames=2",
]  # fmt: skip
FVLM_VOCAB = 49152 + 3  # SmolLM2's vocabulary + the token space's 3 specials: the caption logits' real width
FVLM_CAPTION_TOKENS = 64  # the notes' max_caption_tokens (EOS included)


def _fvlm_config(quick: bool):
    """The train config of ``experiment=fvlm_joint hardware=rtx4090`` (the notes' shape), with the LM's vocabulary at
    SmolLM2's size; ``quick``: a tiny LM over 2 of the frames."""
    overrides = ["experiment=fvlm_joint", "hardware=rtx4090", f"model.net.lm.vocab_size={FVLM_VOCAB}"]
    return compose("train", overrides + (FVLM_QUICK_NET if quick else []))


def _fvlm_train(cfg, batch: int, warmup: int, steps: int, device: torch.device) -> dict:
    """Forward (coarse + fine passes, as training runs them) + backward + clip + AdamW of FVLMModule's net and loss
    on seeded random features, latents and full-length captions, at ``batch``."""
    from mmsuite.lightning_modules.fvlm.model import fvlm_loss, training_passes
    from mmsuite.run import build_model

    n_frames = int(cfg.data.frames)
    n_tokens, dim = int(cfg.features.grid) ** 2 + 1, int(cfg.features.dim)
    side = int(cfg.data.image_size) // 8
    g = torch.Generator().manual_seed(0)
    with _PeakMemory(device) as mem:
        torch.manual_seed(0)
        module = build_model(cfg).to(device)
        module.train()
        net, loss_cfg, optim = module.net, module.loss_cfg, module.settings.optim
        opt = torch.optim.AdamW(
            net.parameters(), lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay
        )
        vocab = net.lm.get_input_embeddings().num_embeddings
        fine, scored = training_passes(loss_cfg, net.settings.fine_iterations)
        features = torch.randn(batch, n_frames, n_tokens, dim, generator=g).half().to(device)
        latents = torch.randn(batch, n_frames, net.settings.latent_channels, side, side, generator=g).to(device)
        ids = torch.randint(0, vocab, (batch, FVLM_CAPTION_TOKENS), generator=g).to(device)
        mask = torch.ones_like(ids, dtype=torch.bool)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

        def step() -> None:
            with autocast:
                loss, _ = fvlm_loss(net(features, ids, mask, latents, fine_iterations=fine, scored=scored), loss_cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()

        for _ in range(warmup):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
    return {
        "samples_per_s": batch * steps / elapsed,
        "s_per_step": elapsed / steps,
        "peak_memory_mib": mem.mib,
        "peak_memory_method": mem.method,
        "params_M": sum(p.numel() for p in net.parameters()) / 1e6,
    }


def _fvlm_cpu_run(quick: bool, batch: int, warmup: int, steps: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    return _fvlm_train(_fvlm_config(quick), batch, warmup, steps, torch.device("cpu"))


def bench_fvlm(quick: bool) -> dict:
    """The foveated VLM's training step at the notes' shape (``experiment=fvlm_joint hardware=rtx4090``: 16 of 24
    frames, 325 x 384 patch features, a SmolLM2-135M-shaped LM with its 49K vocabulary, captions of 64 tokens,
    coarse + 2 fine passes, 8 x 32 x 32 latents): samples/s and peak memory. CUDA: bf16 autocast at batch 32, the
    notes' anchor (about 100 samples/s in about 16 GB on a 4090). CPU: fp32 at batches 1, 2 and 8, each in its own
    process (a clean peak of the resident set); ``memory_per_sample_mib`` is the slope from batch 2 to 8,
    ``largest_batch_cpu_estimate`` how many samples the memory available would hold at that slope, and the
    ``_largest`` keys one step run at 85 % of that batch in a fresh process (backing off toward batch 8 when the
    kernel kills it or an allocation fails; ``killed_batches`` lists those). ``quick``: a tiny LM over 2 of the
    frames, one step at batches 1 and 2 in this process (a check of the code, not figures)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = _fvlm_config(quick)
    out = {"device_type": device.type, "device_name": _device_name(device), "shape": {
        "frames": int(cfg.data.frames), "stored_frames": int(cfg.data.clip_frames),
        "features": [int(cfg.features.grid) ** 2 + 1, int(cfg.features.dim)],
        "lm": dict(cfg.model.net.lm), "caption_tokens": FVLM_CAPTION_TOKENS,
        "fine_iterations": int(cfg.model.net.fine_iterations),
    }}  # fmt: skip
    if device.type == "cuda":
        res = _fvlm_train(cfg, 32, 2, 3 if quick else 10, device)
        return {**out, **res, "batch": 32, "anchor_samples_per_s": 100.0, "anchor_memory_gib": 16.0}
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable")) / 1024
    if quick:
        runs = {b: _fvlm_train(cfg, b, 0, 1, device) for b in (1, 2)}
        lo, hi = 1, 2
    else:  # each batch in a fresh process: a process's resident set does not shrink, so a second peak would hide
        with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
            runs = {b: pool.apply(_fvlm_cpu_run, (quick, b, 1, 2, torch.get_num_threads())) for b in (1, 2, 8)}
        lo, hi = 2, 8
    per_sample = max((runs[hi]["peak_memory_mib"] - runs[lo]["peak_memory_mib"]) / (hi - lo), 1e-3)
    largest = int(hi + (available - runs[hi]["peak_memory_mib"]) // per_sample)
    big: dict = {}
    if not quick:  # one step at the largest batch, in a process of its own; one the kernel kills is reported
        batch, killed = max(hi + 1, int(0.85 * largest)), []
        while batch > hi:
            try:
                with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
                    run = ex.submit(_fvlm_cpu_run, quick, batch, 0, 1, torch.get_num_threads()).result()
                big = {f"{k}_largest": v for k, v in run.items() if k != "peak_memory_method"}
                break
            except (BrokenProcessPool, MemoryError, RuntimeError):  # killed, or an allocation that failed inside
                killed.append(batch)
                batch = (batch + hi) // 2
        big = {"batch_largest": batch if big else None, **big, "killed_batches": killed}
    return {
        **out,
        **{f"{k}_b{b}": v for b, r in runs.items() for k, v in r.items() if k != "peak_memory_method" or b == lo},
        "memory_per_sample_mib": per_sample,
        "available_memory_mib": available,
        "largest_batch_cpu_estimate": largest,
        **big,
        "precision": "fp32",
    }


class _Batches:
    """An in-memory iterable of ready batches (a plain list would be read as several dataloaders)."""

    def __init__(self, batches: list):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


# ---------------------------------------------------------------------------------------------------
def bench_mmpt(quick: bool) -> dict:
    """MMPT Stage 4 at the cpu job's shape (the model of ``experiment=mmpt_stage4``, :func:`compose`: its token space,
    toy Qwen3 base, LoRA and the new rows): training target tokens/s (forward, backward, AdamW on random well-formed
    batches of all four tasks), and greedy T2I generation tokens/s with and without the constrained processor, timed
    alternately so that machine load falls on both alike. ``quick``: batch 4 and fewer steps, the same shape."""
    import dataclasses

    from omegaconf import OmegaConf
    from transformers import LogitsProcessorList

    from mmsuite.lightning_modules.mmpt.adapters import add_adapters, param_groups
    from mmsuite.lightning_modules.mmpt.base import build_toy_lm, extend_vocabulary
    from mmsuite.lightning_modules.mmpt.loss import TargetLoss
    from mmsuite.lightning_modules.mmpt.module import MMPTSettings
    from mmsuite.settings import parse
    from mmsuite.tokenizers.mmpt_decoding import TaskGrammar
    from mmsuite.tokenizers.mmpt_sequences import SequenceBuilder, TaskItem, collate, collate_prompts
    from mmsuite.tokenizers.mmpt_space import TASK_NAMES, MMPTLayout
    from mmsuite.tokenizers.token_space import TokenSpace

    cfg = compose("train", ["experiment=mmpt_stage4"])
    s = parse(MMPTSettings, OmegaConf.to_container(cfg.model, resolve=True), "model")
    fmt, adapters = s.format, dataclasses.replace(s.adapters, dropout=0.0)
    layout = MMPTLayout(TokenSpace.from_config(s.token_space))
    torch.manual_seed(0)
    model = build_toy_lm(layout.text.size, dataclasses.replace(s.base.toy, rows=layout.base_rows))
    extend_vocabulary(model, layout)
    model = add_adapters(model, layout, adapters)
    rng = np.random.default_rng(0)
    builder = SequenceBuilder(layout, fmt)
    audio_starts = np.array([r.start for r in layout.audio])[:, None]

    def item(key):
        text = rng.integers(layout.text.start, layout.text.stop, size=int(rng.integers(8, 15)))
        image = rng.integers(layout.image.start, layout.image.stop, size=fmt.image_tokens)
        codes = rng.integers(0, layout.audio_bins, size=(layout.n_codebooks, fmt.audio_max_frames)) + audio_starts
        return TaskItem(key, text.tolist(), image.tolist(), codes.T.reshape(-1).tolist())

    batch_size = 4 if quick else 16
    batches = [
        collate([builder.build(TASK_NAMES[i % 4], item(f"{b}-{i}")) for i in range(batch_size)], layout.pad_id)
        for b in range(4)
    ]
    loss_fn = TargetLoss(layout)
    opt = torch.optim.AdamW(param_groups(model, adapters))

    def train_steps(n):
        for i in range(n):
            out = loss_fn.task_losses(model, batches[i % len(batches)])
            out["loss"].backward()
            opt.step()
            opt.zero_grad()

    steps = 3 if quick else 20
    train_steps(2)
    t = timed(lambda: train_steps(steps), repeat=1 if quick else 3)
    tokens = sum(int(b["task"].numel() and (b["labels"] != -100).sum()) for b in batches)
    train_tps = tokens / len(batches) * steps / t

    model.eval()
    grammar = TaskGrammar(layout, fmt)
    prompts = collate_prompts([builder.prompt("t2i", item(f"p{i}").text) for i in range(batch_size)], layout.pad_id)
    n_new = fmt.image_tokens + 2  # <img_start> + the grid + <img_end>

    def generate(constrained: bool):
        kw = grammar.generate_kwargs("t2i") if constrained else {"pad_token_id": layout.pad_id}
        kw.update(max_new_tokens=n_new, min_new_tokens=n_new if not constrained else None, do_sample=False)
        if not constrained:
            kw["logits_processor"] = LogitsProcessorList()
        with torch.no_grad():
            out = model.generate(**prompts, **kw)
        assert out.shape[1] - prompts["input_ids"].shape[1] == n_new
        return out

    times = {True: [], False: []}
    for _ in range(2 if quick else 6):  # alternate, best of each
        for constrained in (False, True):
            times[constrained].append(timed(lambda c=constrained: generate(c), repeat=1))
    free, constrained = min(times[False]), min(times[True])
    return {
        "train_target_tokens_per_s": train_tps,
        "generate_tokens_per_s": batch_size * n_new / free,
        "generate_constrained_tokens_per_s": batch_size * n_new / constrained,
        "constraint_overhead": constrained / free - 1.0,
        "batch": batch_size,
        "steps": steps,
    }


BENCHES = {
    "toyworld": bench_toyworld,
    "shards": bench_shards,
    "tokenizer": bench_tokenizer,
    "loop_overhead": bench_loop_overhead,
    "audio_tokenizer": bench_audio_tokenizer,
    "text_tokenizer": bench_text_tokenizer,
    "m4": bench_m4,
    "dynamics": bench_dynamics,
    "dynamics_gpu16gb": bench_dynamics_gpu16gb,
    "mmpt": bench_mmpt,
    "fvlm": bench_fvlm,
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
            config = k in CONFIG_KEYS or k.removeprefix("published_") in CONFIG_KEYS
            if k in ("device", "quick") or config or isinstance(v, bool) or not isinstance(v, int | float):
                continue
            lines.append(f"| {label} | {k} | {v:.4g} |")
    return "\n".join(lines) + "\n"


def write_summary(results_dir: Path | None = None) -> str:
    """(Re)write ``results_dir/summary.md`` (default RESULTS) from every result JSON there; returns its text."""
    results_dir = Path(results_dir or RESULTS)
    summary = table(load_results(results_dir))
    (results_dir / "summary.md").write_text(summary)
    return summary


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", default="", help="comma-separated subset of " + ",".join(BENCHES))
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (for a quick look)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (and the Rust tokenizers' thread pool)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where the result JSONs and summary.md go")
    ap.add_argument("--prefix", default="", help="results go to <prefix><name>.json (benchmarks/gpu.sh: gpu-)")
    return ap


def main() -> None:
    ap = build_parser()
    args = ap.parse_args()
    chosen = [n for n in (args.only.split(",") if args.only else BENCHES) if n]
    unknown = [n for n in chosen if n not in BENCHES]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHES)}")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))  # read when tokenizers first goes parallel
    args.results.mkdir(parents=True, exist_ok=True)
    info = device_info()
    for name in chosen:
        print(f"[bench] {name} ...", flush=True)
        res = BENCHES[name](args.quick)
        record = json.dumps({"device": info, "quick": args.quick, **res}, indent=2, default=float)
        (args.results / f"{args.prefix}{name}.json").write_text(record + "\n")
    print("\n" + write_summary(args.results))


if __name__ == "__main__":
    main()
