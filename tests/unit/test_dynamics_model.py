"""The dynamics space-time transformer: shapes, zero-init head, causality over time, conditioning, size."""

from __future__ import annotations

import pytest
import torch

from mmsuite.lightning_modules.dynamics.model import DynamicsNetSettings, DynamicsTransformer


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads only add overhead (and stall badly on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY = dict(
    latent_channels=4,
    latent_size=(4, 6),
    patch=2,
    dim=32,
    depth=4,
    heads=2,
    temporal_every=2,
    registers=2,
    k_max=64,
    num_actions=0,
)
# The gpu16gb profile's shape (~60M): 128 px frames -> 16x16x8 latents, patch 2 -> 64 tokens per frame.
GPU16GB = dict(
    latent_channels=8,
    latent_size=16,
    patch=2,
    dim=640,
    depth=12,
    heads=10,
    temporal_every=4,
    registers=4,
    num_actions=8,
)


def _model(seed: int = 0, random_head: bool = False, **overrides) -> DynamicsTransformer:
    torch.manual_seed(seed)
    model = DynamicsNetSettings(**{**TINY, **overrides}).build().eval()
    if random_head:  # the zero head would leave only the prior's guess and the skip, which see no other frames
        torch.nn.init.normal_(model.head.weight, std=0.5)
    return model


def _inputs(b: int, t: int, seed: int = 1, actions: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, t, 4, 4, 6, generator=g)
    tau_index = torch.randint(0, 65, (b, t), generator=g)
    step_level = torch.randint(0, 7, (b, t), generator=g)
    acts = torch.randint(-1, actions, (b, t), generator=g) if actions else None
    return z, tau_index, step_level, acts


@pytest.mark.parametrize("frames", [1, 16, 32])
def test_output_has_the_latent_shape_for_any_length(frames):
    model = _model(random_head=True)
    z, tau_index, step_level, _ = _inputs(2, frames)
    with torch.no_grad():
        out = model(z, tau_index, step_level)
    assert out.shape == z.shape
    assert torch.isfinite(out).all() and out.abs().max() > 0


def test_patchify_round_trip_is_exact():
    model = _model()
    z = _inputs(2, 3)[0]
    tokens = model.patchify(z)
    assert tokens.shape == (2, 3, model.num_patches, 4 * 2 * 2) and model.num_patches == 6
    assert torch.equal(model.unpatchify(tokens), z)


def test_zero_initialised_head_gives_the_prior_and_skip_alone_but_trains():
    model = _model().train()
    z, tau_index, step_level, _ = _inputs(2, 4)
    tau_index[:, 0] = 64  # the first frame at pure noise: no guess, no skip
    out = model(z, tau_index, step_level)
    assert torch.equal(out[:, 0], torch.zeros_like(z[:, 0]))
    (out - z).pow(2).mean().backward()
    assert model.head.weight.grad.abs().max() > 0  # the head learns from step one


@pytest.mark.parametrize("t", [0, 3, 6])
def test_changing_a_later_frame_never_changes_earlier_outputs(t):
    model = _model(random_head=True, num_actions=3)
    z, tau_index, step_level, actions = _inputs(2, 8, actions=3)
    z2, tau2, level2, actions2 = z.clone(), tau_index.clone(), step_level.clone(), actions.clone()
    z2[:, t + 1 :] = torch.randn_like(z2[:, t + 1 :])
    tau2[:, t + 1 :] = (tau2[:, t + 1 :] + 7) % 65
    level2[:, t + 1 :] = (level2[:, t + 1 :] + 3) % 7
    actions2[:, t + 1 :] = (actions2[:, t + 1 :] + 2) % 3
    with torch.no_grad():
        a, b = model(z, tau_index, step_level, actions), model(z2, tau2, level2, actions2)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-6)
    assert (a[:, t + 1 :] - b[:, t + 1 :]).abs().amax(dim=(0, 2, 3, 4)).min() > 1e-3  # later frames do change


