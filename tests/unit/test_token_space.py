import json

import pytest

from mmsuite.tokenizers.token_space import TokenSpace, TokenSpaceMismatch, check_same


def test_ranges_are_contiguous_and_disjoint():
    space = TokenSpace([("specials", 16), ("text", 100), ("image", 1000)])
    assert [(r.name, r.start, r.stop) for r in space] == [("specials", 0, 16), ("text", 16, 116), ("image", 116, 1116)]
    assert space.vocab_size == 1116
    assert space.range_of(116).name == "image" and space.range_of(115).name == "text"
    with pytest.raises(ValueError, match="outside every range"):
        space.range_of(1116)


def test_register_rejects_duplicates_and_bad_sizes():
    space = TokenSpace([("image", 10)])
    with pytest.raises(ValueError, match="already registered"):
        space.register("image", 5)
    with pytest.raises(ValueError, match="positive integer"):
        space.register("audio", 0)


def test_sha_depends_on_names_sizes_and_order():
    a = TokenSpace([("text", 10), ("image", 20)])
    assert a.sha256 == TokenSpace([("text", 10), ("image", 20)]).sha256
    assert a.sha256 != TokenSpace([("image", 20), ("text", 10)]).sha256
    assert a.sha256 != TokenSpace([("text", 10), ("image", 21)]).sha256
    assert a.sha256 != TokenSpace([("txt", 10), ("image", 20)]).sha256


def test_save_load_round_trip_and_tamper_detection(tmp_path):
    space = TokenSpace.from_config([{"name": "image", "size": 1000}, {"name": "pose", "size": 64}])
    path = space.save(tmp_path / "token_space.json")
    assert TokenSpace.load(path) == space
    body = json.loads(path.read_text())
    body["ranges"][1]["size"] = 65
    body["vocab_size"] = 1065
    path.write_text(json.dumps(body))
    with pytest.raises(ValueError, match="does not match"):
        TokenSpace.load(path)


def test_mismatch_error_names_both_hashes_and_sources():
    a, b = TokenSpace([("image", 1000)]), TokenSpace([("image", 64000)])
    check_same(a.sha256, "x", a.sha256, "y")
    with pytest.raises(TokenSpaceMismatch) as e:
        check_same(a.sha256, "run dir /r/token_space.json", b.sha256, "data /d/manifest.json")
    msg = str(e.value)
    assert a.sha256 in msg and b.sha256 in msg
    assert "/r/token_space.json" in msg and "/d/manifest.json" in msg


# -- named specials ----------------------------------------------------------------------------------------

# sha256 of spaces without specials, computed before specials existed: run dirs, manifests and checkpoints
# written earlier must keep matching.
OLD_SHAS = {
    (
        ("specials", 16),
        ("text", 100),
        ("image", 1000),
    ): "6b70dd5a9a94d600eb6ab569c29463de30113876e3736f14b849bc644000f44b",
    (
        ("text", 151669),
        ("qwen_pad", 267),
        ("image", 8192),
    ): "d9b578c16187e65e5f39bee8361ebad7c4fc5769fffc95c83f567cea94afe9f8",
    (("image", 1000), ("pose", 64)): "9bd8030bd72c65d5223ffb23f5fb0b7585b5919bb68d4a82e299e332fc69003a",
}


@pytest.mark.parametrize("ranges", list(OLD_SHAS))
def test_sha_of_spaces_without_specials_is_unchanged(ranges, tmp_path):
    space = TokenSpace(ranges)
    assert space.sha256 == OLD_SHAS[ranges]
    assert "tokens" not in space.canonical_json()
    assert TokenSpace.from_config([{"name": n, "size": s} for n, s in ranges]).sha256 == OLD_SHAS[ranges]
    assert TokenSpace.load(space.save(tmp_path / "ts.json")).sha256 == OLD_SHAS[ranges]


def test_specials_map_names_to_ids_and_back():
    space = TokenSpace([("text", 300)])
    rng = space.register_specials(name="specials", tokens=["<pad>", "<bos>", "<eos>"], size=8)
    assert (rng.start, rng.size) == (300, 8) and space.vocab_size == 308
    assert space.special("<pad>") == 300 and space.special("<eos>") == 302
    assert space.special_name(301) == "<bos>"
    assert space.specials == {"<pad>": 300, "<bos>": 301, "<eos>": 302}
    assert space.special_tokens("specials") == ("<pad>", "<bos>", "<eos>") and space.special_tokens("text") == ()
    assert space.is_special(302) and not space.is_special(303) and not space.is_special(5)
    with pytest.raises(KeyError, match=r"305 is an unnamed \(reserved\) special id"):
        space.special_name(305)
    with pytest.raises(KeyError, match="not a special.*'text'"):
        space.special_name(5)


