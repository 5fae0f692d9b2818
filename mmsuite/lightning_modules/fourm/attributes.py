"""nano4m evaluation: caption <-> image attribute accuracy on the toy world.

An evaluation task of ``kind: attributes`` (``model.tasks``) generates its ``target`` modality from its ``inputs``
alone (MaskGIT or ROAR, :func:`~mmsuite.lightning_modules.fourm.generate.generate_chain`) and scores the clip's
attributes (figure colour, action) in what it generated:

* ``image -> caption`` (target ``caption``): the generated caption is detokenised with the data's text BPE and
  parsed (:func:`mmsuite.sources.toyworld.caption_attributes`): the colour is the word right before "figure" (so a
  background colour never counts), the action is the earliest action phrase in the text ("waving its left arm", ...);
* ``caption -> image`` (target an image modality): the generated image tokens are classified by
  :class:`AttributeProbe`, a small convolutional classifier over the token grid fitted once, at the first
  evaluation, on the real frames of the TRAIN split. Its accuracy on the real frames of the evaluated split is
  logged beside it (``probe_real_*``): the ceiling of what the probe can read. The probe sees one frame, so it
  can read the figure's colour, but an action only as far as one frame shows it (a raised arm, a low squat, a
  figure in the air); walking left and walking right look alike in a single frame.

Logged per task (epoch means, ``{prefix}/{task}/...``): ``color_acc``, ``action_acc``, ``both_acc``, with
``*_majority_acc`` (always answering the train split's most common value) and ``*_chance`` (one over the number
of values) beside them, and ``token_acc`` (generated vs true tokens); image -> caption adds ``exact_caption``.
The DataModule supplies the labels (``attr_color``, ``attr_action`` in the batch), the value names, the train
split's counts, the text tokenizer and the probe's training frames (``mmsuite.datamodules.nano4m``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmsuite.sources.toyworld import caption_attributes

ATTRIBUTES = ("color", "action")


# -- the attribute probe --------------------------------------------------------------------------------------
class _ProbeNet(nn.Module):
    def __init__(self, vocab: int, levels: Sequence[int] | None, width: int, n_out: int):
        super().__init__()
        self.levels = [int(v) for v in levels] if levels else None
        if self.levels is None:  # plain codes: a learned table
            self.table = nn.Embedding(vocab, width)
            c_in = width
        else:  # FSQ codes: the one-hot digit of every channel (similar codes share digits)
            self.register_buffer("basis", torch.cumprod(torch.tensor([1] + self.levels[:-1]), 0), persistent=False)
            self.register_buffer("starts", torch.cumsum(torch.tensor([0] + self.levels[:-1]), 0), persistent=False)
            c_in = sum(self.levels)
        self.body = nn.Sequential(
            nn.Conv2d(c_in, width, 3, padding=1), nn.GELU(), nn.Conv2d(width, width, 3, padding=1), nn.GELU()
        )
        self.head = nn.Linear(2 * width, n_out)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        n = tokens.shape[0]
        if self.levels is None:
            x = self.table(tokens)
        else:
            digits = (tokens[..., None] // self.basis) % torch.tensor(self.levels) + self.starts
            x = torch.zeros(*tokens.shape, sum(self.levels)).scatter_(2, digits, 1.0)
        h = self.body(x.transpose(1, 2).reshape(n, -1, *grid))
        return self.head(torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1))


class AttributeProbe:
    """A small classifier of clip attributes from one frame's image tokens (local ids ``[N, h*w]``).

    Each token becomes the one-hot digits of its FSQ code (``levels``; a learned table otherwise); two 3x3
    convolutions over the token grid, then the mean and the max over the grid (a bag of local code patterns, so a
    figure's colour counts wherever the figure stands), then one linear head per attribute. Fitted with AdamW and a
    one-cycle schedule on cross-entropy, seeded. Kept out of every checkpoint (the evaluation holds it off the
    LightningModule's state).

    Measured on the toy world (``experiments/nano4m/README.md``): trained on the train split's real frames it reads
    the colour of held-out val frames well and the action only a little above chance: one frame cannot tell walking
    left from walking right, and shows a wave, jump or squat only in some phases of the motion."""

    def __init__(
        self,
        vocab: int,
        grid: Sequence[int],
        classes: Mapping[str, int],
        levels: Sequence[int] | None = None,
        width: int = 32,
        seed: int = 0,
    ):
        self.vocab, self.grid = int(vocab), (int(grid[0]), int(grid[1]))
        self.classes = {a: int(n) for a, n in classes.items()}
        if levels and int(np.prod(levels)) != self.vocab:
            raise ValueError(f"FSQ levels {list(levels)} make {int(np.prod(levels))} codes, vocab is {vocab}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = _ProbeNet(self.vocab, levels, width, sum(self.classes.values())).eval()
        self.seed = int(seed)

    def _check(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.long().cpu()
        length = self.grid[0] * self.grid[1]
        if tokens.ndim != 2 or tokens.shape[1] != length:
            raise ValueError(f"the probe reads [N, {length}] image tokens, got {tuple(tokens.shape)}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab):
            raise ValueError(f"image tokens must be local ids in [0, {self.vocab})")
        return tokens

    def _split(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for a, n in self.classes.items():
            out[a], i = z[:, i : i + n], i + n
        return out

    def fit(
        self,
        tokens: torch.Tensor,
        labels: Mapping[str, torch.Tensor],
        epochs: int = 15,
        batch_size: int = 128,
        lr: float = 3e-3,
        weight_decay: float = 1e-2,
    ) -> dict[str, float]:
        """Fit on ``tokens [N, h*w]`` and ``labels {attribute: [N]}``; -> the training accuracy per attribute."""
        tokens = self._check(tokens)
        y = {a: labels[a].long().cpu() for a in self.classes}
        n = tokens.shape[0]
        batch_size = min(int(batch_size), n)
        per_epoch = n // batch_size
        opt = torch.optim.AdamW(self.net.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(int(epochs) * per_epoch, 1))
        gen = torch.Generator().manual_seed(self.seed)
        self.net.train()
        with torch.inference_mode(False), torch.enable_grad():
            for _ in range(int(epochs)):
                order = torch.randperm(n, generator=gen)
                for i in range(per_epoch):
                    idx = order[i * batch_size : (i + 1) * batch_size]
                    z = self._split(self.net(tokens[idx], self.grid))
                    loss = sum(F.cross_entropy(z[a], y[a][idx]) for a in self.classes)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
        self.net.eval()
        pred = self.predict(tokens)
        return {a: float((pred[a] == y[a]).float().mean()) for a in self.classes}

    @torch.no_grad()
    def predict(self, tokens: torch.Tensor, batch_size: int = 512) -> dict[str, torch.Tensor]:
        """``{attribute: class index [N]}`` (CPU)."""
        tokens = self._check(tokens)
        z = [self.net(tokens[i : i + batch_size], self.grid) for i in range(0, tokens.shape[0], batch_size)]
        z = self._split(torch.cat(z) if z else torch.zeros(0, sum(self.classes.values())))
        return {a: v.argmax(-1) for a, v in z.items()}


# -- the evaluation task ----------------------------------------------------------------------------------------
def _datamodule(module):
    dm = module.trainer.datamodule if module._trainer is not None else None
    for need in ("attribute_values", "attribute_counts", "probe_data", "start"):
        if not hasattr(dm, need):
            raise RuntimeError(
                "an attributes task needs the nano4m DataModule (attribute labels, values, train-split counts, text "
                f"tokenizer, probe frames); the trainer's DataModule is {type(dm).__name__}"
            )
    return dm


def _probe(module, dm, image: str) -> AttributeProbe:
    """The probe of ``module`` for image modality ``image``, fitted on the train split's real frames at first use."""
    cache = module.__dict__.setdefault("_attribute_probes", {})
    if image not in cache:
        k = module.net.index(image)
        spec = module.net.specs[k]
        classes = {a: len(dm.attribute_values[a]) for a in ATTRIBUTES}
        t0 = time.perf_counter()
        # eval.py validates under torch.inference_mode: its tensors could not be trained, so build and fit outside it
        with torch.inference_mode(False), torch.enable_grad():
            probe = AttributeProbe(module.net.vocabs[k], spec["grid"], classes, spec.get("levels"), seed=module.seed)
            tokens, labels = dm.probe_data("train")
            acc = probe.fit(tokens, labels)
        shown = ", ".join(f"{a} {v:.3f}" for a, v in acc.items())
        took = time.perf_counter() - t0
        say = getattr(module, "print", print)  # a LightningModule prints above the progress bar
        say(f"[mmsuite] attribute probe: {len(tokens)} train frames, {took:.1f} s, train accuracy {shown}")
        cache[image] = probe
    return cache[image]


def generate_chained(
    module,
    tokens: torch.Tensor,
    inputs: Sequence[str],
    targets: Sequence[str],
    settings: dict,
    batch_idx: int,
    constraints: Mapping | None = None,
) -> torch.Tensor:
    """``targets`` generated in order from ``inputs`` alone (each finished target is input to the next), with the
    ``settings`` ``scheme``, ``steps``, ``temperature``, ``top_k``, ``top_p``, seeded by the module's seed and
    ``batch_idx``; ``constraints``: optional per-slot hooks by target name
    (:data:`~mmsuite.lightning_modules.fourm.generate.Constraint`). -> every modality, local ids ``[B, S]`` (the
    positions of modalities neither given nor generated hold 0)."""
    from mmsuite.lightning_modules.fourm.generate import generate_chain

    known = torch.zeros_like(tokens, dtype=torch.bool)
    for name in inputs:
        _, off, length = module._modality(name)
        known[:, off : off + length] = True
    gen = torch.Generator(device=tokens.device).manual_seed(int(module.seed) * 1_000_003 + int(batch_idx))
    constraints = constraints or {}
    out, _ = generate_chain(
        module.net,
        tokens.masked_fill(~known, 0),
        known,
        [{"target": t, "constrain": constraints.get(t)} for t in targets],
        steps=settings["steps"],
        scheme=settings["scheme"],
        temperature=settings["temperature"],
        top_k=settings.get("top_k"),
        top_p=settings.get("top_p"),
        generator=gen,
    )
    return out


def generate_target(module, tokens: torch.Tensor, task: dict, batch_idx: int, constrain=None) -> torch.Tensor:
    """``task['target']`` (local ids ``[B, length]``) generated from ``task['inputs']`` alone, with the task's
    generation settings (:func:`generate_chained`); ``constrain``: an optional per-slot hook."""
    target = task["target"]
    out = generate_chained(module, tokens, task["inputs"], [target], task, batch_idx, {target: constrain})
    _, off, length = module._modality(target)
    return out[:, off : off + length]


def decode_captions(dm, local: torch.Tensor) -> list[str]:
    """Local caption ids ``[B, L]`` -> text; specials (pad, ...) and ids past the trained vocabulary are dropped."""
    text = dm.text_tokenizer
    start, n = dm.start("caption"), text.vocab_size
    return [text.decode([start + i for i in row if i < n]) for row in local.cpu().tolist()]


def attribute_metric_names(task: dict, image_target: bool) -> list[str]:
    """The metrics :func:`eval_attribute_task` reports for ``task`` (under ``{task name}/``); ``image_target``: its
    target modality is image-like (has a grid), so the attribute probe reads it."""
    if image_target:
        names = ["token_acc", *(f"probe_real_{a}_acc" for a in ATTRIBUTES)]
    elif task["target"] == "caption":
        names = ["token_acc", "exact_caption"]
    else:
        raise ValueError(
            f"attributes task {task['name']!r}: target must be 'caption' or an image modality, got {task['target']!r}"
        )
    names += [f"{a}_{key}" for a in ATTRIBUTES for key in ("acc", "majority_acc", "chance")]
    return [*names, "both_acc"]


def eval_attribute_task(module, task: dict, batch: dict, batch_idx: int) -> None:
    """Generate ``task['target']`` from ``task['inputs']`` and add the attribute metrics (module docstring,
    :func:`attribute_metric_names`) to the module's epoch means (``module._accumulate``; logged as
    ``val/<task name>/...`` or ``test/...`` at the end of the epoch)."""
    dm = _datamodule(module)
    tokens, name, target = batch["tokens"], task["name"], task["target"]

    def accumulate(key: str, values: torch.Tensor) -> None:
        module._accumulate(f"{name}/{key}", values.float())

    k, off, length = module._modality(target)
    truth = {a: batch[f"attr_{a}"].cpu() for a in ATTRIBUTES}
    pred_tokens = generate_target(module, tokens, task, batch_idx)
    accumulate("token_acc", pred_tokens == tokens[:, off : off + length])

    if module.net.modalities[k].grid is not None:  # an image-like target: read by the probe
        probe = _probe(module, dm, target)
        pred = probe.predict(pred_tokens)
        real = probe.predict(tokens[:, off : off + length])
        for a in ATTRIBUTES:
            accumulate(f"probe_real_{a}_acc", real[a] == truth[a])
    else:  # the caption (attribute_metric_names admitted no other target when the module was built)
        texts = decode_captions(dm, pred_tokens)
        true_texts = decode_captions(dm, tokens[:, off : off + length])
        accumulate("exact_caption", torch.tensor([t == u for t, u in zip(texts, true_texts)]))
        values = dm.attribute_values
        said = [caption_attributes(t, values["color"], values["action"]) for t in texts]
        pred = {a: torch.tensor([values[a].index(s[a]) if s[a] else -1 for s in said]) for a in ATTRIBUTES}

    for a in ATTRIBUTES:
        counts = dm.attribute_counts[a]
        majority = dm.attribute_values[a].index(max(counts, key=counts.get))
        accumulate(f"{a}_acc", pred[a] == truth[a])
        accumulate(f"{a}_majority_acc", truth[a] == majority)
        accumulate(f"{a}_chance", torch.full((len(truth[a]),), 1.0 / len(dm.attribute_values[a])))
    both = torch.stack([pred[a] == truth[a] for a in ATTRIBUTES]).all(0)
    accumulate("both_acc", both)
