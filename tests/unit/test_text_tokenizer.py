"""Unit tests for the text tokenizer: byte-level BPE training and local Hugging Face tokenizers (CPU, fast)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from tokenizers import Tokenizer

from mmsuite.datamodules.base import prepare_text_tokenizer
from mmsuite.datamodules.shards import DatasetWriter, ShardError
from mmsuite.tokenizers.text import (
    TextTokenizer,
    load_hf_tokenizer,
    settings_path,
    text_bpe_path,
    text_tokenizer_from_config,
    train_bpe,
)
from mmsuite.tokenizers.token_space import TokenSpace

COLORS = ["red", "green", "blue", "yellow", "black"]
SIDES = ["left", "right"]
PATTERNS = ["striped", "dotted", "plain", "checkered", "wavy"]
CAPTIONS = [
    f"a {c} figure waving its {s} arm on a {p} {COLORS[(i + j) % 5]} background"
    for i, c in enumerate(COLORS)
    for s in SIDES
    for j, p in enumerate(PATTERNS)
]
SPECIALS = ["<pad>", "<bos>", "<eos>", "<img>"]
STRINGS = [
    "a red figure waving its left arm on a striped blue background",
    "A PURPLE figure, jumping!? 42 times",
    "  leading and  double  spaces\n\ttabs\r\nand trailing  ",
    "héllo wörld — naïve café, Straße",
    "日本語のキャプション 🙂 👩‍👩‍👧 ∑x² \x00 \u200b end",
    "",
]


def _space(text_size=300, extra=()):
    return TokenSpace([("specials", SPECIALS), ("text", text_size), *extra, ("image", 64)])


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory):
    return train_bpe(CAPTIONS, 300, tmp_path_factory.mktemp("bpe") / "tokenizer.json")


@pytest.fixture(scope="module")
def tok(bpe_path):
    return TextTokenizer.from_file(bpe_path, _space())


def test_train_bpe_writes_a_byte_level_tokenizer_without_specials(bpe_path):
    assert len(CAPTIONS) == 50
    body = json.loads(bpe_path.read_text())
    assert body["added_tokens"] == []
    assert body["pre_tokenizer"]["type"] == "ByteLevel" and body["decoder"]["type"] == "ByteLevel"
    raw = Tokenizer.from_file(str(bpe_path))
    assert 256 < raw.get_vocab_size() <= 300
    assert not any(t.startswith("<") and t.endswith(">") for t in raw.get_vocab())
    # trained merges compress the captions well below one token per byte
    assert len(raw.encode(CAPTIONS[0]).ids) < len(CAPTIONS[0]) / 2


def test_train_bpe_is_atomic_and_deterministic(tmp_path, bpe_path):
    out = train_bpe(CAPTIONS, 300, tmp_path)  # a directory means <dir>/tokenizer.json
    assert out == tmp_path / "tokenizer.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]
    assert out.read_bytes() == bpe_path.read_bytes()

    def bad_texts():
        yield "fine"
        yield 3

    with pytest.raises(TypeError, match="text #1 is int"):
        train_bpe(bad_texts(), 300, tmp_path / "bad.json")
    with pytest.raises(ValueError, match=">= 256"):
        train_bpe(CAPTIONS, 100, tmp_path / "small.json")
    with pytest.raises(TypeError, match="single string"):
        train_bpe("a caption", 300, tmp_path / "str.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]  # nothing half-written


@pytest.mark.parametrize("s", STRINGS)
def test_round_trip_is_exact_and_ids_lie_in_the_text_range(tok, s):
    ids = tok.encode(s)
    rng = tok.token_space["text"]
    assert all(rng.start <= i < rng.start + tok.vocab_size for i in ids)
    assert tok.decode(ids) == s


def test_encode_batch_matches_encode_and_accepts_arrays(tok):
    batch = tok.encode_batch(STRINGS, add_eos=True)
    assert batch == [tok.encode(s, add_eos=True) for s in STRINGS]
    assert tok.decode_batch([np.asarray(b) for b in batch], skip_specials=True) == STRINGS
    with pytest.raises(TypeError, match="single string"):
        tok.encode_batch("a red figure")
    with pytest.raises(TypeError, match="item 1 is NoneType"):
        tok.encode_batch(["a", None])


def test_bos_eos_are_the_token_space_specials(tok):
    space = tok.token_space
    plain = tok.encode("a red figure")
    framed = tok.encode("a red figure", add_bos=True, add_eos=True)
    assert framed == [space.special("<bos>"), *plain, space.special("<eos>")]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
    assert tok.decode(framed, skip_specials=True) == "a red figure"
    # the strings of the specials are just text: they never turn into the special ids
    ids = tok.encode("<bos> and <eos>")
    assert not any(space.is_special(i) for i in ids) and tok.decode(ids) == "<bos> and <eos>"


def test_special_names_are_configurable_and_missing_ones_are_clear(bpe_path):
    space = TokenSpace([("text", 300), ("specials", ["<|start|>", "<|end|>"])])
    tok = TextTokenizer.from_file(bpe_path, space, bos="<|start|>", eos="<|end|>")
    assert tok.encode("a", add_bos=True, add_eos=True)[::2] == [300, 301]
    with pytest.raises(KeyError, match=r"no special token '<pad>'.*known specials: \['<\|start\|>', '<\|end\|>'\]"):
        _ = tok.pad_id
    plain = TextTokenizer.from_file(bpe_path, TokenSpace([("text", 300)]))
    assert plain.decode(plain.encode("no specials needed")) == "no specials needed"
    with pytest.raises(KeyError, match="known specials: none"):
        plain.encode("x", add_eos=True)


def test_decode_rejects_ids_outside_the_text_range(tok):
    space = tok.token_space
    text, image = space["text"], space["image"]
    with pytest.raises(
        ValueError, match=rf"token id {image.start} at position 1: .*text range 'text' \[4,304\).*'image'"
    ):
        tok.decode([text.start, image.start])
    with pytest.raises(ValueError, match=r"token id 2 at position 0: it is the special '<eos>'.*skip_specials=True"):
        tok.decode([2, text.start])
    with pytest.raises(ValueError, match=r"token id 999 .*no range"):
        tok.decode([999])
    with pytest.raises(ValueError, match=r"token id -1 "):
        tok.decode([-1])
    # skip_specials drops named specials only, never ids of other modalities
    with pytest.raises(ValueError, match=f"token id {image.start} "):
        tok.decode([image.start], skip_specials=True)


def test_unused_tail_of_a_larger_text_range_is_rejected(bpe_path):
    tok = TextTokenizer.from_file(bpe_path, TokenSpace([("text", 512)]))
    assert tok.vocab_size <= 300
    with pytest.raises(ValueError, match=r"past the tokenizer's \d+ tokens"):
        tok.decode([tok.vocab_size])


def test_text_range_smaller_than_the_vocab_raises(bpe_path):
    vocab = Tokenizer.from_file(str(bpe_path)).get_vocab_size()
    with pytest.raises(ValueError, match=rf"range 'text' has 100 ids but .*tokenizer.json has {vocab} tokens"):
        TextTokenizer.from_file(bpe_path, _space(text_size=100))
    with pytest.raises(KeyError, match="no token range 'text'"):
        TextTokenizer.from_file(bpe_path, TokenSpace([("image", 10)]))


def test_local_directory_with_tokenizer_json_and_save_pretrained(tmp_path, bpe_path, tok):
    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()
    (plain_dir / "tokenizer.json").write_bytes(bpe_path.read_bytes())
    from_dir = TextTokenizer.from_file(plain_dir, _space())
    s = STRINGS[4]
    assert from_dir.encode(s) == tok.encode(s) and from_dir.decode(from_dir.encode(s)) == s

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    hf_dir = tmp_path / "hf"
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(bpe_path))).save_pretrained(hf_dir)
    assert AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)(s)["input_ids"] == [
        i - 4 for i in tok.encode(s)
    ]
    from_hf = TextTokenizer.from_file(hf_dir, _space())
    assert from_hf.vocab_size == tok.vocab_size
    assert from_hf.encode(s, add_bos=True) == tok.encode(s, add_bos=True) and from_hf.decode(from_hf.encode(s)) == s


def test_local_directory_without_tokenizer_json_goes_through_transformers(tmp_path, bpe_path, tok):
    # a GPT-2 style folder: vocab.json + merges.txt; transformers builds the fast tokenizer offline
    slow_dir = tmp_path / "gpt2_style"
    slow_dir.mkdir()
    Tokenizer.from_file(str(bpe_path)).model.save(str(slow_dir))
    (slow_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    space = _space(text_size=301)  # GPT2Tokenizer adds <|endoftext|> after the BPE vocab
    gpt2 = TextTokenizer.from_file(slow_dir, space)
    assert gpt2.vocab_size == tok.vocab_size + 1
    for s in STRINGS:
        assert gpt2.encode(s) == tok.encode(s) and gpt2.decode(gpt2.encode(s)) == s
    # the pretrained tokenizer's own special string is encoded literally, unless asked otherwise
    eot = gpt2.tokenizer.token_to_id("<|endoftext|>") + space["text"].start
    assert (
        eot not in gpt2.encode("end<|endoftext|>")
        and gpt2.decode(gpt2.encode("end<|endoftext|>")) == "end<|endoftext|>"
    )
    parsing = TextTokenizer.from_file(slow_dir, space, literal_specials=False)
    assert parsing.encode("end<|endoftext|>")[-1] == eot


def test_missing_or_broken_paths_raise_clear_errors(tmp_path):
    missing = tmp_path / "no_such_tokenizer_dir"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        TextTokenizer.from_file(missing, _space())
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_hf_tokenizer(tmp_path)  # exists, but holds no tokenizer
    broken = tmp_path / "tokenizer.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid Hugging Face tokenizer.json"):
        load_hf_tokenizer(broken)


# ---------------------------------------------------------------------------------------------------
# from a config: prepare_text_tokenizer (train once, train split only) and text_tokenizer_from_config
# ---------------------------------------------------------------------------------------------------
CONF = Path(__file__).resolve().parents[2] / "conf" / "tokenizer"
HELD_OUT = ["a zebra giraffe figure", "zebra giraffe zebra giraffe"]  # only in val/test: must not be learnt


def _tokenizer_cfg(name: str, **overrides) -> dict:
    """conf/tokenizer/<name>.yaml as the run resolves it, with ``overrides``."""
    cfg = OmegaConf.merge(OmegaConf.load(CONF / f"{name}.yaml"), overrides)
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A caption-only data set: CAPTIONS in train, HELD_OUT text (many times) in val and test."""
    root = tmp_path_factory.mktemp("data") / "captions-0123456789"
    with DatasetWriter(root, samples_per_shard=16) as w:
        for i, c in enumerate(CAPTIONS):
            w.write("train", f"s{i:04d}", {"caption.txt": c, "label.json": {"i": i}})
        for i in range(20):
            w.write("val" if i % 2 else "test", f"h{i:04d}", {"caption.txt": HELD_OUT[i % 2]})
    return root


