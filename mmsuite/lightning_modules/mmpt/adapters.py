"""What Stage 4 trains: LoRA on the attention and MLP projections, and the new embedding (and head) rows.

Both come from PEFT: ``LoraConfig(trainable_token_indices=...)`` wraps the embedding, and the head, in a
``TrainableTokensLayer`` that holds *replacement* rows for the given ids (``trainable_tokens_delta``, fp32) and
writes them into the frozen matrix at every forward. A tied head gets only the embedding key and
``ensure_weight_tying``, so its rows are the embedding's (one parameter); an untied head gets its own rows.
Everything else stays frozen.

The rows hold full values, so weight decay would pull them to zero rather than to their start: they get their
own optimiser group with weight decay 0 (:func:`param_groups`). A checkpoint holds only the trainable tensors
(:func:`trainable_state_dict`, a few MB); the frozen base is rebuilt from its folder.
"""

from __future__ import annotations

import json
import os
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mmsuite.lightning_modules.mmpt.base import heads_tied
from mmsuite.settings import fail, parse, setting
from mmsuite.tokenizers.mmpt_space import MMPTLayout

LORA_KEYS = ("lora_A", "lora_B")
ROWS_KEY = "trainable_tokens_delta"
ADAPTER_FILE = "adapters.safetensors"
ADAPTER_RECORD = "adapters.json"


def _default_targets() -> list[str]:
    return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class AdapterSettings:
    r: int = setting(16, ge=1)
    alpha: int = setting(32, ge=1)
    dropout: float = setting(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = setting(_default_targets())  # attention and MLP projections
    lr: float = setting(2e-4, gt=0.0)  # LoRA
    weight_decay: float = setting(0.01, ge=0.0)  # LoRA only: the new rows get 0
    rows_lr: float = setting(1e-3, gt=0.0)  # the new embedding / head rows

    def check(self, key: str) -> None:
        if "lm_head" in self.target_modules or "embed_tokens" in self.target_modules:
            fail(f"{key}.target_modules", "must not hold lm_head or embed_tokens: LoRA there touches the base's rows")


def add_adapters(model, layout: MMPTLayout, settings: AdapterSettings):
    """``model`` (extended to ``layout``) wrapped by PEFT with LoRA and the trainable rows; the base is frozen."""
    from peft import LoraConfig, get_peft_model

    rows = model.get_input_embeddings().weight.shape[0]
    if rows != layout.vocab_size:
        raise ValueError(f"the model has {rows} embedding rows, the token space {layout.vocab_size}: extend it first")
    ids = list(layout.trainable_ids)
    tied = heads_tied(model)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        trainable_token_indices={"embed_tokens": ids} if tied else {"embed_tokens": ids, "lm_head": ids},
        ensure_weight_tying=tied,
        bias="none",
    )
    with warnings.catch_warnings():
        # PEFT warns that ensure_weight_tying found nothing in modules_to_save/target_modules; the trainable
        # tokens are tied by their own path (checked by check_trainable)
        warnings.filterwarnings("ignore", message=r".*ensure_weight_tying.*no tied modules.*")
        return get_peft_model(model, config)


