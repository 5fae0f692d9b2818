"""Glue between Hydra and Lightning: compose -> instantiate -> run dir -> resume -> fit/validate/test.

Entry points (``train.py``, ``eval.py``, ``prepare.py``, ``generate.py``) are thin Hydra apps over the
functions here. The run dir is ``${paths.log_dir}/<name>/<run>/``: a pure function of the config, so every
process agrees on it however it was started (Lightning's own launcher, torchrun, SLURM). Global rank 0 alone
writes into it, under a lock, and only once the config has built the token space, data module, model and trainer.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shlex
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback as HydraCallback
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf, open_dict

from mmsuite.callbacks.hparams import log_hparams
from mmsuite.callbacks.perf import PerfMonitor
from mmsuite.callbacks.progress import RunProgressBar
from mmsuite.callbacks.run_state import (
    AtomicCheckpointIO,
    RunDirLock,
    RunState,
    choose_resume_checkpoint,
    load_mmsuite_checkpoint,
    remove_stale_temp_files,
    resume_config_differences,
    step_checkpoints,
    write_text_atomic,
)
from mmsuite.callbacks.summary import RunSummary
from mmsuite.config import check_settings
from mmsuite.console import ConsoleLog
from mmsuite.datamodules.base import prepare_text_tokenizer
from mmsuite.tokenizers.text import TEXT_TOKENIZERS, text_tokenizer_from_config
from mmsuite.tokenizers.token_space import TokenSpace, check_same

DONE_MARKER = "DONE"


# ---------------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------------
# torchrun: RANK (global), GROUP_RANK (node), LOCAL_RANK; SLURM (srun): SLURM_PROCID (global); the processes
# Lightning launches itself: LOCAL_RANK, NODE_RANK. A node's first process under torchrun has LOCAL_RANK=0.
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "GROUP_RANK", "NODE_RANK", "LOCAL_RANK")


def is_rank_zero() -> bool:
    """True in the global rank 0 process, whoever launched it: every rank variable that is set is 0."""
    return all(int(os.environ.get(name) or 0) == 0 for name in RANK_VARIABLES)


def git_revision() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if rev.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def prepare_config(cfg: DictConfig, groups: tuple[str, ...] = ("model", "data")) -> DictConfig:
    """Check the settings of ``groups`` (:func:`mmsuite.config.check_settings`) before anything is built or
    written: an unknown key, a wrong type or an invalid value stops the run with the key's full name."""
    check_settings(cfg, groups)
    return cfg


def print_config(config: dict) -> None:
    from rich.console import Console
    from rich.syntax import Syntax

    Console(stderr=False).print(Syntax(OmegaConf.to_yaml(config), "yaml", theme="ansi_dark"))


def build_token_space(cfg: DictConfig) -> TokenSpace:
    ranges = OmegaConf.select(cfg, "token_space.ranges")
    if ranges is None:
        raise ValueError("the experiment defines no token_space.ranges (conf/experiment/<name>.yaml)")
    return TokenSpace.from_config(OmegaConf.to_container(ranges, resolve=True))


def set_threads(cfg: DictConfig) -> None:
    threads = OmegaConf.select(cfg, "hardware.threads")
    if threads:
        torch.set_num_threads(int(threads))


def native_cpu_precision() -> str:
    """``bf16-mixed`` where the CPU has native bf16 arithmetic (AVX512-BF16 or AMX), else ``32-true``.

    On such CPUs bf16 autocast runs the convolutions of the image tokenizer about 1.8x faster (measured in
    ``experiments/image_tokenizer/README.md``); elsewhere bf16 is emulated and slower. Used in configs as
    ``${native_cpu_precision:}``.
    """
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        try:
            if getattr(cpu, probe)():
                return "bf16-mixed"
        except (AttributeError, RuntimeError):
            continue
    return "32-true"


OmegaConf.register_new_resolver("native_cpu_precision", native_cpu_precision, replace=True)
# ${mul:a,b}: integer product, e.g. the token count of an image grid (conf/modalities/)
OmegaConf.register_new_resolver("mul", lambda a, b: int(a) * int(b), replace=True)
OmegaConf.register_new_resolver("add", lambda a, b: int(a) + int(b), replace=True)


