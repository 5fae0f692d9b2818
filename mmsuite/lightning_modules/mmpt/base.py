"""The Stage 3 base: a causal LM whose vocabulary is extended to the MMPT token space.

The base comes from a local Hugging Face folder (a real Qwen3 checkpoint with its tokenizer) or, for the toy
world, is a small ``Qwen3ForCausalLM`` built from :class:`ToyLMSettings`. Its embedding (and an untied head) is
resized to the token space's total and **every new row is set explicitly**: the mean of the base's text rows
plus seeded noise (``init_noise`` times the per-dimension std). ``resize_token_embeddings(mean_resizing=True)``
is not used: it only touches rows past the old matrix, and its draw is not seeded by us.

A saved base is the Hugging Face folder (``config.json``, safetensors) plus ``token_space.json`` (with its sha256)
and ``mmpt_base.json`` (how it was made, and the sha256 again); :func:`load_base` checks both against each other,
against the model's row count, and against the sha256 a caller expects.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mmsuite.settings import fail, setting
from mmsuite.tokenizers.mmpt_space import LayoutSettings, MMPTLayout, text_special_ids
from mmsuite.tokenizers.token_space import TokenSpace, check_same

TOKEN_SPACE_FILE = "token_space.json"
RECORD_FILE = "mmpt_base.json"
RECORD_VERSION = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ToyLMSettings:
    """Shape of the toy base (transformers' Qwen3 architecture, random weights)."""

    hidden_size: int = setting(64, ge=1)
    num_layers: int = setting(2, ge=1)
    num_heads: int = setting(4, ge=1)
    num_kv_heads: int = setting(2, ge=1)
    head_dim: int = setting(16, ge=1)
    intermediate_size: int = setting(128, ge=1)
    tie_word_embeddings: bool = True
    max_position_embeddings: int = setting(2048, ge=8)
    rope_theta: float = setting(10000.0, gt=0.0)
    rows: int = setting(0, ge=0)  # embedding rows; 0: the text tokenizer's size (more mimics a base with padding rows)
    seed: int = setting(0, ge=0)

    def check(self, key: str) -> None:
        if self.num_heads % self.num_kv_heads:
            fail(f"{key}.num_kv_heads", f"({self.num_kv_heads}) must divide num_heads ({self.num_heads})")


@dataclass
class PretrainSettings:
    """Stage 3 on the run's own task shards: every weight of the extended base trained on the reading tasks (A2T,
    I2T) and on the captions alone, so that Stage 4 starts from a model that reads image and audio tokens and
    writes text. ``steps: 0``: the base as built."""

    steps: int = setting(0, ge=0)
    batch_size: int = setting(32, ge=1)  # sequences per step
    lr: float = setting(3.0e-3, gt=0.0)
    warmup_steps: int = setting(50, ge=0)
    weight_decay: float = setting(0.01, ge=0.0)
    grad_clip: float = setting(1.0, gt=0.0)
    seed: int = setting(0, ge=0)  # order of the training sequences
    val_rows: int = setting(256, ge=1)  # held-out (val split) rows scored before and after


@dataclass
class BaseSettings:
    path: str = ""  # a local Hugging Face causal-LM folder with its tokenizer; "": the toy LM of `toy`
    toy: ToyLMSettings = setting(ToyLMSettings())
    pretrain: PretrainSettings = setting(PretrainSettings())
    layout: LayoutSettings = setting(LayoutSettings())
    init_seed: int = setting(0, ge=0)  # seed of the new rows' noise
    init_noise: float = setting(0.02, ge=0.0)  # new row = mean of the text rows + init_noise * per-dim std * N(0, 1)
    dtype: str = setting("float32", choices=list(DTYPES))  # weights of the saved base


def build_toy_lm(text_size: int, settings: ToyLMSettings):
    """A randomly initialised ``Qwen3ForCausalLM`` with ``settings.rows or text_size`` embedding rows."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    rows = int(settings.rows) or int(text_size)
    if rows < text_size:
        raise ValueError(f"base.toy.rows ({rows}) is smaller than the text tokenizer's {text_size} ids")
    config = Qwen3Config(
        vocab_size=rows,
        hidden_size=settings.hidden_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_kv_heads,
        head_dim=settings.head_dim,
        intermediate_size=settings.intermediate_size,
        tie_word_embeddings=settings.tie_word_embeddings,
        max_position_embeddings=settings.max_position_embeddings,
        rope_theta=settings.rope_theta,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        return Qwen3ForCausalLM(config)


def load_hf_lm(path: str | os.PathLike, dtype: str = "float32"):
    """``AutoModelForCausalLM`` from a local folder (never downloads); a clear error when it is not one."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"base LM folder {path} has no config.json (a local Hugging Face model folder)")
    return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=DTYPES[dtype])


def _frozen_weight(layer) -> torch.Tensor:
    # a PEFT trainable-tokens wrapper's `.weight` is a fresh merged tensor; its wrapped layer holds the parameter
    return layer.original_module.weight if hasattr(layer, "original_module") else layer.weight