@contextmanager
def rows_written_in(model):
    """Inference with the new rows written into the frozen matrices once, instead of at every forward (PEFT's
    trainable tokens copy the whole matrix per call: most of a decoding step for a small LM with a large new
    vocabulary). PEFT's own merge / unmerge of the trainable-token layers only: the rows it replaces are restored
    exactly on exit (LoRA, whose unmerge is not exact, stays unmerged)."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    layers = [m for m in model.modules() if isinstance(m, TrainableTokensLayer) and not m.merged]
    try:
        for layer in layers:
            layer.merge()
        yield model
    finally:
        for layer in reversed(layers):
            if layer.merged:
                layer.unmerge()


def lora_numel(config, settings: AdapterSettings) -> int:
    """LoRA parameters ``r * (in + out)`` over the targeted projections of a Qwen3/Llama-style config."""
    h = config.hidden_size
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or h // heads
    inter = config.intermediate_size
    shapes = {
        "q_proj": (h, heads * hd),
        "k_proj": (h, kv * hd),
        "v_proj": (h, kv * hd),
        "o_proj": (heads * hd, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }
    unknown = sorted(set(settings.target_modules) - set(shapes))
    if unknown:
        raise ValueError(f"lora_numel knows {list(shapes)}, not {unknown}")
    per_layer = sum(settings.r * sum(shapes[m]) for m in settings.target_modules)
    return per_layer * config.num_hidden_layers


def expected_trainable(config, layout: MMPTLayout, settings: AdapterSettings, tied: bool) -> dict[str, int]:
    """The trainable counts the formula gives: LoRA, rows (``len(trainable_ids) * hidden``, twice when untied)."""
    rows = len(layout.trainable_ids) * config.hidden_size * (1 if tied else 2)
    lora = lora_numel(config, settings)
    return {"lora": lora, "rows": rows, "total": lora + rows}


def trainable_summary(model) -> dict[str, int]:
    """Trainable parameters by kind, counted once each (a tied head's rows are the embedding's)."""
    out = {"lora": 0, "rows": 0, "other": 0, "frozen": 0}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            out["frozen"] += p.numel()
        elif any(k in name for k in LORA_KEYS):
            out["lora"] += p.numel()
        elif ROWS_KEY in name:
            out["rows"] += p.numel()
        else:
            out["other"] += p.numel()
    out["total"] = out["lora"] + out["rows"] + out["other"]
    return out


def check_trainable(model, layout: MMPTLayout, settings: AdapterSettings) -> dict[str, int]:
    """Gate A2: exactly LoRA and the new rows train, in the counts the formula gives, on exactly
    ``layout.trainable_ids``. Returns the counts (for printing); raises ValueError otherwise."""
    base = model.get_base_model()
    tied = heads_tied(base)
    if tied != bool(getattr(base.config, "tie_word_embeddings", False)):
        raise ValueError(f"the head is {'' if tied else 'not '}tied but config.tie_word_embeddings says otherwise")
    got = trainable_summary(model)
    want = expected_trainable(base.config, layout, settings, tied)
    if got["other"]:
        names = [n for n, p in model.named_parameters() if p.requires_grad and ROWS_KEY not in n]
        names = [n for n in names if not any(k in n for k in LORA_KEYS)]
        raise ValueError(f"parameters other than LoRA and the new rows train: {names[:5]}")
    if (got["lora"], got["rows"]) != (want["lora"], want["rows"]):
        raise ValueError(f"trainable counts {got} differ from the formula's {want}")
    ids = list(layout.trainable_ids)
    for name in ("embed", "head"):
        layer = base.get_input_embeddings() if name == "embed" else base.get_output_embeddings()
        adapter = getattr(layer, "token_adapter", None)
        if adapter is None:
            raise ValueError(f"the {name} is not wrapped for trainable rows")
        for key, indices in adapter.token_indices.items():
            if list(indices) != ids:
                raise ValueError(f"the {name}'s trainable rows ({key}) are not the token space's new rows")
    if tied:
        e = base.get_input_embeddings().token_adapter.trainable_tokens_delta
        h = base.get_output_embeddings().token_adapter.trainable_tokens_delta
        if any(e[k] is not h[k] for k in e):
            raise ValueError("the head is tied but its trainable rows are not the embedding's")
    return {**got, "expected_total": want["total"]}


def param_groups(model, settings: AdapterSettings) -> list[dict]:
    """Optimiser groups: LoRA (``lr``, ``weight_decay``) and the new rows (``rows_lr``, weight decay 0)."""
    lora, rows = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ROWS_KEY in name:
            rows.append(p)
        elif any(k in name for k in LORA_KEYS):
            lora.append(p)
        else:
            raise ValueError(f"param_groups: {name} trains but is neither LoRA nor a new row")
    return [
        {"name": "lora", "params": lora, "lr": settings.lr, "weight_decay": settings.weight_decay},
        {"name": "rows", "params": rows, "lr": settings.rows_lr, "weight_decay": 0.0},
    ]


def trainable_state_dict(model) -> dict[str, torch.Tensor]:
    """The trainable tensors by name (each once), detached copies."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable_state_dict(model, state: dict[str, torch.Tensor], source: str = "the checkpoint") -> None:
    """Copy ``state`` into the trainable parameters; every one must be there with its shape, nothing else."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match this model's trainable parameters: missing {missing[:3]} "
            f"({len(missing)}), unexpected {unexpected[:3]} ({len(unexpected)})"
        )
    for n, p in params.items():
        if tuple(state[n].shape) != tuple(p.shape):
            raise ValueError(f"{source}: {n} has shape {tuple(state[n].shape)}, the model {tuple(p.shape)}")
        p.copy_(state[n].to(p))


def save_adapters(model, layout: MMPTLayout, settings: AdapterSettings, out_dir: str | os.PathLike) -> Path:
    """``adapters.safetensors`` (the trainable tensors) and ``adapters.json`` (settings, token-space sha256)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {n: t.contiguous() for n, t in trainable_state_dict(model).items()}
    tmp = out / f".{ADAPTER_FILE}.tmp-{os.getpid()}"
    save_file(tensors, str(tmp))
    os.replace(tmp, out / ADAPTER_FILE)
    record = {"settings": asdict(settings), "token_space_sha256": layout.sha256}
    tmp = out / f".{ADAPTER_RECORD}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / ADAPTER_RECORD)
    return out


def load_adapters(model, layout: MMPTLayout, path: str | os.PathLike):
    """Wrap the extended base ``model`` like the saved run and load its trainable tensors: the PEFT model."""
    from safetensors.torch import load_file

    from mmsuite.tokenizers.token_space import check_same

    path = Path(path)
    record = json.loads((path / ADAPTER_RECORD).read_text())
    check_same(layout.sha256, "the base's token space", record["token_space_sha256"], str(path / ADAPTER_RECORD))
    settings = parse(AdapterSettings, record["settings"], f"{path / ADAPTER_RECORD}: settings")
    peft_model = add_adapters(model, layout, settings)
    load_trainable_state_dict(peft_model, load_file(str(path / ADAPTER_FILE)), source=str(path / ADAPTER_FILE))
    return peft_model, settings


@torch.no_grad()
def effective_weights(model) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedding and head matrices ``[V, d]`` the model computes with (adapted rows written in)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embed, head = base.get_input_embeddings(), base.get_output_embeddings()
    v = base.config.vocab_size
    device = next(base.parameters()).device
    e = embed(torch.arange(v, device=device))
    d = e.shape[1]
    h = head(torch.eye(d, device=device, dtype=e.dtype)).T
    return e.clone(), h.contiguous()
