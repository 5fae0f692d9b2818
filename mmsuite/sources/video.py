"""A folder of real videos as fixed-length clips of square frames, decoded with PyAV (``pip install av``).

``list_videos(root)`` finds the video files (sorted relative paths, which are the split ids: splits are by
video, never by frame). ``read_frames(path, fps, start_s, span_s, size)`` decodes one video, keeps one frame per
``1/fps`` seconds of presentation time from ``start_s`` for ``span_s`` seconds (``None``: to the end), and resizes
each on its shorter side to ``size`` and centre-crops it (uint8 ``[T, size, size, 3]``). ``cut_clips`` cuts that
into consecutive non-overlapping clips of ``clip_frames`` frames (the rest is dropped), so every sample of a data
set has the same length and windows by stride can be taken at load time.

``write_video`` encodes uint8 frames with PyAV (MPEG-4 part 2, always in FFmpeg): tests make their own folders.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")


def import_av():
    try:
        import av
    except ImportError:
        raise ImportError("reading a video folder needs PyAV: pip install av (or pip install -e '.[video]')") from None
    return av


def list_videos(root: str | Path, extensions: tuple[str, ...] = VIDEO_EXTENSIONS) -> list[str]:
    """Video files under ``root`` (recursively) as sorted paths relative to it; an empty folder is an error."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"video folder not found: {root} (data.source.root)")
    exts = {e.lower() for e in extensions}
    videos = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts)
    if not videos:
        raise FileNotFoundError(f"no video files ({', '.join(sorted(exts))}) under {root} (data.source.root)")
    return videos


def read_frames(
    path: str | Path, fps: float, size: int, start_s: float = 0.0, span_s: float | None = None
) -> np.ndarray:
    """Frames of one video at ``fps`` (by presentation time), resized + centre-cropped: uint8 ``[T, size, size, 3]``.

    A frame is kept when its timestamp reaches the next sampling time ``start_s + k/fps``; videos slower than
    ``fps`` therefore repeat no frame and give fewer frames. Decoding errors name the file.
    """
    from mmsuite.sources.images import resize_center_crop

    if not fps > 0:
        raise ValueError(f"data.source.fps must be positive, got {fps!r}")
    if span_s is not None and not span_s > 0:
        raise ValueError(f"data.source.span_s must be positive or null, got {span_s!r}")
    av = import_av()
    out: list[np.ndarray] = []
    end = None if span_s is None else start_s + span_s
    next_t = float(start_s)
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                if frame.time is None:
                    raise ValueError(f"{path}: a video frame has no timestamp")
                t = float(frame.time)
                if end is not None and t >= end:
                    break
                if t + 1e-6 < next_t:
                    continue
                rgb = frame.to_ndarray(format="rgb24")
                out.append(resize_center_crop(rgb, size))
                while next_t <= t + 1e-6:
                    next_t += 1.0 / fps
    except av.error.FFmpegError as e:
        raise ValueError(f"cannot decode video {path}: {e}") from None
    if not out:
        return np.zeros((0, size, size, 3), np.uint8)
    return np.stack(out)


def cut_clips(frames: np.ndarray, clip_frames: int) -> list[np.ndarray]:
    """Consecutive non-overlapping clips of exactly ``clip_frames`` frames; the remainder is dropped."""
    if clip_frames < 1:
        raise ValueError(f"clip_frames must be >= 1, got {clip_frames}")
    return [frames[s : s + clip_frames] for s in range(0, len(frames) - clip_frames + 1, clip_frames)]


def write_video(path: str | Path, frames: np.ndarray, fps: int = 10) -> Path:
    """Encode uint8 ``[T, H, W, 3]`` frames (H, W even) to ``path`` with MPEG-4 part 2 (for tests and examples)."""
    av = import_av()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=int(fps))
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 4_000_000
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
