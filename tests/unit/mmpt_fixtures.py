"""Small MMPT pieces shared by the tests/unit/test_mmpt_*.py files: a tiny layout, format and random items."""

from __future__ import annotations

import numpy as np

from mmsuite.tokenizers.mmpt_sequences import TaskItem
from mmsuite.tokenizers.mmpt_space import FormatSettings, LayoutSettings, MMPTLayout

TEXT, BASE_ROWS, IMAGE_CODES, K, BINS = 40, 48, 16, 3, 8  # 40 text ids + 8 padding rows like Qwen3's
FMT = FormatSettings(image_tokens=4, audio_max_frames=5, audio_min_frames=1, text_max_tokens=6, text_min_tokens=1)


def tiny_layout(banned=()) -> MMPTLayout:
    layout = MMPTLayout.build(TEXT, BASE_ROWS, IMAGE_CODES, K, BINS, LayoutSettings(multiple_of=64))
    return MMPTLayout(layout.token_space, banned) if banned else layout


def audio_ids(layout: MMPTLayout, codes: np.ndarray) -> np.ndarray:
    """Codes ``[K, T]`` -> frame-major global ids (what the audio tokenizer writes)."""
    starts = np.array([r.start for r in layout.audio])
    return (codes + starts[:, None]).T.reshape(-1)


def random_item(layout: MMPTLayout, rng: np.random.Generator, key: str, text_len=None, frames=None, source=""):
    text_len = int(rng.integers(1, FMT.text_max_tokens + 1)) if text_len is None else text_len
    frames = int(rng.integers(1, FMT.audio_max_frames + 1)) if frames is None else frames
    text = rng.integers(layout.text.start, layout.text.stop, size=text_len)
    image = rng.integers(layout.image.start, layout.image.stop, size=FMT.image_tokens)
    audio = audio_ids(layout, rng.integers(0, layout.audio_bins, size=(layout.n_codebooks, frames)))
    return TaskItem(key, text.tolist(), image.tolist(), audio.tolist(), source)


def tiny_qwen3(vocab_size: int, tied: bool = True, seed: int = 0, hidden: int = 32):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        tie_word_embeddings=tied,
        max_position_embeddings=256,
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).eval()
