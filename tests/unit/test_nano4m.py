"""nano4m: caption -> attribute parsing, the attribute probe, and the token shards (tiny saved tokenizers)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mmsuite.datamodules.nano4m import Nano4MDataModule
from mmsuite.datamodules.shards import ALLOWED_EXT, decode_sample, iter_raw_samples, read_manifest
from mmsuite.lightning_modules.fourm.attributes import AttributeProbe, caption_attributes
from mmsuite.sources import toyworld
from mmsuite.sources.splits import split_by_item
from mmsuite.tokenizers.image import AutoencoderSettings
from mmsuite.tokenizers.token_space import TokenSpace

COLORS, ACTIONS = toyworld.FIGURE_COLORS, toyworld.ACTIONS


# -- captions -> attributes ---------------------------------------------------------------------------------------
def test_every_toy_world_caption_gives_back_its_colour_and_action():
    for i in range(60):
        clip = toyworld.make_clip(toyworld.ToyWorldConfig(image_size=32, frames=1), i)
        got = caption_attributes(clip.caption, COLORS, ACTIONS)
        assert got == {"color": clip.attributes["color"], "action": clip.attributes["action"]}, clip.caption


def test_caption_parsing_is_strict_about_where_the_words_are():
    # the colour is the figure's (before "figure"), never the background's
    text = "a red figure jumping on a blue and white striped background"
    assert caption_attributes(text, COLORS, ACTIONS) == {"color": "red", "action": "jump"}
    assert caption_attributes("a figure jumping on a blue background", COLORS, ACTIONS)["color"] is None
    assert caption_attributes("a blue background", COLORS, ACTIONS) == {"color": None, "action": None}
    # phrases match as whole words; the earliest one wins
    text = "a black figure waving its right arm walking to the left"
    assert caption_attributes(text, COLORS, ACTIONS)["action"] == "wave_right_arm"
    assert caption_attributes("a red figure jumpingly", COLORS, ACTIONS)["action"] is None
    assert caption_attributes("", COLORS, ACTIONS) == {"color": None, "action": None}


# -- the probe ---------------------------------------------------------------------------------------------------
def _synthetic(n: int, seed: int, informative: bool) -> tuple[torch.Tensor, dict]:
    """4 x 4 grids of FSQ [4, 4] codes (16 codes): background codes 0..7; if informative, class c puts code 8 + c at
    two random cells (a 'figure' anywhere in the frame)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 8, (n, 16), generator=g)
    labels = torch.randint(0, 4, (n,), generator=g)
    if informative:
        for i in range(n):
            cells = torch.randperm(16, generator=g)[:2]
            tokens[i, cells] = 8 + labels[i]
    return tokens, {"color": labels}


def _held_out_accuracy(informative: bool) -> float:
    x, y = _synthetic(512, 0, informative)
    xv, yv = _synthetic(256, 1, informative)
    probe = AttributeProbe(16, (4, 4), {"color": 4}, levels=[4, 4], width=16, seed=0)
    probe.fit(x, y, epochs=40, batch_size=64)
    return float((probe.predict(xv)["color"] == yv["color"]).float().mean())


def test_the_probe_reads_an_attribute_that_is_in_the_tokens():
    assert _held_out_accuracy(informative=True) > 0.9


def test_the_probe_fails_when_the_tokens_carry_no_attribute():
    assert _held_out_accuracy(informative=False) < 0.4  # chance is 0.25; it memorises, but cannot generalise


def test_the_evaluation_fits_its_probe_even_under_inference_mode():
    """eval.py validates under torch.inference_mode; the probe is still fitted (once) and then cached."""
    from types import SimpleNamespace

    from mmsuite.lightning_modules.fourm.attributes import _probe

    x, y = _synthetic(1024, 0, informative=True)
    y = {"color": y["color"], "action": y["color"] % 2}
    net = SimpleNamespace(index=lambda name: 0, specs=[{"grid": [4, 4], "levels": [4, 4]}], vocabs=[16])
    module = SimpleNamespace(net=net, seed=0)
    calls = []
    dm = SimpleNamespace(
        attribute_values={"color": list("abcd"), "action": ["x", "y"]},
        probe_data=lambda split: calls.append(split) or (x, y),
    )
    with torch.inference_mode():
        probe = _probe(module, dm, "tok_rgb")
        assert _probe(module, dm, "tok_rgb") is probe and calls == ["train"]
        assert float((probe.predict(x)["color"] == y["color"]).float().mean()) > 0.6  # fitted (chance 0.25)