def test_earlier_frames_do_reach_later_outputs():
    model = _model(random_head=True)
    z, tau_index, step_level, _ = _inputs(1, 4)
    z2 = z.clone()
    z2[:, 0] = torch.randn_like(z2[:, 0])
    with torch.no_grad():
        diff = (model(z, tau_index, step_level) - model(z2, tau_index, step_level)).abs()
    assert diff[:, 1:].amax(dim=(2, 3, 4)).min() > 1e-3  # the temporal layers carry frame 0 forward


def test_tau_and_step_conditions_each_change_the_prediction():
    model = _model(random_head=True)
    z, tau_index, step_level, _ = _inputs(2, 3)
    with torch.no_grad():
        base = model(z, tau_index, step_level)
        other_tau = model(z, (tau_index + 1) % 65, step_level)
        other_step = model(z, tau_index, (step_level + 1) % 7)
    assert (base - other_tau).abs().max() > 1e-3
    assert (base - other_step).abs().max() > 1e-3


def test_unlabelled_frames_use_the_learned_base_action_only():
    model = _model(random_head=True, num_actions=3)
    z, tau_index, step_level, _ = _inputs(2, 3)
    with torch.no_grad():
        no_labels = model(z, tau_index, step_level)
        all_unlabelled = model(z, tau_index, step_level, torch.full((2, 3), -1))
        labelled = model(z, tau_index, step_level, torch.full((2, 3), 2))
    assert torch.equal(no_labels, all_unlabelled)
    assert (labelled - no_labels).abs().max() > 1e-3
    model.train()
    model(z, tau_index, step_level).sum().backward()
    assert model.action_base.grad.abs().max() > 0 and model.action_embed.weight.grad is not None


def test_activation_checkpointing_gives_the_same_output_and_gradients():
    z, tau_index, step_level, _ = _inputs(2, 4)
    grads = []
    for use in (False, True):
        model = _model(random_head=True).train()
        model(z, tau_index, step_level, checkpoint=use).pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


def test_grouped_query_heads_run():
    model = _model(random_head=True, dim=64, heads=4, kv_heads=2)
    z, tau_index, step_level, _ = _inputs(1, 5)
    with torch.no_grad():
        assert model(z, tau_index, step_level).shape == z.shape


def test_gpu16gb_shape_is_about_60m_parameters_without_allocating():
    with torch.device("meta"):
        model = DynamicsNetSettings(**GPU16GB).build()
    assert all(p.is_meta for p in model.parameters())
    params = sum(p.numel() for p in model.parameters())
    assert 45e6 <= params <= 80e6, params
    assert [b.temporal for b in model.blocks] == [False, False, False, True] * 3


BAD_CONFIGS = [
    ("patch", dict(patch=4)),
    ("heads", dict(dim=30)),
    ("kv_heads", dict(kv_heads=3)),
    ("temporal_every", dict(temporal_every=5)),
    ("temporal_every", dict(temporal_every=1)),  # every layer over time: none within a frame
    ("k_max", dict(k_max=48)),
    ("num_actions", dict(num_actions=-1)),
]


@pytest.mark.parametrize("name, overrides", BAD_CONFIGS, ids=[n for n, _ in BAD_CONFIGS])
def test_bad_configs_raise(name, overrides):
    with pytest.raises(ValueError, match=name):
        DynamicsNetSettings(**{**TINY, **overrides}).build()


def test_bad_inputs_raise():
    model = _model()
    z, tau_index, step_level, _ = _inputs(2, 3)
    with pytest.raises(ValueError, match="z must be"):
        model(z[:, :, :3], tau_index, step_level)
    with pytest.raises(ValueError, match="tau_index must lie"):
        model(z, tau_index + 65, step_level)
    with pytest.raises(ValueError, match="step_level must be an integer"):
        model(z, tau_index, step_level.float())
    with pytest.raises(ValueError, match="step_level must be an integer tensor of shape"):
        model(z, tau_index, step_level[:, :2])
    with pytest.raises(ValueError, match="num_actions=0"):
        model(z, tau_index, step_level, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="actions must lie"):
        _model(num_actions=3)(z, tau_index, step_level, torch.full((2, 3), 3))
