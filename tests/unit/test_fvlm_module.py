"""The foveated VLM's data module and LightningModule pieces that need no trainer: caption encoding and batching,
a video folder's caption files, greedy-caption scoring, attention images, what the perf callback counts, and the
per-command time limit."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mmsuite.callbacks.time_limit import CommandTimer
from mmsuite.datamodules.fvlm import FVLMDataModule
from mmsuite.lightning_modules.fvlm.module import FVLMModule, attention_overlay, score_captions
from mmsuite.settings import SettingsError


class _Text:
    """A stand-in text tokenizer: one id per word, EOS = 99, pad = 98."""

    eos_id, pad_id = 99, 98

    def encode(self, text, add_eos=False):
        return [len(w) for w in text.split()] + ([self.eos_id] if add_eos else [])


def _datamodule(**extra):
    settings = dict(
        data_dir="/nonexistent",
        log_dir="/nonexistent",
        encoder={"ckpt": "/nonexistent.ckpt", "run": "x"},
        text_tokenizer={"name": "text_bpe"},
        clip_frames=8,
        frames=4,
        batch_size=2,
    )
    dm = FVLMDataModule(**{**settings, **extra})
    dm.text_tokenizer = _Text()
    dm.latent_mean, dm.latent_std = torch.zeros(2), torch.full((2,), 2.0)
    return dm


def _sample(caption, frames=True):
    s = {
        "features": np.arange(8 * 3 * 5, dtype=np.float16).reshape(8, 3, 5),
        "latents": np.ones((8, 2, 2, 2), np.float16),
        "caption": caption,
        "attributes": {"clip": 0},
    }
    if frames:
        s["frames"] = np.zeros((8, 4, 4, 3), np.uint8)
    return s


def test_samples_read_evenly_spaced_frames_and_batches_pad_captions_after_eos():
    dm = _datamodule()
    assert dm.frame_index.tolist() == [0, 2, 5, 7]
    items = dm.expand(_sample("a red figure")) + dm.expand(_sample("a big red figure waving"))
    assert items[0]["features"].shape == (4, 3, 5) and items[0]["features"][1, 0, 0] == 2 * 15
    batch = dm.collate(items)
    assert batch["text_ids"].tolist() == [[1, 3, 6, 99, 98, 98], [1, 3, 3, 6, 6, 99]]
    assert batch["text_mask"].sum(dim=1).tolist() == [4, 6]
    assert batch["latents"].dtype == torch.float32 and torch.allclose(
        batch["latents"], torch.full((2, 4, 2, 2, 2), 0.5)
    )
    assert batch["frames"].shape == (2, 4, 4, 4, 3) and batch["caption"][1] == "a big red figure waving"
    assert "frames" not in dm.collate([dm.expand(_sample("a", frames=False))[0]])  # train split: no frames


def test_a_caption_over_the_limit_stops_naming_the_setting():
    dm = _datamodule(max_caption_tokens=3)
    with pytest.raises(ValueError, match="data.max_caption_tokens=3"):
        dm.expand(_sample("a red figure"))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"frames": 9}, "data.frames"),
        ({"features": {"kind": "pixel_patches", "grid": 5}}, "data.features.image_size"),
        ({"features": {"kind": "vit"}}, "data.features.kind"),
        ({"world": {"detail_size": 99}}, "data.world"),
    ],
)
def test_bad_data_settings_name_the_key(override, key):
    with pytest.raises(SettingsError, match=key.replace(".", r"\.")):
        _datamodule(**override)


def test_a_video_without_its_caption_file_stops_naming_it(tmp_path):
    for name in ("v0.mp4", "v1.mp4", "v1.txt"):  # decoding comes after the caption files are read
        (tmp_path / name).write_bytes(b"")
    dm = _datamodule(source={"kind": "video", "root": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match="v0.txt"):
        next(dm._iter_clips([]))
    (tmp_path / "v0.txt").write_text(" \n")
    with pytest.raises(ValueError, match="v0.txt is empty"):
        next(dm._iter_clips([]))


def _module(**settings) -> FVLMModule:
    """A tiny FVLMModule: 8-wide features, 2 latent channels, a 20-id LM, 2 fine passes."""
    torch.manual_seed(0)
    lm = {"vocab_size": 20, "hidden_size": 16, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1}
    net = {"feature_dim": 8, "latent_channels": 2, "fine_iterations": 2, "glimpse": {"heads": 2}, "lm": lm}
    return FVLMModule(net={**net, "film": {"channels": [4], "mlp_dim": 8}}, **settings)


@pytest.mark.parametrize("coarse_only", [False, True])
def test_throughput_counts_every_lm_position_the_training_passes_read(coarse_only):
    """Mode token + one glimpse per frame in every pass that runs, ``<sep>`` + the caption (padding left out) in the
    scored ones: what the LM is handed, padding removed."""
    module = _module(loss={"coarse_only": coarse_only})
    b, t, length = 2, 3, 5
    mask = torch.arange(length)[None] < torch.tensor([4, 2])[:, None]  # 6 real caption tokens
    batch = {
        "features": torch.randn(b, t, 5, 8).half(),
        "latents": torch.randn(b, t, 2, 4, 4),
        "text_ids": torch.randint(0, 20, (b, length)),
        "text_mask": mask,
    }
    widths, lm_call = [], module.net._lm
    module.net._lm = lambda x, *a, **k: (widths.append(x.shape[1]), lm_call(x, *a, **k))[1]
    module.log = lambda *a, **k: None  # no trainer
    module.training_step(batch, 0)
    samples, tokens = module.throughput_counts(batch)
    frames_only, scored = 1 + t, 1 + t + length  # the widths the LM is handed, padding included
    assert widths == ([scored] if coarse_only else [scored, frames_only, scored])
    padding = int((~mask).sum())
    assert samples == b and int(tokens) == b * sum(widths) - padding * widths.count(scored)
    assert int(tokens) == (b * 4 + 6 if coarse_only else b * 4 * 3 + 2 * 6)


class _Words:
    """A stand-in text tokenizer over the token space's ids 3..19 (one toy-world word each), EOS = 2."""

    words = "a red blue figure jumping waving on plain striped background with small green cross square the of".split()
    range, vocab_size, eos_id = SimpleNamespace(start=3), 17, 2

    def decode_batch(self, batch, skip_specials=False):
        return [" ".join(self.words[i - 3] for i in ids if i >= 3) for ids in batch]


