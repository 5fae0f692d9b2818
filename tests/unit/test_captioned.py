import csv
import json

import numpy as np
import pytest
from PIL import Image

from mmsuite.sources.captioned import load_audio, load_image, read_audio_captions, read_llava_pretrain
from mmsuite.sources.wav import write_wav


def _llava_folder(tmp_path, entries):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for name in ("sub/a.png", "b.jpg"):
        Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(images / name)
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(entries))
    return path, images


def test_llava_pretrain_records_read_the_gpt_turn_and_name_bad_entries(tmp_path):
    entries = [
        {
            "id": "x/1",
            "image": "sub/a.png",
            "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": " a  red cube "}],
        },
        {"image": "b.jpg", "caption": "a blue ball"},
    ]
    path, images = _llava_folder(tmp_path, entries)
    recs = list(read_llava_pretrain(path, images))
    assert [(r.key, r.caption) for r in recs] == [("x_1", "a red cube"), ("b", "a blue ball")]
    assert load_image(recs[0].path, 16).shape == (16, 16, 3)
    path.write_text(json.dumps([{"image": "missing.png", "caption": "c"}]))
    with pytest.raises(FileNotFoundError, match="entry 0"):
        list(read_llava_pretrain(path, images))
    path.write_text(json.dumps([{"image": "b.jpg"}]))
    with pytest.raises(ValueError, match="entry 0: no caption"):
        list(read_llava_pretrain(path, images))


def test_audio_caption_csv_gives_one_record_per_caption_grouped_by_file(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    write_wav(audio / "dog.wav", np.sin(np.linspace(0, 100, 16000)).astype(np.float32) * 0.5, 16000)
    path = tmp_path / "captions.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "caption_1", "caption_2"])
        w.writerow(["dog.wav", "a dog barks", "barking"])
    recs = list(read_audio_captions(path, audio))
    assert [r.caption for r in recs] == ["a dog barks", "barking"] and {r.item for r in recs} == {"dog"}
    wav = load_audio(recs[0].path, 8000, max_seconds=0.5)
    assert wav.dtype == np.float32 and wav.shape == (4000,)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["file_name", "caption"], ["cat.wav", "meow"]])
    with pytest.raises(FileNotFoundError, match="row 2"):
        list(read_audio_captions(path, audio))
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["name", "caption"], ["dog.wav", "x"]])
    with pytest.raises(ValueError, match="no audio file column"):
        list(read_audio_captions(path, audio))
