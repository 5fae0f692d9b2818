"""prepare.py with a text tokenizer: tokenizer=text_bpe trains on the train captions, tokenizer=hf_text checks."""

import json

import pytest
from hydra import compose, initialize_config_dir
from tokenizers import Tokenizer

from mmsuite.datamodules.shards import read_texts
from mmsuite.run import build_token_space
from mmsuite.tokenizers.text import TextTokenizer, settings_path, train_bpe
from tests.cli.conftest import ROOT, run_cli


def _token_space(*overrides: str):
    """The token space prepare.py builds for these overrides, composed from the same config tree."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return build_token_space(compose("prepare", overrides=list(overrides)))


@pytest.fixture(scope="module")
def text_bpe_run(tmp_path_factory):
    """One `prepare.py tokenizer=text_bpe debug=smoke`; its data dir is reused by the hf_text runs."""
    data, logs = tmp_path_factory.mktemp("data"), tmp_path_factory.mktemp("logs")
    proc = run_cli("prepare.py", "tokenizer=text_bpe", "debug=smoke", logs=logs, data=data)
    return data, logs, proc


def test_prepare_trains_a_bpe_on_the_train_captions(text_bpe_run):
    data, _, proc = text_bpe_run
    (dataset,) = [p for p in data.iterdir() if not p.name.startswith(".")]
    (path,) = dataset.glob("text_bpe-*/tokenizer.json")
    assert str(path) in proc.stdout
    record = json.loads(settings_path(path).read_text())
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert record["settings"]["split"] == "train" and record["n_texts"] == manifest["splits"]["train"]["samples"]
    assert json.loads(path.read_text())["added_tokens"] == []  # no special strings inside the tokenizer

    space = _token_space("tokenizer=text_bpe", "debug=smoke")
    tok = TextTokenizer.from_file(path, space)
    text = space["text"]
    caption = next(read_texts(dataset, "val", "caption.txt"))  # unseen in training, still round-trips
    ids = tok.encode(caption, add_bos=True, add_eos=True)
    assert all(text.start <= i < text.start + tok.vocab_size for i in ids[1:-1])
    assert tok.decode(ids[1:-1]) == caption and len(ids) < len(caption) / 2
    # bos/eos are the token space's specials, by id, outside the text range
    assert ids[0] == space.special("<bos>") and ids[-1] == space.special("<eos>")
    assert space.specials == {"<pad>": text.stop, "<bos>": text.stop + 1, "<eos>": text.stop + 2}
    assert f"<bos>={text.stop + 1}" in proc.stdout


def test_prepare_checks_a_local_hf_tokenizer(text_bpe_run, tmp_path):
    from transformers import PreTrainedTokenizerFast

    data, logs, _ = text_bpe_run
    bpe = train_bpe(["a red figure jumping", "a blue figure squatting"] * 4, 280, tmp_path / "bpe.json")
    folder = tmp_path / "my_tokenizer"
    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(bpe)), eos_token="<|im_end|>")
    hf.save_pretrained(folder)
    size = len(hf)
    proc = run_cli(
        "prepare.py", "tokenizer=hf_text", f"tokenizer.path={folder}", f"tokenizer.vocab_size={size}", "debug=smoke",
        logs=logs, data=data,
    )  # fmt: skip
    assert f"TextTokenizer({folder}, vocab={size}, range=text=[0,{size}))" in proc.stdout
    assert f"<pad>={size}, <bos>={size + 1}, <eos>={size + 2}" in proc.stdout

    proc = run_cli(
        "prepare.py", "tokenizer=hf_text", f"tokenizer.path={folder}", "tokenizer.vocab_size=300", "debug=smoke",
        logs=logs, data=data, check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert f"{folder} has {size} tokens but the token space's 'text' range" in proc.stderr
    assert f"declares 300: set tokenizer.vocab_size={size}" in proc.stderr
