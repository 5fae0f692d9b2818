"""The procedural toy sound source: determinism, shapes, event layout, captions, spectra, config, action tracks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmsuite.sources import toysound as ts
from mmsuite.sources.toyworld import ACTIONS

N_CLIPS = 200  # clips scanned by the coverage tests
KIND_WORDS = {  # written out independently of the module's noun table: (singular, plural)
    "beep": ("beep", "beeps"),
    "rising_chirp": ("rising chirp", "rising chirps"),
    "falling_chirp": ("falling chirp", "falling chirps"),
    "hum": ("hum", "hums"),
    "noise_burst": ("noise burst", "noise bursts"),
    "click_train": ("click train", "click trains"),
}
COUNT_WORDS = {1: ("a", "an", "one"), 2: ("two",), 3: ("three",)}
BANDS_HZ = {"low": (150, 300), "mid": (400, 800), "high": (1000, 2500)}


@pytest.fixture(scope="module")
def clips() -> list[ts.SoundClip]:
    return list(ts.iter_sounds(ts.ToySoundConfig(), N_CLIPS))


def _only(index: int = 0, **kwargs) -> ts.SoundClip:
    return ts.make_sound(ts.ToySoundConfig(**kwargs), index)


def _event_spans(clip: ts.SoundClip) -> list[tuple[int, int]]:
    sr, a = clip.sample_rate, clip.attributes
    return [(round(o * sr), round((o + d) * sr)) for o, d in zip(a["onsets_s"], a["durations_s"])]


def _dominant_hz(x: np.ndarray, sr: int, pad: int = 8) -> float:
    """Frequency of the largest Hann-windowed FFT bin (zero-padded ``pad`` times for finer bins)."""
    n = len(x) * pad
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x)), n))
    return float(np.fft.rfftfreq(n, 1 / sr)[np.argmax(spectrum)])


# -- determinism --------------------------------------------------------------------------------------


def test_same_seed_and_index_give_identical_clips():
    a = ts.make_sound(ts.ToySoundConfig(seed=3), 11)
    np.random.seed(0)  # the global RNG must play no part
    ts.make_sound(ts.ToySoundConfig(seed=3), 12)  # nor the call order
    b = ts.make_sound(ts.ToySoundConfig(seed=3), 11)
    assert a.audio.tobytes() == b.audio.tobytes()
    assert (a.caption, a.attributes, a.index) == (b.caption, b.attributes, 11)


def test_other_index_or_seed_gives_other_clips():
    base = ts.make_sound(ts.ToySoundConfig(seed=3), 11)
    for other in (ts.make_sound(ts.ToySoundConfig(seed=3), 12), ts.make_sound(ts.ToySoundConfig(seed=4), 11)):
        assert not np.array_equal(base.audio, other.audio)
    audios = {c.audio.tobytes() for c in ts.iter_sounds(ts.ToySoundConfig(), 30)}
    assert len(audios) == 30


def test_iter_sounds_yields_the_same_clips_as_make_sound():
    cfg = ts.ToySoundConfig(seed=1)
    got = list(ts.iter_sounds(cfg, 3, start=5))
    assert [c.index for c in got] == [5, 6, 7]
    np.testing.assert_array_equal(got[1].audio, ts.make_sound(cfg, 6).audio)
    assert list(ts.iter_sounds(cfg, 0)) == []
    with pytest.raises(ValueError, match="n must"):
        list(ts.iter_sounds(cfg, -1))
    with pytest.raises(ValueError, match="index"):
        ts.make_sound(cfg, -1)


# -- shapes, range, event layout ----------------------------------------------------------------------


@pytest.mark.parametrize(("sr", "duration"), [(24000, 1.0), (8000, 0.5), (16000, 2.5), (44100, 0.73)])
def test_length_dtype_peak_and_finite(sr, duration):
    cfg = ts.ToySoundConfig(sample_rate=sr, duration_s=duration)
    for clip in ts.iter_sounds(cfg, 40):
        assert clip.audio.shape == (round(sr * duration),) and clip.audio.dtype == np.float32
        assert np.isfinite(clip.audio).all()
        peak = float(np.abs(clip.audio).max())
        assert 0.05 < peak <= 1.0
        assert peak == pytest.approx(clip.attributes["peak"], rel=1e-5)  # every event reaches the drawn peak
        assert clip.sample_rate == sr
        assert json.loads(json.dumps(clip.attributes)) == clip.attributes


def test_loud_is_louder_than_quiet(clips):
    peaks = {"quiet": [], "loud": []}
    for clip in clips:
        peaks[clip.attributes["loudness"]].append(float(np.abs(clip.audio).max()))
    assert max(peaks["quiet"]) < 0.5 * min(peaks["loud"])


@pytest.mark.parametrize(("sr", "duration"), [(24000, 1.0), (8000, 0.5)])
def test_events_fit_do_not_overlap_and_silence_elsewhere(sr, duration):
    for clip in ts.iter_sounds(ts.ToySoundConfig(sample_rate=sr, duration_s=duration), 60):
        a = clip.attributes
        spans = _event_spans(clip)
        assert len(spans) == a["count"] == len(a["onsets_s"]) == len(a["durations_s"])
        assert spans[0][0] > 0 and spans[-1][1] < len(clip.audio)
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert end < start, clip.caption
        outside = np.ones(len(clip.audio), bool)
        for start, end in spans:
            outside[start:end] = False
            assert np.abs(clip.audio[start:end]).max() > 0.5 * a["peak"]  # every event is really there
        assert not clip.audio[outside].any(), clip.caption  # noise_floor = 0: exact silence between events
        lengths = np.array(a["durations_s"])
        assert ((lengths >= 0.05) & (lengths <= 0.12) if a["length"] == "short" else lengths >= 0.17).all()


def test_events_fade_in_and_out_except_click_attacks(clips):
    for clip in clips:
        for start, end in _event_spans(clip):
            event = np.abs(clip.audio[start:end])
            assert event[-1] == 0.0 and event[-10:].max() < 0.2 * event.max(), clip.caption
            if clip.attributes["kind"] != "click_train":
                assert event[0] == 0.0 and event[:10].max() < 0.2 * event.max(), clip.caption


def test_click_trains_start_sharply():
    clip = _only(kinds=("click_train",), pitches=("high",))
    start, end = _event_spans(clip)[0]
    event = np.abs(clip.audio[start:end])
    assert event[: round(0.002 * clip.sample_rate)].max() > 0.5 * event.max()  # peak within 2 ms


def test_noise_floor_fills_the_gaps():
    clip = _only(noise_floor=0.01)
    start, _ = _event_spans(clip)[0]
    gap = clip.audio[:start]
    assert 0.005 < gap.std() < 0.02


# -- captions and coverage ----------------------------------------------------------------------------


def test_caption_matches_attributes(clips):
    for clip in clips:
        a, words = clip.attributes, clip.caption.split()
        assert words[0] in COUNT_WORDS[a["count"]], clip.caption
        singular, plural = KIND_WORDS[a["kind"]]
        assert clip.caption.endswith(" " + (singular if a["count"] == 1 else plural)), clip.caption
        assert a["loudness"] in words and a["length"] in words, clip.caption
        pitch_words = [w for w in words if w in ("low", "high") or w.startswith("mid")]
        assert len(pitch_words) == 1 and pitch_words[0].startswith(a["pitch"]), clip.caption
        assert ts.caption(a) == clip.caption


def test_caption_examples():
    base = {"loudness": "loud", "length": "short", "pitch": "high", "kind": "beep", "count": 2}
    assert ts.caption(base) == "two loud short high beeps"
    hum = base | {"loudness": "quiet", "length": "long", "pitch": "low", "kind": "hum", "count": 1}
    assert ts.caption(hum) == "a quiet long low hum"
    chirps = base | {"kind": "falling_chirp", "count": 3, "pitch": "mid"}
    assert ts.caption(chirps) == "three loud short mid-pitched falling chirps"


def test_every_attribute_value_is_reachable(clips):
    seen = {key: {c.attributes[key] for c in clips} for key in ("kind", "pitch", "count", "loudness", "length")}
    assert seen["kind"] == set(KIND_WORDS)
    assert seen["pitch"] == set(BANDS_HZ)
    assert seen["count"] == {1, 2, 3}
    assert seen["loudness"] == {"quiet", "loud"} and seen["length"] == {"short", "long"}
    assert len({c.caption for c in clips}) > 100


def test_config_restricts_the_draws():
    cfg = ts.ToySoundConfig(kinds=["hum"], pitches=["low", "high"], counts=[2])  # lists, as from Hydra
    assert cfg.kinds == ("hum",)
    attrs = [c.attributes for c in ts.iter_sounds(cfg, 20)]
    assert {a["kind"] for a in attrs} == {"hum"} and {a["count"] for a in attrs} == {2}
    assert {a["pitch"] for a in attrs} == {"low", "high"}


# -- spectra ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["beep", "hum", "noise_burst", "click_train"])
def test_dominant_frequency_lies_in_the_pitch_band(kind):
    for pitch, (lo, hi) in BANDS_HZ.items():
        for index in range(4):
            clip = _only(index, kinds=(kind,), pitches=(pitch,))
            start, end = _event_spans(clip)[0]
            f = _dominant_hz(clip.audio[start:end].astype(np.float64), clip.sample_rate)
            slack = 0.25 if kind in ("noise_burst", "click_train") else 0.03  # noisy / short-lived spectra
            assert lo * (1 - slack) <= f <= hi * (1 + slack), (clip.caption, f)


def test_high_beep_is_higher_than_low_beep():
    for index in range(5):
        low = _only(index, kinds=("beep",), pitches=("low",))
        high = _only(index, kinds=("beep",), pitches=("high",))
        f_low, f_high = (_dominant_hz(c.audio.astype(np.float64), c.sample_rate) for c in (low, high))
        assert f_high > 3 * f_low
        assert f_low == pytest.approx(low.attributes["freq_start_hz"], abs=2.0)


@pytest.mark.parametrize("pitch", ["low", "mid", "high"])
def test_chirps_sweep_the_right_way(pitch):
    for kind, rising in (("rising_chirp", True), ("falling_chirp", False)):
        for index in range(3):
            clip = _only(index, kinds=(kind,), pitches=(pitch,))
            a = clip.attributes
            assert (a["freq_end_hz"] > 1.4 * a["freq_start_hz"]) == rising
            assert (a["freq_start_hz"] > 1.4 * a["freq_end_hz"]) != rising
            for start, end in _event_spans(clip):
                quarter = (end - start) // 4
                x = clip.audio[start:end].astype(np.float64)
                first = _dominant_hz(x[:quarter], clip.sample_rate, pad=32)
                last = _dominant_hz(x[-quarter:], clip.sample_rate, pad=32)
                assert (last > first) == rising, (clip.caption, first, last)


def test_all_frequencies_below_nyquist_at_the_lowest_rate():
    cfg = ts.ToySoundConfig(sample_rate=8000, kinds=("hum", "beep"), pitches=("high",))
    for clip in ts.iter_sounds(cfg, 20):
        spectrum = np.abs(np.fft.rfft(clip.audio.astype(np.float64)))
        freqs = np.fft.rfftfreq(len(clip.audio), 1 / 8000)
        assert spectrum[freqs > 3700].sum() < 0.01 * spectrum.sum()


# -- config -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sample_rate", 7999),
        ("sample_rate", 24000.0),
        ("sample_rate", True),
        ("duration_s", 0.1),
        ("duration_s", float("nan")),
        ("duration_s", "1"),
        ("seed", -1),
        ("seed", 1.5),
        ("noise_floor", -0.1),
        ("noise_floor", 0.5),
        ("kinds", ()),
        ("kinds", ("beep", "bark")),
        ("kinds", ("beep", "beep")),
        ("pitches", ("medium",)),
        ("counts", (0, 1)),
        ("counts", (4,)),
    ],
)
def test_bad_config_values_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"ToySoundConfig.{field} "):
        ts.ToySoundConfig(**{field: value})


def test_config_is_frozen():
    cfg = ts.ToySoundConfig()
    with pytest.raises(AttributeError):
        cfg.seed = 1  # type: ignore[misc]


# -- action tracks ------------------------------------------------------------------------------------


def test_every_toy_world_action_has_a_sound():
    assert set(ts.ACTION_SOUNDS) == set(ACTIONS)


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize(("n_frames", "fps"), [(16, 8.0), (30, 29.97), (1, 4.0)])
def test_action_sound_length_range_and_determinism(action, n_frames, fps):
    cfg = ts.ToySoundConfig(sample_rate=16000)
    track = ts.action_sound(action, n_frames, fps, cfg, 2)
    assert track.shape == (round(n_frames / fps * 16000),) and track.dtype == np.float32
    assert np.isfinite(track).all() and np.abs(track).max() <= 1.0
    assert ts.action_sound(action, n_frames, fps, cfg, 2).tobytes() == track.tobytes()


def test_action_sounds_differ_by_kind():
    cfg = ts.ToySoundConfig()
    tracks = {a: ts.action_sound(a, 32, 8.0, cfg, 0) for a in ACTIONS}
    assert not tracks["idle"].any()  # idle is silent
    peaks = {a: float(np.abs(t).max()) for a, t in tracks.items()}
    for quiet in ("wave_left_arm", "wave_right_arm", "squat"):
        assert 0.0 < peaks[quiet] < 0.1
    for loud in ("walk_left", "walk_right", "jump"):
        assert peaks[loud] > 0.15
    assert _dominant_hz(tracks["walk_left"].astype(np.float64), cfg.sample_rate, pad=1) < 150  # thuds are low
    assert not np.array_equal(tracks["walk_left"], ts.action_sound("walk_left", 32, 8.0, cfg, 1))


def test_footsteps_follow_the_given_motion_cycle():
    cfg, fps, period = ts.ToySoundConfig(sample_rate=8000), 10.0, 10.0
    track = ts.action_sound("walk_right", 40, fps, cfg, 0, period_frames=period, phase=np.pi / 2)
    # A step at frame 0 and then every half period (5 frames = 0.5 s): 8 thuds in 4 s.
    frame = round(cfg.sample_rate / fps)
    energy = np.array([np.abs(track[i * frame : (i + 1) * frame]).max() for i in range(40)])
    steps = np.flatnonzero(energy > 0.1)
    np.testing.assert_array_equal(steps, np.arange(0, 40, 5))


def test_jump_whoosh_is_high_and_in_the_air():
    cfg, fps, period = ts.ToySoundConfig(sample_rate=16000), 10.0, 12.0
    track = ts.action_sound("jump", 12, fps, cfg, 0, period_frames=period, phase=0.0)
    sr = cfg.sample_rate
    air = track[round(0.2 * sr) : round(0.4 * sr)].astype(np.float64)  # mid-flight: whoosh near 2 kHz
    assert np.abs(air).max() > 0.05 and _dominant_hz(air, sr) > 800
    ground = track[round(0.75 * sr) : round(1.15 * sr)]  # on the ground after landing thud decays
    assert np.abs(ground).max() < 0.01


def test_action_sound_rejects_bad_input():
    with pytest.raises(ValueError, match="moonwalk"):
        ts.action_sound("moonwalk", 16, 8.0)
    with pytest.raises(ValueError, match="n_frames"):
        ts.action_sound("jump", 0, 8.0)
    with pytest.raises(ValueError, match="fps"):
        ts.action_sound("jump", 16, 0.0)
    with pytest.raises(ValueError, match="period_frames"):
        ts.action_sound("jump", 16, 8.0, period_frames=-1.0)


def test_caption_attributes_read_back_every_stated_attribute():
    from mmsuite.sources.toysound import SOUND_ATTRIBUTES, caption_attributes

    cfg = ts.ToySoundConfig(sample_rate=8000)
    for clip in ts.iter_sounds(cfg, 40):
        got = caption_attributes(clip.caption)
        assert got == {a: clip.attributes[a] for a in SOUND_ATTRIBUTES}, clip.caption
    assert set(caption_attributes("").values()) == {None}
