import numpy as np
import pytest
import torch

from mmsuite.tokenizers.mmpt_decoding import (
    TaskGrammar,
    decode_batch,
    decode_generated,
    decode_report,
    illegal_mass,
    illegal_mass_by_state,
)
from mmsuite.tokenizers.mmpt_sequences import SequenceBuilder, collate, collate_prompts
from mmsuite.tokenizers.mmpt_space import TASK_NAMES, TASKS, DecodeError, FormatSettings
from tests.unit.mmpt_fixtures import FMT, random_item, tiny_layout, tiny_qwen3


def _prompts(layout, task, n, seed=0, with_open=False):
    rng = np.random.default_rng(seed)
    builder = SequenceBuilder(tiny_layout(), FMT)  # no banned ids: prompts may hold any text id
    prompts = []
    for i in range(n):  # prompts of different lengths: left padding is exercised
        seq = builder.build(task, random_item(layout, rng, f"k{i}"))
        prompts.append(seq.input_ids[: seq.target_start + (1 if with_open else 0)])
    return collate_prompts(prompts, layout.pad_id)


def _random_scores(gen, batch, vocab):
    scores = torch.randn(batch, vocab, generator=gen) * 30
    # anything at all: huge values, -inf, +inf and NaN on random ids (also on allowed ones)
    for value in (float("-inf"), float("inf"), float("nan"), 1e38, -1e38):
        hit = torch.rand(batch, vocab, generator=gen) < 0.05
        scores[hit] = value
    return scores


def _run_loop(grammar, task, prompts, sample: bool, seed: int, with_open=False):
    """generate()'s loop over random scores: process, pick, pad finished rows, stop at the close tag."""
    kw = grammar.generate_kwargs(task, prompt_ends_open=with_open)
    proc = kw["logits_processor"][0]
    ids = prompts["input_ids"]
    gen = torch.Generator().manual_seed(seed)
    unfinished = torch.ones(ids.shape[0], dtype=torch.bool)
    for _ in range(kw["max_new_tokens"]):
        scores = proc(ids, _random_scores(gen, ids.shape[0], grammar.layout.vocab_size))
        assert torch.isfinite(scores).any(dim=1).all() and not scores.isnan().any()
        if sample:
            nxt = torch.multinomial(torch.softmax(scores / 0.7, dim=-1), 1, generator=gen)[:, 0]
        else:
            nxt = scores.argmax(dim=-1)
        nxt = torch.where(unfinished, nxt, torch.full_like(nxt, kw["pad_token_id"]))
        unfinished &= nxt != kw["eos_token_id"]
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        if not unfinished.any():
            break
    assert not unfinished.any(), "a row did not close within max_new_tokens"
    return ids[:, prompts["input_ids"].shape[1] :]


@pytest.mark.parametrize("sample", [False, True])
@pytest.mark.parametrize("task", TASK_NAMES)
def test_any_random_scores_become_a_decodable_target(task, sample):
    layout = tiny_layout(banned=[0, 1])
    grammar = TaskGrammar(layout, FMT)
    for seed in range(6):
        with_open = seed % 2 == 1
        prompts = _prompts(layout, task, 5, seed, with_open)
        out = _run_loop(grammar, task, prompts, sample, seed, with_open)
        for body in decode_batch(layout, task, out, FMT, prompt_ends_open=with_open):
            assert not isinstance(body, DecodeError), body
            if TASKS[task].target == "text":
                assert not np.isin(body, [0, 1]).any()  # banned ids never come out


def test_audio_ends_only_at_frame_boundaries_and_is_forced_at_the_limit():
    layout = tiny_layout()
    fmt = FormatSettings(image_tokens=4, audio_max_frames=3, audio_min_frames=2)
    grammar = TaskGrammar(layout, fmt)
    _, a_close, _ = layout.tags("audio")
    k = layout.n_codebooks
    p = torch.arange(-1, k * 3 + 2)
    allowed = grammar.allowed[grammar.states("t2a", p)]
    can_end = allowed[:, a_close].tolist()
    assert can_end == [p_ >= 0 and p_ % k == 0 and p_ >= 2 * k and p_ <= 3 * k for p_ in p.tolist()]
    assert allowed[p.tolist().index(3 * k)].sum() == 1  # only <aud_end> at the limit
    for i, p_ in enumerate(p.tolist()):
        if 0 <= p_ < 3 * k:
            r = layout.audio[p_ % k]
            assert allowed[i, r.start : r.stop].all() and allowed[i].sum() == r.size + int(can_end[i])
    # greedy on scores that favour <aud_end> stops at the first allowed boundary; scores that never favour it
    # are forced to stop at audio_max_frames
    for favour_end, frames in ((True, 2), (False, 3)):
        proc = grammar.processor("t2a")
        ids = _prompts(layout, "t2a", 2)["input_ids"]
        for _ in range(grammar.generate_kwargs("t2a")["max_new_tokens"]):
            scores = torch.zeros(2, layout.vocab_size)
            scores[:, a_close] = 5.0 if favour_end else -5.0
            ids = torch.cat([ids, proc(ids, scores).argmax(-1, keepdim=True)], dim=1)
        gen = ids[:, -grammar.generate_kwargs("t2a")["max_new_tokens"] :]
        bodies = decode_batch(layout, "t2a", gen, fmt)
        assert all(b.size == frames * k for b in bodies)


