"""What a researcher watches while a run trains, logged on Lightning's logging steps (``trainer.log_every_n_steps``):

* ``train/grad_norm``: the L2 norm of all gradients as one vector, before clipping (beside ``train/loss``: it is
  about the optimisation, not the machine);
* ``perf/samples_per_s`` and ``perf/tokens_per_s`` (families with tokens): over all devices, over the steps since
  the previous logging step, validation time left out;
* ``perf/step_time_s``: seconds per optimizer step (accumulated batches included), over the same steps;
* ``perf/mfu``: model FLOPs utilisation of one device, only where its peak FLOP/s is known (Lightning's table of
  GPUs for the run's precision, or ``callbacks.peak_flops``); nothing on CPUs rather than a made-up figure. The
  FLOPs are those of the first optimizer step of the process (forward, backward, teacher passes, recomputation),
  counted by torch's ``FlopCounterMode``, per token (or sample) and scaled by the tokens (samples) since then;
* ``perf/peak_memory_gib``: the device's peak allocated memory (CUDA).

Every family gets these from ``conf/callbacks/default.yaml`` without code of its own. What a sample and a token are
is the family's to say, with ``throughput_counts(batch) -> (samples, tokens or None)`` on its module (ints, or a
0-d device tensor for the tokens); without it, samples are the first tensor's leading dimension, and tokens are the
ones of an ``attention_mask`` entry (the Hugging Face batch convention) where the batch has one, else none.

Hand-written rather than Lightning's ``ThroughputMonitor`` and ``grad_norm``: both synchronise with the GPU on every
step (``cuda.synchronize`` after each batch; every parameter's norm copied to the host). Here nothing touches the
GPU's queue between logging steps; the rates come from Lightning's ``Throughput`` utility.
"""

from __future__ import annotations

import time

import torch
from lightning.fabric.utilities.throughput import Throughput, get_available_flops
from lightning.pytorch.callbacks import Callback

PRECISION_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16}  # the compute dtype of trainer.precision's prefix
PERF_KEYS = ("samples_per_s", "tokens_per_s", "step_time_s", "mfu", "peak_memory_gib")  # perf/<key> (docstring)


def total_grad_norm(parameters, sharded: bool = False, reduce=None) -> torch.Tensor | None:
    """L2 norm of the gradients of ``parameters`` as one vector, a device tensor (no host sync); None without
    gradients. ``sharded``: each rank holds a part of every gradient (FSDP), so the squares are summed over ranks
    with ``reduce(tensor)``."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return None
    squares = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]).square().sum()
    if sharded:
        squares = reduce(squares)
    return squares.sqrt()


def batch_counts(pl_module, batch) -> tuple[int, int | torch.Tensor | None]:
    """``(samples, tokens or None)`` of a training batch, as the family counts them (module docstring). Tokens may be
    a device tensor: it is summed on the device and read back on logging steps only."""
    count = getattr(pl_module, "throughput_counts", None)
    if count is not None:
        samples, tokens = count(batch)
        return int(samples), None if tokens is None else tokens if torch.is_tensor(tokens) else int(tokens)
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, list | tuple) else [batch]
    first = next((v for v in values if torch.is_tensor(v) and v.ndim), None)
    samples = int(first.shape[0]) if first is not None else 1
    return samples, (mask.sum() if torch.is_tensor(mask) else None)


def peak_flops_per_s(trainer, configured: float | None) -> float | None:
    """One device's peak FLOP/s for the run's precision: ``configured``, else Lightning's table (GPUs); else None."""
    if configured:
        return float(configured)
    device = trainer.strategy.root_device
    if device.type != "cuda":
        return None
    dtype = PRECISION_DTYPES.get(str(trainer.precision).split("-")[0], torch.float32)
    return get_available_flops(device, dtype)


