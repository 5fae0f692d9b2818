"""prepare.py tokenize.*: the smoke toy world as token shards (image checkpoint + text BPE), then reused."""

import json

import torch

from mmsuite.tokenizers.image import AutoencoderSettings
from tests.cli.conftest import ROOT, run_cli

NET = dict(levels=[4, 4], downsample=8, patch_size=4, channels=8, channel_mult=[1, 2], num_res_blocks=[1, 1])


def test_prepare_tokenize_image_and_text(tmp_path):
    data, logs = tmp_path / "data", tmp_path / "logs"
    ckpt = tmp_path / "image.ckpt"
    state = {"net." + k: v for k, v in AutoencoderSettings(**NET).build().state_dict().items()}
    torch.save({"hyper_parameters": {"net": NET, "image_size": 32}, "state_dict": state}, ckpt)
    overrides = [
        "experiment=image_tokenizer",
        "debug=smoke",
        f"tokenize.image={ckpt}",
        f"tokenize.text={{config:{ROOT / 'conf/tokenizer/text_bpe.yaml'}}}",
    ]
    run_cli("prepare.py", *overrides, logs=logs, data=data)
    (out,) = data.glob("*/tokens-*")
    manifest = json.loads((out / "manifest.json").read_text())
    assert [r["name"] for r in manifest["token_space"]["ranges"]] == ["text", "specials", "image"]
    assert manifest["token_space_sha256"] and manifest["sample_fields"] == [
        "caption.txt",
        "tok_image.npy",
        "tok_text.npy",
    ]
    source = json.loads((out.parent / "manifest.json").read_text())
    assert {s: v["samples"] for s, v in manifest["splits"].items()} == {
        s: v["samples"] for s, v in source["splits"].items()
    }
    again = run_cli("prepare.py", *overrides, logs=logs, data=data)
    assert "reusing" in again.stdout

    bad = run_cli("prepare.py", *overrides[:2], f"tokenize.audio={ckpt}", logs=logs, data=data, check=False)
    assert bad.returncode != 0 and "tokenize.audio: the source data set" in bad.stderr + bad.stdout
