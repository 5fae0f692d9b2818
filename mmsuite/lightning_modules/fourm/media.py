"""nano4m's samples: what the model makes of a few clips, to look at and listen to.

From one batch (local ids), one row per distinct clip (a clip's frames share its caption and sound), each target
generated from one modality alone with the ``generation`` settings (scheme, steps, temperature):

* caption -> image: the generated frame beside the clip's real one, the prompt written under them;
* image -> caption: the generated caption beside the real frame it was read from;
* caption -> sound: the generated sound track decoded to audio, with its prompt;
* sound -> caption: the caption generated from the clip's real sound track;
* a chained any-to-any example (:func:`write_samples` only): from ``generation.given`` alone, ``generation.chain``
  in order, each finished modality input to the next (nano4m: sound -> caption -> image).

:func:`make_samples` generates them once; :func:`log_validation_samples` sends them to every logger at the end of
each validation (``val/caption_to_image``, ``val/image_to_caption``, ``val/caption_to_audio/<i>`` with
``val/caption_to_audio/prompts``, ``val/audio_to_caption``; :mod:`mmsuite.callbacks.samples`) and
:func:`write_samples` writes them as files for ``generate.py``. Frames and sounds are decoded with the data's image
and audio tokenizers (loaded once, kept off the module's state).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import torch

from mmsuite.callbacks.samples import log_audio, log_image_grid, log_text, make_grid
from mmsuite.lightning_modules.fourm.attributes import decode_captions, generate_chained, generate_target

TILE = 96  # pixels per side of a frame in the grid (nearest-neighbour upscaled)
TEXT_LINES = 4
TEXT_WIDTH = 240  # pixels of text beside a frame (image -> caption)


def codebook_constraint(n_q: int, bins: int):
    """Generation hook for frame-major audio ids: slot ``t * n_q + k`` may only take codebook ``k``'s ids
    ``[k * bins, (k + 1) * bins)`` (the audio tokenizer decodes nothing else there)."""

    def constrain(logits: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        first = (slot % n_q)[:, None] * bins
        ids = torch.arange(logits.shape[-1], device=logits.device)[None]
        return logits.masked_fill((ids < first) | (ids >= first + bins), float("-inf"))

    return constrain


def _tokenizers(module, dm) -> dict:
    """The data's image and audio tokenizers, loaded at first use and cached beside (not in) the module's state."""
    cache = module.__dict__.setdefault("_media_tokenizers", {})
    if not cache:
        from mmsuite.tokenizers.image import ImageTokenizer

        k = module.net.index("tok_rgb")
        h, _ = module.net.modalities[k].grid
        ckpt = dm.image_tokenizer["ckpt"]
        size = h * ImageTokenizer.from_checkpoint(ckpt).downsample
        cache["image"] = ImageTokenizer.from_checkpoint(ckpt, image_size=size)
        if "audio" in module.names:
            from mmsuite.tokenizers.audio import audio_tokenizer_from_checkpoint

            cache["audio"] = audio_tokenizer_from_checkpoint(dm.audio_tokenizer["ckpt"], token_space=dm.token_space)
    return cache


def _distinct_clips(module, tokens: torch.Tensor, n: int) -> torch.Tensor:
    """The first row of each distinct caption in ``tokens`` (a clip's frames share it), at most ``n`` rows."""
    _, off, length = module._modality("caption")
    seen, keep = set(), []
    for i, row in enumerate(tokens[:, off : off + length].tolist()):
        if tuple(row) not in seen and len(keep) < n:
            seen.add(tuple(row))
            keep.append(i)
    return tokens[keep]


def _captioned_tiles(frames: list[torch.Tensor], texts: list[str], beside: bool = False) -> torch.Tensor:
    """uint8 ``[N, 3, H, W]``: per row, its frames ``[H, W, 3]`` side by side, the text wrapped under them (or
    beside them, ``beside``)."""
    from PIL import Image, ImageDraw

    tiles = []
    for i, text in enumerate(texts):
        images = [Image.fromarray(f[i].numpy()).resize((TILE, TILE), Image.NEAREST) for f in frames]
        width = TILE * len(images) + 4 * (len(images) - 1)
        if beside:
            canvas = Image.new("RGB", (width + 4 + TEXT_WIDTH, TILE), "black")
            at, text_width, max_lines = (width + 4, 2), TEXT_WIDTH, TILE // 12
        else:
            canvas = Image.new("RGB", (width, TILE + 12 * TEXT_LINES + 4), "black")
            at, text_width, max_lines = (2, TILE + 2), width, TEXT_LINES
        for j, image in enumerate(images):
            canvas.paste(image, (j * (TILE + 4), 0))
        lines = [line for part in text.split("\n") for line in textwrap.wrap(part, width=max(text_width // 6, 8))]
        ImageDraw.Draw(canvas).multiline_text(at, "\n".join(lines[:max_lines]), fill="white", spacing=1)
        tiles.append(torch.from_numpy(np.array(canvas)).permute(2, 0, 1))
    return torch.stack(tiles)


@torch.no_grad()
def make_samples(module, dm, tokens: torch.Tensor, n: int, chain: bool = False) -> dict:
    """Generate the samples of the module docstring from ``tokens`` (local ids ``[B, S]``, at most ``n`` distinct
    clips) -> a dict of what was made: ``prompts`` (true captions), ``caption_to_image`` / ``real_frames`` (uint8
    ``[N, H, W, 3]``), ``image_to_caption``, ``caption_to_audio`` (float ``[N, samples]``, with ``sample_rate``),
    ``real_audio``, ``audio_to_caption``, and with ``chain`` a ``chain`` dict (``given``, ``targets``, ``caption``,
    ``frames``, ``audio``: what the chain made, None where it made none)."""
    g = module.generation
    rows = _distinct_clips(module, tokens, n)
    settings = {"scheme": g.scheme, "steps": g.steps, "temperature": g.temperature, "top_k": None, "top_p": None}
    _, off, length = module._modality("caption")
    out = {"prompts": decode_captions(dm, rows[:, off : off + length])}
    tok = _tokenizers(module, dm)
    constraints = {}
    if "audio" in module.names:
        constraints["audio"] = codebook_constraint(tok["audio"].n_q, tok["audio"].bins)

    def frames(ids):
        k = module.net.index("tok_rgb")
        h, w = module.net.modalities[k].grid
        return module._decode_frames(tok["image"], ids, h, w)

    def sound(ids):
        return tok["audio"].decode(ids.cpu() + dm.start("audio"))[:, 0]

    def made(inputs, target):
        task = {**settings, "inputs": inputs, "target": target}
        return generate_target(module, rows, task, 0, constrain=constraints.get(target))

    def part(name, ids):
        _, start, size = module._modality(name)
        return ids[:, start : start + size]

    if "tok_rgb" in module.names:
        out["caption_to_image"] = frames(made(["caption"], "tok_rgb"))
        out["real_frames"] = frames(part("tok_rgb", rows))
        out["image_to_caption"] = decode_captions(dm, made(["tok_rgb"], "caption"))
    if "audio" in module.names:
        out["sample_rate"] = tok["audio"].sample_rate
        out["caption_to_audio"] = sound(made(["caption"], "audio"))
        out["real_audio"] = sound(part("audio", rows))
        out["audio_to_caption"] = decode_captions(dm, made(["audio"], "caption"))
    if chain:
        given, targets = list(g.given), list(g.chain)
        ids = generate_chained(module, rows, given, targets, settings, 0, constraints)
        out["chain"] = {
            "given": given,
            "targets": targets,
            "caption": decode_captions(dm, part("caption", ids)) if "caption" in targets else None,
            "frames": frames(part("tok_rgb", ids)) if "tok_rgb" in targets else None,
            "audio": sound(part("audio", ids)) if "audio" in targets else None,
        }
    return out


@torch.no_grad()
def log_validation_samples(module, tokens: torch.Tensor) -> None:
    """Generate (:func:`make_samples`) and log the samples from validation ``tokens`` (local ids ``[B, S]``)."""
    trainer, step = module.trainer, module.global_step
    s = make_samples(module, trainer.datamodule, tokens, module.generation.grid_samples)
    prompts = s["prompts"]
    if "caption_to_image" in s:
        tiles = _captioned_tiles(
            [s["caption_to_image"], s["real_frames"]], [f"{i}: {p} (made | real)" for i, p in enumerate(prompts)]
        )
        log_image_grid(trainer, "val/caption_to_image", tiles, nrow=min(4, len(tiles)), step=step)
        table = [[str(i), text, true] for i, (text, true) in enumerate(zip(s["image_to_caption"], prompts))]
        log_text(trainer, "val/image_to_caption", ["clip", "generated caption", "true caption"], table, step=step)
    if "caption_to_audio" in s:
        log_audio(trainer, "val/caption_to_audio", s["caption_to_audio"], s["sample_rate"], step=step)
        rows_text = [[str(i), p] for i, p in enumerate(prompts)]
        log_text(trainer, "val/caption_to_audio/prompts", ["clip", "prompt"], rows_text, step=step)
        table = [[str(i), text, true] for i, (text, true) in enumerate(zip(s["audio_to_caption"], prompts))]
        log_text(trainer, "val/audio_to_caption", ["clip", "caption from the sound", "true caption"], table, step=step)


@torch.no_grad()
def write_samples(module, dm, tokens: torch.Tensor, out_dir, n: int) -> list[Path]:
    """Generate (:func:`make_samples`, with the chain) from ``tokens`` and write them to ``out_dir`` -> the files:
    ``caption_to_image.png`` (made | real frame, the prompt under them), ``image_to_caption.png`` (the frame, the
    generated and true caption beside it), ``caption_to_sound_<i>.wav``, ``sound_to_caption_<i>.wav`` (the real
    sound the caption was generated from), ``chain.png`` / ``chain_<i>.wav`` (what the chain made), and
    ``samples.json`` holding every prompt and generated caption with the files they belong to."""
    from PIL import Image

    from mmsuite.sources.wav import write_wav

    out_dir = Path(out_dir)
    s = make_samples(module, dm, tokens, n, chain=True)
    prompts, written = s["prompts"], []
    record = {"prompts": prompts}

    def png(name, tiles, nrow):
        written.append(out_dir / name)
        Image.fromarray(np.ascontiguousarray(make_grid(tiles, nrow).permute(1, 2, 0).numpy())).save(written[-1])
        return name

    def wavs(stem, clips):
        names = []
        for i, clip in enumerate(clips):
            written.append(write_wav(out_dir / f"{stem}_{i}.wav", clip.clamp(-1, 1).numpy(), s["sample_rate"]))
            names.append(written[-1].name)
        return names

    if "caption_to_image" in s:
        tiles = _captioned_tiles([s["caption_to_image"], s["real_frames"]], [f"{p} (made | real)" for p in prompts])
        record["caption_to_image"] = {"file": png("caption_to_image.png", tiles, 4), "prompts": prompts}
        texts = [f"made: {m}\ntrue: {t}" for m, t in zip(s["image_to_caption"], prompts)]
        tiles = _captioned_tiles([s["real_frames"]], texts, beside=True)
        record["image_to_caption"] = {"file": png("image_to_caption.png", tiles, 1), "captions": s["image_to_caption"]}
    if "caption_to_audio" in s:
        record["caption_to_sound"] = {"files": wavs("caption_to_sound", s["caption_to_audio"]), "prompts": prompts}
        record["sound_to_caption"] = {
            "files": wavs("sound_to_caption", s["real_audio"]),
            "captions": s["audio_to_caption"],
        }
    c = s["chain"]
    chain = {"given": c["given"], "targets": c["targets"], "caption": c["caption"]}
    if "audio" in c["given"] and "sound_to_caption" in record:  # the real sounds it started from
        chain["given_files"] = record["sound_to_caption"]["files"]
    if c["frames"] is not None:
        texts = c["caption"] or [" -> ".join(c["given"] + c["targets"])] * len(c["frames"])
        chain["file"] = png("chain.png", _captioned_tiles([c["frames"]], texts), 4)
    if c["audio"] is not None:
        chain["files"] = wavs("chain", c["audio"])
    record["chain"] = chain
    written.append(out_dir / "samples.json")
    written[-1].write_text(json.dumps(record, indent=1) + "\n")
    return written
