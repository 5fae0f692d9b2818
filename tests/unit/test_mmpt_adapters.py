import numpy as np
import pytest
import torch

from mmsuite.lightning_modules.mmpt.adapters import (
    AdapterSettings,
    add_adapters,
    check_trainable,
    effective_weights,
    load_adapters,
    load_trainable_state_dict,
    param_groups,
    rows_written_in,
    save_adapters,
    trainable_state_dict,
)
from mmsuite.lightning_modules.mmpt.base import BaseSettings, ToyLMSettings, build_stage3_base, load_base
from mmsuite.lightning_modules.mmpt.loss import TargetLoss
from mmsuite.tokenizers.mmpt_sequences import SequenceBuilder, collate
from mmsuite.tokenizers.mmpt_space import TASK_NAMES
from tests.unit.mmpt_fixtures import BASE_ROWS, BINS, FMT, IMAGE_CODES, TEXT, K, random_item

SETTINGS = AdapterSettings(r=4, alpha=8, dropout=0.0, lr=1e-2, weight_decay=0.1, rows_lr=1e-2)
# the formula by hand for hidden 32, 4 heads of 8, 2 kv heads, MLP 64, 2 layers, r = 4:
# q, o: 4 * (32 + 32); k, v: 4 * (32 + 16); gate, up, down: 4 * (32 + 64)
LORA = 2 * (2 * 4 * 64 + 2 * 4 * 48 + 3 * 4 * 96)
NEW_ROWS = 10 + IMAGE_CODES + K * BINS  # specials + image + audio (not the reserved tail)


def _base(tied, out_dir=None):
    toy = ToyLMSettings(
        hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64,
        tie_word_embeddings=tied, rows=BASE_ROWS, max_position_embeddings=128,
    )  # fmt: skip
    return build_stage3_base(TEXT, IMAGE_CODES, K, BINS, BaseSettings(toy=toy, init_noise=0.1), out_dir)


def _batch(layout, seed=0):
    rng = np.random.default_rng(seed)
    builder = SequenceBuilder(layout, FMT)
    return collate([builder.build(t, random_item(layout, rng, t)) for t in TASK_NAMES], layout.pad_id)


@pytest.mark.parametrize("tied", [True, False])
def test_exactly_lora_and_the_new_rows_train_in_the_formulas_count(tied):
    model, layout = _base(tied)
    peft_model = add_adapters(model, layout, SETTINGS)
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert all(("lora_A" in n or "lora_B" in n or "trainable_tokens_delta" in n) for n in names)
    assert sum("trainable_tokens_delta" in n for n in names) == (1 if tied else 2)
    counts = check_trainable(peft_model, layout, SETTINGS)
    assert counts["lora"] == LORA and counts["rows"] == NEW_ROWS * 32 * (1 if tied else 2)
    assert counts["total"] == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    # anything else that trains stops the gate
    peft_model.get_base_model().model.norm.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="other than LoRA"):
        check_trainable(peft_model, layout, SETTINGS)


@pytest.mark.parametrize("tied", [True, False])
def test_one_step_moves_only_new_rows_and_lora_and_no_decay_reaches_the_rows(tied):
    model, layout = _base(tied)
    peft_model = add_adapters(model, layout, SETTINGS)
    batch = _batch(layout)
    e0, h0 = effective_weights(peft_model)
    lora0 = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_B" in n}
    groups = param_groups(peft_model, SETTINGS)
    assert [(g["name"], g["weight_decay"]) for g in groups] == [("lora", 0.1), ("rows", 0.0)]
    opt = torch.optim.AdamW(groups)
    peft_model.train()
    TargetLoss(layout).task_losses(peft_model, batch)["loss"].backward()
    opt.step()
    e1, h1 = effective_weights(peft_model)
    base = layout.base_rows
    assert torch.equal(e1[:base], e0[:base]) and torch.equal(h1[:base], h0[:base])  # bit-identical
    used = sorted(set(batch["input_ids"].unique().tolist()) & set(layout.trainable_ids))
    assert not torch.equal(e1[used], e0[used])
    assert not torch.equal(h1[list(layout.trainable_ids)], h0[list(layout.trainable_ids)])
    if tied:
        assert torch.equal(e1, h1)
    if not tied:  # untied embedding rows no input holds get no gradient; with weight decay 0 they stay put
        unused = sorted(set(layout.trainable_ids) - set(batch["input_ids"].flatten().tolist()))
        assert unused and torch.equal(e1[unused], e0[unused])
    assert any(not torch.equal(p, lora0[n]) for n, p in peft_model.named_parameters() if "lora_B" in n)


