"""mmsuite.tokenize: a toy-world clips data set -> token shards with an image checkpoint and a text BPE."""

import numpy as np
import pytest
import torch

from mmsuite.datamodules.clips import build_toyworld
from mmsuite.datamodules.shards import decode_sample, iter_raw_samples, read_manifest, split_shards
from mmsuite.tokenize import TokenizeError, tokenize_dataset
from mmsuite.tokenizers.image import AutoencoderSettings, ImageTokenizer
from mmsuite.tokenizers.text import train_bpe
from mmsuite.tokenizers.token_space import TokenSpace

NET = dict(levels=[4, 4], downsample=8, patch_size=4, channels=8, channel_mult=[1, 2], num_res_blocks=[1, 1])
SPLITS = {"train": 0.6, "val": 0.2, "test": 0.2}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tok")
    root = build_toyworld(tmp / "clips", {"image_size": 32, "frames": 4}, 10, SPLITS, 4, workers=1)
    torch.manual_seed(0)
    net = AutoencoderSettings(**NET).build()
    ckpt = tmp / "image.ckpt"
    torch.save(
        {
            "hyper_parameters": {"net": NET, "image_size": 32},
            "state_dict": {"net." + k: v for k, v in net.state_dict().items()},
        },
        ckpt,
    )
    captions = [s["caption"] for _, s in samples(root)]
    bpe = train_bpe(captions, 300, tmp / "bpe" / "tokenizer.json", min_frequency=1)
    return root, ckpt, bpe


def samples(root):
    manifest = read_manifest(root)
    for split in manifest["splits"]:
        for shard in split_shards(root, split, manifest):
            for raw in iter_raw_samples(shard.path):
                yield split, decode_sample(raw)


def test_image_and_text_token_shards(source, capsys):
    root, ckpt, bpe = source
    out = tokenize_dataset(root, image={"ckpt": str(ckpt)}, text=str(bpe))
    assert out.parent == root and out.name.startswith("tokens-")
    manifest = read_manifest(out)
    names = [r["name"] for r in manifest["token_space"]["ranges"]]
    assert names == ["text", "specials", "image"]
    ranges = {r["name"]: (r["start"], r["start"] + r["size"]) for r in manifest["token_space"]["ranges"]}
    space = TokenSpace(
        [
            (r["name"], r["tokens"]) if "tokens" in r else (r["name"], r["size"])
            for r in manifest["token_space"]["ranges"]
        ]
    )
    assert manifest["token_space_sha256"] == space.sha256
    assert ranges["image"][1] - ranges["image"][0] == 16  # FSQ 4x4
    assert ranges["image"][0] > 0  # after text + specials: ids are offset in the joint space

    src = {s["__key__"]: (split, s) for split, s in samples(root)}
    got = {s["__key__"]: (split, s) for split, s in samples(out)}
    assert got.keys() == src.keys()
    tok = ImageTokenizer.from_checkpoint(ckpt, token_space=space)
    for key, (split, s) in got.items():
        assert split == src[key][0]
        assert set(s) == {"__key__", "tok_image", "tok_text", "caption"}
        assert s["caption"] == src[key][1]["caption"]
        img, txt = s["tok_image"], s["tok_text"]
        assert img.dtype == np.int32 and img.shape == (4, 16)
        assert txt.dtype == np.int32 and txt.ndim == 1 and len(txt) > 0
        assert ranges["image"][0] <= img.min() and img.max() < ranges["image"][1]
        assert ranges["text"][0] <= txt.min() and txt.max() < ranges["text"][1]
    key, (_, s) = next(iter(got.items()))
    decoded = tok.decode(torch.from_numpy(s["tok_image"]).reshape(4, *tok.grid))
    assert tuple(decoded.shape) == src[key][1]["frames"].shape
    np.testing.assert_array_equal(tok.encode(src[key][1]["frames"]).reshape(4, -1).numpy(), s["tok_image"])

    capsys.readouterr()
    assert tokenize_dataset(root, image={"ckpt": str(ckpt)}, text=str(bpe)) == out
    assert "reusing" in capsys.readouterr().out


