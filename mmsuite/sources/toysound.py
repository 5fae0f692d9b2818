"""Procedural "toy-world sound": deterministic short captioned audio clips, plus sound tracks for toy-world videos.

Every clip is a pure function of ``(cfg.seed, index)`` (seeded with ``np.random.default_rng([seed, index])``, so
the call order and the global RNG play no part). A clip holds 1-3 non-overlapping events of one kind:

* ``beep``: a pure tone; ``rising_chirp`` / ``falling_chirp``: an exponential sweep across the pitch band;
* ``hum``: a tone with a few harmonics and a slow tremolo; ``noise_burst``: band-pass noise centred in the band;
* ``click_train``: a run of damped-sine clicks (the only kind with a sharp attack).

Each clip also draws a pitch class (low / mid / high, bands at least a third of an octave apart and below the
Nyquist frequency of the lowest allowed sample rate), a loudness (quiet / loud: the peak of every event) and a
length (short / long: the length of every event). The caption is built from these attributes alone, e.g.
"two loud short high beeps" or "a quiet long low hum". Events sit inside the clip with a small margin and a
minimum gap, and (click trains apart) begin and end with a raised-cosine fade, so the first and last sample of
an event is exactly zero. Audio is float32 in [-1, 1]. numpy only.

:func:`action_sound` makes a matching track for a toy-world video: a soft thud per footstep for the walks, a
rising-then-falling filtered-noise whoosh and a landing thud per jump, a quiet cloth rustle following the motion
for the arm waves and squats, and silence for ``idle``. Event times follow the toy world's motion phase
``phase + 2 pi t / period_frames`` (t in frames); pass the clip's period and phase to line them up exactly,
otherwise both are drawn from the toy world's ranges.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from mmsuite.sources.toyworld import ACTIONS, PERIODS

KINDS: tuple[str, ...] = ("beep", "rising_chirp", "falling_chirp", "hum", "noise_burst", "click_train")
KIND_NOUNS: dict[str, tuple[str, str]] = {  # (singular, plural)
    "beep": ("beep", "beeps"),
    "rising_chirp": ("rising chirp", "rising chirps"),
    "falling_chirp": ("falling chirp", "falling chirps"),
    "hum": ("hum", "hums"),
    "noise_burst": ("noise burst", "noise bursts"),
    "click_train": ("click train", "click trains"),
}
PITCHES: tuple[str, ...] = ("low", "mid", "high")
PITCH_WORDS: dict[str, str] = {"low": "low", "mid": "mid-pitched", "high": "high"}
PITCH_BANDS_HZ: dict[str, tuple[float, float]] = {  # a third of an octave or more apart, below 4 kHz
    "low": (150.0, 300.0),
    "mid": (400.0, 800.0),
    "high": (1000.0, 2500.0),
}
COUNTS: tuple[int, ...] = (1, 2, 3)
COUNT_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three"}
LOUDNESS_PEAKS: dict[str, tuple[float, float]] = {"quiet": (0.12, 0.22), "loud": (0.6, 0.9)}  # peak of each event
LENGTHS_S: dict[str, tuple[float, float]] = {"short": (0.06, 0.1), "long": (0.18, 0.26)}  # length of each event

MARGIN_S = 0.02  # silence kept at the start and the end of a clip
MIN_GAP_S = 0.05  # silence kept between two events
RELEASE_S = 0.005  # fade-out of every event
ATTACK_S: dict[str, float] = {  # fade-in per kind; click trains start sharply
    "beep": 0.005,
    "rising_chirp": 0.005,
    "falling_chirp": 0.005,
    "hum": 0.02,
    "noise_burst": 0.003,
    "click_train": 0.0,
}
CLICK_INTERVAL_S = (0.025, 0.04)  # time between two clicks of a click train
CHIRP_EDGE = 1.15  # a chirp starts and ends within this factor of its band's edges
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8000, 192000
MIN_DURATION_S, MAX_DURATION_S = 0.5, 60.0  # 0.5 s holds three short events (0.3 s), two gaps and two margins
MAX_NOISE_FLOOR = 0.05

ACTION_SOUNDS: dict[str, str] = {
    "walk_left": "footsteps",
    "walk_right": "footsteps",
    "wave_left_arm": "rustle",
    "wave_right_arm": "rustle",
    "jump": "whoosh",
    "squat": "rustle",
    "idle": "silence",
}


@dataclass(frozen=True)
class ToySoundConfig:
    """Settings of the toy sound source."""

    sample_rate: int = 24000
    duration_s: float = 1.0
    seed: int = 0
    noise_floor: float = 0.0  # std of white noise added to every clip and track (0: exact silence between events)
    kinds: tuple[str, ...] = KINDS  # sound kinds to draw from (uniformly)
    pitches: tuple[str, ...] = PITCHES  # pitch classes to draw from (uniformly)
    counts: tuple[int, ...] = COUNTS  # event counts to draw from (uniformly)

    def __post_init__(self):
        for name in ("kinds", "pitches", "counts"):  # lists from Hydra / JSON
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if isinstance(self.sample_rate, bool) or not isinstance(self.sample_rate, (int, np.integer)):
            raise ValueError(f"ToySoundConfig.sample_rate must be an integer, got {self.sample_rate!r}")
        if not MIN_SAMPLE_RATE <= self.sample_rate <= MAX_SAMPLE_RATE:
            msg = f"must be in [{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}] Hz, got {self.sample_rate}"
            raise ValueError(f"ToySoundConfig.sample_rate {msg}")
        if not _is_real(self.duration_s) or not MIN_DURATION_S <= self.duration_s <= MAX_DURATION_S:
            msg = f"must be in [{MIN_DURATION_S}, {MAX_DURATION_S}] seconds, got {self.duration_s!r}"
            raise ValueError(f"ToySoundConfig.duration_s {msg}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"ToySoundConfig.seed must be a non-negative integer, got {self.seed!r}")
        if not _is_real(self.noise_floor) or not 0.0 <= self.noise_floor <= MAX_NOISE_FLOOR:
            raise ValueError(f"ToySoundConfig.noise_floor must be in [0, {MAX_NOISE_FLOOR}], got {self.noise_floor!r}")
        for name, allowed in (("kinds", KINDS), ("pitches", PITCHES), ("counts", COUNTS)):
            values = getattr(self, name)
            bad = [v for v in values if isinstance(v, bool) or v not in allowed]
            if not values or bad or len(set(values)) != len(values):
                msg = f"must be a non-empty list of distinct values from {allowed}, got {values}"
                raise ValueError(f"ToySoundConfig.{name} {msg}")

    @property
    def n_samples(self) -> int:
        return round(self.sample_rate * self.duration_s)


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


@dataclass
class SoundClip:
    """One generated clip and its labels."""

    index: int
    audio: np.ndarray  # float32 [n_samples], peak <= 1
    sample_rate: int
    caption: str
    attributes: dict  # JSON-friendly: kind, pitch, count, loudness, length, peak, freq_*_hz, onsets_s, durations_s


# -- public API ---------------------------------------------------------------------------------------


def make_sound(cfg: ToySoundConfig, index: int) -> SoundClip:
    """Generate clip ``index`` of the source ``cfg``; deterministic in ``(cfg.seed, index)``."""
    _check_index(index)
    rng = np.random.default_rng([cfg.seed, int(index)])
    sr, n_total = cfg.sample_rate, cfg.n_samples

    kind = cfg.kinds[rng.integers(len(cfg.kinds))]
    pitch = cfg.pitches[rng.integers(len(cfg.pitches))]
    count = int(cfg.counts[rng.integers(len(cfg.counts))])
    loudness = ("quiet", "loud")[rng.integers(2)]
    length = ("short", "long")[rng.integers(2)]
    margin, gap = round(MARGIN_S * sr), round(MIN_GAP_S * sr)
    if count * round(LENGTHS_S["long"][1] * sr) + (count - 1) * gap + 2 * margin > n_total:
        length = "short"  # long events would not fit: the caption must stay true (short ones always fit)
    peak = float(rng.uniform(*LOUDNESS_PEAKS[loudness]))
    f_start, f_end = _frequencies(rng, kind, PITCH_BANDS_HZ[pitch])

    # Event lengths, then onsets: the free time is split at random around the events, gaps and margins.
    lengths = [round(rng.uniform(*LENGTHS_S[length]) * sr) for _ in range(count)]
    free = n_total - 2 * margin - (count - 1) * gap - sum(lengths)
    spare = np.floor(rng.dirichlet(np.ones(count + 1)) * free).astype(int)
    onsets, t = [], margin
    for i, n in enumerate(lengths):
        t += spare[i]
        onsets.append(int(t))
        t += n + gap

    audio = np.zeros(n_total)
    for onset, n in zip(onsets, lengths):
        event = _event(rng, kind, f_start, f_end, n, sr)
        audio[onset : onset + n] = peak * event / np.abs(event).max()
    if cfg.noise_floor > 0:
        audio += cfg.noise_floor * rng.standard_normal(n_total)

    attributes = {
        "kind": kind,
        "pitch": pitch,
        "count": count,
        "loudness": loudness,
        "length": length,
        "peak": peak,
        "freq_start_hz": f_start,
        "freq_end_hz": f_end,
        "onsets_s": [o / sr for o in onsets],
        "durations_s": [n / sr for n in lengths],
    }
    return SoundClip(
        index=int(index),
        audio=np.clip(audio, -1.0, 1.0).astype(np.float32),
        sample_rate=sr,
        caption=caption(attributes),
        attributes=attributes,
    )


def iter_sounds(cfg: ToySoundConfig, n: int, start: int = 0) -> Iterator[SoundClip]:
    """Clips ``start, start + 1, ..., start + n - 1``."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    for index in range(start, start + n):
        yield make_sound(cfg, index)


