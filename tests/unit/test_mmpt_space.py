import numpy as np
import pytest

from mmsuite.tokenizers.audio import token_ranges
from mmsuite.tokenizers.mmpt_space import (
    REQUIRED_SPECIALS,
    DecodeError,
    LayoutSettings,
    MMPTLayout,
    text_special_ids,
)
from mmsuite.tokenizers.token_space import TokenSpace
from tests.unit.mmpt_fixtures import BASE_ROWS, BINS, FMT, IMAGE_CODES, TEXT, K, audio_ids, tiny_layout


def test_layout_puts_new_rows_after_the_base_rows_and_pads_to_64():
    layout = tiny_layout()
    names = [(r.name, r.start, r.stop) for r in layout.token_space]
    assert names[:4] == [("text", 0, 40), ("text_pad", 40, 48), ("specials", 48, 58), ("image", 58, 74)]
    assert [n[0] for n in names[4:]] == ["audio_q0", "audio_q1", "audio_q2", "reserved"]
    assert layout.base_rows == BASE_ROWS and layout.vocab_size == 128 and layout.vocab_size % 64 == 0
    assert list(layout.token_space.specials) == list(REQUIRED_SPECIALS)
    assert list(REQUIRED_SPECIALS[:9]) == [
        "<text_start>", "<text_end>", "<img_start>", "<img_end>", "<aud_start>", "<aud_end>",
        "<gen_text>", "<gen_img>", "<gen_aud>",
    ]  # fmt: skip
    assert layout.special("<text_start>") == 48 and layout.pad_id == 57
    assert layout.trainable_ids == range(48, 98) and layout.new_ids == range(48, 128)
    assert layout.never_emitted_ids() == [*range(40, 48), *range(98, 128)]
    # the audio ranges carry the audio tokenizer's names and sizes
    assert [(r.name, r.size) for r in layout.audio] == [(d["name"], d["size"]) for d in token_ranges(K, BINS)]


def test_layout_round_trips_through_token_space_json_with_the_same_sha(tmp_path):
    layout = tiny_layout()
    path = layout.token_space.save(tmp_path / "token_space.json")
    again = MMPTLayout(TokenSpace.load(path))
    assert again.sha256 == layout.sha256 and again.vocab_size == layout.vocab_size
    other = MMPTLayout.build(TEXT, BASE_ROWS, IMAGE_CODES, K + 1, BINS)
    assert other.sha256 != layout.sha256


def test_layout_without_padding_rows_or_reserved_tail_and_extra_specials():
    layout = MMPTLayout.build(46, 46, 8, 2, 4, LayoutSettings(multiple_of=1, extra_specials=["<sep>"]))
    assert layout.text_pad is None and layout.reserved is None
    assert layout.special("<sep>") == 46 + len(REQUIRED_SPECIALS)
    assert layout.vocab_size == 46 + len(REQUIRED_SPECIALS) + 1 + 8 + 8


def test_layout_rejects_spaces_that_are_not_mmpt():
    with pytest.raises(ValueError, match="starts with the base vocabulary"):
        MMPTLayout(TokenSpace([("image", 4), ("text", 4)]))
    with pytest.raises(ValueError, match="lacks"):
        MMPTLayout(TokenSpace([("text", 4), ("specials", ["<pad>"]), ("image", 4), ("audio_q0", 4)]))
    with pytest.raises(ValueError, match="fewer than its"):
        MMPTLayout.build(50, 40, 8, 2, 4)


