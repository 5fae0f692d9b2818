import numpy as np
import pytest

from mmsuite.tokenizers.mmpt_sequences import (
    IGNORE,
    SequenceBuilder,
    SequenceSettings,
    TaskItem,
    ablation_sequences,
    ablation_summary,
    bootstrap_mean_ci,
    collate,
    collate_prompts,
    derangement,
    run_prompt_ablation,
    verify_sequence,
)
from mmsuite.tokenizers.mmpt_space import TASK_NAMES, TASKS, DecodeError
from tests.unit.mmpt_fixtures import FMT, random_item, tiny_layout

ORDER = {
    "a2t": ["<aud_start>", "A", "<aud_end>", "<gen_text>", "<text_start>", "T", "<text_end>"],
    "i2t": ["<img_start>", "I", "<img_end>", "<gen_text>", "<text_start>", "T", "<text_end>"],
    "t2a": ["<text_start>", "T", "<text_end>", "<gen_aud>", "<aud_start>", "A", "<aud_end>"],
    "t2i": ["<text_start>", "T", "<text_end>", "<gen_img>", "<img_start>", "I", "<img_end>"],
}


def _symbols(layout, ids):
    """Each id as its special's name, or T / I / A for runs of text / image / audio ids."""
    out = []
    for i in ids.tolist():
        if layout.token_space.is_special(i):
            out.append(layout.token_space.special_name(i))
            continue
        sym = "T" if i in layout.text else "I" if i in layout.image else "A"
        if not out or out[-1] != sym:
            out.append(sym)
    return out


def test_every_task_has_the_issues_order_and_labels_only_on_the_target():
    layout, rng = tiny_layout(), np.random.default_rng(0)
    builder = SequenceBuilder(layout, FMT)
    for i in range(20):
        item = random_item(layout, rng, f"k{i}")
        for task in TASK_NAMES:
            seq = builder.build(task, item)
            assert _symbols(layout, seq.input_ids) == ORDER[task]
            verify_sequence(layout, seq, FMT)
            start = seq.target_start
            # labels equal the ids on the whole target span, tags included, -100 before it; not shifted
            assert (seq.labels[:start] == IGNORE).all() and (seq.labels[start:] == seq.input_ids[start:]).all()
            open_, close, gen = layout.tags(TASKS[task].target)
            assert seq.input_ids[start - 1] == gen and seq.labels[start] == open_ and seq.labels[-1] == close
            target = np.asarray(item.body(TASKS[task].target))
            assert seq.target[1:-1].tolist() == target.tolist()  # never truncated
            labelled = seq.labels[seq.labels != IGNORE]
            rng_name = {"text": "text", "image": "image", "audio": None}[TASKS[task].target]
            body = labelled[1:-1]
            if rng_name:
                r = layout.token_space[rng_name]
                assert ((body >= r.start) & (body < r.stop)).all()
            else:
                assert ((body >= layout.audio[0].start) & (body < layout.audio[-1].stop)).all()
    assert builder.drops.total() == 0


def test_a_long_prompt_is_shortened_but_a_target_is_never_truncated():
    layout = tiny_layout()
    item = random_item(layout, np.random.default_rng(1), "long", text_len=30, frames=5)  # audio: 15 ids
    builder = SequenceBuilder(layout, FMT, SequenceSettings(max_seq_len=40, min_prompt_tokens=4))
    seq = builder.build("t2a", item)  # 30 + 15 + 5 = 50 > 40: the prompt loses 10 tokens
    assert len(seq) == 40 and seq.shortened == 10
    assert seq.input_ids[1:21].tolist() == list(item.text[:20])
    assert seq.target[1:-1].tolist() == list(item.audio)
    assert builder.drops.shortened["t2a"] == 1 and builder.drops.total() == 0
    # when shortening would leave fewer than min_prompt_tokens, the sample is dropped
    tight = SequenceBuilder(layout, FMT, SequenceSettings(max_seq_len=22, min_prompt_tokens=4))
    assert tight.build("t2a", item) is None
    # a caption target is never shortened: the A2T sample is dropped
    assert tight.build("a2t", random_item(layout, np.random.default_rng(2), "a", text_len=6, frames=5)) is None
    assert tight.drops.as_dict() == {"t2a": {"too_long": 1}, "a2t": {"too_long": 1}}
    assert "never truncated" in tight.drops.examples[("a2t", "too_long")]