def caption(attributes: dict) -> str:
    """E.g. "two loud short high beeps", "a quiet long low hum"."""
    count = attributes["count"]
    noun = KIND_NOUNS[attributes["kind"]][0 if count == 1 else 1]
    words = [attributes["loudness"], attributes["length"], PITCH_WORDS[attributes["pitch"]], noun]
    article = COUNT_WORDS[count]
    if count == 1 and words[0][0] in "aeiou":
        article = "an"
    return " ".join([article, *words])


SOUND_ATTRIBUTES: tuple[str, ...] = ("kind", "pitch", "count", "loudness", "length")  # what a caption names


def caption_attributes(text: str) -> dict[str, str | int | None]:
    """The attributes a toy-sound caption states (:func:`caption`'s inverse; None for each it does not state):
    ``count`` from the first word ("a"/"an" 1, "two", "three"), ``loudness``, ``length`` and ``pitch`` as whole
    words, ``kind`` from the earliest noun phrase (singular or plural)."""
    words = text.split()
    counts = {"a": 1, "an": 1, **{w: n for n, w in COUNT_WORDS.items() if n > 1}}
    pitch_of = {w: p for p, w in PITCH_WORDS.items()}
    padded = f" {' '.join(words)} "
    found = [(padded.find(f" {noun} "), kind) for kind, nouns in KIND_NOUNS.items() for noun in nouns]
    found = [(pos, kind) for pos, kind in found if pos >= 0]
    return {
        "kind": min(found)[1] if found else None,
        "pitch": next((pitch_of[w] for w in words if w in pitch_of), None),
        "count": counts.get(words[0]) if words else None,
        "loudness": next((w for w in words if w in LOUDNESS_PEAKS), None),
        "length": next((w for w in words if w in LENGTHS_S), None),
    }