def test_the_probe_checks_its_input():
    probe = AttributeProbe(16, (4, 4), {"color": 4}, levels=[4, 4])
    with pytest.raises(ValueError, match=r"\[N, 16\]"):
        probe.predict(torch.zeros(2, 15, dtype=torch.long))
    with pytest.raises(ValueError, match="local ids"):
        probe.predict(torch.full((2, 16), 16))
    with pytest.raises(ValueError, match="FSQ levels"):
        AttributeProbe(16, (4, 4), {"color": 4}, levels=[4, 8])


# -- the data set ------------------------------------------------------------------------------------------------
NET = dict(levels=[4, 4], downsample=8, patch_size=4, channels=8, channel_mult=[1, 2], num_res_blocks=[1, 1])
N_Q, BINS, SR = 4, 16, 8000
CAPTION = 96  # a BPE of 6 train captions spells unseen words byte by byte
AUDIO_FRAMES = 13  # 8 frames at 16 fps = 0.5 s = 4000 samples at 8 kHz; hop 320 -> ceil(12.5) = 13 codec frames
SPLITS = {"train": 0.6, "val": 0.2, "test": 0.2}


def _image_ckpt(path: Path) -> Path:
    torch.manual_seed(0)
    net = AutoencoderSettings(**NET).build()
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    torch.save({"hyper_parameters": {"net": NET, "image_size": 32}, "state_dict": state}, path)
    return path


def _audio_ckpt(path: Path) -> Path:
    from mmsuite.lightning_modules.audio_tokenizer import AudioTokenizerModule

    codec = dict(
        kind="scratch",
        name="tiny",
        sample_rate=SR,
        n_filters=4,
        ratios=[8, 5, 4, 2],
        dimension=16,
        lstm=0,
        causal=False,
        bins=BINS,
        bandwidth=0.4,
        target_bandwidths=[0.4],
        kmeans_init=False,
    )
    torch.manual_seed(0)
    module = AudioTokenizerModule(
        codec=codec, optim={"lr": 1e-3}, schedule={"warmup_steps": 1}, loss={"waveform_mse": 1.0, "stft": 0.0}
    )
    state = {"net." + k: v for k, v in module.net.state_dict().items()}
    torch.save({"hyper_parameters": {"codec": codec}, "state_dict": state}, path)
    return path


def _space() -> TokenSpace:
    return TokenSpace.from_config(
        [
            {"name": "text", "size": 512},
            {"name": "specials", "tokens": ["<pad>", "<bos>", "<eos>"]},
            {"name": "image", "size": 16},
            *[{"name": f"audio_q{k}", "size": BINS} for k in range(N_Q)],
        ]
    )


def _modalities(caption: int = CAPTION, audio_frames: int = AUDIO_FRAMES) -> list[dict]:
    return [
        {"name": "tok_rgb", "kind": "image", "range": "image", "vocab": 16, "length": 16, "grid": [4, 4]},
        {"name": "caption", "kind": "seq", "range": "text", "vocab": 515, "length": caption},
        {"name": "audio", "kind": "seq", "range": "audio_q0", "vocab": N_Q * BINS, "length": audio_frames * N_Q},
    ]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("nano4m_ckpts")
    return _image_ckpt(tmp / "image.ckpt"), _audio_ckpt(tmp / "audio.ckpt")


def _dm(tmp_path: Path, ckpts, **kw) -> Nano4MDataModule:
    image, audio = ckpts
    args = dict(
        world={"image_size": 32, "frames": 8, "seed": 0},
        n_clips=10,
        splits=SPLITS,
        modalities=_modalities(),
        image_tokenizer={"run": "x", "ckpt": str(image), "train_if_missing": False},
        audio_tokenizer={"run": "y", "ckpt": str(audio), "train_if_missing": False},
        text_tokenizer={
            "name": "text_bpe",
            "vocab_size": 512,
            "min_frequency": 1,
            "path": None,
            "specials": {"pad": "<pad>", "bos": "<bos>", "eos": "<eos>"},
        },  # fmt: skip
        sound={"fps": 16},
        frames_per_clip=2,
        log_dir=str(tmp_path / "logs"),
        clip_samples_per_shard=4,
        data_dir=str(tmp_path / "data"),
        batch_size=4,
        samples_per_shard=3,
        token_space=_space(),
    )
    args.update(kw)
    return Nano4MDataModule(**args)