def test_text_only_gets_its_own_folder(source, tmp_path):
    root, _, bpe = source
    out = tokenize_dataset(root, text={"path": str(bpe)}, out=tmp_path / "t")
    manifest = read_manifest(out)
    assert [r["name"] for r in manifest["token_space"]["ranges"]] == ["text", "specials"]
    assert manifest["sample_fields"] == ["caption.txt", "tok_text.npy"]


def test_errors_name_the_key_and_file(source, tmp_path):
    root, ckpt, bpe = source
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(TokenizeError, match=r"tokenize\.image\.ckpt.*nope\.ckpt"):
        tokenize_dataset(root, image={"ckpt": str(missing)})
    with pytest.raises(TokenizeError, match=r"tokenize\.audio.*manifest\.json.*audio\.wav"):
        tokenize_dataset(root, audio={"ckpt": str(ckpt)})
    with pytest.raises(TokenizeError, match="at least one"):
        tokenize_dataset(root)
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(TokenizeError, match=r"tokenize\.image.*bad\.ckpt"):
        tokenize_dataset(root, image=str(bad), out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_audio_and_text_token_shards_from_toy_sound(tmp_path):
    """The audio path: toy sound + a tiny saved audio tokenizer checkpoint + a BPE -> frame-major audio ids."""
    from mmsuite.datamodules.sounds import build_toysound
    from mmsuite.lightning_modules.audio_tokenizer import AudioTokenizerModule
    from mmsuite.tokenizers.audio import audio_tokenizer_from_checkpoint

    sr = 8000
    codec = dict(
        kind="scratch",
        name="tiny",
        sample_rate=sr,
        n_filters=4,
        ratios=[8, 5, 4, 2],
        dimension=16,
        lstm=0,
        causal=False,
        bins=16,
        bandwidth=0.4,
        target_bandwidths=[0.4],
        kmeans_init=False,
        token_ranges=[{"name": f"audio_q{k}", "size": 16} for k in range(4)],
    )
    root = build_toysound(tmp_path / "sound", {"sample_rate": sr, "duration_s": 0.5}, 8, SPLITS, 4)
    torch.manual_seed(0)
    module = AudioTokenizerModule(
        codec=codec,
        optim={"lr": 1e-3},
        schedule={"warmup_steps": 1},
        loss={"waveform_mse": 1.0, "stft": 0.0},
    )
    ckpt = tmp_path / "audio.ckpt"
    state = {"net." + k: v for k, v in module.net.state_dict().items()}
    torch.save({"hyper_parameters": {"codec": codec}, "state_dict": state}, ckpt)
    captions = [s["caption"] for _, s in samples(root)]
    bpe = train_bpe(captions, 300, tmp_path / "bpe" / "tokenizer.json", min_frequency=1)
    out = tokenize_dataset(root, audio={"ckpt": str(ckpt)}, text=str(bpe))
    manifest = read_manifest(out)
    ranges = {r["name"]: (r["start"], r["start"] + r["size"]) for r in manifest["token_space"]["ranges"]}
    assert [r["name"] for r in manifest["token_space"]["ranges"]] == ["text", "specials"] + [
        f"audio_q{k}" for k in range(4)
    ]
    tok = audio_tokenizer_from_checkpoint(ckpt)
    n_frames = -(-int(0.5 * sr) // 320)
    got = {key["__key__"]: (split, key) for split, key in samples(out)}
    for split, src in samples(root):
        split2, sample = got[src["__key__"]]
        assert split2 == split
        ids = sample["tok_audio"]
        assert ids.dtype == np.int32 and ids.shape == (n_frames * 4,)
        for p, i in enumerate(ids):  # frame-major: position p holds codebook p % 4
            lo, hi = ranges[f"audio_q{p % 4}"]
            assert lo <= i < hi
        assert tok.n_q == 4