def action_sound(
    action: str,
    n_frames: int,
    fps: float,
    cfg: ToySoundConfig | None = None,
    index: int = 0,
    *,
    period_frames: float | None = None,
    phase: float | None = None,
) -> np.ndarray:
    """A float32 sound track [round(n_frames / fps * sample_rate)] for a toy-world clip of ``action``.

    ``period_frames`` and ``phase`` give the clip's motion cycle (toy-world convention: the motion phase at frame
    ``t`` is ``phase + 2 pi t / period_frames``); left out, they are drawn from the toy world's ranges.
    """
    if action not in ACTION_SOUNDS:
        raise ValueError(f"unknown action {action!r}; expected one of {ACTIONS}")
    if isinstance(n_frames, bool) or not isinstance(n_frames, (int, np.integer)) or n_frames < 1:
        raise ValueError(f"n_frames must be a positive integer, got {n_frames!r}")
    if not _is_real(fps) or not 0 < fps < 1000:
        raise ValueError(f"fps must be in (0, 1000), got {fps!r}")
    if period_frames is not None and (not _is_real(period_frames) or not period_frames > 0):
        raise ValueError(f"period_frames must be > 0, got {period_frames!r}")
    _check_index(index)
    cfg = cfg if cfg is not None else ToySoundConfig()
    sr = cfg.sample_rate
    rng = np.random.default_rng([cfg.seed, int(index), 1 + ACTIONS.index(action)])  # apart from make_sound's
    period = float(period_frames) if period_frames is not None else rng.uniform(*PERIODS[action])
    phase0 = float(phase) if phase is not None else rng.uniform(0.0, 2 * np.pi)
    n_total = round(n_frames / fps * sr)
    track = np.zeros(n_total)

    def times(target: float) -> np.ndarray:  # seconds where the motion phase is target (mod 2 pi)
        first = (target - phase0) % (2 * np.pi) / (2 * np.pi) * period - period  # one cycle early: tails count
        return np.arange(first, n_frames, period) / fps

    sound = ACTION_SOUNDS[action]
    if sound == "footsteps":  # a foot lands when its leg is furthest forward: sin(phase) = +-1
        for t in np.sort(np.concatenate([times(np.pi / 2), times(3 * np.pi / 2)])):
            _add_at(track, rng.uniform(0.3, 0.45) * _thud(rng, sr), round(t * sr))
    elif sound == "whoosh":  # in the air while sin(phase) > 0: take-off at phase 0, landing at phase pi
        air = max(round(period / 2 / fps * sr), 16)
        for t in times(0.0):
            u = np.arange(air) / max(air, 1)
            centres = 500.0 * 4.0 ** np.sin(np.pi * u)  # 500 Hz -> 2 kHz -> 500 Hz
            whoosh = _swept_noise(rng, centres, sr, octaves=0.5) * np.sin(np.pi * u) ** 2
            _add_at(track, rng.uniform(0.2, 0.35) * _normalised(whoosh), round(t * sr))
            _add_at(track, rng.uniform(0.15, 0.25) * _thud(rng, sr), round(t * sr) + air)
    elif sound == "rustle":  # loudest where the limbs move fastest
        motion = phase0 + 2 * np.pi * np.arange(n_total) / sr * fps / period
        speed = np.abs(np.sin(motion) if action == "squat" else np.cos(motion))
        noise = _bandpass_noise(rng, n_total, sr, rng.uniform(250.0, 500.0), octaves=0.6)
        track += rng.uniform(0.03, 0.06) * _normalised(noise) * speed
    if cfg.noise_floor > 0:
        track += cfg.noise_floor * rng.standard_normal(n_total)
    return np.clip(track, -1.0, 1.0).astype(np.float32)


