"""Golden-set decoding and prompt ablation at every validation: callbacks any token-LM family can use.

Both read fixed golden items from the DataModule and ask the LightningModule to do the model's part; they write
files under the run dir, log ``val/golden/...`` and ``val/ablation/...`` metrics, and keep a history across
validations (a resumed run appends to it, dropping entries from steps it trains again).

What they need (duck-typed):

* DataModule: ``golden_items() -> {task: [item]}``, ``builder`` (a
  :class:`~mmsuite.tokenizers.mmpt_sequences.SequenceBuilder`), ``text_tokenizer``, ``golden_attributes``
  (``{key: attributes}``);
* LightningModule: ``decode_golden(task, items, builder, constrained) -> [{key, ok, error, body}]``,
  ``golden_media(task, row, out_dir, text_tokenizer, attributes) -> jsonl row`` (writes png / wav, scores
  captions), ``illegal_mass(batch) -> [N]`` and ``sequence_nll(batch) -> [B]`` (teacher-forced).

Golden decoding runs each task's golden set greedily with the constrained processor (files and the decode rate)
and once more unconstrained, beside the teacher-forced probability outside the allowed set, so the constraint
hides nothing. The prompt ablation scores each target with its correct, a shuffled and an empty source
(:func:`~mmsuite.tokenizers.mmpt_sequences.run_prompt_ablation`) and records whether the gaps grew from the first
validation to the latest.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import torch

from mmsuite.tokenizers.mmpt_sequences import collate, run_prompt_ablation
from mmsuite.tokenizers.mmpt_space import TASKS


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _history(path: Path, step: int) -> list[dict]:
    """The entries of ``path`` before ``step`` (a resumed run replaces what it trains again)."""
    if not path.is_file():
        return []
    return [e for e in json.loads(path.read_text()).get("history", []) if e["step"] < step]


class _GoldenCallback(L.Callback):
    def __init__(self):
        self._items: dict | None = None

    def _ready(self, trainer) -> bool:
        return not trainer.sanity_checking and trainer.is_global_zero and trainer.datamodule is not None

    def items(self, trainer) -> dict:
        if self._items is None:
            self._items = trainer.datamodule.golden_items()
        return self._items


class GoldenDecoding(_GoldenCallback):
    """Greedy decoding of every golden set: ``<out_dir>/step_<k>/<task>.jsonl`` with the png / wav outputs,
    ``<out_dir>/golden_summary.json`` (per step and task: constrained and unconstrained decode rates, errors by
    kind, illegal mass, caption attribute accuracy beside the share of the set's most common value), metrics,
    and media to TensorBoard / wandb."""

    def __init__(self, out_dir: str, unconstrained: bool = True, media_per_task: int = 4):
        super().__init__()
        self.out_dir = Path(out_dir)
        self.unconstrained = unconstrained
        self.media_per_task = media_per_task

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self._ready(trainer):
            return
        dm = trainer.datamodule
        step = trainer.global_step
        out = self.out_dir / f"step_{step}"
        out.mkdir(parents=True, exist_ok=True)
        entry: dict = {"step": step}
        for task, items in self.items(trainer).items():
            rows = pl_module.decode_golden(task, items, dm.builder, constrained=True)
            recs = [
                pl_module.golden_media(task, r, out, dm.text_tokenizer, dm.golden_attributes.get(r["key"]))
                for r in rows
            ]
            with open(out / f"{task}.jsonl", "w") as f:
                f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in recs)
            entry[task] = self._task_summary(pl_module, dm, task, items, rows, recs)
            self._log_media(trainer, task, out, recs)
        path = self.out_dir / "golden_summary.json"
        history = [*_history(path, step), entry]
        _write_json(path, {"history": history, "latest": entry})
        for task in TASKS:
            if task not in entry:
                continue
            for k, v in entry[task].items():
                if isinstance(v, int | float) and k != "n":
                    pl_module.log(f"val/golden/{task}_{k}", float(v), rank_zero_only=True)

    def _task_summary(self, pl_module, dm, task, items, rows, recs) -> dict:
        n = len(rows)
        errors = Counter(r["error"] for r in rows if not r["ok"])
        s: dict = {"n": n, "decode_rate": sum(r["ok"] for r in rows) / n, "errors": dict(errors)}
        if self.unconstrained:
            free = pl_module.decode_golden(task, items, dm.builder, constrained=False)
            s["decode_rate_unconstrained"] = sum(r["ok"] for r in free) / n
            s["errors_unconstrained"] = dict(Counter(r["error"] for r in free if not r["ok"]))
        seqs = [q for q in (dm.builder.build(task, it) for it in items) if q is not None]
        if seqs:
            s["illegal_mass"] = float(pl_module.illegal_mass(collate(seqs, dm.builder.layout.pad_id)).mean())
        scored = [r for r in recs if "attributes" in r]
        if TASKS[task].target == "text" and scored:
            for attr in scored[0]["attributes"]:
                hits = [bool(r.get("attributes", {}).get(attr, False)) for r in recs]
                s[f"{attr}_acc"] = float(np.mean(hits))
                # the share the golden set's most common value has: what one fixed answer would score
                truth = Counter(str(dm.golden_attributes.get(r["key"], {}).get(attr)) for r in recs)
                s[f"{attr}_majority"] = truth.most_common(1)[0][1] / len(recs)
        return s

    def _log_media(self, trainer, task: str, out: Path, recs: list[dict]) -> None:
        files = [r for r in recs if r.get("file")][: self.media_per_task]
        if not files:
            return
        for logger in trainer.loggers:
            exp = getattr(logger, "experiment", None)
            for r in files:
                path = out / r["file"]
                tag = f"golden/{task}/{r['key']}"
                if path.suffix == ".png" and hasattr(exp, "add_image"):
                    from PIL import Image

                    img = np.asarray(Image.open(path).convert("RGB"))
                    exp.add_image(tag, img, trainer.global_step, dataformats="HWC")
                elif path.suffix == ".wav" and hasattr(exp, "add_audio"):
                    from mmsuite.sources.wav import decode_wav

                    wav, rate = decode_wav(path.read_bytes(), str(path))
                    exp.add_audio(tag, torch.from_numpy(wav.mean(axis=0)), trainer.global_step, sample_rate=rate)
                elif hasattr(logger, "log_image") and path.suffix == ".png":
                    logger.log_image(key=tag, images=[str(path)], step=trainer.global_step)
                elif hasattr(logger, "log_audio") and path.suffix == ".wav":
                    logger.log_audio(key=tag, audios=[str(path)], step=trainer.global_step)


class PromptAblation(_GoldenCallback):
    """Teacher-forced prompt ablation on the golden sets of ``tasks``: ``<out_dir>/prompt_ablation.json`` (per
    step and task: NLL per condition, gaps with bootstrap 95 % intervals, the share of items where the correct
    source loses; and ``growth``: each gap at the first validation and the latest) and ``val/ablation/...``."""

    def __init__(self, out_dir: str, tasks: list[str], n_boot: int = 2000, seed: int = 0, batch_size: int = 16):
        super().__init__()
        unknown = sorted(set(tasks) - set(TASKS))
        if unknown:
            raise ValueError(f"PromptAblation: unknown tasks {unknown}; tasks are {list(TASKS)}")
        self.out_dir, self.tasks = Path(out_dir), list(tasks)
        self.n_boot, self.seed, self.batch_size = n_boot, seed, batch_size

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self._ready(trainer):
            return
        dm, step = trainer.datamodule, trainer.global_step
        entry: dict = {"step": step}
        for task in self.tasks:
            res = run_prompt_ablation(
                pl_module.sequence_nll,
                dm.builder,
                task,
                self.items(trainer)[task],
                batch_size=self.batch_size,
                seed=self.seed,
                n_boot=self.n_boot,
            )
            entry[task] = res
            for cond in ("shuffled", "empty"):
                gap = res[f"gap_{cond}"]
                metrics = {
                    f"{task}_gap_{cond}": gap["mean"],
                    f"{task}_gap_{cond}_ci_low": gap["ci95"][0],
                    f"{task}_gap_{cond}_ci_high": gap["ci95"][1],
                    f"{task}_correct_loses_{cond}": res[f"correct_loses_{cond}"],
                }
                for k, v in metrics.items():
                    pl_module.log(f"val/ablation/{k}", float(v), rank_zero_only=True)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / "prompt_ablation.json"
        history = [*_history(path, step), entry]
        grown = growth(history, self.tasks)
        _write_json(path, {"history": history, "latest": entry, "growth": grown})
        for task in self.tasks:  # gate C2 in the metrics: each gap at the first validation, and its growth since
            for cond in ("shuffled", "empty"):
                g = grown[f"{task}_gap_{cond}"]
                pl_module.log(f"val/ablation/{task}_gap_{cond}_first", float(g["first"]), rank_zero_only=True)
                pl_module.log(
                    f"val/ablation/{task}_gap_{cond}_growth", float(g["last"] - g["first"]), rank_zero_only=True
                )


def growth(history: list[dict], tasks: list[str]) -> dict:
    """Each task's gaps at the first and the latest validation of ``history`` and whether they grew (gate C2)."""
    first, last = history[0], history[-1]
    out = {"first_step": first["step"], "last_step": last["step"]}
    for task in tasks:
        for cond in ("shuffled", "empty"):
            a, b = first[task][f"gap_{cond}"]["mean"], last[task][f"gap_{cond}"]["mean"]
            out[f"{task}_gap_{cond}"] = {"first": a, "last": b, "grew": b > a}
    return out