def test_bad_bodies_are_dropped_and_counted_by_task_and_reason():
    layout = tiny_layout()
    good = random_item(layout, np.random.default_rng(3), "g", frames=2)
    builder = SequenceBuilder(layout, FMT)
    bad = [
        ("a2t", TaskItem("e", [], good.image, good.audio), "empty_text"),
        ("t2a", TaskItem("e2", [], good.image, good.audio), "empty_text"),
        ("a2t", TaskItem("c", good.text, good.image, list(good.audio)[1:] + [good.audio[0]]), "bad_audio"),
        ("t2a", TaskItem("c2", good.text, good.image, list(good.audio)[:-1]), "bad_audio"),
        ("t2i", TaskItem("i", good.text, list(good.image)[:-1], good.audio), "bad_image"),
        ("i2t", TaskItem("i2", good.text, [layout.pad_id] * FMT.image_tokens, good.audio), "bad_image"),
        ("i2t", TaskItem("t", [*good.text, 44], good.image, good.audio), "bad_text"),
        ("i2t", TaskItem("t2", [1] * (FMT.text_max_tokens + 1), good.image, good.audio), "bad_text"),
    ]
    for task, item, _ in bad:
        assert builder.build(task, item) is None
    expected: dict = {}
    for task, _, reason in bad:
        expected.setdefault(task, {}).setdefault(reason, 0)
        expected[task][reason] += 1
    assert builder.drops.as_dict() == expected
    assert "codebook_mismatch" in builder.drops.examples[("a2t", "bad_audio")]
    # drop counts merge across workers
    other = SequenceBuilder(layout, FMT)
    other.drops.merge(builder.drops.state_dict())
    other.drops.merge(builder.drops.state_dict())
    assert other.drops.total("i2t") == 2 * builder.drops.total("i2t")


def test_collate_pads_right_for_training_and_left_for_generation():
    layout, rng = tiny_layout(), np.random.default_rng(4)
    builder = SequenceBuilder(layout, FMT)
    seqs = [builder.build(t, random_item(layout, rng, t)) for t in TASK_NAMES]
    batch = collate(seqs, layout.pad_id)
    length = max(len(s) for s in seqs)
    assert batch["input_ids"].shape == (4, length) and batch["task"].tolist() == [0, 1, 2, 3]
    for i, s in enumerate(seqs):
        n = len(s)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (length - n)
        assert (batch["labels"][i, n:] == IGNORE).all() and (batch["input_ids"][i, n:] == layout.pad_id).all()
    prompts = collate_prompts([s.prompt for s in seqs], layout.pad_id)
    m = max(s.target_start for s in seqs)
    for i, s in enumerate(seqs):
        assert prompts["input_ids"][i, m - s.target_start :].tolist() == s.prompt.tolist()
        assert prompts["attention_mask"][i].sum() == s.target_start


def test_ablation_keeps_the_target_and_changes_only_the_source():
    layout, rng = tiny_layout(), np.random.default_rng(5)
    builder = SequenceBuilder(layout, FMT)
    items = [random_item(layout, rng, f"k{i}") for i in range(7)]
    for task in ("t2a", "t2i"):
        keys, conds = ablation_sequences(builder, task, items, seed=3)
        assert keys == [it.key for it in items]
        donors = derangement(len(items), seed=3)
        t_open, t_close, _ = layout.tags("text")
        for i, (c, s, e) in enumerate(zip(conds["correct"], conds["shuffled"], conds["empty"])):
            assert c.target.tolist() == s.target.tolist() == e.target.tolist()
            assert c.input_ids[1 : c.target_start - 2].tolist() == list(items[i].text)
            assert s.input_ids[1 : s.target_start - 2].tolist() == list(items[donors[i]].text)
            assert e.prompt.tolist() == [t_open, t_close, layout.tags(TASKS[task].target)[2]]
    p = derangement(10, seed=1)
    assert sorted(p.tolist()) == list(range(10)) and not (p == np.arange(10)).any()
    assert derangement(10, seed=1).tolist() == p.tolist()