# ---------------------------------------------------------------------------------------------------
# run dir, resume, finished marker
# ---------------------------------------------------------------------------------------------------
def strategy_name(cfg: DictConfig) -> str:
    """``trainer.strategy`` as a name: the string itself, or the class a ``_target_`` strategy config builds."""
    strategy = cfg.trainer.get("strategy", "auto")
    return strategy.get("_target_", "").rsplit(".", 1)[-1] if isinstance(strategy, DictConfig) else str(strategy)


def check_multirun_strategy(cfg: DictConfig) -> None:
    """``-m`` with a script-relaunching strategy would make every child start its own sweep: refuse."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    strategy, devices = strategy_name(cfg), cfg.trainer.get("devices", 1)
    relaunches = strategy.lower().startswith(("ddp", "fsdp")) and "spawn" not in strategy.lower()
    if relaunches and (str(devices) != "1" or int(cfg.trainer.get("num_nodes") or 1) > 1):
        raise SystemExit(
            f"multirun (-m) cannot run a multi-process strategy (trainer.strategy={strategy}, "
            f"trainer.devices={devices}): Lightning would relaunch this script, sweep included, in every process. "
            "Run each job as its own command (no -m), or use trainer.strategy=ddp_spawn inside sweeps."
        )


def resolve_resume(cfg: DictConfig, run_dir: Path, config: dict) -> str | None:
    """The checkpoint to continue from, or None; refuses what ``resume`` forbids and a changed config."""
    mode = cfg.get("resume", "auto")
    if mode not in ("auto", "never", "must"):
        raise ValueError(f"resume must be auto, never or must; got {mode!r}")
    ckpt_dir = run_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    if mode == "never":
        existing = [p for p in (last, *step_checkpoints(ckpt_dir)) if p.exists()]
        if existing:
            raise SystemExit(f"resume=never but {existing[0]} exists: choose another run=NAME or delete {run_dir}")
        return None
    found = choose_resume_checkpoint(ckpt_dir)  # last.ckpt, or the newest good step checkpoint
    if found is None:
        if mode == "must":
            raise SystemExit(f"resume=must but there is no checkpoint at {last}")
        return None
    path, extra = found
    check_resume_config(extra["config"], config, path)
    return str(path)


def check_resume_config(saved: dict, config: dict, ckpt: Path) -> None:
    """A resumed run keeps the checkpoint's config in everything but ``run_state.RESUME_MAY_CHANGE``."""
    diffs = resume_config_differences(saved, config)
    if diffs:
        lines = "\n".join(f"  {key}: {old!r} in the checkpoint, {new!r} now" for key, old, new in diffs)
        raise SystemExit(
            f"resume refused: this command's config differs from the one that wrote {ckpt}:\n{lines}\n"
            "A resumed run may change only its hardware, run length, paths and logging "
            "(mmsuite/callbacks/run_state.py, RESUME_MAY_CHANGE). To continue this run, drop those overrides; "
            "to train with them, start a new run: run=NEW_NAME (resume=never makes sure nothing is resumed)."
        )


def finished_metrics(run_dir: Path) -> dict | None:
    marker = run_dir / DONE_MARKER
    if not marker.exists():
        return None
    metrics = run_dir / "metrics.json"
    return json.loads(metrics.read_text()) if metrics.exists() else {}


def check_same_job(cfg: DictConfig, run_dir: Path) -> None:
    """A sweep job dir reused by a different sweep would silently mix runs: stop instead."""
    saved = run_dir / "overrides.json"
    if not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN and saved.exists()):
        return
    now = sorted(HydraConfig.get().overrides.task)
    before = json.loads(saved.read_text())
    if before != now:
        raise SystemExit(f"{run_dir} holds a job with overrides {before}, not {now}: pass a new sweep=NAME")


def check_run_dir_token_space(run_dir: Path, token_space: TokenSpace) -> None:
    saved = run_dir / "token_space.json"
    if saved.exists():
        check_same(
            TokenSpace.load(saved).sha256,
            f"the run dir's token space ({saved})",
            token_space.sha256,
            "this command's token space (config token_space.ranges)",
        )


