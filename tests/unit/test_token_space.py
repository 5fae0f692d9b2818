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
