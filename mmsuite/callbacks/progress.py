"""One progress bar style for train, eval and every family: Lightning's tqdm bar, with the training bar sized to the
run, and one bar per evaluation (``val`` / ``test``) in the same format.

The training bar counts batches over the whole run, not over an epoch: its total is the run's optimizer steps
times ``trainer.accumulate_grad_batches``, where the steps are ``trainer.max_steps`` or, for a run that a token
budget ends, the module's ``estimated_total_steps()`` (the smaller where both are set), and a resumed run starts
where it stopped. Validation inside a fit shows on that same line (``val 3/8``) rather than on a second bar below it,
so the console (and ``train.log``) keeps one line per bar. Its metrics are redrawn on logging steps only, where
Lightning reads the logged values back anyway; between them the bar moves without touching the GPU.
"""

from __future__ import annotations

import sys

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, convert_inf

TRAIN = "train"


def run_total_batches(trainer, pl_module) -> int | None:
    """Batches the whole run trains on (None when neither the steps nor a budget bound it)."""
    bounds = [trainer.max_steps] if trainer.max_steps and trainer.max_steps > 0 else []
    estimate = getattr(pl_module, "estimated_total_steps", None)
    steps = estimate() if estimate is not None else None
    if steps is not None:
        bounds.append(int(steps))
    return min(bounds) * int(trainer.accumulate_grad_batches) if bounds else None


class RunProgressBar(TQDMProgressBar):
    def __init__(self):
        super().__init__(refresh_rate=1)

    @property
    def validation_description(self) -> str:
        return "val"

    @property
    def test_description(self) -> str:
        return "test"

    def _bar(self, desc: str, **kwargs) -> Tqdm:
        """A bar of the one style: kept on screen when done, mean rate over the whole bar."""
        return Tqdm(
            desc=desc,
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=self.BAR_FORMAT,
            **kwargs,
        )

    def _in_fit(self, trainer) -> bool:
        return trainer.state.fn == "fit" and not trainer.sanity_checking and self._train_progress_bar is not None

    # -- training ---------------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        self.train_progress_bar = self._bar(
            TRAIN,
            total=run_total_batches(trainer, pl_module),
            initial=trainer.fit_loop.total_batch_idx + 1,  # a resumed run: the rate counts this process's batches
        )

    def on_train_epoch_start(self, trainer, *_) -> None:
        pass  # one bar for the run: no reset per epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        if bar is None or bar.disable:
            return
        total = run_total_batches(trainer, pl_module)
        if total is not None:
            bar.total = max(total, trainer.fit_loop.total_batch_idx + 1)
        if trainer._logger_connector.should_update_logs:  # the logging decision Lightning itself makes
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        bar.update(trainer.fit_loop.total_batch_idx + 1 - bar.n)  # tqdm's own throttle decides when to redraw

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pass

    def on_train_end(self, trainer, pl_module) -> None:
        bar = self.train_progress_bar
        if not bar.disable:
            bar.n = trainer.fit_loop.total_batch_idx + 1
            bar.total = bar.n  # the run ended here (its steps, its token budget or its time limit)
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()
        bar.close()

    # -- evaluation outside a fit (eval.py, test=true): one bar named by its split -----------------------------
    def init_validation_tqdm(self) -> Tqdm:
        return self._bar(self.validation_description)

    def init_test_tqdm(self) -> Tqdm:
        return self._bar(self.test_description)

    def _next_loader(self, bar: Tqdm, split: str, trainer, dataloader_idx: int) -> None:
        """Restart ``bar`` for a new evaluation loader: its batch count, named ``split`` (and the loader's index
        where there are several)."""
        if not self.has_dataloader_changed(dataloader_idx):
            return
        loaders = trainer.num_val_batches if split == "val" else trainer.num_test_batches
        bar.reset(total=convert_inf(loaders[dataloader_idx]))
        bar.initial = 0
        bar.set_description(f"{split} (loader {dataloader_idx})" if len(loaders) > 1 else split, refresh=False)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx: int = 0) -> None:
        self._next_loader(self.test_progress_bar, "test", trainer, dataloader_idx)

    # -- validation inside a fit: on the training bar's line --------------------------------------------------
    def on_validation_start(self, trainer, pl_module) -> None:
        if not self._in_fit(trainer):
            super().on_validation_start(trainer, pl_module)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx: int = 0) -> None:
        if trainer.sanity_checking:
            super().on_validation_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)
        elif not self._in_fit(trainer):
            self._next_loader(self.val_progress_bar, "val", trainer, dataloader_idx)
        else:
            self.has_dataloader_changed(dataloader_idx)  # tracks the loader whose batch count is shown

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx: int = 0) -> None:
        if not self._in_fit(trainer):
            super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
            return
        bar = self.train_progress_bar
        if not bar.disable:
            total = self.total_val_batches_current_dataloader
            shown = f"/{int(total)}" if total not in (None, float("inf")) else ""
            bar.set_description(f"{TRAIN} (val {batch_idx + 1}{shown})", refresh=True)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not self._in_fit(trainer):
            super().on_validation_end(trainer, pl_module)
            return
        self.reset_dataloader_idx_tracker()
        bar = self.train_progress_bar
        if not bar.disable:
            bar.set_description(TRAIN, refresh=False)
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=True)
