import numpy as np
import torch
import torch.nn.functional as F

from mmsuite.lightning_modules.mmpt.loss import TargetLoss
from mmsuite.tokenizers.mmpt_decoding import TaskGrammar
from mmsuite.tokenizers.mmpt_sequences import IGNORE, SequenceBuilder, collate
from mmsuite.tokenizers.mmpt_space import TASK_NAMES
from tests.unit.mmpt_fixtures import FMT, random_item, tiny_layout, tiny_qwen3


def _batch(layout, tasks, seed=0):
    rng = np.random.default_rng(seed)
    builder = SequenceBuilder(layout, FMT)
    return collate([builder.build(t, random_item(layout, rng, f"{t}{i}")) for i, t in enumerate(tasks)], layout.pad_id)


def _reference(model, layout, batch):
    """Per-token CE from the full [B, L, V] logits, shifted by hand, never-emitted ids masked."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logits[..., layout.never_emitted_ids()] = float("-inf")
    labels = batch["labels"][:, 1:]
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, reduction="none", ignore_index=IGNORE)
    return ce, labels != IGNORE


def test_task_losses_match_the_full_logits_reference_and_only_targets_reach_the_head():
    layout = tiny_layout()
    model = tiny_qwen3(layout.vocab_size, tied=False)
    tasks = ["a2t", "t2a", "t2a", "t2i", "a2t"]  # no i2t: absent tasks neither count nor weigh
    batch = _batch(layout, tasks)
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, inp, out: seen.append(tuple(inp[0].shape)))
    out = TargetLoss(layout).task_losses(model, batch)
    hook.remove()
    n_targets = int((batch["labels"] != IGNORE).sum())
    assert seen == [(n_targets, 32)]  # the head saw the target positions only: no [B, L, V] logits
    ce, mask = _reference(model, layout, batch)
    per_task = []
    for i, name in enumerate(TASK_NAMES):
        rows = torch.tensor([t == name for t in tasks])
        tok = mask[rows]
        assert out["task_tokens"][i] == tok.sum()
        per_task.append(ce[rows][tok].mean() if tok.any() else torch.tensor(0.0))
        torch.testing.assert_close(out["task_loss"][i], per_task[-1])
    present = [p for i, p in enumerate(per_task) if TASK_NAMES[i] in tasks]
    torch.testing.assert_close(out["loss"], torch.stack(present).mean())
    weights = torch.tensor([1.0, 5.0, 2.0, 1.0])
    weighted = TargetLoss(layout).task_losses(model, batch, weights)["loss"]
    w = torch.tensor([1.0, 0.0, 2.0, 1.0])
    torch.testing.assert_close(weighted, (w * torch.stack(per_task)).sum() / w.sum())
    # a plain token mean would be dominated by the long audio targets; the total is not
    assert not torch.allclose(out["loss"], ce[mask].mean())


def test_sequence_nll_is_the_per_row_target_mean():
    layout = tiny_layout()
    model = tiny_qwen3(layout.vocab_size, tied=True)
    batch = _batch(layout, list(TASK_NAMES) * 2, seed=1)
    nll = TargetLoss(layout).sequence_nll(model, batch)
    ce, mask = _reference(model, layout, batch)
    torch.testing.assert_close(nll, (ce * mask).sum(1) / mask.sum(1))


def test_illegal_mass_of_a_random_model_is_large_and_per_target_position():
    layout = tiny_layout()
    model = tiny_qwen3(layout.vocab_size)
    grammar = TaskGrammar(layout, FMT)
    batch = _batch(layout, list(TASK_NAMES), seed=2)
    mass, states, task = TargetLoss(layout).illegal_mass(model, batch, grammar)
    n = int((batch["labels"] != IGNORE).sum())
    assert mass.shape == states.shape == task.shape == (n,)
    assert ((mass >= 0) & (mass <= 1)).all() and mass.mean() > 0.5  # untrained: most mass is illegal
    assert task.tolist() == sorted(task.tolist())