@contextmanager
def claim_run_dir(run_dir: Path) -> Iterator[None]:
    """Hold the run dir's lock in global rank 0 (the other ranks write nothing there); clear stale temp files."""
    if not is_rank_zero():
        yield
        return
    with RunDirLock(run_dir):
        for path in remove_stale_temp_files(run_dir):
            print(f"[mmsuite] removed {path}, left by a writer that was killed")
        yield


def write_run_info(config: dict, run_dir: Path, token_space: TokenSpace) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    token_space.save(run_dir / "token_space.json")
    write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(config))
    overrides = sorted(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    write_text_atomic(run_dir / "overrides.json", json.dumps(overrides) + "\n")
    with open(run_dir / "commands.log", "a") as f:
        f.write(
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}  git {git_revision()}  {shlex.join([sys.executable, *sys.argv])}\n"
        )


def wandb_id(run_dir: Path) -> str:
    path = run_dir / "wandb_id.txt"
    if path.exists():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    if is_rank_zero():
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n")
    return run_id


# ---------------------------------------------------------------------------------------------------
# building the Lightning objects
# ---------------------------------------------------------------------------------------------------
def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    loggers = []
    for lcfg in (cfg.get("logger") or {}).values():
        if not isinstance(lcfg, DictConfig) or "_target_" not in lcfg:
            continue
        if lcfg._target_.endswith("WandbLogger") and lcfg.get("id") is None:
            with open_dict(lcfg):
                lcfg.id = wandb_id(run_dir)
        loggers.append(instantiate(lcfg))
    return loggers


def build_callbacks(cfg: DictConfig, config: dict, run_dir: Path, token_space: TokenSpace) -> list:
    ccfg = cfg.callbacks
    ckpt_dir = run_dir / "checkpoints"
    callbacks = [
        RunState(config, token_space.sha256, git_revision(), str(run_dir / "token_space.json")),
        RunSummary(config),
        # last.ckpt, and the newest keep_step_checkpoints step<N>.ckpt (resume's fallback if last.ckpt is damaged)
        ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="step{step:07d}",
            auto_insert_metric_name=False,
            monitor="step",
            mode="max",
            save_top_k=cfg.keep_step_checkpoints,
            save_last=True,
            every_n_train_steps=cfg.checkpoint_every_n_steps,
            enable_version_counter=False,
        ),
    ]
    if ccfg.get("monitor"):
        callbacks.append(
            ModelCheckpoint(
                dirpath=ckpt_dir,
                filename="best",
                monitor=ccfg.monitor,
                mode=ccfg.mode,
                save_top_k=1,
                save_last=False,
                enable_version_counter=False,
            )
        )
    if ccfg.get("progress_bar"):
        callbacks.append(RunProgressBar())
    if ccfg.get("lr_monitor") and cfg.get("logger"):
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if ccfg.get("perf"):  # train/grad_norm, perf/samples_per_s, perf/tokens_per_s, perf/step_time_s, perf/mfu
        callbacks.append(PerfMonitor(peak_flops=ccfg.get("peak_flops")))
    for extra in (ccfg.get("extra") or {}).values():
        callbacks.append(instantiate(extra))
    return callbacks


def build_datamodule(cfg: DictConfig, token_space: TokenSpace, run_dir: Path | None):
    dm = instantiate(cfg.data, token_space=token_space, _convert_="all")
    if run_dir is None:
        dm.plan_dir = None
    return dm


def build_model(cfg: DictConfig):
    return instantiate(cfg.model, _convert_="all")


def build_trainer(cfg: DictConfig, callbacks: list, loggers: list, run_dir: Path) -> L.Trainer:
    return instantiate(
        cfg.trainer,
        enable_progress_bar=bool(cfg.callbacks.get("progress_bar")),
        callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=str(run_dir),
        plugins=[AtomicCheckpointIO()],
        _convert_="all",
    )


def collect_metrics(trainer: L.Trainer, callbacks: list, earlier: dict | None = None) -> dict:
    """``final``: the trainer's current metrics, over ``earlier`` ones they do not replace."""
    final = {k: float(v) for k, v in {**(earlier or {}), **trainer.callback_metrics}.items()}
    best = {}
    for cb in callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.monitor and cb.best_model_score is not None:
            best[cb.monitor] = float(cb.best_model_score)
            best["best_ckpt"] = cb.best_model_path
    return {"final": final, "best": best, "global_step": trainer.global_step, "epoch": trainer.current_epoch}


