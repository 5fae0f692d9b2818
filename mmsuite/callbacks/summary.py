"""The few lines a run prints about itself instead of its whole config (``print_config=true`` prints that too).

Printed by global rank 0 when the fit starts, once Lightning has built the data set (its path names the tokenizers
it was made with, which may be trained first), chosen the devices and set up the precision, so every line says what
is actually running.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback


def count(n: float) -> str:
    """A count for people: 1.2 M, 834 K, 12."""
    for div, unit in ((1e9, " G"), (1e6, " M"), (1e3, " K")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:g}"


def run_summary(config: dict, trainer, pl_module) -> str:
    steps = [f"{trainer.max_steps} steps (trainer.max_steps)"] if trainer.max_steps and trainer.max_steps > 0 else []
    tokens = getattr(pl_module, "total_tokens", None)
    if tokens:
        steps.append(f"a token budget of {count(tokens)} tokens (schedule.total_tokens)")
    if not steps:
        steps.append(f"{trainer.max_epochs} epochs (trainer.max_epochs)")
    dm = trainer.datamodule
    params = sum(p.numel() for p in pl_module.parameters())
    trained = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
    logs = ", ".join(type(lg).__name__.removesuffix("Logger").lower() for lg in trainer.loggers) or "no logger"
    hardware = (config.get("hardware") or {}).get("name", "?")
    return "\n".join(
        [
            f"  experiment  {config.get('name')} (seed {config.get('seed')})",
            f"  hardware    {hardware}: {trainer.world_size} x {trainer.strategy.root_device.type}, "
            f"{type(trainer.strategy).__name__}, precision {trainer.precision}",
            f"  length      {' or '.join(steps)}",
            f"  batch       {getattr(dm, 'batch_size', '?')} per device x {trainer.accumulate_grad_batches} "
            f"accumulated x {trainer.world_size} device(s)",
            f"  model       {type(pl_module).__name__}, {count(params)} parameters ({count(trained)} trained)",
            f"  data        {getattr(dm, 'root', '?')}",
            f"  logs        {logs}; the console in train.log, the config in config.yaml",
        ]
    )


class RunSummary(Callback):
    """Prints :func:`run_summary` at the start of the fit (global rank 0)."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = config

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            print(run_summary(self.config, trainer, pl_module), flush=True)