def test_prepare_text_tokenizer_trains_once_on_train_captions_only(dataset, monkeypatch):
    cfg = _tokenizer_cfg("text_bpe", vocab_size=400)
    path = prepare_text_tokenizer(cfg, dataset)
    assert path.parent.parent == dataset and path.parent.name.startswith("text_bpe-") and path.name == "tokenizer.json"
    record = json.loads(settings_path(path).read_text())
    assert record["settings"]["split"] == "train" and record["n_texts"] == len(CAPTIONS)
    assert record["settings"]["data"] == dataset.name and record["settings"]["vocab_size"] == 400
    vocab = Tokenizer.from_file(str(path)).get_vocab()
    assert record["trained_vocab_size"] == len(vocab) <= 400
    assert "Ġfigure" in vocab and "Ġbackground" in vocab  # train words were merged...
    assert not any(len(t) > 2 and t.strip("Ġ") in "zebragiraffe" for t in vocab)  # ...held-out ones never

    # a second call reuses the file without reading a single shard
    before = (path.stat().st_mtime_ns, path.read_bytes())

    def no_reading(*args, **kwargs):
        raise AssertionError("the shards were read again")

    monkeypatch.setattr("mmsuite.datamodules.shards.read_texts", no_reading)
    assert prepare_text_tokenizer(cfg, dataset) == path
    assert (path.stat().st_mtime_ns, path.read_bytes()) == before
    # other settings get their own folder next to it
    other = _tokenizer_cfg("text_bpe", vocab_size=400, min_frequency=3)
    assert text_bpe_path(other, dataset).parent != path.parent
    assert sorted(p.name for p in path.parent.iterdir()) == ["tokenizer.json", "tokenizer.settings.json"]


