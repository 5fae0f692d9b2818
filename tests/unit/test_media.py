"""Sample media: nano4m's audio generation stays within each slot's codebook, prompts are drawn under the frames, and
text tables reach TensorBoard and the file loggers."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from mmsuite.callbacks.samples import log_text
from mmsuite.lightning_modules.fourm.media import _captioned_tiles, codebook_constraint


def test_audio_slots_keep_to_their_codebook():
    n_q, bins = 3, 4
    logits = torch.randn(7, n_q * bins)
    slot = torch.arange(7)  # frame-major: slot t * n_q + k holds codebook k
    picked = codebook_constraint(n_q, bins)(logits, slot).argmax(-1)
    assert torch.equal(picked // bins, slot % n_q)


def test_prompts_are_drawn_under_the_frames():
    frames = [torch.zeros(2, 8, 8, 3, dtype=torch.uint8), torch.full((2, 8, 8, 3), 255, dtype=torch.uint8)]
    tiles = _captioned_tiles(frames, ["a red figure jumping", "a blue figure squatting on a plain background"])
    assert tiles.dtype == torch.uint8 and tiles.shape[:2] == (2, 3) and tiles.shape[3] == 2 * 96 + 4
    text_area = tiles[:, :, 96:]
    assert int(text_area.amax()) > 200 and bool((tiles[0] != tiles[1]).any())  # white text, per prompt


def test_captions_can_stand_beside_the_frame():
    frames = [torch.zeros(1, 8, 8, 3, dtype=torch.uint8)]
    tiles = _captioned_tiles(frames, ["made: a red figure\ntrue: a blue figure"], beside=True)
    assert tiles.shape[2] == 96 and tiles.shape[3] > 96  # one frame high, the text to its right
    assert int(tiles[:, :, :, :96].amax()) == 0 and int(tiles[:, :, :, 100:].amax()) > 200


def test_text_tables_reach_tensorboard_and_file_loggers(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb, csv = TensorBoardLogger(tmp_path, name="tb", version=""), CSVLogger(tmp_path, name="csv", version="")
    trainer = SimpleNamespace(is_global_zero=True, global_step=5, loggers=[tb, csv], default_root_dir=str(tmp_path))
    written = log_text(trainer, "val/image_to_caption", ["clip", "caption"], [["0", "a red | figure"]])
    assert written and "| 0 | a red \\| figure |" in written[0].read_text()
    tb.experiment.flush()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    assert "val/image_to_caption/text_summary" in acc.Tags()["tensors"]