def heads_tied(model) -> bool:
    """Whether the output head shares its weight with the input embedding (what the model does, not its config);
    ``model`` may be wrapped by PEFT."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = model.get_output_embeddings()
    return head is not None and _frozen_weight(head) is _frozen_weight(model.get_input_embeddings())


@torch.no_grad()
def _init_rows(weight: torch.Tensor, old: range, new: range, generator: torch.Generator, noise: float) -> None:
    ref = weight[old.start : old.stop].float()
    mean, std = ref.mean(dim=0), ref.std(dim=0)
    z = torch.randn(len(new), weight.shape[1], generator=generator)
    weight[new.start : new.stop] = (mean + noise * std * z).to(weight.dtype)


def extend_vocabulary(model, layout: MMPTLayout, seed: int = 0, noise: float = 0.02) -> None:
    """Resize ``model``'s embedding (and an untied head) from ``layout.base_rows`` to ``layout.vocab_size`` rows
    and set every new row (:attr:`MMPTLayout.new_ids`) to the mean of the text rows plus seeded noise."""
    rows = model.get_input_embeddings().weight.shape[0]
    if rows != layout.base_rows:
        raise ValueError(
            f"the base model has {rows} embedding rows but the token space puts its first new id at "
            f"{layout.base_rows} (text {layout.text.size} + padding rows); they must agree"
        )
    tied = heads_tied(model)
    if tied != bool(getattr(model.config, "tie_word_embeddings", False)):
        raise ValueError(f"the model's head is {'' if tied else 'not '}tied but its config says otherwise")
    model.resize_token_embeddings(layout.vocab_size, mean_resizing=False)
    generator = torch.Generator().manual_seed(int(seed))
    _init_rows(model.get_input_embeddings().weight, layout.text_rows, layout.new_ids, generator, noise)
    if not tied:
        _init_rows(model.get_output_embeddings().weight, layout.text_rows, layout.new_ids, generator, noise)
    if heads_tied(model) != tied:
        raise RuntimeError("resizing changed whether the head is tied")
    if model.config.vocab_size != layout.vocab_size:
        raise RuntimeError(f"config.vocab_size is {model.config.vocab_size} after resizing to {layout.vocab_size}")


def build_stage3_base(
    text_size: int,
    image_codes: int,
    audio_codebooks: int,
    audio_bins: int,
    settings: BaseSettings,
    out_dir: str | os.PathLike | None = None,
):
    """The extended base and its layout: ``(model, layout)``; saved to ``out_dir`` when given.

    With ``settings.path`` the base and its tokenizer come from that folder (``text_size`` must equal its
    tokenizer's size; its own special tokens are banned from text decoding); otherwise a toy Qwen3 is built.
    """
    from mmsuite.tokenizers.text import load_hf_tokenizer, vocab_size_of

    banned: list[int] = []
    source: dict = {}
    if settings.path:
        tokenizer = load_hf_tokenizer(settings.path)
        got = vocab_size_of(tokenizer)
        if got != text_size:
            raise ValueError(f"the base tokenizer in {settings.path} has {got} ids, the text range {text_size}")
        model = load_hf_lm(settings.path, settings.dtype)
        source = {"kind": "path", "path": str(settings.path)}
    else:
        tokenizer = None
        model = build_toy_lm(text_size, settings.toy)
        source = {"kind": "toy", "toy": asdict(settings.toy)}
    rows = model.get_input_embeddings().weight.shape[0]
    layout = MMPTLayout.build(text_size, rows, image_codes, audio_codebooks, audio_bins, settings.layout)
    if tokenizer is not None:
        banned = text_special_ids(tokenizer, layout)
        layout = MMPTLayout(layout.token_space, banned)
    extend_vocabulary(model, layout, settings.init_seed, settings.init_noise)
    model = model.to(DTYPES[settings.dtype])
    if out_dir is not None:
        record = {
            "source": source,
            "init_seed": settings.init_seed,
            "init_noise": settings.init_noise,
            "dtype": settings.dtype,
        }
        save_base(model, layout, out_dir, record, tokenizer_dir=settings.path or None)
    return model, layout


def save_base(
    model, layout: MMPTLayout, out_dir: str | os.PathLike, record: dict, tokenizer_dir: str | os.PathLike | None = None
) -> Path:
    """Write the Hugging Face folder, ``token_space.json`` and ``mmpt_base.json`` to ``out_dir`` atomically (a
    temporary sibling folder, renamed at the end). An existing ``out_dir`` is an error."""
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} exists; load it with load_base, or delete it to rebuild the base")
    if model.get_input_embeddings().weight.shape[0] != layout.vocab_size:
        raise ValueError("save_base: the model has not been extended to the token space (extend_vocabulary)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer_dir is not None:
            for f in Path(tokenizer_dir).iterdir():
                if f.is_file() and (f.name.startswith("tokenizer") or f.name in ("vocab.json", "merges.txt")):
                    shutil.copy2(f, tmp / f.name)
        layout.token_space.save(tmp / TOKEN_SPACE_FILE)
        body = {
            "version": RECORD_VERSION,
            "token_space_sha256": layout.sha256,
            "base_rows": layout.base_rows,
            "vocab_size": layout.vocab_size,
            "tie_word_embeddings": heads_tied(model),
            "banned_text_ids": list(layout.banned_text_ids),
            **record,
        }
        (tmp / RECORD_FILE).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_base(
    path: str | os.PathLike,
    expected_sha256: str | None = None,
    expected_from: str = "the run config",
    dtype: str | None = None,
):
    """``(model, layout)`` of a saved Stage 3 base, checked: the token space's own sha256, the record's,
    ``expected_sha256`` (gate A1; both hashes and both places on a mismatch) and the model's row count."""
    path = Path(path)
    ts_path, rec_path = path / TOKEN_SPACE_FILE, path / RECORD_FILE
    for f in (ts_path, rec_path):
        if not f.is_file():
            raise FileNotFoundError(f"{path} is not a Stage 3 base: {f.name} is missing")
    space = TokenSpace.load(ts_path)
    record = json.loads(rec_path.read_text())
    check_same(space.sha256, str(ts_path), record.get("token_space_sha256", "<none>"), str(rec_path))
    if expected_sha256 is not None:
        check_same(expected_sha256, expected_from, space.sha256, str(ts_path))
    layout = MMPTLayout(space, record.get("banned_text_ids", ()))
    model = load_hf_lm(path, dtype or record.get("dtype", "float32"))
    rows = model.get_input_embeddings().weight.shape[0]
    if rows != layout.vocab_size:
        raise ValueError(f"{path}: the model has {rows} embedding rows, its token space {layout.vocab_size}")
    if heads_tied(model) != bool(record["tie_word_embeddings"]):
        raise ValueError(f"{path}: the loaded head is {'' if heads_tied(model) else 'not '}tied, unlike when saved")
    return model, layout


@torch.no_grad()
def rows_loss(model, layout: MMPTLayout, rows: list, batch_size: int = 64) -> float:
    """Token-mean cross-entropy (nats/token) of ``model`` over the labelled tokens of ``(input_ids, labels)`` rows."""
    import torch.nn.functional as F

    from mmsuite.lightning_modules.mmpt.loss import TargetLoss
    from mmsuite.tokenizers.mmpt_sequences import collate_rows

    loss_fn, device = TargetLoss(layout), next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate_rows(rows[i : i + batch_size], layout.pad_id).items()}
        logits, targets, _ = loss_fn.target_logits(model, batch)
        total += float(F.cross_entropy(logits, targets, reduction="sum"))
        count += targets.numel()
    model.train(was_training)
    return total / max(count, 1)


