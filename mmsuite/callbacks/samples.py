"""Send image grids (e.g. originals above reconstructions), audio clips and text tables to whatever loggers a
trainer has.

No torchvision: :func:`make_grid` is a few lines of tensor code. TensorBoard gets ``add_image`` /
``add_audio`` / ``add_text``, W&B gets ``log_image`` / ``log_audio`` / ``log_text`` (wandb is only touched through
Lightning's logger, lazily), every other logger (CSV, ...) gets PNG / 16-bit WAV / Markdown files under
``<log_dir>/samples/``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def make_grid(images: torch.Tensor, nrow: int, padding: int = 2, pad_value: int = 255) -> torch.Tensor:
    """uint8 ``[N, 3, H, W]`` -> one uint8 ``[3, rows*(H+p)+p, nrow*(W+p)+p]`` image, filled row by row."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, 3, H, W] (or [N, 1, H, W]), got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8, got {images.dtype}")
    images = images.detach().cpu()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    n, c, h, w = images.shape
    nrow = max(1, min(int(nrow), max(n, 1)))
    rows = max(1, math.ceil(n / nrow))
    grid = torch.full((c, rows * (h + padding) + padding, nrow * (w + padding) + padding), pad_value, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, y : y + h, x : x + w] = images[i]
    return grid


def _safe_tag(tag: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in tag.replace("/", "_"))


def log_image_grid(trainer, tag: str, images: torch.Tensor, nrow: int, step: int | None = None) -> list[Path]:
    """Build a grid from uint8 ``images`` ``[N, 3, H, W]`` and send it to every logger of ``trainer``.

    Rank zero only (other ranks return at once). Returns the PNG files written (for file-based loggers).
    """
    if not getattr(trainer, "is_global_zero", True):
        return []
    grid = make_grid(images, nrow)
    step = int(trainer.global_step) if step is None else int(step)
    written: list[Path] = []
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    for logger in getattr(trainer, "loggers", None) or []:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, grid, step, dataformats="CHW")
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=tag, images=[grid.permute(1, 2, 0).numpy()], step=step)
        else:
            from PIL import Image

            root = getattr(logger, "log_dir", None) or trainer.default_root_dir
            path = Path(root) / "samples" / f"{_safe_tag(tag)}_step{step}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(grid.permute(1, 2, 0).numpy())).save(path)
            written.append(path)
    return written


def log_audio(trainer, tag: str, audio: torch.Tensor, sample_rate: int, step: int | None = None) -> list[Path]:
    """Send float clips ``audio`` ``[N, S]`` (mono, clipped to [-1, 1]) to every logger of ``trainer``, as
    ``{tag}/{i}``. Rank zero only. Returns the WAV files written (for file-based loggers)."""
    if not getattr(trainer, "is_global_zero", True):
        return []
    if audio.ndim != 2:
        raise ValueError(f"audio must be [N, S] (mono clips), got shape {tuple(audio.shape)}")
    clips = audio.detach().float().clamp(-1, 1).cpu()
    step = int(trainer.global_step) if step is None else int(step)
    written: list[Path] = []
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    for logger in getattr(trainer, "loggers", None) or []:
        if isinstance(logger, TensorBoardLogger):
            for i, clip in enumerate(clips):
                logger.experiment.add_audio(f"{tag}/{i}", clip[None], step, sample_rate=int(sample_rate))
        elif isinstance(logger, WandbLogger):
            rates = [int(sample_rate)] * len(clips)
            logger.log_audio(key=tag, audios=[c.numpy() for c in clips], step=step, sample_rate=rates)
        else:
            from mmsuite.sources.wav import write_wav

            root = Path(getattr(logger, "log_dir", None) or trainer.default_root_dir) / "samples"
            root.mkdir(parents=True, exist_ok=True)
            for i, clip in enumerate(clips):
                written.append(write_wav(root / f"{_safe_tag(tag)}_step{step}_{i}.wav", clip.numpy(), sample_rate))
    return written


def log_text(trainer, tag: str, columns: list[str], rows: list[list[str]], step: int | None = None) -> list[Path]:
    """Send a table of text (e.g. prompts and what the model wrote) to every logger of ``trainer``: TensorBoard and
    file loggers get it as a Markdown table, W&B as a table. Rank zero only. Returns the files written."""
    if not getattr(trainer, "is_global_zero", True):
        return []
    cell = lambda text: str(text).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(map(cell, columns)) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    markdown = "\n".join(lines)
    step = int(trainer.global_step) if step is None else int(step)
    written: list[Path] = []
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    for logger in getattr(trainer, "loggers", None) or []:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(tag, markdown, step)
        elif isinstance(logger, WandbLogger):
            logger.log_text(key=tag, columns=list(columns), data=[[str(c) for c in row] for row in rows], step=step)
        else:
            root = Path(getattr(logger, "log_dir", None) or trainer.default_root_dir) / "samples"
            root.mkdir(parents=True, exist_ok=True)
            path = root / f"{_safe_tag(tag)}_step{step}.md"
            path.write_text(markdown + "\n")
            written.append(path)
    return written


def gif_bytes(frames: torch.Tensor | np.ndarray, fps: float = 4.0) -> bytes:
    """uint8 ``[T, H, W, 3]`` -> an animated GIF (looping), encoded with PIL."""
    import io

    from PIL import Image

    arr = np.ascontiguousarray(frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else frames)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8 or len(arr) == 0:
        raise ValueError(f"frames must be uint8 [T, H, W, 3] with T >= 1, got {arr.dtype} {arr.shape}")
    images = [Image.fromarray(f) for f in arr]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return buf.getvalue()


def log_gif(trainer, tag: str, frames: torch.Tensor, fps: float = 4.0, step: int | None = None) -> list[Path]:
    """Send a clip uint8 ``[T, H, W, 3]`` as an animated GIF to every logger of ``trainer`` (rank zero only).

    TensorBoard gets an image summary whose encoded image is the GIF (what ``add_video`` writes, without
    moviepy), W&B a ``wandb.Video``; other loggers a ``.gif`` file under ``samples/``. Returns the files written.
    """
    if not getattr(trainer, "is_global_zero", True):
        return []
    data = gif_bytes(frames, fps)
    t, h, w = (int(s) for s in frames.shape[:3])
    step = int(trainer.global_step) if step is None else int(step)
    written: list[Path] = []
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    for logger in getattr(trainer, "loggers", None) or []:
        if isinstance(logger, TensorBoardLogger):
            from tensorboard.compat.proto.summary_pb2 import Summary

            image = Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=data)
            logger.experiment._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
        elif isinstance(logger, WandbLogger):
            import wandb

            clip = np.ascontiguousarray(np.asarray(frames.cpu() if isinstance(frames, torch.Tensor) else frames))
            logger.experiment.log({tag: wandb.Video(clip.transpose(0, 3, 1, 2), fps=int(fps))}, step=step)
        else:
            root = Path(getattr(logger, "log_dir", None) or trainer.default_root_dir)
            path = root / "samples" / f"{_safe_tag(tag)}_step{step}.gif"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            written.append(path)
    return written
