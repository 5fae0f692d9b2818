"""The run's hyperparameters beside its final metrics: TensorBoard's HPARAMS tab (one row per run, one column per
setting, then the final ``val/…`` and ``test/…`` metrics) and every other logger's hyperparameters.

Written once, when the run has finished, from the flat resolved config (``model.optim.lr``, ``data.batch_size``,
...; lists as JSON text). TensorBoard gets the plugin's summaries directly rather than through Lightning's
``log_hyperparams(params, metrics)``, which would also log each final metric again at step 0; the HPARAMS tab reads
each metric's last value from its own scalar series instead.
"""

from __future__ import annotations

import json


def flat_config(config: dict) -> dict:
    """Dotted key -> int, float or str (booleans, lists and None as JSON text), sorted by key."""
    out: dict = {}

    def walk(node, prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict) and value:
                walk(value, name + ".")
            elif isinstance(value, bool):  # TensorBoard would show 0 / 1
                out[name] = "true" if value else "false"
            elif isinstance(value, int | float | str):
                out[name] = value
            else:
                out[name] = json.dumps(value, sort_keys=True, default=str)

    walk(config, "")
    return dict(sorted(out.items()))


def final_metrics(metrics: dict) -> dict[str, float]:
    """The ``val/…`` and ``test/…`` values of a run's ``metrics.json`` record."""
    values = {**metrics.get("final", {}), **metrics.get("test", {})}
    return {k: float(v) for k, v in sorted(values.items()) if k.startswith(("val/", "test/"))}


def log_hparams(loggers: list, config: dict, metrics: dict) -> None:
    """Send the flat config with the final metrics (:func:`final_metrics`) to every logger (rank zero only)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    params, finals = flat_config(config), final_metrics(metrics)
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            from torch.utils.tensorboard.summary import hparams

            writer = logger.experiment  # reopens its file writer if the fit closed it
            for summary in hparams(params, finals):
                writer._get_file_writer().add_summary(summary)
            writer.flush()
            writer.close()
        else:
            logger.log_hyperparams(params)
            logger.save()