def pretrain_base(model, layout: MMPTLayout, train: list, val: list, settings: PretrainSettings) -> dict:
    """Stage 3: train every weight of ``model`` on ``(input_ids, labels)`` rows (the reading tasks and the captions
    alone) for ``settings.steps`` AdamW steps, token-mean cross-entropy; returns what it did and the held-out loss
    before and after. A plain loop, not a Trainer: it runs inside the Stage 4 run's ``configure_model``, where a
    second Trainer would share the run's loggers."""
    import time

    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from mmsuite.lightning_modules.mmpt.loss import TargetLoss
    from mmsuite.nn.schedule import warmup_cosine_scheduler
    from mmsuite.tokenizers.mmpt_sequences import collate_rows

    if not train:
        raise ValueError("Stage 3 pretraining (model.base.pretrain) found no sequences in the train split")
    val = val[: settings.val_rows]
    start = time.perf_counter()
    before = rows_loss(model, layout, val) if val else float("nan")
    loss_fn, device = TargetLoss(layout), next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    sched = warmup_cosine_scheduler(opt, settings.warmup_steps, settings.steps, 0.1)
    generator = torch.Generator().manual_seed(settings.seed)
    order, pos, last = torch.randperm(len(train), generator=generator), 0, float("nan")
    b = min(settings.batch_size, len(train))
    model.train()
    for _ in tqdm(range(settings.steps), desc="Stage 3 base (reading tasks + captions)", unit="step"):
        if pos + b > len(train):
            order, pos = torch.randperm(len(train), generator=generator), 0
        rows = [train[int(i)] for i in order[pos : pos + b]]
        pos += b
        batch = {k: v.to(device) for k, v in collate_rows(rows, layout.pad_id).items()}
        logits, targets, _ = loss_fn.target_logits(model, batch)
        loss = F.cross_entropy(logits, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        opt.step()
        sched.step()
        last = loss.detach()  # read once at the end: no host sync per step
    model.eval()
    after = rows_loss(model, layout, val) if val else float("nan")
    return {
        "train_rows": len(train),
        "val_rows": len(val),
        "val_loss_before": before,
        "val_loss_after": after,
        "train_loss_last": float(last),
        "seconds": round(time.perf_counter() - start, 1),
    }
