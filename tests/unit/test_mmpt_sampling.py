import numpy as np
import pytest

from mmsuite.tokenizers.mmpt_sampling import GoldenSettings, MixtureSettings, TaskMixture, select_golden
from mmsuite.tokenizers.mmpt_space import TASK_NAMES


def _candidates(n=300, seed=0):
    rng = np.random.default_rng(seed)
    keys = [f"item{i:04d}" for i in range(n)]
    lengths = rng.integers(3, 30, size=n).tolist()
    sources = rng.choice(["toyworld", "llava"], size=n, p=[0.75, 0.25]).tolist()
    return keys, lengths, sources


def test_golden_sets_are_stratified_and_a_function_of_the_seed_alone():
    keys, lengths, sources = _candidates()
    settings = GoldenSettings(per_task=64, length_bins=4, seed=7)
    chosen = select_golden(keys, lengths, sources, settings)
    assert len(chosen) == 64 == len(set(chosen))
    # the same items whatever order the candidates come in
    order = np.random.default_rng(1).permutation(len(keys))
    again = select_golden([keys[i] for i in order], [lengths[i] for i in order], [sources[i] for i in order], settings)
    assert sorted(keys[order[i]] for i in again) == sorted(keys[i] for i in chosen)
    assert select_golden(keys, lengths, sources, GoldenSettings(seed=8)) != chosen
    # each source gets its share, and within a source every length quartile is represented about equally
    for src in ("toyworld", "llava"):
        share = sum(sources[i] == src for i in range(len(keys))) / len(keys)
        picked = [i for i in chosen if sources[i] == src]
        assert abs(len(picked) - 64 * share) <= 1
        ranked = sorted((i for i in range(len(keys)) if sources[i] == src), key=lambda i: (lengths[i], keys[i]))
        bins = np.array_split(np.array(ranked), 4)
        per_bin = [len(set(picked) & set(b.tolist())) for b in bins]
        assert max(per_bin) - min(per_bin) <= 1


def test_golden_selection_errors():
    keys, lengths, sources = _candidates(10)
    with pytest.raises(ValueError, match="at least 64"):
        select_golden(keys, lengths, sources, GoldenSettings())
    with pytest.raises(ValueError, match="not unique"):
        select_golden(["a", "a"], [1, 2], None, GoldenSettings(per_task=1))


def test_the_mixture_ramps_from_reading_tasks_to_the_final_weights():
    mix = TaskMixture(MixtureSettings(ramp_start=100, ramp_steps=50))
    a2t, i2t, t2a, t2i = (TASK_NAMES.index(t) for t in ("a2t", "i2t", "t2a", "t2i"))
    assert mix.probabilities(0).tolist() == mix.probabilities(99).tolist() == [0.5, 0.5, 0.0, 0.0]
    np.testing.assert_allclose(mix.probabilities(125), [0.375, 0.375, 0.125, 0.125])
    np.testing.assert_allclose(mix.probabilities(150), [0.25] * 4)
    np.testing.assert_allclose(mix.probabilities(10**6), [0.25] * 4)
    early = mix.draw(step=50, n=1000)
    assert set(early.tolist()) <= {a2t, i2t}
    late = np.concatenate([mix.draw(step=200 + s, n=100) for s in range(40)])
    assert abs(np.mean(late == t2a) - 0.25) < 0.03 and abs(np.mean(late == t2i) - 0.25) < 0.03
    # writing tasks come in gradually
    share = [np.mean(np.isin(mix.draw(s, 2000), [t2a, t2i])) for s in (100, 120, 140)]
    assert share[0] < share[1] < share[2] < 0.5


def test_draws_are_a_function_of_seed_step_and_stream_and_the_state_checkpoints():
    a, b = (
        TaskMixture(MixtureSettings(ramp_start=5, ramp_steps=10)),
        TaskMixture(MixtureSettings(ramp_start=5, ramp_steps=10)),
    )
    assert a.draw(7, 16).tolist() == b.draw(7, 16).tolist()
    assert a.draw(7, 16, stream=1).tolist() != a.draw(7, 16, stream=0).tolist()
    state = a.state_dict()
    assert sum(state["drawn"].values()) == 48 and state["step"] == 7
    resumed = TaskMixture(MixtureSettings(ramp_start=5, ramp_steps=10))
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    assert resumed.draw(8, 16).tolist() == a.draw(8, 16).tolist()  # the resumed run draws what this one does
    with pytest.raises(ValueError, match="ramp_steps"):
        TaskMixture(MixtureSettings(ramp_start=5, ramp_steps=20)).load_state_dict(state)


def test_mixture_settings_are_checked():
    from mmsuite.settings import parse

    with pytest.raises(ValueError, match="mixture.weights has unknown task"):
        parse(MixtureSettings, {"weights": {"a2x": 1.0}}, "mixture")
    with pytest.raises(ValueError, match="reading task"):
        parse(MixtureSettings, {"weights": {"t2a": 1.0, "t2i": 1.0}}, "mixture")
    with pytest.raises(ValueError, match="mixture.ramp_start must be >= 0"):
        parse(MixtureSettings, {"ramp_start": -1}, "mixture")


def test_draw_among_respects_each_rows_tasks_and_is_a_function_of_step_and_stream():
    mix = TaskMixture(MixtureSettings(ramp_start=10, ramp_steps=0))
    allowed = np.zeros((400, len(TASK_NAMES)), dtype=bool)
    image_rows = np.arange(400) % 2 == 0
    allowed[image_rows, [TASK_NAMES.index("i2t")]] = True
    allowed[image_rows, [TASK_NAMES.index("t2i")]] = True
    allowed[~image_rows, [TASK_NAMES.index("a2t")]] = True
    allowed[~image_rows, [TASK_NAMES.index("t2a")]] = True
    before = mix.draw_among(5, allowed)
    assert allowed[np.arange(400), before].all()
    assert set(before.tolist()) == {TASK_NAMES.index("i2t"), TASK_NAMES.index("a2t")}
    after = mix.draw_among(20, allowed, stream=1)
    assert allowed[np.arange(400), after].all() and 0.4 < np.isin(after, [2, 3]).mean() < 0.6
    np.testing.assert_array_equal(after, TaskMixture(mix.settings).draw_among(20, allowed, stream=1))
    assert not np.array_equal(after, mix.draw_among(20, allowed, stream=2))
    with pytest.raises(ValueError, match="no weight"):
        mix.draw_among(5, np.eye(len(TASK_NAMES), dtype=bool)[[2]])
