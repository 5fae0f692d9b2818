import numpy as np
import pytest
import torch

from mmsuite.lightning_modules.fourm.masking import DirichletMasking, fixed_plan, split_budget

M4_LENGTHS = [256, 39, 256, 39]
M4 = dict(
    input_alphas=[1.5, 1.5, 0.5, 0.5],
    target_alphas=[0.5, 0.5, 1.5, 1.5],
    input_tokens_range=[96, 256],
    target_tokens_range=[39, 256],
)


def rng(seed=0):
    return np.random.default_rng(seed)


def test_m4_budget_statistics_match_the_reference_monte_carlo():
    # figures of a per-sample simulation of 4M's masking loop over 200k samples
    b = DirichletMasking(M4_LENGTHS, **M4).draw_budgets(20_000, rng())
    assert b.n_in.mean() == pytest.approx(175.9, rel=0.01)
    assert b.n_tg.mean() == pytest.approx(147.6, rel=0.01)
    assert b.req_in.sum(1).mean() == pytest.approx(175.9, rel=0.01)
    assert b.req_tg.sum(1).mean() == pytest.approx(147.6, rel=0.01)
    assert b.b_in.sum(1).mean() == pytest.approx(137.8, rel=0.02)
    assert b.b_tg.sum(1).mean() == pytest.approx(95.4, rel=0.02)
    # before clamping the mean share of each modality is alpha / sum(alpha)
    share = (b.req_in / b.n_in[:, None]).mean(0)
    np.testing.assert_allclose(share, np.array(M4["input_alphas"]) / 4.0, atol=0.01)


def test_budgets_sum_to_the_request_and_respect_the_caps():
    big = DirichletMasking([1000] * 4, **M4)
    b = big.draw_budgets(5000, rng(1))
    np.testing.assert_array_equal(b.b_in, b.req_in)  # caps above the ranges: nothing clamped
    np.testing.assert_array_equal(b.b_in.sum(1), b.n_in)
    np.testing.assert_array_equal(b.b_tg.sum(1), b.n_tg)
    assert b.n_in.min() >= 96 and b.n_in.max() <= 256 and b.n_tg.min() >= 39 and b.n_tg.max() <= 256

    alpha = np.tile([0.01, 0.3, 5.0], (3000, 1))
    n = rng(2).integers(0, 50, size=3000)
    np.testing.assert_array_equal(split_budget(alpha, n, rng(3)).sum(1), n)

    m = DirichletMasking(M4_LENGTHS, **M4)
    b_in, b_tg = m.sample_budgets(5000, rng(4))
    L = torch.tensor(M4_LENGTHS)
    assert b_in.dtype == b_tg.dtype == torch.long and b_in.shape == (5000, 4)
    assert (b_in >= 0).all() and (b_tg >= 0).all() and (b_in <= L).all() and (b_in + b_tg <= L).all()
    assert (b_in == L).any() and (b_in + b_tg == L).any()  # the caps are reached

    avail = np.ones((5000, 4), dtype=bool)
    avail[::2, 1] = False
    avail[1::3, 2] = False
    b_in, b_tg = m.sample_budgets(5000, rng(5), available=torch.from_numpy(avail))
    assert (b_in[~torch.from_numpy(avail)] == 0).all() and (b_tg[~torch.from_numpy(avail)] == 0).all()
    assert b_in[1::2, 1].sum() > 0


def test_plan_positions_are_disjoint_sorted_and_match_the_budgets():
    m = DirichletMasking([64, 39, 64, 39], **M4)
    plan = m(64, rng(6))
    seg, off = m.segment_ids, m.offsets
    assert off.tolist() == [0, 64, 103, 167] and seg.shape == (206,) and m.seq_len == 206
    assert m.positions[off].tolist() == [0, 0, 0, 0] and m.positions[-1] == 38
    for name in ("enc", "dec"):
        index, valid = getattr(plan, f"{name}_index"), getattr(plan, f"{name}_valid")
        budget = plan.b_in if name == "enc" else plan.b_tg
        assert index.dtype == torch.long and valid.dtype == torch.bool and index.shape == valid.shape
        counts = valid.sum(1)
        assert index.shape[1] == counts.max() and valid.all(1).any()  # padded to the batch maximum only
        assert (valid == (torch.arange(index.shape[1]) < counts[:, None])).all()  # valid first, then padding
        assert (index[~valid] == 0).all()
        assert int(budget.sum()) == (plan.n_real_input if name == "enc" else plan.n_real_target)
        for b in range(64):
            pos = index[b, valid[b]]
            assert (pos[1:] > pos[:-1]).all() and (pos < m.seq_len).all()
            np.testing.assert_array_equal(torch.bincount(seg[pos], minlength=4), budget[b])
    for b in range(64):
        enc = set(plan.enc_index[b, plan.enc_valid[b]].tolist())
        dec = set(plan.dec_index[b, plan.dec_valid[b]].tolist())
        assert not enc & dec