def test_image_is_exactly_the_grid_then_its_end_and_text_never_emits_padding_rows():
    layout = tiny_layout()
    grammar = TaskGrammar(layout, FMT)
    _, i_close, _ = layout.tags("image")
    st = grammar.states("t2i", torch.arange(-1, FMT.image_tokens + 2))
    rows = grammar.allowed[st]
    assert rows[0].sum() == 1 and rows[0, layout.tags("image")[0]]
    assert all(rows[1 + p, layout.image.start : layout.image.stop].all() for p in range(FMT.image_tokens))
    assert rows[1 + FMT.image_tokens].sum() == 1 and rows[1 + FMT.image_tokens, i_close]
    assert rows[-1].sum() == 1 and rows[-1, layout.pad_id]  # done: one finite id
    text = grammar.allowed[grammar.states("a2t", torch.arange(0, FMT.text_max_tokens))]
    never = layout.never_emitted_ids()
    assert not text[:, never].any() and not text[:, layout.image.start :].any()
    assert not text[0, layout.tags("text")[1]] and text[1, layout.tags("text")[1]]  # text_min_tokens = 1


def test_a_tiny_models_generate_with_the_processor_always_decodes():
    layout = tiny_layout()
    grammar = TaskGrammar(layout, FMT)
    model = tiny_qwen3(layout.vocab_size)
    for task in TASK_NAMES:
        prompts = _prompts(layout, task, 4, seed=1)
        for sample in (False, True):
            kw = grammar.generate_kwargs(task)
            extra = (
                {"do_sample": True, "top_k": 5, "top_p": 0.9, "temperature": 1.3} if sample else {"do_sample": False}
            )
            torch.manual_seed(0)
            out = model.generate(**prompts, **kw, **extra)
            gen = out[:, prompts["input_ids"].shape[1] :]
            report = decode_report(decode_batch(layout, task, gen, FMT))
            assert report == {"n": 4, "success_rate": 1.0, "errors": {}}, (task, sample)
    # the same model without the constraint: only the never-emitted ids are banned
    prompts = _prompts(layout, "t2a", 4, seed=1)
    kw = grammar.generate_kwargs("t2a", constrained=False)
    gen = model.generate(**prompts, **kw, do_sample=False)[:, prompts["input_ids"].shape[1] :]
    assert not np.isin(gen.numpy(), layout.never_emitted_ids()).any()
    assert decode_report(decode_batch(layout, "t2a", gen, FMT))["n"] == 4


def test_batched_left_padded_greedy_matches_one_prompt_at_a_time():
    layout = tiny_layout()
    grammar = TaskGrammar(layout, FMT)
    model = tiny_qwen3(layout.vocab_size, seed=3)
    prompts = _prompts(layout, "t2a", 3, seed=2)
    batched = model.generate(**prompts, **grammar.generate_kwargs("t2a"), do_sample=False)
    width = prompts["input_ids"].shape[1]
    for i in range(3):
        keep = prompts["attention_mask"][i].bool()
        one = {k: v[i : i + 1, keep] for k, v in prompts.items()}
        single = model.generate(**one, **grammar.generate_kwargs("t2a"), do_sample=False)
        a = decode_generated(layout, "t2a", batched[i, width:], FMT)
        b = decode_generated(layout, "t2a", single[0, int(keep.sum()) :], FMT)
        assert a.tolist() == b.tolist()


def test_processor_rejects_mixed_prompt_ends_and_wrong_vocab():
    layout = tiny_layout()
    grammar = TaskGrammar(layout, FMT)
    ids = torch.tensor([[1, layout.tags("image")[2]], [1, layout.tags("image")[0]]])
    with pytest.raises(ValueError, match="not a mix"):
        grammar.processor("t2i")(ids, torch.zeros(2, layout.vocab_size))
    with pytest.raises(ValueError, match="token space has"):
        grammar.processor("t2i")(ids, torch.zeros(2, layout.vocab_size + 1))


def test_every_built_target_is_legal_under_the_grammar_and_illegal_mass_measures_the_rest():
    layout, rng = tiny_layout(), np.random.default_rng(7)
    grammar = TaskGrammar(layout, FMT)
    builder = SequenceBuilder(layout, FMT)
    seqs = [builder.build(t, random_item(layout, rng, f"{t}{i}")) for i in range(3) for t in TASK_NAMES]
    batch = collate(seqs, layout.pad_id)
    states = grammar.target_states(batch["labels"], batch["task"])
    labels = batch["labels"][batch["labels"] != -100]
    assert states.shape == labels.shape
    assert grammar.allowed[states, labels].all()  # the builder and the grammar agree on every target token
    # all mass on the target: nothing illegal; uniform over the vocabulary: everything outside the allowed set
    peaked = torch.full((labels.numel(), layout.vocab_size), -1e4)
    peaked[torch.arange(labels.numel()), labels] = 0.0
    assert illegal_mass(peaked, states, grammar).max() < 1e-6
    uniform = torch.zeros(labels.numel(), layout.vocab_size)
    want = 1 - grammar.allowed[states].sum(1).float() / layout.vocab_size
    torch.testing.assert_close(illegal_mass(uniform, states, grammar), want)
    by_state = illegal_mass_by_state(illegal_mass(uniform, states, grammar), states, grammar)
    assert {"audio_q0", "audio_q1", "audio_q2", "image", "open_text", "text_end"} <= set(by_state)
