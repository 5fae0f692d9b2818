"""Unit tests for the EnCodec audio tokenizer: ids, codebook ranges, segments/scales, pretrained loading (CPU)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mmsuite.tokenizers import audio
from mmsuite.tokenizers.audio import (
    AudioTokenizer,
    build_encodec,
    import_encodec,
    load_pretrained_encodec,
    n_q_for_bandwidth,
    token_ranges,
)
from mmsuite.tokenizers.token_space import TokenSpace

REPO = Path(__file__).resolve().parents[2]
# 8 kHz mono, hop 16 -> 500 frames/s; 16 bins = 4 bits -> 2 kbps per codebook; 4 codebooks -> 2/4/6/8 kbps
TINY = dict(sample_rate=8000, n_filters=4, ratios=(4, 4), dimension=16, lstm=0, bins=16, n_q=4, kmeans_init=False)
# the 48 kHz recipe in small: non-causal, group norm, per-segment loudness normalisation, 400-sample segments
TINY_SEGMENTED = dict(TINY, causal=False, norm="time_group_norm", normalize=True, segment=0.05, overlap=0.1)


def _tiny(**kw):
    torch.manual_seed(0)
    return build_encodec(**{**TINY, **kw})


def _wav(batch=2, samples=2000, channels=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, samples) if channels is None else (batch, channels, samples)
    return 0.3 * torch.randn(shape, generator=g)


def _random_codes(tok, batch=2, frames=5, seed=0):
    return torch.randint(0, tok.bins, (batch, tok.n_q, frames), generator=torch.Generator().manual_seed(seed))


# -- bandwidth and ranges ---------------------------------------------------------------------------------


def test_bandwidth_selects_number_of_codebooks():
    # encodec's released models: 24 kHz (75 frames/s) and 48 kHz (150 frames/s), 1024 bins
    assert [n_q_for_bandwidth(b, 75, 1024) for b in (1.5, 3.0, 6.0, 12.0, 24.0)] == [2, 4, 8, 16, 32]
    assert [n_q_for_bandwidth(b, 150, 1024) for b in (3.0, 6.0, 12.0, 24.0)] == [2, 4, 8, 16]
    model = _tiny()
    assert model.target_bandwidths == [2.0, 4.0, 6.0, 8.0] and model.frame_rate == 500
    for bw, n_q in [(2.0, 1), (4.0, 2), (6.0, 3), (8.0, 4)]:
        tok = AudioTokenizer(model, bandwidth=bw)
        assert tok.n_q == n_q == model.quantizer.get_num_quantizers_for_bandwidth(model.frame_rate, bw)
        assert tok.tokens_per_second == 500 * n_q
        assert tok.encode_codes(_wav(1, 160)).shape == (1, n_q, 10)
    with pytest.raises(ValueError, match=r"bandwidth 5\.0 kbps; choose one of \[2\.0, 4\.0, 6\.0, 8\.0\]"):
        AudioTokenizer(model, bandwidth=5.0)
    # target_bandwidths instead of n_q
    assert _tiny(n_q=None, target_bandwidths=[2.0, 6.0]).quantizer.n_q == 3


def test_token_ranges_helper_and_default_space():
    assert token_ranges(3, 16) == [{"name": f"audio_q{k}", "size": 16} for k in range(3)]
    assert token_ranges(2, 8, prefix="snd")[1] == {"name": "snd_q1", "size": 8}
    tok = AudioTokenizer(_tiny(), bandwidth=6.0)
    assert tok.range_names == ["audio_q0", "audio_q1", "audio_q2"]
    assert [(r.start, r.size) for r in tok.ranges] == [(0, 16), (16, 16), (32, 16)]


# -- round trips ------------------------------------------------------------------------------------------


def test_round_trip_shapes_and_frame_major_ids():
    space = TokenSpace(
        [("text", 100), ("specials", ["<pad>", "<aud_start>"]), *[(f"audio_q{k}", 16) for k in range(4)]]
    )
    tok = AudioTokenizer(_tiny(), space, bandwidth=8.0)
    wav = _wav(2, 2000)  # 0.25 s at 8 kHz -> 125 frames
    codes = tok.encode_codes(wav, sample_rate=8000)
    assert codes.shape == (2, 4, 125) and codes.dtype == torch.long
    assert tok.num_frames(2000) == 125
    ids = tok.encode(wav)
    assert ids.shape == (2, 125 * 4) and torch.equal(ids, tok.codes_to_ids(codes))
    for pos in range(ids.shape[1]):  # position t*n_q+k lies in range k
        assert ((ids[:, pos] >= tok.ranges[pos % 4].start) & (ids[:, pos] < tok.ranges[pos % 4].stop)).all()
    assert torch.equal(tok.ids_to_codes(ids), codes)
    out = tok.decode(ids)
    assert out.shape == (2, 1, 2000) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.equal(out, tok.decode_codes(codes))
    # [B, C, S] input and [n_q, T] / [N] forms
    assert torch.equal(tok.encode_codes(wav[:, None]), codes)
    assert torch.equal(tok.codes_to_ids(codes[0]), ids[0]) and torch.equal(tok.ids_to_codes(ids[0]), codes[0])
    assert tok.decode(ids[0]).shape == (1, 1, 2000)


def test_flattening_is_frame_major_with_per_codebook_offsets():
    tok = AudioTokenizer(_tiny(), bandwidth=6.0)  # 3 codebooks at 0, 16, 32
    codes = torch.tensor([[[1, 2], [3, 4], [5, 6]]])  # [B=1, n_q=3, T=2]
    assert tok.codes_to_ids(codes).tolist() == [[1, 16 + 3, 32 + 5, 2, 16 + 4, 32 + 6]]
    codes = _random_codes(tok, frames=7)
    assert torch.equal(tok.ids_to_codes(tok.codes_to_ids(codes)), codes)


def test_codes_match_encodec_own_encode():
    model = _tiny()
    tok = AudioTokenizer(model, bandwidth=8.0)
    wav = _wav(2, 1000)
    assert torch.equal(tok.encode_codes(wav), model.encode(wav[:, None])[0][0])


# -- errors -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok4():
    space = TokenSpace([("text", 100), *[(f"audio_q{k}", 16) for k in range(4)]])
    return AudioTokenizer(_tiny(), space, bandwidth=8.0)


def test_out_of_range_ids_are_rejected(tok4):
    ids = tok4.codes_to_ids(_random_codes(tok4, batch=1, frames=3))
    bad = ids.clone()
    bad[0, 5] = 7  # position 5 = frame 1, codebook 1; 7 is a text id
    with pytest.raises(
        ValueError, match=r"audio id 7 at position 5 \(frame 1, codebook 1\).*'audio_q1' \[116, 132\)"
    ) as e:
        tok4.decode(bad)
    assert "not an audio id" in str(e.value) and "'text'" in str(e.value)
    bad = ids.clone()
    bad[0, 0] = 10_000
    with pytest.raises(ValueError, match=r"audio id 10000 at position 0 .*outside the token space \(vocab size 164\)"):
        tok4.ids_to_codes(bad)
    bad[0, 0] = -100  # a label pad value
    with pytest.raises(ValueError, match=r"audio id -100 at position 0"):
        tok4.ids_to_codes(bad)


def test_wrong_codebook_order_is_named(tok4):
    ids = tok4.codes_to_ids(_random_codes(tok4, batch=2, frames=3))
    frames = ids.view(2, 3, 4).clone()
    frames[..., [0, 1]] = frames[..., [1, 0]]  # swap codebooks 0 and 1 in every frame
    with pytest.raises(ValueError) as e:
        tok4.decode(frames.view(2, 12))
    msg = str(e.value)
    assert "position 0" in msg and "codebook 0's range 'audio_q0'" in msg
    assert "lies in codebook 1's range 'audio_q1'" in msg and "wrong codebook order" in msg
    assert "12 bad id(s)" in msg  # 2 rows x 3 frames x 2 codebooks
    # codebook-major flattening (all of codebook 0, then codebook 1 ...) is caught the same way
    codes = _random_codes(tok4, batch=1, frames=4)
    codebook_major = (codes + tok4._starts[None, :, None]).reshape(1, -1)
    with pytest.raises(ValueError, match=r"position 1 \(frame 0, codebook 1\).*wrong codebook order"):
        tok4.ids_to_codes(codebook_major)


def test_wrong_length_sample_rate_channels_and_codes(tok4):
    ids = tok4.codes_to_ids(_random_codes(tok4, batch=1, frames=3))
    with pytest.raises(ValueError, match=r"11 audio ids is not a whole number of frames.*multiple of 4"):
        tok4.decode(ids[:, :11])
    with pytest.raises(ValueError, match=r"0 audio ids"):
        tok4.decode(ids[:, :0])
    with pytest.raises(ValueError, match=r"sampled at 16000 Hz but this EnCodec tokenizer works at 8000 Hz"):
        tok4.encode(_wav(1, 800), sample_rate=16000)
    with pytest.raises(ValueError, match=r"takes 1 channel\(s\), got 2"):
        tok4.encode(_wav(1, 800, channels=2))
    with pytest.raises(TypeError, match=r"float in \[-1, 1\].*int16"):
        tok4.encode(torch.zeros(1, 800, dtype=torch.int16))
    with pytest.raises(ValueError, match=r"code 16 \(batch 0, codebook 2, frame 1\) is outside \[0, 16\)"):
        tok4.codes_to_ids(torch.tensor([[[0, 0], [0, 0], [0, 16], [0, 0]]]))
    with pytest.raises(ValueError, match=r"codes must be \[B, n_q=4, T\]"):
        tok4.decode_codes(torch.zeros(1, 3, 5, dtype=torch.long))


def test_token_space_must_match_the_codebooks():
    model = _tiny()
    with pytest.raises(ValueError, match=r"no range 'audio_q3'.*4 ranges audio_q0..audio_q3 of 16 ids"):
        AudioTokenizer(model, TokenSpace.from_config(token_ranges(3, 16)), bandwidth=8.0)
    with pytest.raises(ValueError, match=r"'audio_q0' has 32 ids but the EnCodec codebooks have 16 codes"):
        AudioTokenizer(model, TokenSpace.from_config(token_ranges(4, 32)), bandwidth=8.0)
    with pytest.raises(ValueError, match=r"range 'audio_q2' but this tokenizer uses only 2 codebooks at 4.0 kbps"):
        AudioTokenizer(model, TokenSpace.from_config(token_ranges(4, 16)), bandwidth=4.0)


# -- segments and loudness scales (the 48 kHz recipe) ------------------------------------------------------


@pytest.mark.parametrize("samples", [100, 400, 760, 1000])
def test_segmented_normalising_model_round_trip(samples):
    torch.manual_seed(0)
    model = build_encodec(**TINY_SEGMENTED)  # segment 400 samples = 25 frames, stride 360
    tok = AudioTokenizer(model, bandwidth=8.0)
    wav = _wav(2, samples)
    ids, scales = tok.encode(wav, return_scales=True)
    n_seg = 1 if samples <= 400 else 1 + -(-(samples - 400) // 360)
    assert scales.shape == (2, n_seg) and (scales > 0).all()
    assert ids.shape == (2, tok.num_frames(samples) * 4)
    # same codes and scales as encodec's own segmenting encoder (it may add a redundant tail segment)
    frames = model.encode(wav[:, None])[:n_seg]
    assert torch.equal(tok.ids_to_codes(ids), torch.cat([c for c, _ in frames], dim=-1))
    assert torch.allclose(scales, torch.stack([s.view(-1) for _, s in frames], dim=1))
    out = tok.decode(ids, scales=scales, length=samples)
    assert out.shape == (2, 1, samples) and torch.isfinite(out).all()
    assert tok.decode(ids, scales=scales).shape[-1] >= samples


def test_normalising_model_needs_scales_or_decode_scale():
    torch.manual_seed(0)
    model = build_encodec(**TINY_SEGMENTED)
    tok = AudioTokenizer(model, bandwidth=8.0)
    ids, scales = tok.encode(_wav(1, 1000), return_scales=True)
    with pytest.raises(ValueError, match=r"normalises the loudness.*pass scales=.*decode_scale"):
        tok.decode(ids)
    with pytest.raises(ValueError, match=r"scales must be \[B=1, n_segments=3\]"):
        tok.decode(ids, scales=scales[:, :2])
    fixed = AudioTokenizer(model, bandwidth=8.0, decode_scale=0.1)
    # a fixed scale s decodes exactly like passing s for every segment
    assert torch.allclose(fixed.decode(ids), tok.decode(ids, scales=torch.full((1, 3), 0.1)))
    plain = AudioTokenizer(_tiny(), bandwidth=8.0)
    with pytest.raises(ValueError, match=r"does not normalise loudness; scales must be None"):
        plain.decode(plain.encode(_wav(1, 160)), scales=torch.ones(1, 1))


# -- pretrained weights from a local file ------------------------------------------------------------------


@pytest.fixture(scope="module")
def encodec24_file(tmp_path_factory):
    """encodec's 24 kHz architecture, random weights, saved in the package's format (a torch state dict)."""
    enc = import_encodec()
    torch.manual_seed(0)
    model = enc.EncodecModel.encodec_model_24khz(pretrained=False)
    path = tmp_path_factory.mktemp("encodec") / "encodec_24khz_random.th"
    torch.save(model.state_dict(), path)
    return path, model.state_dict()


def test_pretrained_24khz_loads_through_the_config(encodec24_file):
    path, state = encodec24_file
    cfg = OmegaConf.load(REPO / "conf/tokenizer/encodec_24khz.yaml")
    cfg.path = str(path)
    tok = AudioTokenizer.from_config(cfg)
    assert (tok.sample_rate, tok.channels, tok.bandwidth, tok.n_q, tok.bins) == (24000, 1, 6.0, 8, 1024)
    assert tok.frame_rate == 75 and tok.tokens_per_second == 600 and tok.model.name == "encodec_24khz"
    loaded = tok.model.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())
    ids = tok.encode(_wav(1, 2400), sample_rate=24000)  # 0.1 s -> 8 frames x 8 codebooks
    assert ids.shape == (1, 64)
    assert all(ids[0, p] in tok.ranges[p % 8] for p in range(64))
    assert tok.decode(ids, length=2400).shape == (1, 1, 2400)
    assert tok.describe()["flatten"] == "frame_major"
    # the same through a plain dict, with a token space that has other ranges first
    space = TokenSpace([("text", 50), *[(r["name"], r["size"]) for r in token_ranges(4, 1024)]])
    tok3 = AudioTokenizer.from_config(
        {"kind": "pretrained", "path": str(path), "variant": "24khz", "bandwidth": 3.0}, space
    )
    assert tok3.n_q == 4 and tok3.ranges[0].start == 50


def test_pretrained_loader_errors(encodec24_file, tmp_path):
    path, _ = encodec24_file
    with pytest.raises(FileNotFoundError, match=r"EnCodec checkpoint not found: .*nope\.th"):
        AudioTokenizer.from_config({"kind": "pretrained", "path": str(tmp_path / "nope.th"), "bandwidth": 6.0})
    with pytest.raises(ValueError, match=r"does not support bandwidth 5\.0 kbps; choose one of \[1\.5, 3\.0, 6\.0"):
        load_pretrained_encodec(path, "24khz", bandwidth=5.0)
    with pytest.raises(ValueError, match=r"\[3\.0, 6\.0, 12\.0, 24\.0\]"):
        load_pretrained_encodec(path, "48khz", bandwidth=1.5)
    with pytest.raises(ValueError, match=r"unknown pretrained EnCodec variant '32khz'"):
        load_pretrained_encodec(path, "32khz", bandwidth=6.0)
    with pytest.raises(ValueError, match=r"needs `path`"):
        AudioTokenizer.from_config(OmegaConf.load(REPO / "conf/tokenizer/encodec_24khz.yaml"))
    with pytest.raises(ValueError, match=r"needs an explicit `bandwidth`"):
        AudioTokenizer.from_config({"kind": "pretrained", "path": str(path)})
    with pytest.raises(ValueError, match=r"config says n_q=4 but EnCodec encodec_24khz at 6.0 kbps has n_q=8"):
        AudioTokenizer.from_config({"kind": "pretrained", "path": str(path), "bandwidth": 6.0, "n_q": 4})
    with pytest.raises(ValueError, match=r"kind: pretrained or kind: scratch"):
        AudioTokenizer.from_config({"path": str(path)})
    # wrong keys: the tiny model's weights in a file
    wrong = tmp_path / "tiny.th"
    torch.save(_tiny().state_dict(), wrong)
    with pytest.raises(ValueError, match=r"tiny\.th: .*(wrong shape|missing key)") as e:
        load_pretrained_encodec(wrong, "24khz", bandwidth=6.0)
    assert "decoder.model" in str(e.value)  # names some of the keys
    partial = tmp_path / "partial.th"
    torch.save({"encoder.model.0.conv.conv.bias": torch.zeros(32), "extra.weight": torch.zeros(1)}, partial)
    with pytest.raises(
        ValueError,
        match=r"partial\.th: does not match .*missing key\(s\), e\.g\. \[.*"
        r"unexpected key\(s\), e\.g\. \['extra\.weight'\]",
    ):
        load_pretrained_encodec(partial, "24khz", bandwidth=6.0)
    not_a_state_dict = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "epoch": 3}, not_a_state_dict)
    with pytest.raises(ValueError, match=r"expected an EnCodec state dict.*a training checkpoint"):
        load_pretrained_encodec(not_a_state_dict, "24khz", bandwidth=6.0)
    # a file named like encodec's release is checked against the sha256 in its name
    official = tmp_path / "encodec_24khz-d7cc33bc.th"
    os.symlink(path, official)
    with pytest.raises(ValueError, match=r"named like encodec's release with sha256 d7cc33bc"):
        load_pretrained_encodec(official, "24khz", bandwidth=6.0)


def test_scratch_config_builds_and_loads_weights(tmp_path):
    model = _tiny()
    path = tmp_path / "tiny.th"
    torch.save(model.state_dict(), path)
    cfg = {"kind": "scratch", "name": "toy", "bandwidth": 4.0, "path": str(path), **TINY}
    cfg["ratios"] = list(cfg["ratios"])
    tok = AudioTokenizer.from_config({**cfg, "token_ranges": token_ranges(2, 16)})
    assert tok.n_q == 2 and all(torch.equal(tok.model.state_dict()[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match=r"token_ranges .* do not match the model's 2 codebooks"):
        AudioTokenizer.from_config({**cfg, "token_ranges": token_ranges(4, 16)})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['n_filter'\]"):
        AudioTokenizer.from_config({"kind": "scratch", "n_filter": 4})


def test_48khz_architecture_is_stereo_normalising_and_segmented():
    enc = import_encodec()
    torch.manual_seed(0)
    tok = AudioTokenizer(enc.EncodecModel.encodec_model_48khz(pretrained=False), bandwidth=6.0)
    assert (tok.sample_rate, tok.channels, tok.n_q, tok.frame_rate, tok.normalize) == (48000, 2, 4, 150, True)
    ids, scales = tok.encode(_wav(1, 2400, channels=2), return_scales=True)  # 0.05 s -> 8 frames
    assert ids.shape == (1, 32) and scales.shape == (1, 1)
    assert tok.decode(ids, scales=scales, length=2400).shape == (1, 2, 2400)


# -- importing encodec -------------------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("torchaudio") is not None, reason="torchaudio is installed here")
def test_torchaudio_stand_in_is_not_left_behind():
    import_encodec()
    assert "torchaudio" not in sys.modules
    code = (
        "import sys\n"
        "from mmsuite.tokenizers.audio import import_encodec\n"
        "enc = import_encodec()\n"
        "assert 'torchaudio' not in sys.modules, 'stand-in left in sys.modules'\n"
        "import importlib.util; assert importlib.util.find_spec('torchaudio') is None\n"
        "try:\n"
        "    enc.utils.convert_audio\n"
        "    enc.utils.torchaudio.transforms\n"
        "except RuntimeError as e:\n"
        "    print('ERR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ERR torchaudio is not installed" in out.stdout and "mmsuite resamples and writes audio itself" in out.stdout


def test_missing_encodec_says_how_to_install(monkeypatch):
    monkeypatch.setattr(audio, "_ENCODEC_MODULE", "encodec_not_installed_here")
    with pytest.raises(ImportError, match=r"make install.*pip install --no-deps encodec==0\.1\.1"):
        import_encodec()