def _members(root: Path, split: str) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for shard in sorted(root.glob(f"{split}-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, _, name = m.name.partition(".")
                out.setdefault(key, {})[name] = tar.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory, ckpts) -> Nano4MDataModule:
    dm = _dm(tmp_path_factory.mktemp("nano4m_data"), ckpts)
    dm.prepare_data()
    dm.setup()
    return dm


def test_shards_hold_exact_token_counts_in_their_ranges_and_no_pickle(built):
    space, text = _space(), built.text_tokenizer
    seen = 0
    for split in ("train", "val", "test"):
        for members in _members(built.root, split).values():
            assert all("." + name.rsplit(".", 1)[-1] in ALLOWED_EXT for name in members), sorted(members)
            arrays = {n: np.load(io.BytesIO(b), allow_pickle=False) for n, b in members.items() if n.endswith(".npy")}
            rgb, cap, audio = arrays["tok_rgb.npy"], arrays["caption.npy"], arrays["audio.npy"]
            assert rgb.dtype == cap.dtype == audio.dtype == np.int32
            assert rgb.shape == (2, 16) and cap.shape == (CAPTION,) and audio.shape == (AUDIO_FRAMES * N_Q,)
            assert ((rgb >= space["image"].start) & (rgb < space["image"].stop)).all()
            for p, i in enumerate(audio):  # frame-major: position p holds codebook p % n_q
                assert i in space[f"audio_q{p % N_Q}"]
            pad = text.pad_id
            n_text = int((cap != pad).sum())
            assert (cap[n_text:] == pad).all() and (cap[:n_text] != pad).all()  # padded at the end only
            assert text.decode(cap[:n_text]) == members["caption_text.txt"].decode()
            seen += 1
    assert seen == 10


def test_split_by_clip_as_the_toy_world_splits_its_clips(built):
    expected = split_by_item(range(10), SPLITS, seed=0)
    for split in ("train", "val", "test"):
        keys = set(_members(built.root, split))
        assert keys == {f"clip{i:07d}" for i, s in expected.items() if s == split}
    counts = read_manifest(built.root)["train_attribute_counts"]
    assert sum(counts["color"].values()) == sum(counts["action"].values()) == list(expected.values()).count("train")


def test_batches_are_local_ids_with_attribute_labels(built):
    batch = next(iter(built.train_dataloader()))
    tokens = batch["tokens"]
    assert tokens.shape == (4, 16 + CAPTION + AUDIO_FRAMES * N_Q)
    assert int(tokens[:, :16].max()) < 16 and int(tokens[:, 16 : 16 + CAPTION].max()) < 515
    assert int(tokens[:, 16 + CAPTION :].max()) < N_Q * BINS
    assert set(batch) - {"stream_pos"} == {"tokens", "attr_color", "attr_action"}
    assert int(batch["attr_color"].max()) < len(COLORS) and int(batch["attr_action"].max()) < len(ACTIONS)
    tokens, labels = built.probe_data("train")
    assert tokens.shape == (2 * 6, 16) and labels["color"].shape == (12,)
    # the labels are the clips' own attributes
    for key, members in _members(built.root, "train").items():
        attrs = decode_sample({"__key__": key, **members})["attributes"]
        assert attrs["color"] in COLORS and attrs["clip"] == key


def test_a_caption_or_sound_that_does_not_fit_stops_the_build(tmp_path, ckpts):
    short = _dm(tmp_path / "a", ckpts, modalities=_modalities(caption=4))
    with pytest.raises(ValueError, match="never truncated"):
        short.prepare_data()
    assert not short.root.exists()
    wrong = _dm(tmp_path / "b", ckpts, modalities=_modalities(audio_frames=12))
    with pytest.raises(ValueError, match="audio.frames to 13"):
        wrong.prepare_data()
    assert not wrong.root.exists()


def test_the_modality_set_is_checked():
    with pytest.raises(ValueError, match="tok_rgb"):
        Nano4MDataModule(
            world={"image_size": 32, "frames": 8},
            n_clips=10,
            splits=SPLITS,
            modalities=[{"name": "pose", "range": "image", "vocab": 16, "length": 16}],
            image_tokenizer={"run": "x", "ckpt": "x"},
            text_tokenizer={},
            log_dir="logs",
            data_dir="data",
            batch_size=2,
        )


def test_raw_shard_samples_decode_without_name_clashes(built):
    shard = sorted(built.root.glob("val-*.tar"))[0]
    sample = decode_sample(next(iter_raw_samples(str(shard))))
    assert isinstance(sample["caption"], np.ndarray) and isinstance(sample["caption_text"], str)