def test_prepare_text_tokenizer_refuses_other_settings_and_edited_files(dataset, tmp_path):
    cfg = _tokenizer_cfg("text_bpe", vocab_size=300, path=str(tmp_path / "mine"))
    path = prepare_text_tokenizer(cfg, dataset)
    assert path == tmp_path / "mine" / "tokenizer.json"
    with pytest.raises(ValueError, match=r"other settings.*vocab_size: 300 there, 320 now.*Delete"):
        prepare_text_tokenizer(dict(cfg, vocab_size=320), dataset)
    with pytest.raises(ValueError, match=r"data: 'captions-0123456789' there, 'elsewhere' now"):
        prepare_text_tokenizer(cfg, tmp_path / "elsewhere")
    path.write_bytes(path.read_bytes() + b" ")  # still a valid tokenizer.json, but not the trained one
    with pytest.raises(ValueError, match="changed since prepare.py trained it"):
        prepare_text_tokenizer(cfg, dataset)
    settings_path(path).unlink()
    with pytest.raises(ValueError, match="tokenizer.settings.json does not"):
        prepare_text_tokenizer(cfg, dataset)


def test_prepare_text_tokenizer_names_a_missing_caption_field(dataset, tmp_path):
    cfg = _tokenizer_cfg("text_bpe", text_field="text.txt", path=str(tmp_path / "bpe" / "t.json"))
    with pytest.raises(ShardError, match=r"sample s0000 has no text.txt \(it has \['caption.txt', 'label.json'\]\)"):
        prepare_text_tokenizer(cfg, dataset)
    assert list(tmp_path.iterdir()) == []  # nothing half-written, not even the folder


