"""nano4m's validation samples: what the model makes of a few validation clips, to look at and listen to.

At the end of every validation (not the sanity check), from the first validation batch, one row per distinct clip
(up to ``generation.grid_samples``), each target generated from one modality alone with the ``generation`` settings
(scheme, steps, temperature):

* caption -> image: the generated frame beside the clip's real one, the prompt written under them, as one grid
  (``val/caption_to_image``);
* caption -> sound: the generated sound track decoded to audio (``val/caption_to_audio/<i>``), with the prompts as a
  table (``val/caption_to_audio/prompts``);
* image -> caption: the generated and the true caption of each frame as a table (``val/image_to_caption``).

They go to every logger through :mod:`mmsuite.callbacks.samples`. Frames and sounds are decoded with the data's image
and audio tokenizers (loaded once, kept off the module's state).
"""

from __future__ import annotations

import numpy as np
import torch

from mmsuite.callbacks.samples import log_audio, log_image_grid, log_text
from mmsuite.lightning_modules.fourm.attributes import decode_captions, generate_target

TILE = 96  # pixels per side of a frame in the grid (nearest-neighbour upscaled)
TEXT_LINES = 4


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


def _captioned_tiles(frames: list[torch.Tensor], prompts: list[str]) -> torch.Tensor:
    """uint8 ``[N, 3, H, W]``: per row, its frames ``[H, W, 3]`` side by side, the prompt wrapped under them."""
    import textwrap

    from PIL import Image, ImageDraw

    tiles = []
    for i, prompt in enumerate(prompts):
        images = [Image.fromarray(f[i].numpy()).resize((TILE, TILE), Image.NEAREST) for f in frames]
        width = TILE * len(images) + 4 * (len(images) - 1)
        canvas = Image.new("RGB", (width, TILE + 12 * TEXT_LINES + 4), "black")
        for j, image in enumerate(images):
            canvas.paste(image, (j * (TILE + 4), 0))
        lines = textwrap.wrap(prompt, width=max(width // 6, 8))[:TEXT_LINES]
        ImageDraw.Draw(canvas).multiline_text((2, TILE + 2), "\n".join(lines), fill="white", spacing=1)
        tiles.append(torch.from_numpy(np.array(canvas)).permute(2, 0, 1))
    return torch.stack(tiles)


@torch.no_grad()
def log_validation_samples(module, tokens: torch.Tensor) -> None:
    """Generate and log the samples of the module docstring from validation ``tokens`` (local ids ``[B, S]``)."""
    dm = module.trainer.datamodule
    g = module.generation
    rows = _distinct_clips(module, tokens, g.grid_samples)
    settings = {"scheme": g.scheme, "steps": g.steps, "temperature": g.temperature, "top_k": None, "top_p": None}
    step, trainer = module.global_step, module.trainer
    _, off, length = module._modality("caption")
    prompts = decode_captions(dm, rows[:, off : off + length])
    tok = _tokenizers(module, dm)

    if "tok_rgb" in module.names:
        k, ioff, ilen = module._modality("tok_rgb")
        h, w = module.net.modalities[k].grid
        made = generate_target(module, rows, {**settings, "inputs": ["caption"], "target": "tok_rgb"}, 0)
        frames = [module._decode_frames(tok["image"], ids, h, w) for ids in (made, rows[:, ioff : ioff + ilen])]
        tiles = _captioned_tiles(frames, [f"{i}: {p} (made | real)" for i, p in enumerate(prompts)])
        log_image_grid(trainer, "val/caption_to_image", tiles, nrow=min(4, len(tiles)), step=step)

        said = generate_target(module, rows, {**settings, "inputs": ["tok_rgb"], "target": "caption"}, 0)
        table = [[str(i), text, true] for i, (text, true) in enumerate(zip(decode_captions(dm, said), prompts))]
        log_text(trainer, "val/image_to_caption", ["clip", "generated caption", "true caption"], table, step=step)

    if "audio" in module.names:
        audio = tok["audio"]
        task = {**settings, "inputs": ["caption"], "target": "audio"}
        made = generate_target(module, rows, task, 0, constrain=codebook_constraint(audio.n_q, audio.bins))
        wav = audio.decode(made.cpu() + dm.start("audio"))[:, 0]
        log_audio(trainer, "val/caption_to_audio", wav, audio.sample_rate, step=step)
        rows_text = [[str(i), p] for i, p in enumerate(prompts)]
        log_text(trainer, "val/caption_to_audio/prompts", ["clip", "prompt"], rows_text, step=step)