class _Clips:
    """A stand-in of a set-up FVLMDataModule: one val batch of 3 clips, 4 frames of 2 x 2 patches + CLS."""

    text_tokenizer, grid, has_cls = _Words(), (2, 2), True
    feature_shape, latent_shape, token_space = (5, 8), (2, 4, 4), SimpleNamespace(vocab_size=20)

    def setup(self, stage):
        truth = "a red figure jumping on a plain blue background with a small green cross"
        self.batch = {
            "features": torch.randn(3, 4, 5, 8).half(),
            "latents": torch.randn(3, 4, 2, 4, 4),
            "frames": torch.randint(0, 255, (3, 4, 8, 8, 3), dtype=torch.uint8),
            "caption": [truth] * 3,
            "attributes": [{"clip": i} for i in range(3)],
        }

    def val_dataloader(self):
        return [self.batch]


def test_generate_hands_the_model_the_data_and_writes_scored_captions_and_attention_maps(tmp_path, monkeypatch):
    """generate.py's path (mmsuite.run.generate) with the checkpoint's rebuild replaced by in-memory objects."""
    from omegaconf import OmegaConf

    import mmsuite.run

    module, data = _module(eval={"max_new_tokens": 3}), _Clips()
    monkeypatch.setattr(mmsuite.run, "rebuild_from_checkpoint", lambda cfg: (None, {}, data, module))
    monkeypatch.setattr(mmsuite.run, "load_checkpoint_config", lambda path: ({}, {"state_dict": module.state_dict()}))
    out = tmp_path / "gen"
    mmsuite.run.generate(OmegaConf.create({"ckpt_path": "x.ckpt", "split": "val", "n_samples": 2, "out_dir": str(out)}))
    captions = json.loads((out / "captions.json").read_text())
    assert captions["passes"] == ["coarse", "fine_2", "autoregressive"] and len(captions["clips"]) == 2
    clip = captions["clips"][1]
    assert clip["clip"] == 1 and clip["truth"].startswith("a red figure")
    for name in captions["passes"]:
        caption = clip[name]["caption"]
        assert isinstance(caption, str) and len(caption.split()) <= 3  # max_new_tokens, from the stand-in's words
        assert set(clip[name]["correct"]) == {"color", "action", "background", "background_color", "detail_color",
                                              "detail_shape"}  # fmt: skip
    assert sorted(p.name for p in out.glob("*.png")) == ["clip0_attention.png", "clip1_attention.png"]


def test_captions_are_scored_per_attribute_and_the_detail_separately():
    truth = "a red figure jumping on a plain blue background with a small green cross"
    got = "a red figure jumping on a plain blue background with a small green square"
    scores = score_captions([got, "nothing legible"], [truth, truth])
    assert [ok for ok, _ in scores["color"]] == [True, False]
    assert [ok for ok, _ in scores["detail_color"]] == [True, False]
    assert [ok for ok, _ in scores["detail_shape"]] == [False, False]
    assert scores["detail_shape"][0][1] == "cross"
    no_detail = score_captions([got], ["a red figure jumping on a plain blue background"])
    assert no_detail["detail_shape"] == [] and no_detail["action"] == [(True, "jump")]


def test_attention_overlay_keeps_the_frame_where_the_glimpse_looks():
    frames = torch.full((2, 8, 8, 3), 200, dtype=torch.uint8)
    attention = torch.zeros(2, 3, 1 + 4)  # CLS + a 2 x 2 grid, 3 heads
    attention[:, :, 1] = 1.0  # every head on the top-left patch
    img = attention_overlay(frames, attention, (2, 2), has_cls=True)
    assert img.shape == (2, 3, 8, 8) and img.dtype == torch.uint8
    assert img[0, 1, 0, 0] == 200 and img[0, 1, 7, 7] == 50  # green: kept | darkened to a quarter


def test_command_timer_gives_each_command_its_own_time():
    timer = CommandTimer({"seconds": 5})
    timer.load_state_dict({"time_elapsed": {"train": 1e6}})  # what an earlier command trained
    assert timer.time_elapsed() == 0 and not timer.expired
    assert CommandTimer({"seconds": 0}).expired