class PerfMonitor(Callback):
    """Logs ``train/grad_norm`` and ``perf/*`` on logging steps (module docstring). ``peak_flops``: one device's peak
    FLOP/s for ``perf/mfu`` where Lightning's table does not know the device (null: the table; CPUs: no MFU)."""

    def __init__(self, peak_flops: float | None = None):
        super().__init__()
        self.peak_flops = peak_flops
        self.origin: float | None = None  # the time the first optimizer step of this process ended
        self.counter = None  # FlopCounterMode over the first optimizer step (only where MFU can be computed)
        self._counting = False
        self._val_start: float | None = None

    # -- gradient norm ------------------------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not trainer._logger_connector.should_update_logs:  # the logging decision Lightning itself makes
            return
        from lightning.pytorch.strategies import FSDPStrategy

        sharded = isinstance(trainer.strategy, FSDPStrategy)
        reduce = lambda t: trainer.strategy.reduce(t, reduce_op="sum")  # noqa: E731
        norm = total_grad_norm(pl_module.parameters(), sharded, reduce)
        if norm is not None:
            pl_module.log("train/grad_norm", norm, on_step=True, on_epoch=False, batch_size=1)

    # -- throughput -----------------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        self.peak = peak_flops_per_s(trainer, self.peak_flops)
        self.world = trainer.world_size
        self.throughput = Throughput(available_flops=self.peak, world_size=self.world, window_size=2)
        self.origin = None
        self.paused = 0.0  # validation time since the origin
        self.steps = self.samples = self.tokens = 0
        self.has_tokens = None
        self.last_step = trainer.global_step
        self.counter = None
        self.flops_per_unit: float | None = None
        self.measured_units = 0
        if self.peak is not None:
            from torch.utils.flop_counter import FlopCounterMode

            self.counter = FlopCounterMode(display=False)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.counter is not None and self.flops_per_unit is None and not self._counting:
            self.counter.__enter__()
            self._counting = True

    def _stop_counting(self) -> float:
        self.counter.__exit__(None, None, None)
        self._counting = False
        return float(self.counter.get_total_flops())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        samples, tokens = batch_counts(pl_module, batch)
        self.has_tokens = tokens is not None
        units = tokens if tokens is not None else samples
        if self._counting:
            self.measured_units += units
        self.samples += samples
        if tokens is not None:
            self.tokens = self.tokens + tokens  # a device tensor stays on the device until the logging step
        if trainer.global_step == self.last_step:  # accumulating: the optimizer step is not done yet
            return
        self.last_step = trainer.global_step
        self.steps += 1
        if self._counting:
            self.flops_per_unit = self._stop_counting() / max(float(self.measured_units), 1.0)
        cuda = trainer.strategy.root_device.type == "cuda"
        if self.origin is None:  # the window starts after the first step (warm-up, FLOP counting)
            if cuda:
                torch.cuda.synchronize(trainer.strategy.root_device)
            self.origin, self.steps, self.samples, self.tokens = time.perf_counter(), 0, 0, 0
            self._update(0.0, 0)
            return
        if not trainer._logger_connector.should_update_logs:
            return
        if cuda:  # once per logging step, where Lightning itself reads the logged values back
            torch.cuda.synchronize(trainer.strategy.root_device)
        elapsed = time.perf_counter() - self.origin - self.paused
        self.tokens = int(self.tokens)
        units_since = (self.tokens if self.has_tokens else self.samples) - self._units_logged
        self._update(elapsed, units_since)
        metrics = self.throughput.compute()
        out = {}
        if "device/batches_per_sec" in metrics:
            out["perf/step_time_s"] = 1.0 / metrics["device/batches_per_sec"]
            out["perf/samples_per_s"] = metrics["device/samples_per_sec"] * self.world
        if "device/items_per_sec" in metrics:
            out["perf/tokens_per_s"] = metrics["device/items_per_sec"] * self.world
        if "device/mfu" in metrics:
            out["perf/mfu"] = metrics["device/mfu"]
        if cuda:
            out["perf/peak_memory_gib"] = torch.cuda.max_memory_allocated(trainer.strategy.root_device) / 2**30
        for key, value in out.items():
            pl_module.log(key, float(value), on_step=True, on_epoch=False, batch_size=1)

    def _update(self, elapsed: float, units_since: int) -> None:
        """One point of the throughput window: totals since the origin, and the FLOPs since the previous point."""
        self._units_logged = self.tokens if self.has_tokens else self.samples
        flops = None if self.flops_per_unit is None else int(self.flops_per_unit * units_since)
        self.throughput.update(
            time=elapsed,
            batches=self.steps,
            samples=self.samples,
            lengths=self.tokens if self.has_tokens else None,
            flops=flops,
        )

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking and self.origin is not None:
            if trainer.strategy.root_device.type == "cuda":
                torch.cuda.synchronize(trainer.strategy.root_device)
            self._val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        start = self._val_start
        if start is not None:
            if trainer.strategy.root_device.type == "cuda":
                torch.cuda.synchronize(trainer.strategy.root_device)
            self.paused += time.perf_counter() - start
            self._val_start = None

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self._counting:
            self._stop_counting()