def test_ablation_summary_gaps_cis_and_loss_share():
    rng = np.random.default_rng(0)
    correct = rng.normal(2.0, 0.1, 200)
    noisy = correct + rng.normal(0, 0.1, 200)
    summary = ablation_summary({"correct": correct, "shuffled": correct + 0.5, "empty": noisy})
    assert summary["n"] == 200
    assert summary["gap_shuffled"]["mean"] == pytest.approx(0.5)
    lo, hi = summary["gap_shuffled"]["ci95"]
    assert lo == pytest.approx(0.5) and hi == pytest.approx(0.5) and summary["gap_shuffled"]["excludes_zero"]
    assert summary["correct_loses_shuffled"] == 0.0
    lo, hi = summary["gap_empty"]["ci95"]
    assert lo < 0 < hi and not summary["gap_empty"]["excludes_zero"]
    assert 0.3 < summary["correct_loses_empty"] < 0.7
    mean, lo, hi = bootstrap_mean_ci(rng.normal(1.0, 1.0, 400), seed=1)
    assert lo < mean < hi and hi - lo == pytest.approx(2 * 1.96 / 20, rel=0.25)


def test_run_prompt_ablation_calls_the_nll_function_per_condition():
    layout, rng = tiny_layout(), np.random.default_rng(6)
    builder = SequenceBuilder(layout, FMT)
    items = [random_item(layout, rng, f"k{i}") for i in range(5)]

    def fake_nll(batch):  # the shorter the source, the higher the "loss": empty > shuffled/correct
        return 10.0 / batch["attention_mask"].sum(1).float()

    out = run_prompt_ablation(fake_nll, builder, "t2i", items, batch_size=2)
    assert out["n"] == 5 and len(out["per_item"]["empty"]) == 5
    assert out["nll"]["empty"] > out["nll"]["correct"]
    assert isinstance(out["gap_empty"]["ci95"][0], float) and out["keys"] == [it.key for it in items]


def test_a_prompt_from_a_source_alone_leaves_room_for_the_longest_target():
    layout = tiny_layout()
    item = random_item(layout, np.random.default_rng(8), "p", text_len=30)
    builder = SequenceBuilder(layout, FMT, SequenceSettings(max_seq_len=40))
    prompt = builder.prompt("t2a", item.text)  # longest audio target: 5 frames x 3 = 15 ids + 2 tags
    assert prompt.tolist() == [
        layout.special("<text_start>"),
        *item.text[:20],
        *layout.tags("text")[1:2],
        layout.special("<gen_aud>"),
    ]
    short = random_item(layout, np.random.default_rng(9), "q")
    assert builder.prompt("i2t", short.image).tolist() == builder.build("i2t", short).prompt.tolist()
    with pytest.raises(ValueError, match="no room"):
        SequenceBuilder(layout, FMT, SequenceSettings(max_seq_len=20)).prompt("a2t", item.audio)
    with pytest.raises(ValueError, match="bad|empty|source"):
        builder.prompt("t2i", [])


def test_the_sequence_gate_catches_a_broken_sequence():
    layout = tiny_layout()
    seq = SequenceBuilder(layout, FMT).build("t2a", random_item(layout, np.random.default_rng(10), "x", frames=2))
    broken = [
        ("labels", 1, 5, "outside the target"),  # a prompt token supervised
        ("labels", -1, IGNORE, "differs"),  # the end tag not supervised
        ("input_ids", 0, layout.special("<img_start>"), "source tags"),
        ("input_ids", -3, layout.audio[0].start, "codebook_mismatch"),  # and its label too
    ]
    for field_name, pos, value, match in broken:
        bad = SequenceBuilder(layout, FMT).build("t2a", random_item(layout, np.random.default_rng(10), "x", frames=2))
        getattr(bad, field_name)[pos] = value
        if field_name == "input_ids" and pos < 0:
            bad.labels[pos] = value
        with pytest.raises((ValueError, DecodeError), match=match):
            verify_sequence(layout, bad, FMT)
    verify_sequence(layout, seq, FMT)


def test_text_only_sequences_label_every_token_after_the_opening_tag():
    from mmsuite.tokenizers.mmpt_sequences import assemble_text, collate_rows

    layout = tiny_layout()
    ids, labels = assemble_text(layout, [3, 4, 5])
    t_open, t_close, _ = layout.tags("text")
    assert ids.tolist() == [t_open, 3, 4, 5, t_close]
    assert labels.tolist() == [-100, 3, 4, 5, t_close]
    batch = collate_rows([(ids, labels), (ids[:2], labels[:2])], layout.pad_id)
    assert batch["input_ids"][1].tolist() == [t_open, 3, *[layout.pad_id] * 3]
    assert batch["attention_mask"].sum(1).tolist() == [5, 2] and batch["labels"][1, 2:].eq(-100).all()