# -- events -------------------------------------------------------------------------------------------


def _check_index(index) -> None:
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"clip index must be a non-negative integer, got {index!r}")


def _frequencies(rng, kind: str, band: tuple[float, float]) -> tuple[float, float]:
    """(start, end) frequency in Hz: a sweep across the band for chirps, one log-uniform frequency otherwise."""
    lo, hi = band
    if kind in ("rising_chirp", "falling_chirp"):
        low, high = float(lo * rng.uniform(1.0, CHIRP_EDGE)), float(hi / rng.uniform(1.0, CHIRP_EDGE))
        return (low, high) if kind == "rising_chirp" else (high, low)
    f = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    return f, f


def _event(rng, kind: str, f_start: float, f_end: float, n: int, sr: int) -> np.ndarray:
    """One event of ``n`` samples (float64, any scale), faded in and out."""
    t = np.arange(n) / sr
    if kind == "beep":
        x = np.sin(2 * np.pi * f_start * t)
    elif kind in ("rising_chirp", "falling_chirp"):  # exponential sweep: equal time per octave
        freq = f_start * (f_end / f_start) ** (np.arange(n) / max(n - 1, 1))
        x = np.sin(2 * np.pi * np.cumsum(freq) / sr)
    elif kind == "hum":
        harmonics = [(k, a) for k, a in ((1, 1.0), (2, 0.5), (3, 0.3)) if k * f_start < 0.45 * sr]
        x = sum(a * np.sin(2 * np.pi * k * f_start * t + rng.uniform(0, 2 * np.pi)) for k, a in harmonics)
        x = x * (1.0 + 0.15 * np.sin(2 * np.pi * rng.uniform(4.0, 8.0) * t))  # slow tremolo
    elif kind == "noise_burst":
        x = _bandpass_noise(rng, n, sr, f_start, octaves=0.3)
    elif kind == "click_train":  # damped sines, a few cycles long at low pitch, at a 25-40 Hz rate
        interval = round(rng.uniform(*CLICK_INTERVAL_S) * sr)
        tau = min(interval / sr / 4, max(0.001, 2.0 / f_start))
        click = np.sin(2 * np.pi * f_start * t[:interval]) * np.exp(-t[:interval] / tau)
        x = np.zeros(n)
        for start in range(0, n - interval // 2, interval):
            piece = click[: n - start]
            x[start : start + len(piece)] += piece
    else:
        raise ValueError(f"unknown sound kind {kind!r}; expected one of {KINDS}")
    return _fade(x, round(ATTACK_S[kind] * sr), round(RELEASE_S * sr))


def _fade(x: np.ndarray, n_in: int, n_out: int) -> np.ndarray:
    """``x`` with raised-cosine fades (the first / last sample becomes exactly zero when the fade is on)."""
    ramp = lambda n: 0.5 - 0.5 * np.cos(np.pi * np.arange(n) / n)  # 0 -> almost 1
    x = x.copy()
    n_in, n_out = min(n_in, len(x) // 4), min(n_out, len(x) // 4)
    if n_in > 0:
        x[:n_in] *= ramp(n_in)
    if n_out > 0:
        x[len(x) - n_out :] *= ramp(n_out)[::-1]
    return x


def _log_gaussian(freqs: np.ndarray, centre: float, octaves: float) -> np.ndarray:
    """A band-pass gain: a Gaussian in log2 frequency (std ``octaves``) around ``centre``; zero at DC."""
    octave = np.log2(np.maximum(freqs, 1e-3) / centre)
    return np.where(freqs > 0, np.exp(-0.5 * (octave / octaves) ** 2), 0.0)


def _bandpass_noise(rng, n: int, sr: int, centre: float, octaves: float) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(n))
    return np.fft.irfft(spectrum * _log_gaussian(np.fft.rfftfreq(n, 1 / sr), centre, octaves), n)


def _swept_noise(rng, centres: np.ndarray, sr: int, octaves: float, n_bands: int = 16) -> np.ndarray:
    """Noise whose band centre follows ``centres`` [n] (Hz): a crossfade over fixed log-spaced bands."""
    n = len(centres)
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / sr)
    bands = np.geomspace(centres.min(), centres.max(), n_bands)
    x = np.zeros(n)
    weights = np.exp(-0.5 * ((np.log2(centres)[None] - np.log2(bands)[:, None]) / octaves) ** 2)  # [K, n]
    weights /= weights.sum(axis=0, keepdims=True)
    for band, weight in zip(bands, weights):
        x += weight * np.fft.irfft(spectrum * _log_gaussian(freqs, band, octaves), n)
    return x


def _thud(rng, sr: int) -> np.ndarray:
    """A soft footstep: a decaying low tone that drops in pitch, over a short low noise tap (peak 1)."""
    n = round(0.12 * sr)
    t = np.arange(n) / sr
    f0 = rng.uniform(70.0, 110.0)
    tone = np.sin(2 * np.pi * np.cumsum(f0 * (1.0 - 0.4 * t / t[-1])) / sr) * np.exp(-t / 0.03)
    tap = _normalised(_bandpass_noise(rng, n, sr, 300.0, octaves=0.5)) * np.exp(-t / 0.008)
    return _normalised(_fade(tone + 0.3 * tap, round(0.002 * sr), round(RELEASE_S * sr)))


def _normalised(x: np.ndarray) -> np.ndarray:
    peak = np.abs(x).max() if len(x) else 0.0
    return x / peak if peak > 0 else x


def _add_at(track: np.ndarray, event: np.ndarray, start: int) -> None:
    """Add ``event`` into ``track`` from sample ``start``, cutting whatever falls outside it."""
    lo, hi = max(start, 0), min(start + len(event), len(track))
    if lo < hi:
        track[lo:hi] += event[lo - start : hi - start]
