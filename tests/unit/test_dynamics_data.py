"""Latent-sequence data of the dynamics family: windows by stride, T=1 rows, alternating lengths, exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmsuite.datamodules import dynamics as D
from mmsuite.tokenizers.image import AutoencoderSettings

NET = dict(
    levels=None, downsample=8, channels=8, channel_mult=[1, 2], num_res_blocks=1, latent_channels=8, patch_size=4
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_continuous_tokenizer(path, image_size: int = 32, **net) -> str:
    """A checkpoint in ImageTokenizerModule's format (hyper_parameters.net + net.* weights), untrained."""
    torch.manual_seed(0)
    kwargs = {**NET, **net}
    model = AutoencoderSettings(**kwargs).build()
    state = {f"net.{k}": v for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"hyper_parameters": {"net": kwargs, "image_size": image_size}, "state_dict": state}, path)
    return str(path)


def make_dm(tmp_path, ckpt, **overrides) -> D.DynamicsLatentDataModule:
    kw = dict(
        source={"kind": "toyworld"},
        world={"seed": 0},
        n_clips=12,
        splits={"train": 0.5, "val": 0.25, "test": 0.25},
        clip_frames=8,
        image_size=32,
        encoder={"tokenizer": {"name": "continuous", "levels": None}, "ckpt": ckpt, "train_if_missing": False},
        log_dir=str(tmp_path / "logs"),
        seq_len=4,
        stride=2,
        long_seq_len=8,
        long_batch_size=1,
        long_ratio=0.3,
        single_fraction=0.0,
        data_dir=str(tmp_path / "data"),
        batch_size=2,
        val_batch_size=2,
        samples_per_shard=2,
        shuffle_buffer=4,
        seed=7,
    )
    kw.update(overrides)
    return D.DynamicsLatentDataModule(**kw)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dyn")
    ckpt = write_continuous_tokenizer(tmp / "tok" / "last.ckpt")
    dm = make_dm(tmp, ckpt)
    dm.prepare_data()
    return tmp, ckpt, dm


def test_window_starts_by_stride_stay_inside_the_clip():
    assert D.window_starts(32, 16, 8) == [0, 8, 16]
    assert D.window_starts(8, 4, 2) == [0, 2, 4]
    assert D.window_starts(8, 8, 3) == [0]
    with pytest.raises(ValueError, match="clip_frames"):
        D.window_starts(8, 9, 1)


def test_single_rows_follow_the_fraction_and_are_fixed():
    keys = [(f"clip{i:04d}", s) for i in range(500) for s in (0, 8)]
    assert not any(D.is_single_row(k, s, 0, 0.0) for k, s in keys)
    assert all(D.is_single_row(k, s, 0, 1.0) for k, s in keys)
    share = np.mean([D.is_single_row(k, s, 0, 0.3) for k, s in keys])
    assert 0.26 < share < 0.34
    assert [D.is_single_row(k, s, 0, 0.3) for k, s in keys] == [D.is_single_row(k, s, 0, 0.3) for k, s in keys]


def test_length_choices_depend_on_seed_and_epoch_only():
    take = lambda seed, epoch, ratio: [next(it) for it in [D.length_choices(seed, epoch, ratio)] for _ in range(2000)]
    a = take(3, 0, 0.1)
    assert a == take(3, 0, 0.1)  # what every rank computes
    assert a != take(3, 1, 0.1) and a != take(4, 0, 0.1)
    assert 0.08 < np.mean(a) < 0.12
    assert not any(take(3, 0, 0.0))


def test_build_writes_latent_clips_with_actions_and_stats(built):
    _, _, dm = built
    manifest = json.loads((dm.root / "manifest.json").read_text())
    assert manifest["latent_shape"] == [8, 4, 4]
    assert len(manifest["latent_stats"]["mean"]) == 8 and min(manifest["latent_stats"]["std"]) > 0
    assert sum(s["samples"] for s in manifest["splits"].values()) == 12
    assert manifest["token_space_sha256"] is None
    names = {m for p in dm.root.glob("*.tar") for m in __import__("tarfile").open(p).getnames()}
    assert all(n.endswith((".latents.npy", ".actions.npy", ".clip.json")) for n in names)