def test_body_checks_name_every_violation():
    layout = tiny_layout()
    a0, a1 = layout.audio[0].start, layout.audio[1].start
    good = audio_ids(layout, np.zeros((K, 2), dtype=np.int64))
    assert layout.check_body("audio", good, FMT).tolist() == good.tolist()
    cases = [
        ("audio", [], "empty"),
        ("audio", [a0, a1], "len_not_multiple"),
        ("audio", [a0, a0, a0], "codebook_mismatch@1"),
        ("audio", [a0, 5, a1], "not_audio@1"),
        ("audio", audio_ids(layout, np.zeros((K, FMT.audio_max_frames + 1), dtype=np.int64)), "too_long"),
        ("image", [layout.image.start] * (FMT.image_tokens - 1), "wrong_image_len"),
        ("image", [layout.image.start, a0, layout.image.start, layout.image.start], "not_image@1"),
        ("text", [], "empty"),
        ("text", [1, 2, 44], "not_text@2"),  # a base padding row
        ("text", [1, layout.pad_id], "not_text@1"),
        ("text", [1] * (FMT.text_max_tokens + 1), "too_long"),
    ]
    for modality, ids, code in cases:
        with pytest.raises(DecodeError) as e:
            layout.check_body(modality, ids, FMT)
        assert e.value.code == code, (modality, ids, e.value)
    # a long text passes without limits (a prompt is bounded by max_seq_len instead)
    assert layout.check_body("text", [1] * 20, FMT, limits=False).size == 20
    banned = tiny_layout(banned=[3])
    with pytest.raises(DecodeError, match="not_text@0"):
        banned.check_body("text", [3], FMT)


def test_strict_decoder_never_repairs():
    layout = tiny_layout()
    a_open, a_close, _ = layout.tags("audio")
    body = audio_ids(layout, np.arange(K * 2).reshape(K, 2) % BINS)
    ok = [a_open, *body, a_close, layout.pad_id, layout.pad_id]
    assert layout.decode_target("audio", ok, FMT).tolist() == body.tolist()
    assert layout.decode_target("audio", np.array(ok[:-2]), FMT).tolist() == body.tolist()
    for ids, code in [
        (ok[1:], "missing_start"),
        ([], "missing_start"),
        (ok[:-3], "missing_end"),
        ([*ok[:-2], 5], "trailing@" + str(len(ok) - 2)),
        ([a_open, *body[:-1], a_close], "len_not_multiple"),
        ([a_open, body[1], *body[1:], a_close], "codebook_mismatch@0"),
    ]:
        with pytest.raises(DecodeError) as e:
            layout.decode_target("audio", ids, FMT)
        assert e.value.code == code


def test_text_special_ids_are_the_tokenizers_own_specials(tmp_path):
    from tokenizers import AddedToken, Tokenizer, models

    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.add_special_tokens([AddedToken("<|im_start|>", special=True)])
    tok.add_tokens([AddedToken("plain", special=False)])
    layout = MMPTLayout.build(5, 8, 4, 1, 4)
    assert text_special_ids(tok, layout) == [3]


def test_the_suites_tokenizers_write_bodies_the_layout_accepts():
    """The image, audio and text tokenizers work on an MMPT space as it is (range names, frame-major audio)."""
    import torch

    from mmsuite.tokenizers.audio import AudioTokenizer, build_encodec
    from mmsuite.tokenizers.image import AutoencoderSettings, ImageTokenizer
    from mmsuite.tokenizers.mmpt_space import FormatSettings

    torch.manual_seed(0)
    net = AutoencoderSettings(levels=[4, 3, 2], channels=4, channel_mult=[1, 2], num_res_blocks=[0, 1]).build()
    codec = build_encodec(
        sample_rate=8000, n_filters=4, ratios=(4, 4), dimension=16, lstm=0, bins=16, n_q=4, kmeans_init=False
    )
    layout = MMPTLayout.build(TEXT, BASE_ROWS, net.codebook_size, 4, 16)
    fmt = FormatSettings(image_tokens=16, audio_max_frames=200)
    image_tok = ImageTokenizer(net, layout.token_space, image_size=32)
    images = np.random.default_rng(0).integers(0, 256, size=(1, 32, 32, 3), dtype=np.uint8)
    assert layout.check_body("image", image_tok.encode(images).reshape(-1), fmt).size == 16
    audio_tok = AudioTokenizer(codec, layout.token_space)
    ids = audio_tok.encode(torch.randn(1, 1600) * 0.1)[0]
    body = layout.check_body("audio", ids, fmt)
    assert audio_tok.ids_to_codes(body).shape == (4, 100)
