"""What a run shows while it trains: grad norm, throughput, step time and MFU (callbacks/perf.py), the progress bar
sized to the run (callbacks/progress.py), and the hyperparameters beside the final metrics (callbacks/hparams.py)."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, TensorDataset

from mmsuite.callbacks.hparams import final_metrics, flat_config, log_hparams
from mmsuite.callbacks.perf import PerfMonitor, batch_counts, total_grad_norm
from mmsuite.callbacks.progress import RunProgressBar, run_total_batches

TOKENS_PER_SAMPLE = 5


class Recorder(Logger):
    """Keeps every logged metric: {name: [(step, value)]}."""

    def __init__(self):
        super().__init__()
        self.metrics: dict[str, list] = {}

    name, version = "recorder", "0"

    @property
    def experiment(self):
        return None

    def log_metrics(self, metrics, step=None):
        for k, v in metrics.items():
            self.metrics.setdefault(k, []).append((step, float(v)))

    def log_hyperparams(self, params, *args, **kwargs):
        self.hparams = params


class Tiny(L.LightningModule):
    def __init__(self, tokens: bool = True, budget_steps: int | None = None):
        super().__init__()
        self.net = torch.nn.Linear(8, 4)
        self.tokens, self.budget_steps = tokens, budget_steps

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.net(x).pow(2).mean() * 100.0  # large gradients: clipping changes them

    def throughput_counts(self, batch):
        n = batch[0].shape[0]
        return n, (n * TOKENS_PER_SAMPLE if self.tokens else None)

    def estimated_total_steps(self):
        return self.budget_steps

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def fit(module, callbacks, max_steps=6, accumulate=1, batches=4, **kwargs) -> Recorder:
    logger = Recorder()
    data = DataLoader(TensorDataset(torch.randn(4 * batches, 8)), batch_size=4)
    trainer = L.Trainer(
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        log_every_n_steps=1,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=any(isinstance(c, RunProgressBar) for c in callbacks),
        **{"accelerator": "cpu", **kwargs},
    )
    trainer.fit(module, data)
    return logger


def test_total_grad_norm_is_the_norm_of_all_gradients_as_one_vector():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))
    a.grad, b.grad = torch.tensor([3.0, 0.0, 0.0]), torch.full((2, 2), 2.0)
    frozen = torch.nn.Parameter(torch.ones(5), requires_grad=False)
    assert float(total_grad_norm([a, b, frozen])) == pytest.approx(5.0)  # sqrt(9 + 16)
    assert total_grad_norm([frozen]) is None
    halves = total_grad_norm([a], sharded=True, reduce=lambda t: t + 16.0)  # another rank holds b's squares
    assert float(halves) == pytest.approx(5.0)


def test_batch_counts_asks_the_family_or_counts_the_first_tensor_and_an_attention_mask():
    assert batch_counts(Tiny(), [torch.zeros(6, 8)]) == (6, 6 * TOKENS_PER_SAMPLE)
    assert batch_counts(torch.nn.Linear(1, 1), {"image": torch.zeros(3, 3, 8, 8)}) == (3, None)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])  # a Hugging Face style batch: tokens are the unmasked ones
    samples, tokens = batch_counts(torch.nn.Linear(1, 1), {"input_ids": torch.zeros(2, 4), "attention_mask": mask})
    assert samples == 2 and torch.is_tensor(tokens) and int(tokens) == 5


class MaskBatches(Tiny):
    """A family with no counting hook of its own whose batches carry an attention mask."""

    throughput_counts = None

    def training_step(self, batch, batch_idx):
        return super().training_step([batch["x"]], batch_idx)


def test_a_family_without_a_hook_gets_tokens_per_second_from_its_attention_mask():
    data = [{"x": torch.randn(4, 8), "attention_mask": torch.tensor([[1, 1, 1, 0]] * 4)} for _ in range(4)]
    logger = Recorder()
    trainer = L.Trainer(
        max_steps=4, log_every_n_steps=1, logger=logger, callbacks=[PerfMonitor()], enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(MaskBatches(), DataLoader(data, batch_size=None))
    for (_, samples), (_, tokens) in zip(logger.metrics["perf/samples_per_s"], logger.metrics["perf/tokens_per_s"]):
        assert tokens == pytest.approx(samples * 3)  # 3 unmasked tokens a sample


def test_the_readme_documents_the_perf_keys_that_are_written():
    import re
    from pathlib import Path

    from mmsuite.callbacks.perf import PERF_KEYS

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert set(re.findall(r"perf/(\w+)", readme)) == set(PERF_KEYS)
    logged = fit(Tiny(), [PerfMonitor(peak_flops=1e9)]).metrics
    assert {k.removeprefix("perf/") for k in logged if k.startswith("perf/")} <= set(PERF_KEYS)


def test_grad_norm_before_clipping_throughput_and_step_time_are_logged_and_no_mfu_on_cpu():
    logged = fit(Tiny(), [PerfMonitor()], gradient_clip_val=1e-3).metrics
    norms = [v for _, v in logged["train/grad_norm"]]
    assert len(norms) == 6 and min(norms) > 1e-3  # before clipping, at every logging step
    # the first step starts the window: rates from the second logging step on
    assert [s for s, _ in logged["perf/samples_per_s"]] == [1, 2, 3, 4, 5]
    for (_, samples), (_, tokens), (_, step) in zip(
        logged["perf/samples_per_s"], logged["perf/tokens_per_s"], logged["perf/step_time_s"]
    ):
        assert tokens == pytest.approx(samples * TOKENS_PER_SAMPLE) and samples * step == pytest.approx(4.0)
    assert "perf/mfu" not in logged and "perf/peak_memory_gib" not in logged


def test_no_tokens_no_tokens_per_second():
    logged = fit(Tiny(tokens=False), [PerfMonitor()]).metrics
    assert "perf/samples_per_s" in logged and "perf/tokens_per_s" not in logged


def test_mfu_is_the_counted_flops_over_the_peak_where_the_peak_is_known():
    from torch.utils.flop_counter import FlopCounterMode

    module, peak = Tiny(), 1e9
    logged = fit(module, [PerfMonitor(peak_flops=peak)], accumulate=2, max_steps=4).metrics
    probe = Tiny()
    with FlopCounterMode(display=False) as counter:
        for _ in range(2):  # one optimizer step = two accumulated batches
            probe.training_step([torch.randn(4, 8)], 0).backward()
    per_step = counter.get_total_flops()
    assert per_step > 0
    for (_, mfu), (_, step) in zip(logged["perf/mfu"], logged["perf/step_time_s"]):
        assert mfu * peak * step == pytest.approx(per_step, rel=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_mfu_comes_from_lightnings_table_and_peak_memory_is_logged():
    logged = fit(Tiny(), [PerfMonitor()], accelerator="gpu", devices=1).metrics
    assert all(0 < v < 1 for _, v in logged["perf/mfu"]) and all(v > 0 for _, v in logged["perf/peak_memory_gib"])


def test_perf_monitor_consumes_no_random_numbers():
    torch.manual_seed(0)
    fit(Tiny(), [PerfMonitor(peak_flops=1e9)])
    with_monitor = torch.rand(3)
    torch.manual_seed(0)
    fit(Tiny(), [])
    assert torch.equal(with_monitor, torch.rand(3))


def test_the_bar_counts_the_run_not_the_epoch():
    bar = RunProgressBar()
    fit(Tiny(), [bar], max_steps=7, batches=3)  # 3 batches an epoch, 7 steps
    assert bar.train_progress_bar.n == bar.train_progress_bar.total == 7
    bar = RunProgressBar()
    fit(Tiny(), [bar], max_steps=5, accumulate=2, batches=4)  # the bar counts batches: steps x accumulation
    assert bar.train_progress_bar.n == bar.train_progress_bar.total == 10


@pytest.mark.parametrize("split", ["val", "test"])
def test_evaluation_outside_a_fit_has_one_bar_of_the_same_style_named_by_its_split(split, capsys):
    class Scored(Tiny):
        def validation_step(self, batch, batch_idx):
            self.log("val/x", 1.0)

        test_step = validation_step

    bar = RunProgressBar()
    trainer = L.Trainer(logger=False, callbacks=[bar], enable_model_summary=False, accelerator="cpu")
    run = trainer.validate if split == "val" else trainer.test
    run(Scored(), DataLoader(TensorDataset(torch.randn(12, 8)), batch_size=4), verbose=False)
    shown = bar.val_progress_bar if split == "val" else bar.test_progress_bar
    assert shown.n == shown.total == 3 and shown.desc.startswith(split) and shown.bar_format == bar.BAR_FORMAT
    drawn = [s.strip() for s in capsys.readouterr().out.replace("\r", "\n").splitlines() if s.strip()]
    assert drawn and all(s.startswith(f"{split}:") for s in drawn), drawn  # not "Validation DataLoader 0"


def test_the_bar_total_is_the_smaller_of_the_steps_and_the_budget():
    trainer = SimpleNamespace(max_steps=100, accumulate_grad_batches=2)
    assert run_total_batches(trainer, Tiny(budget_steps=None)) == 200
    assert run_total_batches(trainer, Tiny(budget_steps=30)) == 60
    assert run_total_batches(SimpleNamespace(max_steps=-1, accumulate_grad_batches=1), Tiny(budget_steps=30)) == 30
    assert run_total_batches(SimpleNamespace(max_steps=-1, accumulate_grad_batches=1), Tiny()) is None


def test_the_token_budget_estimates_its_steps_from_the_tokens_per_step_so_far():
    from mmsuite.lightning_modules.fourm.module import FourMModule

    state = SimpleNamespace(global_step=10, tokens_seen=1000, total_tokens=5000.0)
    assert FourMModule.estimated_total_steps(state) == 50
    assert FourMModule.estimated_total_steps(SimpleNamespace(global_step=0, tokens_seen=0, total_tokens=5.0)) is None


def test_flat_config_is_dotted_and_readable():
    flat = flat_config(
        {"model": {"optim": {"lr": 0.002}, "sizes": [1, 2]}, "test": False, "x": None, "s": {"a": 1}, "e": {}}
    )
    assert flat == {"e": "{}", "model.optim.lr": 0.002, "s.a": 1, "model.sizes": "[1, 2]", "test": "false", "x": "null"}
    metrics = {"final": {"val/loss": 1.0, "train/loss": 2.0}, "test": {"test/psnr": 3.0}}
    assert final_metrics(metrics) == {"test/psnr": 3.0, "val/loss": 1.0}


def test_hparams_reach_tensorboards_hparams_tab_with_the_final_metric_names(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    tb, other = TensorBoardLogger(tmp_path, name="tb", version=""), Recorder()
    tb.log_metrics({"val/loss": 0.5}, step=3)
    log_hparams([tb, other], {"model": {"optim": {"lr": 0.002}}, "name": "x"}, {"final": {"val/loss": 0.5}})
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["model.optim.lr"].number_value == pytest.approx(0.002)
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in experiment.metric_infos] == ["val/loss"]
    assert [e.step for e in acc.Scalars("val/loss")] == [3]  # the metric is not logged again
    assert other.hparams == {"model.optim.lr": 0.002, "name": "x"}
