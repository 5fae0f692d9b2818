"""The MMPT Stage 4 LightningModule: a causal LM over the MMPT token space, trained with LoRA and the new rows.

Before training (``configure_model``): the Stage 3 base is loaded from ``base_dir`` with its token space checked
against the run's (gate A1; a missing base is built there first, with ``base.pretrain.steps`` trained on the run's
reading sequences and captions, which is why that build waits for the data), PEFT adds LoRA and the trainable
rows and the trainable set is checked against the formula (gate A2, the count printed). ``on_fit_start`` runs gates
A3 (sequence builders) and A4 (strict decode of stored tokens through the image and audio tokenizers) on the data.

Training: per-task token-weighted losses (:class:`~mmsuite.lightning_modules.mmpt.loss.TargetLoss`), the total a
mean over the tasks present; logged ``train/loss_<task>``, ``train/loss``, ``train/loss_token_weighted`` (the plain
token mean, for comparison), and every ``norm_every`` steps the
mean / std of the new embedding (and untied head) rows' L2 norms. The task mixture and its ramp live in the
DataModule (its state is in the checkpoint). Checkpoints hold only the trainable tensors; the frozen base is
rebuilt from ``base_dir`` (its sha256 checked again).

The golden-set and prompt-ablation callbacks (``mmsuite.callbacks.golden``) call :meth:`decode_golden`,
:meth:`sequence_nll` and :meth:`golden_media`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torchmetrics import MeanMetric

from mmsuite.lightning_modules.mmpt.adapters import (
    ROWS_KEY,
    AdapterSettings,
    add_adapters,
    check_trainable,
    param_groups,
    rows_written_in,
)
from mmsuite.lightning_modules.mmpt.base import (
    RECORD_FILE,
    TOKEN_SPACE_FILE,
    BaseSettings,
    build_toy_lm,
    extend_vocabulary,
    load_base,
    pretrain_base,
    save_base,
)
from mmsuite.lightning_modules.mmpt.loss import TargetLoss
from mmsuite.nn.schedule import StepSchedule, warmup_cosine_scheduler
from mmsuite.settings import as_dict, parse, setting
from mmsuite.tokenizers.mmpt_decoding import TaskGrammar, decode_batch
from mmsuite.tokenizers.mmpt_sequences import collate_prompts
from mmsuite.tokenizers.mmpt_space import TASK_NAMES, TASKS, DecodeError, FormatSettings, MMPTLayout
from mmsuite.tokenizers.token_space import TokenSpace, settings_hash


@dataclass
class MMPTSettings:
    """``model`` of ``model=mmpt`` (conf/model/mmpt.yaml states what comes from elsewhere)."""

    token_space: list[Any] = setting()  # = ${token_space.ranges}: the run's MMPT token space
    format: Any = setting({}, schema=FormatSettings)  # = ${mmpt_format}: what a well-formed body is
    base: BaseSettings = setting(BaseSettings())
    base_root: str = setting()  # = ${paths.data_dir}: the Stage 3 base lives in <base_root>/mmpt-base-<hash>/
    base_dir: str | None = (
        None  # a Stage 3 base folder made elsewhere (null: the one under base_root, built if missing)
    )
    adapters: AdapterSettings = setting(AdapterSettings())
    schedule: Any = setting({}, schema=StepSchedule)  # = the schedule group (${schedule})
    norm_every: int = setting(50, ge=1)  # steps between logs of the new rows' norms
    image_tokenizer_ckpt: str | None = None  # decodes generated image tokens (golden sets, generate.py)
    image_size: int = setting(64, ge=8)  # = ${data.world.image_size}: the frames the image tokenizer encoded
    audio_tokenizer_ckpt: str | None = None  # decodes generated audio tokens
    seed: int = setting(0, ge=0)


class MMPTModule(L.LightningModule):
    Settings = MMPTSettings

    def __init__(self, **settings):
        super().__init__()
        s = self.settings = parse(MMPTSettings, settings, "model")
        self.save_hyperparameters(as_dict(s))
        self.layout = MMPTLayout(TokenSpace.from_config(s.token_space))
        self.fmt = s.format
        self.strict_loading = False  # checkpoints hold the trainable tensors only (checked in on_load_checkpoint)
        self.model = None
        self.trainable_counts: dict | None = None
        self.train_task = torch.nn.ModuleList(MeanMetric() for _ in TASK_NAMES)
        self.val_task = torch.nn.ModuleList(MeanMetric() for _ in TASK_NAMES)
        self._tokenizers: dict = {}
        self.grammar = TaskGrammar(self.layout, self.fmt)
        self.loss_fn = TargetLoss(self.layout)
        self.configure_model()  # now, unless the base must first be trained on the data (then Lightning's hook)

    # -- the base and its adapters (gates A1, A2) -------------------------------------------------------
    @property
    def base_dir(self) -> Path:
        s = self.settings
        if s.base_dir:
            return Path(s.base_dir)
        key = {"token_space": self.layout.sha256, "base": dataclasses.asdict(s.base)}
        return Path(s.base_root) / f"mmpt-base-{settings_hash(key)}"

    def configure_model(self) -> None:
        """Load the Stage 3 base (building it when missing) and add the adapters. Called from ``__init__``, and
        again by Lightning after ``prepare_data``/``setup``: a base pretrained on the run's task shards
        (``base.pretrain.steps``) is built only then, from the datamodule's Stage 3 rows."""
        if self.model is not None:
            return
        with torch.device("cpu"):  # Lightning's hook runs under the accelerator as default device; build as __init__
            self._configure_model()

    def _configure_model(self) -> None:
        path, trainer = self.base_dir, self._trainer
        if not (path / TOKEN_SPACE_FILE).is_file() and not self.settings.base_dir:
            data, device = None, None
            if self.settings.base.pretrain.steps:
                if trainer is None:
                    return  # Lightning calls this hook again once the data exist
                data, device = trainer.datamodule, trainer.strategy.root_device
                if data is None or not hasattr(data, "stage3_rows"):
                    raise ValueError(
                        "model.base.pretrain.steps > 0 trains the Stage 3 base on the task shards: the run needs the "
                        f"MMPT datamodule (data=mmpt), got {type(data).__name__}"
                    )
            if trainer is None or trainer.is_global_zero:  # one rank builds it, the others wait and load it
                ensure_base(self.layout, self.settings.base, path, data, device)
            if trainer is not None:
                trainer.strategy.barrier("mmpt-stage3-base")
        model, layout = load_base(path, expected_sha256=self.layout.sha256, expected_from="the run's token space")
        self.layout = layout  # carries the base's banned text ids
        self.grammar = TaskGrammar(layout, self.fmt)
        self.loss_fn = TargetLoss(layout)
        self.model = add_adapters(model, layout, self.settings.adapters)
        self.model.train()  # from_pretrained returns the base in eval mode (LoRA dropout off)
        self.trainable_counts = check_trainable(self.model, layout, self.settings.adapters)
        c = self.trainable_counts
        print(
            f"[mmpt] gate A2: trainable {c['total']:,} = LoRA {c['lora']:,} + rows {c['rows']:,} "
            f"(formula {c['expected_total']:,}); frozen {c['frozen']:,}",
            flush=True,
        )

    # -- gates A3, A4 before training ---------------------------------------------------------------------
    def on_fit_start(self) -> None:
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "check_records"):
            return
        self.check_base_data(dm)
        checked = dm.check_records("val")
        self.decode_stored(dm)
        print(f"[mmpt] gates A3/A4: {checked['sequences']} sequences of {checked['records']} records pass", flush=True)

    def check_base_data(self, dm) -> None:
        """A base pretrained on task shards must have read this run's (same tokenizers, same data settings)."""
        record = json.loads((self.base_dir / RECORD_FILE).read_text())
        built_on = record.get("pretrain", {}).get("data")
        if built_on is not None and built_on != dm.root.name:
            raise ValueError(
                f"the Stage 3 base {self.base_dir} was pretrained on the task shards {built_on}, this run reads "
                f"{dm.root.name}: delete the base to rebuild it, or set model.base_dir to a base made for this data"
            )

    def decode_stored(self, dm) -> None:
        """Gate A4: the first golden target of each writing task decodes through the tokenizers."""
        items = dm.golden_items()
        for task in ("t2i", "t2a"):
            it = items[task][0]
            body = self.layout.check_body(TASKS[task].target, it.body(TASKS[task].target), self.fmt)
            self.render(task, body)

    # -- training -------------------------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict:
        return self.loss_fn.task_losses(self.model, batch)

    def training_step(self, batch: dict, batch_idx: int):
        out = self(batch)
        for t, name in enumerate(TASK_NAMES):
            self.train_task[t].update(out["task_loss"][t], weight=out["task_tokens"][t])
            self.log(f"train/loss_{name}", self.train_task[t], on_step=False, on_epoch=True)
        self.log("train/loss", out["loss"], prog_bar=True)
        self.log("train/loss_token_weighted", token_weighted(out))
        self.log("train/target_tokens", out["task_tokens"].sum(), reduce_fx="sum")
        if self.global_step % self.settings.norm_every == 0:
            self.log_dict({f"train/{k}": v for k, v in self.row_norms().items()})
        return out["loss"]

    @torch.no_grad()
    def row_norms(self) -> dict[str, float]:
        """Mean and std of the L2 norms of the new rows (embedding, and the head when untied)."""
        out = {}
        for name, p in self.model.named_parameters():
            if ROWS_KEY in name:
                where = "head" if "lm_head" in name else "embed"
                norms = p.detach().float().norm(dim=-1)
                out[f"rows_{where}_norm_mean"] = norms.mean()
                out[f"rows_{where}_norm_std"] = norms.std()
        return out

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self(batch)
        for t, name in enumerate(TASK_NAMES):
            self.val_task[t].update(out["task_loss"][t], weight=out["task_tokens"][t])
            self.log(f"val/loss_{name}", self.val_task[t], on_step=False, on_epoch=True)
        self.log("val/loss", out["loss"], on_step=False, on_epoch=True, prog_bar=True)
        self.log("val/loss_token_weighted", token_weighted(out), on_step=False, on_epoch=True)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(param_groups(self.model, self.settings.adapters))
        total = self.trainer.max_steps
        if total is None or total <= 0:
            raise ValueError(f"MMPTModule needs trainer.max_steps > 0 for its schedule, got {total}")
        s = self.settings.schedule
        sched = warmup_cosine_scheduler(opt, s.warmup_steps, int(total), s.floor_ratio)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    @torch.no_grad()
    def text_nll(self, captions: list) -> dict[str, torch.Tensor]:
        """Gate C3: mean NLL of text-only sequences ``<text_start> TEXT <text_end>`` (nats/token) with the
        adapters and without them (the Stage 3 base): Stage 4 must not make the base's text worse."""
        from mmsuite.tokenizers.mmpt_sequences import assemble_text, collate_rows

        batch = collate_rows([assemble_text(self.layout, c) for c in captions], self.layout.pad_id)
        batch["task"] = torch.zeros(len(captions), dtype=torch.long)
        with_adapters = self.sequence_nll(batch).mean()
        with self.model.disable_adapter():
            base = self.sequence_nll(batch).mean()
        return {"text_nll": with_adapters, "text_nll_base": base, "text_nll_delta": with_adapters - base}

    def on_validation_epoch_end(self) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None or not hasattr(dm, "golden_items") or self.trainer.sanity_checking:
            return
        if not hasattr(self, "_text_prompts"):
            items = dm.golden_items()
            self._text_prompts = [it.text for task in ("i2t", "a2t") for it in items[task]]
        self.log_dict({f"val/{k}": v for k, v in self.text_nll(self._text_prompts).items()})

    # -- checkpoints: the trainable tensors only ----------------------------------------------------------
    def _trainable_keys(self) -> set[str]:
        if self.model is None:  # a pretrained base is built by a training run, once its task shards exist
            raise FileNotFoundError(
                f"the Stage 3 base {self.base_dir} does not exist: `python train.py` with this experiment builds it "
                "(model.base.pretrain trains it on the task shards), or set model.base_dir to one made elsewhere"
            )
        return {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keys = self._trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keys}
        checkpoint["mmpt"] = {"token_space_sha256": self.layout.sha256, "base_dir": str(self.base_dir)}

    def _check_trainable_keys(self, state_dict: dict) -> None:
        got = {k for k in state_dict if k.startswith("model.")}
        want = self._trainable_keys()
        if got != want:
            raise ValueError(
                f"the checkpoint's trainable tensors differ from this model's: missing {sorted(want - got)[:3]}, "
                f"unexpected {sorted(got - want)[:3]}"
            )

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """A checkpoint's state: exactly the trainable tensors (checked), the frozen base stays as built."""
        self._check_trainable_keys(state_dict)
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._check_trainable_keys(checkpoint["state_dict"])
        saved = checkpoint.get("mmpt", {}).get("token_space_sha256")
        if saved is not None and saved != self.layout.sha256:
            raise ValueError(f"the checkpoint's token space {saved} is not this run's {self.layout.sha256}")

    # -- generation and the golden sets ---------------------------------------------------------------------
    @torch.no_grad()
    def generate_targets(self, task: str, prompts: list, constrained: bool = True, batch_size: int = 16) -> list:
        """Greedy continuations of ``prompts`` (id arrays ending with ``<gen tgt>``): each row's body or the
        :class:`DecodeError` the strict decoder raised."""
        was_training = self.model.training
        self.model.eval()
        out: list = []
        with rows_written_in(self.model):
            for i in range(0, len(prompts), batch_size):
                batch = collate_prompts(prompts[i : i + batch_size], self.layout.pad_id)
                batch = {k: v.to(self.device) for k, v in batch.items()}
                kw = self.grammar.generate_kwargs(task, constrained)
                gen = self.model.generate(**batch, do_sample=False, **kw)
                out.extend(decode_batch(self.layout, task, gen[:, batch["input_ids"].shape[1] :], self.fmt))
        self.model.train(was_training)
        return out

    def generate_samples(self, batch: dict, out_dir: Path, datamodule=None) -> list[Path]:
        """generate.py: each row's source -> its target, written to ``out_dir`` (T2I png, T2A wav, captions of
        A2T / I2T in ``captions.jsonl`` beside the reference)."""
        out_dir = Path(out_dir)
        text = getattr(datamodule, "text_tokenizer", None)
        written: list[Path] = []
        lines = []
        labelled = batch["labels"] != -100
        for t, task in enumerate(TASK_NAMES):
            rows = (batch["task"] == t).nonzero().flatten().tolist()
            if not rows:
                continue
            starts = [int(labelled[r].int().argmax()) for r in rows]
            prompts = [batch["input_ids"][r, :s].numpy() for r, s in zip(rows, starts)]
            for i, (r, s, res) in enumerate(zip(rows, starts, self.generate_targets(task, prompts))):
                key = f"{i:03d}"
                if isinstance(res, DecodeError):
                    lines.append({"task": task, "row": r, "ok": False, "error": res.code})
                    continue
                row = {"key": key, "ok": True, "error": None, "body": res}
                rec = self.golden_media(task, row, out_dir, text)
                if TASKS[task].target == "text" and text is not None:
                    ref = batch["input_ids"][r, s + 1 : int(batch["attention_mask"][r].sum()) - 1].tolist()
                    rec["reference"] = text.decode(ref)
                else:
                    written.append(out_dir / rec["file"])
                lines.append(rec)
        path = out_dir / "samples.jsonl"
        path.write_text("".join(json.dumps(x, sort_keys=True) + "\n" for x in lines))
        return [*written, path]

    def decode_golden(self, task: str, items: list, builder, constrained: bool = True) -> list[dict]:
        """Per golden item of ``task``: ``{key, ok, error, body}`` (body: the decoded target ids)."""
        prompts = [builder.prompt(task, it.body(TASKS[task].source)) for it in items]
        results = self.generate_targets(task, prompts, constrained)
        rows = []
        for it, r in zip(items, results):
            ok = not isinstance(r, DecodeError)
            rows.append({"key": it.key, "ok": ok, "error": None if ok else r.code, "body": r if ok else None})
        return rows

    def illegal_mass(self, batch: dict) -> torch.Tensor:
        """Teacher-forced probability outside the grammar's allowed set at every target position ``[N]``."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        return self.loss_fn.illegal_mass(self.model, batch, self.grammar)[0]

    def sequence_nll(self, batch: dict) -> torch.Tensor:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        return self.loss_fn.sequence_nll(self.model, batch)

    def _tokenizer(self, kind: str):
        if kind not in self._tokenizers:
            s = self.settings
            ts = self.layout.token_space
            if kind == "image":
                from mmsuite.tokenizers.image import ImageTokenizer

                if s.image_tokenizer_ckpt is None:
                    raise ValueError("model.image_tokenizer_ckpt is needed to decode image tokens")
                self._tokenizers[kind] = ImageTokenizer.from_checkpoint(
                    s.image_tokenizer_ckpt, token_space=ts, image_size=s.image_size
                )
            else:
                from mmsuite.tokenizers.audio import audio_tokenizer_from_checkpoint

                if s.audio_tokenizer_ckpt is None:
                    raise ValueError("model.audio_tokenizer_ckpt is needed to decode audio tokens")
                self._tokenizers[kind] = audio_tokenizer_from_checkpoint(s.audio_tokenizer_ckpt, token_space=ts)
        return self._tokenizers[kind]

    def render(self, task: str, body: np.ndarray):
        """A decoded target as media: T2I -> uint8 ``[H, W, 3]``; T2A -> ``(float32 wav [S], sample_rate)``."""
        target = TASKS[task].target
        if target == "image":
            tok = self._tokenizer("image")
            h, w = tok.grid
            return tok.decode(torch.as_tensor(body).reshape(1, h, w))[0].numpy()
        if target == "audio":
            tok = self._tokenizer("audio")
            wav = tok.decode(torch.as_tensor(body)[None])
            return wav.reshape(-1).float().numpy(), tok.sample_rate
        raise ValueError(f"render: {task} writes text")

    def golden_media(self, task: str, row: dict, out_dir: Path, text_tokenizer=None, attributes=None) -> dict:
        """Write one decoded golden output under ``out_dir`` (png / wav / its caption) and score a caption against
        the record's attributes; returns the jsonl row."""
        from mmsuite.sources.wav import write_wav

        rec = {"task": task, "key": row["key"], "ok": row["ok"], "error": row["error"]}
        if not row["ok"]:
            return rec
        body = row["body"]
        target = TASKS[task].target
        if target == "text":
            text = text_tokenizer.decode(body.tolist()) if text_tokenizer is not None else None
            rec["text"] = text
            if attributes is not None and text is not None:
                rec["attributes"] = score_caption(text, attributes)
        elif target == "image":
            from PIL import Image

            path = out_dir / f"{task}_{row['key']}.png"
            Image.fromarray(self.render(task, body)).save(path)
            rec["file"] = path.name
            rec["distinct_codes"] = int(np.unique(body).size)
        else:
            wav, rate = self.render(task, body)
            path = out_dir / f"{task}_{row['key']}.wav"
            write_wav(path, wav, rate)
            rec["file"] = path.name
            rec["frames"] = int(body.size // self.layout.n_codebooks)
        return rec


def token_weighted(out: dict) -> torch.Tensor:
    """The plain mean over every target token of the batch (mostly audio: logged beside the task mean)."""
    return (out["task_loss"] * out["task_tokens"]).sum() / out["task_tokens"].sum().clamp(min=1)


def score_caption(text: str, attributes: dict) -> dict[str, bool]:
    """Whether a generated caption states each attribute of its record (toy-world frame or toy sound; {} for
    records of other sources)."""
    from mmsuite.lightning_modules.fourm.attributes import caption_attributes
    from mmsuite.sources import toysound, toyworld

    if attributes.get("source") not in ("toyworld", "toysound"):
        return {}  # real captions state no attributes we can read back
    if attributes["modality"] == "image":
        said = caption_attributes(text, toyworld.FIGURE_COLORS, toyworld.ACTIONS)
        return {a: said[a] == attributes[a] for a in ("color", "action")}
    said = toysound.caption_attributes(text)
    return {a: said[a] == attributes[a] for a in toysound.SOUND_ATTRIBUTES}


def ensure_base(layout: MMPTLayout, settings: BaseSettings, out_dir: Path, data=None, device=None) -> Path:
    """Build the Stage 3 base for ``layout`` at ``out_dir``: the toy Qwen3 (random weights) or the local base LM
    of ``settings.path``, its vocabulary extended with every new row initialised (seeded mean + noise), then, with
    ``settings.pretrain.steps``, every weight trained on the Stage 3 rows of ``data`` (the MMPT datamodule, set up:
    its reading sequences and captions; on ``device``, default the CPU). The run's random streams are left as they
    were (transformers' resizing draws from them), so a run that builds the base and one that finds it built get
    the same LoRA initialisation."""
    devices = [device.index or 0] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        return _build_base(layout, settings, out_dir, data, device)


def _build_base(layout: MMPTLayout, settings: BaseSettings, out_dir: Path, data=None, device=None) -> Path:
    from mmsuite.lightning_modules.mmpt.base import DTYPES, load_hf_lm

    if settings.path:
        from mmsuite.tokenizers.mmpt_space import text_special_ids
        from mmsuite.tokenizers.text import load_hf_tokenizer, vocab_size_of

        tokenizer = load_hf_tokenizer(settings.path)
        if vocab_size_of(tokenizer) != layout.text.size:
            raise ValueError(
                f"the base tokenizer in {settings.path} has {vocab_size_of(tokenizer)} ids but the token space's "
                f"text range has {layout.text.size} (token_space.ranges)"
            )
        layout = MMPTLayout(layout.token_space, text_special_ids(tokenizer, layout))  # its own specials: never text
        model = load_hf_lm(settings.path, settings.dtype)
        source = {"kind": "path", "path": settings.path}
    else:
        toy = dataclasses.replace(settings.toy, rows=layout.base_rows)
        model = build_toy_lm(layout.text.size, toy)
        source = {"kind": "toy", "toy": dataclasses.asdict(toy)}
    extend_vocabulary(model, layout, settings.init_seed, settings.init_noise)
    model = model.to(DTYPES[settings.dtype])
    record = {"source": source, "init_seed": settings.init_seed, "init_noise": settings.init_noise}
    record["dtype"] = settings.dtype
    print(f"[mmpt] building the Stage 3 base at {out_dir}", flush=True)
    if settings.pretrain.steps:
        if data is None:
            raise ValueError("model.base.pretrain.steps > 0 trains the base on the task shards: it needs the data")
        train, val = data.stage3_rows("train"), data.stage3_rows("val")
        model.to(device or "cpu")
        done = pretrain_base(model, layout, train, val, settings.pretrain)
        model.to("cpu")
        record["pretrain"] = {**dataclasses.asdict(settings.pretrain), **done, "data": data.root.name}
        print(
            f"[mmpt] Stage 3: {settings.pretrain.steps} steps on {done['train_rows']} A2T/I2T and text-only rows in "
            f"{done['seconds']:.0f} s; held-out loss {done['val_loss_before']:.3f} -> "
            f"{done['val_loss_after']:.3f} nats/token",
            flush=True,
        )
    return save_base(model, layout, out_dir, record, tokenizer_dir=settings.path or None)
