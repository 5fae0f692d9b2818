"""Unit tests for the text tokenizer: byte-level BPE training and local Hugging Face tokenizers (CPU, fast)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer

from mmsuite.tokenizers.text import TextTokenizer, load_hf_tokenizer, train_bpe
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
