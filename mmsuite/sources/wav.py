"""16-bit PCM WAV bytes and files with the standard library's :mod:`wave` (no torchaudio, no soundfile).

Float audio in [-1, 1] is written as int16 (``round(x * 32767)``, clipped) and read back as ``int16 / 32768``.
Used for ``.wav`` shard members and for the decoded audio that runs and ``generate.py`` write.
"""

from __future__ import annotations

import io
import os
import wave
from pathlib import Path

import numpy as np


def encode_wav(audio, sample_rate: int) -> bytes:
    """Float audio ``[S]`` (mono) or ``[C, S]`` in [-1, 1] -> the bytes of a 16-bit PCM WAV file."""
    x = np.asarray(audio, dtype=np.float64)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"audio must be [S] or [C, S] with S >= 1, got shape {np.shape(audio)}")
    if not np.isfinite(x).all():
        raise ValueError("audio holds NaN or inf samples")
    if isinstance(sample_rate, bool) or int(sample_rate) != sample_rate or sample_rate < 1:
        raise ValueError(f"sample_rate must be a positive integer, got {sample_rate!r}")
    pcm = np.clip(np.round(x * 32767.0), -32768, 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(pcm.shape[0])
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(np.ascontiguousarray(pcm.T).tobytes())  # interleaved frames
    return buf.getvalue()


def decode_wav(data: bytes, name: str = "<bytes>") -> tuple[np.ndarray, int]:
    """16-bit PCM WAV bytes -> (float32 ``[C, S]`` in [-1, 1), sample rate). ``name`` goes into errors."""
    try:
        with wave.open(io.BytesIO(data), "rb") as w:
            channels, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            frames = w.readframes(n)
    except (wave.Error, EOFError) as e:
        raise ValueError(f"{name}: not a readable WAV file ({e})") from None
    if width != 2:
        raise ValueError(f"{name}: {8 * width}-bit WAV; only 16-bit PCM is supported")
    pcm = np.frombuffer(frames, dtype="<i2")
    if pcm.size != n * channels:
        raise ValueError(f"{name}: truncated WAV data ({pcm.size} samples, header says {n * channels})")
    return (pcm.reshape(n, channels).T.astype(np.float32) / 32768.0), int(rate)


def write_wav(path: str | os.PathLike, audio, sample_rate: int) -> Path:
    """Write a 16-bit PCM WAV file atomically (temp file, fsync, rename); returns the path."""
    path = Path(path)
    data = encode_wav(audio, sample_rate)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
