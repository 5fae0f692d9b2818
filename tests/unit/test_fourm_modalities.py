"""The 4M modality registry: each kind's behaviour comes from its entry, and a new kind is one entry."""

from __future__ import annotations

import pytest
import torch

from mmsuite.lightning_modules.fourm import modalities as registry
from mmsuite.lightning_modules.fourm.masking import fixed_plan
from mmsuite.lightning_modules.fourm.model import FourM, FourMNetSettings
from mmsuite.nn.transformer import sincos_1d, sincos_2d

MODS = [
    {"name": "tok_rgb", "kind": "image", "vocab": 16, "length": 16, "grid": [4, 4], "levels": [4, 4]},
    {"name": "coords", "kind": "pose", "vocab": 35, "length": 39},
    {"name": "caption", "kind": "seq", "vocab": 20, "length": 6},
]


def _net(mods=MODS, **kw) -> FourM:
    torch.manual_seed(0)
    return FourMNetSettings(**{"dim": 32, "encoder_depth": 1, "decoder_depth": 1, "heads": 2, **kw}).build(mods).eval()


def test_each_kind_brings_its_own_table_and_positions():
    net = _net()
    assert [type(m).__name__ for m in net.modalities] == ["ImageModality", "PoseModality", "SeqModality"]
    assert isinstance(net.tok_emb[0], registry.FactorisedEmbedding)  # FSQ levels: factorised codes
    assert isinstance(net.tok_emb[1], torch.nn.Embedding) and isinstance(net.tok_emb[2], torch.nn.Embedding)
    assert torch.equal(net.fixed_pos[:16], sincos_2d(4, 4, 32))
    assert torch.equal(net.fixed_pos[16:55], torch.zeros(39, 32))  # poses: learned joint + axis positions
    assert torch.equal(net.fixed_pos[55:], sincos_1d(6, 32))
    assert net.joint_emb.num_embeddings == 13 and bool(net.is_pose[16:55].all()) and not bool(net.is_pose[55:].any())
    assert net.joint_id[16:55].tolist() == [j for j in range(13) for _ in range(3)]
    assert net.component_id[16:55].tolist() == [0, 1, 2] * 13
    assert isinstance(_net(image_embedding="table").tok_emb[0], torch.nn.Embedding)


def test_checkpoint_parameter_names_are_the_same_as_before_the_registry():
    names = [n for n, _ in _net().named_parameters()]
    assert names[:8] == [
        "query",  # a module's own parameters come before its children's
        "tok_emb.0.digit_emb.weight",
        "tok_emb.0.residual.weight",
        "tok_emb.1.weight",
        "tok_emb.2.weight",
        "mod_emb.weight",
        "joint_emb.weight",
        "component_emb.weight",
    ]


def test_kind_errors_name_the_modality_and_the_known_kinds():
    with pytest.raises(ValueError, match=r"modality 'x': kind must be one of \('image', 'pose', 'seq'\), got 'video'"):
        registry.build([{"name": "x", "kind": "video", "vocab": 4, "length": 4}])
    with pytest.raises(ValueError, match="grid \\[3, 3\\] does not hold length 4"):
        registry.build([{"name": "x", "kind": "image", "vocab": 4, "length": 4, "grid": [3, 3]}])
    with pytest.raises(ValueError, match="3 tokens per joint, length 4"):
        registry.build([{"name": "x", "kind": "pose", "vocab": 4, "length": 4}])
    with pytest.raises(ValueError, match="names must be unique"):
        registry.build([MODS[2], MODS[2]])


class _Ordinal(registry.Modality):
    """A toy kind: a scalar in ``vocab`` bins, positions = a constant, decoded by the expected bin."""

    kind = "ordinal"

    def fixed_positions(self, dim: int) -> torch.Tensor:
        return torch.full((self.length, dim), 0.5)

    def pick(self, module, logits: torch.Tensor) -> torch.Tensor:
        bins = torch.arange(logits.shape[-1], dtype=torch.float32)
        return (logits.softmax(-1) * bins).sum(-1).round().long()


def test_a_new_kind_is_one_registry_entry(monkeypatch):
    monkeypatch.setitem(registry.KINDS, "ordinal", _Ordinal)
    mods = [*MODS, {"name": "speed", "kind": "ordinal", "vocab": 9, "length": 2}]
    net = _net(mods)
    assert isinstance(net.modalities[3], _Ordinal) and torch.equal(net.fixed_pos[-2:], torch.full((2, 32), 0.5))
    tokens = torch.cat([torch.randint(0, m["vocab"], (3, m["length"])) for m in mods], dim=1)
    plan = fixed_plan(net.lengths, 3, [0, 2], [3])
    logits = net.predict_logits(tokens, plan)[:, :2, :9]
    picked = net.modalities[3].pick(None, logits)
    assert picked.shape == (3, 2) and bool(((picked >= 0) & (picked < 9)).all())
    out = net(tokens, plan)
    assert set(out) == {"speed"} and out["speed"][0].shape == (6, 9)