def test_windows_by_stride_and_both_lengths(built):
    _, _, dm = built
    dm.setup("fit")
    short, long = dm._streams["train"], dm._streams["train_long"]
    assert short.items_per_sample == 3 and long.items_per_sample == 1  # 8-frame clips: starts 0,2,4 / 0
    kinds = []
    for batch in dm.train_dataloader():
        b, t = batch["latents"].shape[:2]
        assert (b, t) == ((2, 4) if batch["length"] == "S" else (1, 8))
        assert batch["latents"].shape[2:] == (8, 4, 4) and batch["actions"].shape == (b, t)
        assert batch["actions"].min() >= 0 and batch["single"] == [False] * b
        kinds.append(batch["length"])
    assert kinds.count("S") == len(short)
    choices = D.length_choices(7, 0, 0.3)
    expected = []
    while expected.count("S") < len(short):
        expected.append("L" if next(choices) else "S")
    assert kinds == expected and "L" in kinds


def test_windows_are_the_clip_frames_at_their_starts(built):
    _, _, dm = built
    dm.setup("fit")
    clip = next(iter(dm._streams["val"]))["latents"][0]  # a whole val clip, normalised
    from mmsuite.datamodules.shards import decode_sample, iter_raw_samples, split_shards

    raw = decode_sample(next(iter_raw_samples(split_shards(dm.root, "val")[0].path)))
    windows = dm._windows(raw, 4, D.window_starts(8, 4, 2))
    assert [w["latents"].shape[0] for w in windows] == [4, 4, 4]
    norm = dm.collate(windows)["latents"]
    for i, s in enumerate((0, 2, 4)):
        torch.testing.assert_close(norm[i], clip[s : s + 4])


def test_t1_rows_are_flagged_by_the_fraction(built):
    tmp, ckpt, _ = built
    for fraction, want in ((1.0, True), (0.0, False)):
        dm = make_dm(tmp, ckpt, single_fraction=fraction, long_ratio=0.0)
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        assert batch["single"] == [want, want]


def test_train_latents_are_normalised(built):
    _, _, dm = built
    dm.setup("fit")
    z = torch.cat([b["latents"] for b in dm.train_dataloader() if b["length"] == "S"])
    per_channel = z.transpose(0, 2).flatten(1)
    assert per_channel.mean(1).abs().max() < 0.1 and (per_channel.std(1) - 1).abs().max() < 0.1


def test_resume_replays_the_same_batches(built):
    _, _, dm = built
    dm.setup("fit")
    full = list(dm.train_dataloader())
    dm.load_state_dict({"epoch": 0, "next_batch": 5, "num_workers": 0})
    tail = list(dm.train_dataloader())
    assert len(tail) == len(full) - 5
    for a, b in zip(full[5:], tail):
        assert a["length"] == b["length"] and torch.equal(a["latents"], b["latents"])
        assert torch.equal(a["stream_pos"], b["stream_pos"])


def test_quantised_tokenizer_is_refused(tmp_path):
    ckpt = write_continuous_tokenizer(tmp_path / "fsq.ckpt", levels=[8, 8, 8, 8], latent_channels=4)
    dm = make_dm(tmp_path, ckpt)
    with pytest.raises(ValueError, match="continuous latents"):
        dm.prepare_data()


def test_autoencoder_kl_from_a_local_folder_encodes_the_clips(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
        scaling_factor=0.5,
    ).save_pretrained(tmp_path / "vae")
    tok = {"name": "sd_vae", "kind": "autoencoder_kl", "path": str(tmp_path / "vae"), "token_ranges": []}
    dm = make_dm(tmp_path, None, encoder={"tokenizer": tok}, n_clips=4, splits={"train": 0.5, "val": 0.5})
    dm.prepare_data()
    manifest = json.loads((dm.root / "manifest.json").read_text())
    assert manifest["latent_shape"] == [4, 16, 16]  # 32 px, f2


def test_video_source_needs_an_existing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.source.root"):
        make_dm(tmp_path, "x", source={"kind": "video", "root": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match="data.source.kind"):
        make_dm(tmp_path, "x", source={"kind": "webcam"})