def test_text_bpe_from_config_uses_the_token_space_specials(dataset):
    cfg = _tokenizer_cfg("text_bpe", vocab_size=400, min_frequency=5)
    space = TokenSpace.from_config(cfg["token_ranges"])
    with pytest.raises(FileNotFoundError, match="python prepare.py tokenizer=text_bpe"):
        text_tokenizer_from_config(cfg, space, dataset)
    prepare_text_tokenizer(cfg, dataset)
    tok = text_tokenizer_from_config(cfg, space, dataset)
    assert (space["text"].start, space["text"].size) == (0, 400) and tok.range == space["text"]
    ids = tok.encode(CAPTIONS[3], add_bos=True, add_eos=True)
    assert ids[0] == space.special("<bos>") == 401 and ids[-1] == space.special("<eos>") == 402
    assert all(0 <= i < tok.vocab_size for i in ids[1:-1]) and tok.decode(ids, skip_specials=True) == CAPTIONS[3]
    assert tok.pad_id == space.special("<pad>") == 400
    with pytest.raises(KeyError, match="no special token '<pad>' in the token space"):
        text_tokenizer_from_config(cfg, TokenSpace.from_config([{"name": "text", "size": 400}]), dataset)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, bpe_path):
    """A tiny transformers tokenizer folder with added tokens of its own, as save_pretrained writes it."""
    from transformers import PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("hf_tokenizer")
    hf = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_file(str(bpe_path)), eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    hf.save_pretrained(out)
    return out, len(hf)


def test_hf_text_config_loads_a_local_folder_checked_against_the_range(hf_dir, bpe_path):
    folder, size = hf_dir
    cfg = _tokenizer_cfg("hf_text", path=str(folder), vocab_size=size)
    space = TokenSpace.from_config(cfg["token_ranges"])
    tok = text_tokenizer_from_config(cfg, space)
    assert tok.vocab_size == size == Tokenizer.from_file(str(bpe_path)).get_vocab_size() + 2
    s = "a red figure<|im_end|> <eos>"
    ids = tok.encode(s, add_eos=True)
    assert ids[-1] == space.special("<eos>") == size + 2 and not any(space.is_special(i) for i in ids[:-1])
    assert tok.decode(ids[:-1]) == s  # the tokenizer's own special string stays text
    assert tok.encode("a red figure") == [
        i - 4 for i in TextTokenizer.from_file(bpe_path, _space()).encode("a red figure")
    ]

    for declared in (size - 1, size + 10):
        wrong = _tokenizer_cfg("hf_text", path=str(folder), vocab_size=declared)
        with pytest.raises(ValueError, match=rf"{folder} has {size} tokens but .*'text' range.* declares {declared}"):
            text_tokenizer_from_config(wrong, TokenSpace.from_config(wrong["token_ranges"]))
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        missing = _tokenizer_cfg("hf_text", path=str(folder.parent / "no_such_folder"), vocab_size=size)
        text_tokenizer_from_config(missing, space)
    with pytest.raises(ValueError, match="'fsq_toy' is not a text tokenizer"):
        text_tokenizer_from_config({"name": "fsq_toy"}, space)