def test_unknown_special_error_lists_known_specials():
    space = TokenSpace([("specials", ["<pad>", "<bos>", "<eos>"])])
    with pytest.raises(KeyError) as e:
        space.special("<eoi>")
    assert str(e.value) == "no special token '<eoi>' in the token space; known specials: ['<pad>', '<bos>', '<eos>']"
    with pytest.raises(KeyError, match="known specials: none"):
        TokenSpace([("text", 10)]).special("<eos>")


def test_specials_reject_duplicates_and_bad_input():
    space = TokenSpace()
    with pytest.raises(ValueError, match="'<eos>' is listed twice"):
        space.register_specials(tokens=["<bos>", "<eos>", "<eos>"])
    space.register_specials("specials", tokens=["<bos>", "<eos>"])
    with pytest.raises(ValueError, match="'<eos>' is already registered in range 'specials'"):
        space.register_specials("more", tokens=["<img>", "<eos>"])
    with pytest.raises(ValueError, match="already registered"):
        space.register_specials("specials", tokens=["<img>"])
    with pytest.raises(ValueError, match="must not be empty"):
        space.register_specials("s2", tokens=[])
    with pytest.raises(ValueError, match="list of strings"):
        space.register_specials("s2", tokens="<img>")
    with pytest.raises(ValueError, match="non-empty strings"):
        space.register_specials("s2", tokens=["<img>", ""])
    with pytest.raises(ValueError, match="smaller than its 2 special tokens"):
        space.register_specials("s2", tokens=["<a>", "<b>"], size=1)
    # failed registrations left nothing behind
    assert [r.name for r in space] == ["specials"] and space.specials == {"<bos>": 0, "<eos>": 1}


def test_specials_round_trip_through_config_dict_and_file(tmp_path):
    cfg = [
        {"name": "text", "size": 300},
        {"name": "specials", "tokens": ["<pad>", "<bos>", "<eos>"], "size": 32},
        {"name": "image", "size": 64},
    ]
    space = TokenSpace.from_config(cfg)
    assert space["image"].start == 332 and space.special("<eos>") == 302
    entry = space.to_dict()["ranges"][1]
    assert entry == {"name": "specials", "start": 300, "size": 32, "tokens": ["<pad>", "<bos>", "<eos>"]}
    assert "tokens" not in space.to_dict()["ranges"][0]
    loaded = TokenSpace.load(space.save(tmp_path / "token_space.json"))
    assert (
        loaded == space
        and loaded.specials == space.specials
        and loaded.special_tokens("specials")
        == (
            "<pad>",
            "<bos>",
            "<eos>",
        )
    )
    # mapping form; size defaults to the number of tokens
    mapped = TokenSpace.from_config({"text": 300, "specials": ["<pad>", "<bos>", "<eos>"]})
    assert mapped["specials"].size == 3 and mapped.special("<bos>") == 301
    # names, order and reserved size are all part of the identity
    assert space.sha256 != TokenSpace.from_config([cfg[0], {**cfg[1], "size": 33}, cfg[2]]).sha256
    assert (
        space.sha256
        != TokenSpace.from_config([cfg[0], {**cfg[1], "tokens": ["<bos>", "<pad>", "<eos>"]}, cfg[2]]).sha256
    )
    assert TokenSpace([("specials", 3)]).sha256 != TokenSpace([("specials", ["<a>", "<b>", "<c>"])]).sha256
    with pytest.raises(ValueError, match="needs 'name' and 'size'"):
        TokenSpace.from_config([{"name": "specials"}])


def test_tampered_special_names_are_detected(tmp_path):
    path = TokenSpace([("text", 10), ("specials", ["<bos>", "<eos>"])]).save(tmp_path / "token_space.json")
    body = json.loads(path.read_text())
    body["ranges"][1]["tokens"] = ["<eos>", "<bos>"]
    path.write_text(json.dumps(body))
    with pytest.raises(ValueError, match="does not match"):
        TokenSpace.load(path)