def test_zero_alpha_mixture_weights_and_determinism():
    m = DirichletMasking(
        M4_LENGTHS,
        [1.0, 0.0, 1.0, 0.0],
        [0.0, 0.0, 0.0, 1.0],
        input_tokens_range=[300, 600],
        target_tokens_range=[1, 9],
    )
    b = m.draw_budgets(5000, rng(7))
    assert (b.req_in[:, [1, 3]] == 0).all() and (b.req_tg[:, :3] == 0).all()
    plan = m(200, rng(8))
    assert not torch.isin(m.segment_ids[plan.enc_index[plan.enc_valid]], torch.tensor([1, 3])).any()
    assert (m.segment_ids[plan.dec_index[plan.dec_valid]] == 3).all()

    # a mixture whose second component has weight 0 is its first component
    single = DirichletMasking(M4_LENGTHS, **M4)
    mix = DirichletMasking(
        M4_LENGTHS,
        [M4["input_alphas"], [0, 0, 1000, 1000]],
        [M4["target_alphas"], [1000, 1000, 0, 0]],
        M4["input_tokens_range"],
        M4["target_tokens_range"],
        weights=[1, 0],
    )
    a, c = single.draw_budgets(10_000, rng(9)), mix.draw_budgets(10_000, rng(9))
    assert (c.component == 0).all()
    np.testing.assert_array_equal(a.b_in, c.b_in)  # same draws, not just the same statistics
    np.testing.assert_array_equal(a.b_tg, c.b_tg)
    # with weights [0.5, 0.5] both components are drawn, each with its own alphas
    half = DirichletMasking(M4_LENGTHS, *mix_args(), weights=[1, 1]).draw_budgets(4000, rng(11))
    assert 0.45 < half.component.mean() < 0.55 and (half.req_in[half.component == 1][:, :2] == 0).all()

    p1, p2, p3 = single(16, rng(12)), single(16, rng(12)), single(16, rng(13))
    for f in ("enc_index", "enc_valid", "dec_index", "dec_valid", "b_in", "b_tg"):
        assert torch.equal(getattr(p1, f), getattr(p2, f))
    assert not torch.equal(p1.b_in, p3.b_in)


def mix_args():
    return (
        [M4["input_alphas"], [0, 0, 1000, 1000]],
        [M4["target_alphas"], [1000, 1000, 0, 0]],
        M4["input_tokens_range"],
        M4["target_tokens_range"],
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input_alphas=[1.0, 1.0, 1.0]), "input_alphas row 0 has 3 entries but there are 4 modalities"),
        (dict(target_alphas=[[1, 1, 1, 1], [1, 1, 1]]), "target_alphas row 1 has 3 entries"),
        (dict(input_alphas=[1.0, -0.5, 1.0, 1.0]), "input_alphas row 0 must be finite and >= 0"),
        (dict(target_alphas=[0, 0, 0, 0]), "target_alphas row 0 is all zeros"),
        (dict(input_alphas=[1, [1, 1, 1, 1]]), "input_alphas mixes numbers and lists"),
        (dict(input_tokens_range=[200, 100]), r"input_tokens_range must satisfy 0 <= min <= max, got \[200, 100\]"),
        (dict(target_tokens_range=[-1, 10]), "target_tokens_range must satisfy"),
        (dict(target_tokens_range=[5]), "target_tokens_range must be"),
        (dict(weights=[1.0, 1.0]), "weights has 2 entries but there are 1 mixture components"),
        (dict(input_alphas=[[1, 1, 1, 1]] * 2, weights=[0, 0]), "weights must be finite"),
        (dict(input_alphas=[[1, 1, 1, 1]] * 2, target_alphas=[[1, 1, 1, 1]] * 3), "2 mixture rows but target_alphas"),
        (dict(token_loss_cap=0), "token_loss_cap must be a positive integer"),
        (dict(lengths=[256, 0]), "lengths must be positive integers"),
    ],
)
def test_bad_settings_give_clear_errors(kwargs, match):
    args = dict(lengths=M4_LENGTHS, **M4) | kwargs
    with pytest.raises(ValueError, match=match):
        DirichletMasking(**args)


def test_call_arguments_are_checked_and_large_ranges_are_allowed():
    m = DirichletMasking(M4_LENGTHS, **M4)
    with pytest.raises(ValueError, match=r"available has shape \(2, 3\)"):
        m(2, rng(), available=np.ones((2, 3), dtype=bool))
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        m(2, torch.Generator())
    with pytest.raises(ValueError, match="batch_size"):
        m(0, rng())
    # a range above sum(lengths) is allowed: the overflow is clamped away, nearly every token gets used
    huge = DirichletMasking(M4_LENGTHS, [1, 1, 1, 1], [1, 1, 1, 1], [10_000, 10_000], [10_000, 10_000])
    b_in, b_tg = huge.sample_budgets(100, rng())
    assert ((b_in + b_tg) <= torch.tensor(M4_LENGTHS)).all() and (b_in + b_tg).sum(1).float().mean() > 580
    capped = DirichletMasking(M4_LENGTHS, **M4, token_loss_cap=50).draw_budgets(1000, rng())
    assert capped.n_tg.max() == 50 and (capped.b_tg.sum(1) <= 50).all()


def test_fixed_plan_takes_whole_modalities():
    plan = fixed_plan([64, 39, 64, 39], 3, input_modalities=[0], target_modalities=[1])
    assert plan.enc_index.tolist() == [list(range(64))] * 3 and plan.enc_valid.all()
    assert plan.dec_index.tolist() == [list(range(64, 103))] * 3 and plan.dec_valid.all()
    assert plan.b_in.tolist() == [[64, 0, 0, 0]] * 3 and plan.b_tg.tolist() == [[0, 39, 0, 0]] * 3
    assert plan.n_real_input == 192 and plan.n_real_target == 117

    m = DirichletMasking([64, 39, 64, 39], **M4)
    plan = m.fixed_plan(2, [3, 1], [2])
    assert plan.enc_index[0].tolist() == list(range(64, 103)) + list(range(167, 206))
    assert plan.dec_index[1].tolist() == list(range(103, 167))
    with pytest.raises(ValueError, match=r"modalities \[1\] are both input and target"):
        m.fixed_plan(2, [0, 1], [1])
    with pytest.raises(ValueError, match="outside"):
        m.fixed_plan(2, [4], [1])
