"""Captioned images and captioned audio from folders in the formats of public caption sets.

* Images, LLaVA-pretrain style: a JSON list of ``{"id", "image": "<path under the image folder>", "conversations":
  [{"from": "human", ...}, {"from": "gpt", "value": "<caption>"}]}`` (the caption is the first ``gpt`` turn; a
  plain ``"caption"`` key is read too).
* Audio, AudioCaps / Clotho style: a CSV with one audio file column and one or more caption columns. Clotho:
  ``file_name, caption_1 .. caption_5``; AudioCaps: ``audiocap_id, youtube_id, start_time, caption`` with the file
  named by ``youtube_id`` (or set ``file_column``). Every caption of a file is its own record; records of one file
  share the file's id, so a split by item keeps them together.

Readers yield small records (key, item id, file path, caption); :func:`load_image` and :func:`load_audio` turn a
file into what a tokenizer takes (uint8 ``[S, S, 3]``; float32 mono at the tokenizer's rate, at most ``max_seconds``
long: the source is shortened here, never a target in a sequence). Every problem names the file and the entry.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

AUDIO_EXTENSIONS = (".wav",)
_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class CaptionedFile:
    key: str  # a shard key: letters, digits, '_' and '-' only, unique within the reader
    item: str  # the source item (one image, one audio file): what the split is made by
    path: Path
    caption: str


def _key(*parts: str) -> str:
    return "-".join(_KEY_CHARS.sub("_", p).strip("_") or "x" for p in parts)


def read_llava_pretrain(json_path: str | os.PathLike, image_dir: str | os.PathLike) -> Iterator[CaptionedFile]:
    """The records of a LLaVA-pretrain style JSON file whose images lie under ``image_dir``."""
    json_path, image_dir = Path(json_path), Path(image_dir)
    if not json_path.is_file():
        raise FileNotFoundError(f"caption file not found: {json_path}")
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {image_dir}")
    try:
        entries = json.loads(json_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_path}: not valid JSON ({e})") from None
    if not isinstance(entries, list):
        raise ValueError(f"{json_path}: expected a JSON list of records, got {type(entries).__name__}")
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        where = f"{json_path} entry {i}"
        if not isinstance(entry, dict) or "image" not in entry:
            raise ValueError(f"{where}: a record needs an 'image' path, got {str(entry)[:120]}")
        caption = entry.get("caption")
        for turn in entry.get("conversations") or []:
            if isinstance(turn, dict) and turn.get("from") == "gpt":
                caption = turn.get("value")
                break
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"{where}: no caption (a 'gpt' turn in 'conversations', or 'caption')")
        path = image_dir / str(entry["image"])
        if not path.is_file():
            raise FileNotFoundError(f"{where}: image {path} not found")
        ident = str(entry.get("id", Path(str(entry["image"])).stem))
        key = _key(ident)
        if key in seen:
            raise ValueError(f"{where}: id {ident!r} gives the key {key!r} of an earlier record")
        seen.add(key)
        yield CaptionedFile(key=key, item=key, path=path, caption=" ".join(caption.split()))


def read_audio_captions(
    csv_path: str | os.PathLike, audio_dir: str | os.PathLike, file_column: str | None = None
) -> Iterator[CaptionedFile]:
    """The records of an AudioCaps / Clotho style CSV whose audio files lie in ``audio_dir``; ``file_column``:
    the column naming the file (default ``file_name``, else ``youtube_id``); a name without an extension gets
    ``.wav``. Caption columns: every column whose name starts with ``caption``."""
    csv_path, audio_dir = Path(csv_path), Path(audio_dir)
    if not csv_path.is_file():
        raise FileNotFoundError(f"caption file not found: {csv_path}")
    if not audio_dir.is_dir():
        raise FileNotFoundError(f"audio folder not found: {audio_dir}")
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
        header = list(rows[0]) if rows else []
    if file_column is None:
        file_column = next((c for c in ("file_name", "youtube_id") if c in header), None)
    if file_column is None or file_column not in header:
        raise ValueError(f"{csv_path}: no audio file column ({file_column or 'file_name or youtube_id'}) in {header}")
    caption_columns = [c for c in header if c.startswith("caption")]
    if not caption_columns:
        raise ValueError(f"{csv_path}: no caption column (a column named caption...) in {header}")
    seen: set[str] = set()
    for i, row in enumerate(rows):
        where = f"{csv_path} row {i + 2}"
        name = (row.get(file_column) or "").strip()
        if not name:
            raise ValueError(f"{where}: empty {file_column}")
        path = audio_dir / (name if Path(name).suffix else name + ".wav")
        if path.suffix.lower() not in AUDIO_EXTENSIONS:
            raise ValueError(f"{where}: {path.name} is not one of {AUDIO_EXTENSIONS} (convert it to 16-bit WAV)")
        if not path.is_file():
            raise FileNotFoundError(f"{where}: audio file {path} not found")
        item = _key(Path(name).stem)
        for j, column in enumerate(caption_columns):
            caption = " ".join((row.get(column) or "").split())
            if not caption:
                continue
            key = _key(item, f"c{j}")
            if key in seen:
                raise ValueError(f"{where}: the record {key!r} appears twice")
            seen.add(key)
            yield CaptionedFile(key=key, item=item, path=path, caption=caption)


def load_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """uint8 ``[size, size, 3]``: the image at ``path`` in RGB, resized on its shorter side and centre-cropped."""
    from PIL import Image, UnidentifiedImageError

    from mmsuite.sources.images import resize_center_crop

    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None
    return resize_center_crop(rgb, size)


def load_audio(path: str | os.PathLike, sample_rate: int, max_seconds: float | None = None) -> np.ndarray:
    """float32 mono ``[S]`` at ``sample_rate`` (channels averaged, polyphase resampling) from a 16-bit WAV file,
    cut to its first ``max_seconds``."""
    from math import gcd

    from scipy.signal import resample_poly

    from mmsuite.sources.wav import decode_wav

    path = Path(path)
    audio, rate = decode_wav(path.read_bytes(), str(path))
    mono = audio.mean(axis=0).astype(np.float64)
    if max_seconds is not None:
        mono = mono[: int(round(max_seconds * rate))]
    if rate != sample_rate:
        g = gcd(int(rate), int(sample_rate))
        mono = resample_poly(mono, int(sample_rate) // g, int(rate) // g)
    if mono.size == 0:
        raise ValueError(f"{path}: no audio samples")
    return np.clip(mono, -1.0, 1.0).astype(np.float32)