def test_weight_decay_on_the_rows_would_move_unused_rows():
    """The control for the test above: the same step with the rows in a decayed group moves rows no input holds."""
    model, layout = _base(tied=False)
    peft_model = add_adapters(model, layout, SETTINGS)
    batch = _batch(layout)
    e0, _ = effective_weights(peft_model)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    TargetLoss(layout).task_losses(peft_model, batch)["loss"].backward()
    opt.step()
    e1, _ = effective_weights(peft_model)
    unused = sorted(set(layout.trainable_ids) - set(batch["input_ids"].flatten().tolist()))
    assert not torch.equal(e1[unused], e0[unused])


@pytest.mark.parametrize("tied", [True, False])
def test_save_and_load_give_the_same_logits_from_a_small_pickle_free_file(tmp_path, tied):
    _, layout = _base(tied, tmp_path / "stage3")
    model, layout = load_base(tmp_path / "stage3")
    peft_model = add_adapters(model, layout, SETTINGS)
    opt = torch.optim.AdamW(param_groups(peft_model, SETTINGS))
    for seed in range(2):
        TargetLoss(layout).task_losses(peft_model, _batch(layout, seed))["loss"].backward()
        opt.step()
        opt.zero_grad()
    save_adapters(peft_model, layout, SETTINGS, tmp_path / "adapters")
    size = (tmp_path / "adapters" / "adapters.safetensors").stat().st_size
    n_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert size < 4 * n_trainable + 4096  # only the trainable tensors
    fresh, layout2 = load_base(tmp_path / "stage3")
    loaded, settings = load_adapters(fresh, layout2, tmp_path / "adapters")
    assert settings == SETTINGS
    ids = _batch(layout, 5)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, peft_model.eval()(ids).logits, rtol=0, atol=0)


def test_loading_trainable_tensors_checks_names_and_shapes():
    model, layout = _base(tied=True)
    peft_model = add_adapters(model, layout, SETTINGS)
    state = trainable_state_dict(peft_model)
    name = next(iter(state))
    with pytest.raises(ValueError, match="missing"):
        load_trainable_state_dict(peft_model, {k: v for k, v in state.items() if k != name})
    with pytest.raises(ValueError, match="unexpected"):
        load_trainable_state_dict(peft_model, {**state, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        load_trainable_state_dict(peft_model, {**state, name: state[name][:1]})


@pytest.mark.parametrize("tied", [True, False])
def test_rows_written_in_gives_the_same_logits_and_restores_the_frozen_matrices_exactly(tied):
    model, layout = _base(tied)
    peft_model = add_adapters(model, layout, SETTINGS).eval()
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))  # rows and LoRA away from their start
    ids = _batch(layout)["input_ids"]
    frozen = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        with rows_written_in(peft_model):
            got = peft_model(input_ids=ids).logits
            written = [n for n, p in peft_model.named_parameters() if n in frozen and not torch.equal(p, frozen[n])]
            assert written and all("embed_tokens" in n or "lm_head" in n for n in written), written
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    after = {n: p.detach() for n, p in peft_model.named_parameters() if not p.requires_grad}
    assert after.keys() == frozen.keys() and all(torch.equal(after[n], frozen[n]) for n in frozen)
