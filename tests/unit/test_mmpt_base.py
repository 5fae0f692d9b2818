import json

import pytest
import torch

from mmsuite.lightning_modules.mmpt.base import (
    BaseSettings,
    ToyLMSettings,
    build_stage3_base,
    build_toy_lm,
    extend_vocabulary,
    heads_tied,
    load_base,
)
from mmsuite.tokenizers.mmpt_space import LayoutSettings, MMPTLayout
from mmsuite.tokenizers.token_space import TokenSpaceMismatch
from tests.unit.mmpt_fixtures import BASE_ROWS, BINS, IMAGE_CODES, TEXT, K, tiny_layout

TOY = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64)


def _settings(tied=True, noise=0.02, seed=0, path=""):
    toy = ToyLMSettings(**TOY, tie_word_embeddings=tied, rows=BASE_ROWS, max_position_embeddings=128)
    return BaseSettings(path=path, toy=toy, init_seed=seed, init_noise=noise)


@pytest.mark.parametrize("tied", [True, False])
def test_every_new_row_starts_at_the_mean_of_the_text_rows_and_old_rows_are_kept(tied):
    layout = tiny_layout()
    model = build_toy_lm(TEXT, _settings(tied).toy)
    before_e = model.get_input_embeddings().weight.detach().clone()
    before_h = model.get_output_embeddings().weight.detach().clone()
    extend_vocabulary(model, layout, seed=0, noise=0.0)
    e, h = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert e.shape == h.shape == (layout.vocab_size, 32) and model.config.vocab_size == layout.vocab_size
    assert heads_tied(model) == tied
    for w, old in ((e, before_e), (h, before_h)):
        assert torch.equal(w[:BASE_ROWS], old)  # text rows and the base's padding rows untouched
        mean = old[:TEXT].mean(0)  # the padding rows do not count in the mean
        torch.testing.assert_close(w[BASE_ROWS:], mean.expand(layout.vocab_size - BASE_ROWS, -1))
    # with noise: seeded, around the mean, and reproducible
    a, b, c = (build_toy_lm(TEXT, _settings(tied).toy) for _ in range(3))
    extend_vocabulary(a, layout, seed=1, noise=0.1)
    extend_vocabulary(b, layout, seed=1, noise=0.1)
    extend_vocabulary(c, layout, seed=2, noise=0.1)
    wa, wb, wc = (m.get_input_embeddings().weight[BASE_ROWS:] for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    std = before_e[:TEXT].std(0)
    assert ((wa - before_e[:TEXT].mean(0)).abs() < 0.6 * std).all()


def test_extension_checks_the_base_row_count():
    model = build_toy_lm(TEXT, _settings().toy)  # 48 rows
    wrong = MMPTLayout.build(TEXT, TEXT, IMAGE_CODES, K, BINS)  # says the base has 40 rows
    with pytest.raises(ValueError, match="48 embedding rows"):
        extend_vocabulary(model, wrong)


@pytest.mark.parametrize("tied", [True, False])
def test_toy_base_saves_and_loads_back_with_its_token_space(tmp_path, tied):
    out = tmp_path / "stage3"
    model, layout = build_stage3_base(TEXT, IMAGE_CODES, K, BINS, _settings(tied), out)
    assert layout.sha256 == tiny_layout().sha256
    assert {"config.json", "model.safetensors", "token_space.json", "mmpt_base.json"} <= {p.name for p in out.iterdir()}
    assert not list(tmp_path.glob(".stage3.tmp-*"))
    record = json.loads((out / "mmpt_base.json").read_text())
    assert record["token_space_sha256"] == layout.sha256 and record["tie_word_embeddings"] == tied
    loaded, layout2 = load_base(out, expected_sha256=layout.sha256)
    assert layout2.sha256 == layout.sha256 and heads_tied(loaded) == tied
    ids = torch.randint(0, layout.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits, rtol=0, atol=0)
    with pytest.raises(FileExistsError):
        build_stage3_base(TEXT, IMAGE_CODES, K, BINS, _settings(tied), out)


def test_loading_a_base_checks_every_sha(tmp_path):
    out = tmp_path / "stage3"
    _, layout = build_stage3_base(TEXT, IMAGE_CODES, K, BINS, _settings(), out)
    other = MMPTLayout.build(TEXT, BASE_ROWS, IMAGE_CODES, K + 1, BINS)
    with pytest.raises(TokenSpaceMismatch) as e:
        load_base(out, expected_sha256=other.sha256, expected_from="run dir token_space.json")
    assert other.sha256 in str(e.value) and layout.sha256 in str(e.value) and "run dir" in str(e.value)
    record = json.loads((out / "mmpt_base.json").read_text())
    record["token_space_sha256"] = other.sha256
    (out / "mmpt_base.json").write_text(json.dumps(record))
    with pytest.raises(TokenSpaceMismatch, match="mmpt_base.json"):
        load_base(out)
    (out / "token_space.json").unlink()
    with pytest.raises(FileNotFoundError, match="token_space.json"):
        load_base(out)


def test_a_base_from_a_local_hf_folder_bans_its_own_specials_and_keeps_its_tokenizer(tmp_path):
    from tokenizers import AddedToken, Tokenizer, models

    src = tmp_path / "base"
    vocab = {f"w{i}": i for i in range(TEXT - 2)} | {"[UNK]": TEXT - 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.add_special_tokens([AddedToken("<|im_end|>", special=True)])
    build_toy_lm(TEXT, _settings(tied=False).toy).save_pretrained(str(src))
    tok.save(str(src / "tokenizer.json"))
    settings = _settings(tied=False, path=str(src))
    model, layout = build_stage3_base(TEXT, IMAGE_CODES, K, BINS, settings, tmp_path / "stage3")
    assert layout.banned_text_ids == (TEXT - 1,) and layout.base_rows == BASE_ROWS
    assert (tmp_path / "stage3" / "tokenizer.json").is_file()
    _, again = load_base(tmp_path / "stage3")
    assert again.banned_text_ids == (TEXT - 1,)
    with pytest.raises(ValueError, match="has 40 ids, the text range 39"):
        build_stage3_base(TEXT - 1, IMAGE_CODES, K, BINS, settings)
    with pytest.raises(FileNotFoundError, match="not found"):
        build_stage3_base(TEXT, IMAGE_CODES, K, BINS, _settings(path=str(tmp_path / "stage3" / "nope")))


def test_layout_settings_reach_the_built_base():
    settings = _settings()
    settings.layout = LayoutSettings(multiple_of=128)
    _, layout = build_stage3_base(TEXT, IMAGE_CODES, K, BINS, settings)
    assert layout.vocab_size == 128 and layout.reserved.size == 30


def test_every_mmpt_settings_class_is_a_structured_config_that_names_unknown_keys():
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError

    from mmsuite.lightning_modules.mmpt.adapters import AdapterSettings
    from mmsuite.tokenizers.mmpt_sampling import GoldenSettings, MixtureSettings
    from mmsuite.tokenizers.mmpt_sequences import SequenceSettings
    from mmsuite.tokenizers.mmpt_space import FormatSettings

    classes = (
        LayoutSettings, FormatSettings, SequenceSettings, GoldenSettings, MixtureSettings, ToyLMSettings,
        BaseSettings, AdapterSettings,
    )  # fmt: skip
    from mmsuite.settings import parse

    for cls in classes:
        assert OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), {})) == cls()
        assert parse(cls, {}, "x") == cls()
    parsed = parse(BaseSettings, {"toy": {"hidden_size": 8}}, "model.base")
    assert parsed.toy.hidden_size == 8 and isinstance(parsed.layout, LayoutSettings)
    with pytest.raises(ConfigKeyError, match="hiden"):
        OmegaConf.merge(OmegaConf.structured(BaseSettings), {"toy": {"hiden": 8}})
    with pytest.raises(ValueError, match="model.base.toy.hiden: unknown setting"):
        parse(BaseSettings, {"toy": {"hiden": 8}}, "model.base")
    with pytest.raises(ValueError, match="model.base.dtype must be one of"):
        parse(BaseSettings, {"dtype": "float64"}, "model.base")
    with pytest.raises(ValueError, match="format.audio_min_frames"):
        parse(FormatSettings, {"audio_min_frames": 9, "audio_max_frames": 4}, "format")
    with pytest.raises(ValueError, match="adapters.target_modules"):
        parse(AdapterSettings, {"target_modules": ["q_proj", "lm_head"]}, "adapters")