# ---------------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------------
def train(cfg: DictConfig) -> float | None:
    """Fit (and optionally test) one run; returns ``optimized_metric`` for sweepers. Global rank 0 copies its
    console into the run dir's ``train.log`` once the run starts (:class:`~mmsuite.console.ConsoleLog`)."""
    with ConsoleLog() if is_rank_zero() else nullcontext() as console:
        try:
            metrics = _train(cfg, console)
        except Exception:
            multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
            if cfg.get("fail_fast", True) or not multirun:
                raise
            traceback.print_exc()
            print(f"[mmsuite] job failed; fail_fast=false so the sweep goes on (run dir {cfg.paths.run_dir})")
            return float("nan")
        finally:
            _close_wandb()
    key = cfg.get("optimized_metric")
    if not key:
        return None
    value = metrics.get("best", {}).get(key, metrics.get("final", {}).get(key))
    if value is None:
        raise KeyError(f"optimized_metric {key!r} was not logged; logged: {sorted(metrics.get('final', {}))}")
    return value


def _train(cfg: DictConfig, console: ConsoleLog | None = None) -> dict:
    cfg = prepare_config(cfg)
    run_dir = Path(cfg.paths.run_dir)
    set_threads(cfg)
    check_multirun_strategy(cfg)

    # everything that can reject the settings runs before anything is written into the run dir
    config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    token_space = build_token_space(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # the run summary names the seed
    datamodule = build_datamodule(cfg, token_space, run_dir)
    model = build_model(cfg)

    with claim_run_dir(run_dir):  # one run at a time in a run dir: a second one stops here, naming the first
        check_run_dir_token_space(run_dir, token_space)
        done = finished_metrics(run_dir)
        if done is not None and cfg.resume != "never":
            print(
                f"[mmsuite] {run_dir} is finished (marker {run_dir / DONE_MARKER}); not training again.\n"
                f"          final metrics: {json.dumps(done.get('final', {}), sort_keys=True)}\n"
                "          to train more: raise trainer.max_steps and delete the marker, or pass run=NEW_NAME"
            )
            return done
        check_same_job(cfg, run_dir)
        ckpt_path = resolve_resume(cfg, run_dir, config)
        if is_rank_zero() and cfg.get("print_config"):
            print_config(config)
        callbacks = build_callbacks(cfg, config, run_dir, token_space)
        loggers = build_loggers(cfg, run_dir)
        trainer = build_trainer(cfg, callbacks, loggers, run_dir)  # the trainer settings are valid too
        if is_rank_zero():
            write_run_info(config, run_dir, token_space)
            if console is not None:
                console.attach(run_dir / "train.log")
            print(f"[mmsuite] run dir: {run_dir}" + (f" (resuming {ckpt_path})" if ckpt_path else " (new run)"))

        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        fit_metrics: dict = {}
        if not trainer.interrupted:  # the final state, with the metrics of the final validation
            trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
            # a budget that ends between validations: score the final weights (unless Lightning just did: it
            # validates when a module stops the fit with trainer.should_stop, as the token budget does)
            state = next(c for c in callbacks if isinstance(c, RunState))
            if cfg.get("validate_at_end") and state.last_validated_step != trainer.global_step:
                # validate() replaces the metrics: keep the training ones (not the stale validation's) beside its own
                fit_metrics = {k: v for k, v in trainer.callback_metrics.items() if not k.startswith("val/")}
                trainer.validate(model, datamodule=datamodule, verbose=False)
        metrics = collect_metrics(trainer, callbacks, fit_metrics)
        if datamodule.corrupt_shards:
            metrics["corrupt_shards_skipped"] = datamodule.corrupt_shards
        if cfg.get("test"):
            best = metrics["best"].get("best_ckpt")
            test = trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
            metrics["test"] = test[0] if test else {}
        if trainer.is_global_zero and not trainer.interrupted:
            if cfg.callbacks.get("hparams"):
                log_hparams(trainer.loggers, config, metrics)
            write_text_atomic(run_dir / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
            write_text_atomic(run_dir / DONE_MARKER, time.strftime("%Y-%m-%d %H:%M:%S\n"))
            print(f"[mmsuite] finished; metrics in {run_dir / 'metrics.json'}")
        return metrics


def _close_wandb() -> None:
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()


# ---------------------------------------------------------------------------------------------------
# eval, prepare, generate
# ---------------------------------------------------------------------------------------------------
def load_checkpoint_config(ckpt_path: str | os.PathLike) -> tuple[dict, dict]:
    path = Path(ckpt_path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path} (set ckpt_path=...)")
    ckpt = load_mmsuite_checkpoint(path)
    return ckpt["mmsuite"], ckpt


def rebuild_from_checkpoint(cfg: DictConfig):
    """Model, data and token space as the checkpoint's own config describes them; hardware from ``cfg``."""
    extra, _ = load_checkpoint_config(cfg.ckpt_path)
    saved = OmegaConf.create(extra["config"])
    token_space = build_token_space(saved)
    check_same(
        extra["token_space_sha256"],
        f"the checkpoint ({cfg.ckpt_path})",
        token_space.sha256,
        "the token space rebuilt from the checkpoint's config",
    )
    with open_dict(saved):
        saved.data.plan_dir = None
        saved.data.num_workers = cfg.data.get("num_workers", saved.data.num_workers)
        rollout = {k: v for k, v in (cfg.get("rollout") or {}).items() if v is not None}
        if rollout and OmegaConf.select(saved, "model.rollout") is not None:  # eval.py rollout.* (dynamics)
            saved.model.rollout = OmegaConf.merge(saved.model.rollout, rollout)
    datamodule = build_datamodule(saved, token_space, None)
    model = build_model(saved)
    return saved, extra, datamodule, model


def evaluate(cfg: DictConfig) -> dict:
    set_threads(cfg)
    saved, extra, datamodule, model = rebuild_from_checkpoint(cfg)
    trainer_cfg = OmegaConf.merge(
        cfg.trainer,
        {
            "limit_val_batches": saved.trainer.get("limit_val_batches"),
            "limit_test_batches": saved.trainer.get("limit_val_batches"),
        },
    )
    loggers = build_loggers(cfg, Path(cfg.paths.run_dir))
    trainer = instantiate(
        trainer_cfg,
        logger=loggers or False,
        callbacks=[RunProgressBar()],
        plugins=[AtomicCheckpointIO()],
        default_root_dir=cfg.paths.run_dir,
        _convert_="all",
    )
    run = trainer.validate if cfg.split == "val" else trainer.test
    results = run(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True, verbose=False)[0]
    out = {
        "ckpt_path": str(cfg.ckpt_path),
        "split": cfg.split,
        "metrics": results,
        "checkpoint_val_metrics": extra.get("val_metrics", {}),
    }
    out_path = Path(cfg.ckpt_path).parent.parent / f"eval_{cfg.split}.json"
    write_text_atomic(out_path, json.dumps(out, indent=2, sort_keys=True) + "\n")
    print(f"[mmsuite] {cfg.split} metrics of {cfg.ckpt_path}:")
    for k, v in sorted(results.items()):
        print(f"  {k:32s} {v:.6g}")
    print(f"[mmsuite] written to {out_path}")
    return out


def prepare(cfg: DictConfig) -> Path:
    """Build the experiment's data set; with a text tokenizer config, train (text_bpe) and check it too."""
    cfg = prepare_config(cfg, groups=("data",))  # the model is not built (tokenizer= may swap its tokenizer)
    set_threads(cfg)
    token_space = build_token_space(cfg)
    datamodule = build_datamodule(cfg, token_space, None)
    datamodule.prepare_data()
    manifest = json.loads((datamodule.root / "manifest.json").read_text())
    print(f"[mmsuite] dataset {datamodule.root}")
    for split, info in manifest["splits"].items():
        print(f"  {split:6s} {info['samples']:7d} samples in {len(info['shards'])} shards")
    if OmegaConf.select(cfg, "tokenizer.name") in TEXT_TOKENIZERS:
        tokenizer_cfg = OmegaConf.to_container(cfg.tokenizer, resolve=True)
        if tokenizer_cfg["name"] == "text_bpe":
            prepare_text_tokenizer(tokenizer_cfg, datamodule.root)  # train split only, once per settings
        text = text_tokenizer_from_config(tokenizer_cfg, token_space, datamodule.root)
        specials = ", ".join(f"{name}={i}" for name, i in token_space.specials.items())
        print(f"[mmsuite] {text!r}; specials {specials}")
    chosen = OmegaConf.select(cfg, "tokenize")
    if chosen is not None and any(chosen.get(m) is not None for m in ("image", "text", "audio")):
        from mmsuite.tokenize import tokenize_dataset

        opts = OmegaConf.to_container(chosen, resolve=True)
        return tokenize_dataset(
            datamodule.root,
            **{k: opts.get(k) for k in ("image", "text", "audio", "out")},
            batch_size=int(opts.get("batch_size") or 32),
        )
    return datamodule.root


def generate(cfg: DictConfig) -> Path:
    set_threads(cfg)
    saved, extra, datamodule, model = rebuild_from_checkpoint(cfg)
    _, ckpt = load_checkpoint_config(cfg.ckpt_path)
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    if not hasattr(model, "generate_samples"):
        raise NotImplementedError(f"{type(model).__name__} has no generate_samples(batch, out_dir)")
    datamodule.setup("validate")
    loader = datamodule.val_dataloader() if cfg.split == "val" else datamodule.test_dataloader()
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    batch = next(iter(loader))
    batch = {k: v[: cfg.n_samples] if torch.is_tensor(v) else v for k, v in batch.items()}
    # a model that decodes with the data's tokenizers (nano4m) takes the datamodule too
    wants_data = "datamodule" in inspect.signature(model.generate_samples).parameters
    with torch.no_grad():
        written = model.generate_samples(batch, out_dir, **({"datamodule": datamodule} if wants_data else {}))
    for p in written:
        print(f"[mmsuite] wrote {p}")
    return out_dir


# ---------------------------------------------------------------------------------------------------
# sweeps
# ---------------------------------------------------------------------------------------------------
class SweepSummary(HydraCallback):
    """At the end of ``-m``: a table of every job's overrides and final metrics (printed, and saved)."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        Path(config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)
        storage = OmegaConf.select(config, "hydra.sweeper.storage", default=None)
        if isinstance(storage, str) and storage.startswith("sqlite:///"):  # the study's folder must exist
            Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        """A job stopped before it wrote its run dir (a settings error) still gets its row: its overrides."""
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            return
        saved = Path(job_return.hydra_cfg.hydra.runtime.output_dir) / "overrides.json"
        if saved.parent.is_dir() and not saved.exists():
            write_text_atomic(saved, json.dumps(sorted(job_return.overrides)) + "\n")

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = []
        for job_dir in sorted((p for p in sweep_dir.iterdir() if p.is_dir()), key=lambda p: (len(p.name), p.name)):
            overrides = job_dir / "overrides.json"
            if not overrides.exists():
                continue
            metrics_path = job_dir / "metrics.json"
            metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
            rows.append(
                (
                    job_dir.name,
                    json.loads(overrides.read_text()),
                    metrics.get("final", {}),
                    "done" if (job_dir / DONE_MARKER).exists() else "failed/unfinished",
                )
            )
        keys = sorted({k for _, _, m, _ in rows for k in m if k.startswith(("val/", "test/"))})
        header = ["job", "status", "overrides", *keys]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for job, ov, m, status in rows:
            cells = [job, status, " ".join(ov)] + [_fmt(m.get(k)) for k in keys]
            lines.append("| " + " | ".join(cells) + " |")
        table = "\n".join(lines) + "\n"
        write_text_atomic(sweep_dir / "summary.md", table)
        write_text_atomic(
            sweep_dir / "summary.json",
            json.dumps([{"job": j, "overrides": o, "final": m, "status": s} for j, o, m, s in rows], indent=2) + "\n",
        )
        print(f"\n[mmsuite] sweep {sweep_dir}: {len(rows)} job(s)\n{table}")


def _fmt(v) -> str:
    if v is None:
        return "-"
    return "nan" if isinstance(v, float) and math.isnan(v) else f"{v:.4g}"
