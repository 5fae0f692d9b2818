"""The MMPT token space: a base LM's vocabulary extended with specials, image tokens and audio tokens.

Layout (one :class:`TokenSpace`, so its sha256 is the one every shard, checkpoint and run dir checks):

```
text       [0, n_text)                 the base tokenizer's ids (len(tokenizer), its own specials included)
text_pad   [n_text, base_rows)         the base's rows past its tokenizer (Qwen3: 151669..151936); never emitted
specials   [base_rows, ...)            <text_start> <text_end> <img_start> <img_end> <aud_start> <aud_end>
                                       <gen_text> <gen_img> <gen_aud> <pad> (+ extra / reserved specials)
image      one id per image code       (the image tokenizer's range name)
audio_q0.. one range per codebook      frame-major: frame t, codebook k at position t*K+k (the audio tokenizer's names)
reserved   up to a multiple of 64      never emitted
```

New rows start at ``base_rows`` (not at ``n_text``: the base's padding rows are untrained and stay unused).
Every id is computed from the ranges, never by tokenizing a string. Each task's sequence is
``<open src> SRC <close src> <gen tgt> <open tgt> TGT <close tgt>`` (:data:`TASKS`), and the bodies of every
modality are checked by one strict rule set (:meth:`MMPTLayout.check_body`) that never repairs: the sequence
builders use it on their inputs and the decoder on generated outputs, each failure a :class:`DecodeError`
with a named kind.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mmsuite.settings import fail, setting
from mmsuite.tokenizers.token_space import TokenRange, TokenSpace

TEXT, TEXT_PAD, SPECIALS, IMAGE, RESERVED = "text", "text_pad", "specials", "image", "reserved"
AUDIO_PREFIX = "audio"  # codebook k is range audio_q{k} (mmsuite.tokenizers.audio.token_ranges)
PAD = "<pad>"

# modality -> (open tag, close tag, "generate this modality" tag)
MODALITY_TAGS: dict[str, tuple[str, str, str]] = {
    "text": ("<text_start>", "<text_end>", "<gen_text>"),
    "image": ("<img_start>", "<img_end>", "<gen_img>"),
    "audio": ("<aud_start>", "<aud_end>", "<gen_aud>"),
}
REQUIRED_SPECIALS: tuple[str, ...] = (
    *(t for tags in MODALITY_TAGS.values() for t in tags[:2]),
    *(tags[2] for tags in MODALITY_TAGS.values()),
    PAD,
)


@dataclass(frozen=True)
class TaskFormat:
    """A task reads ``source`` and writes ``target`` (modality names of :data:`MODALITY_TAGS`)."""

    name: str
    source: str
    target: str


TASKS: dict[str, TaskFormat] = {
    "a2t": TaskFormat("a2t", source="audio", target="text"),
    "i2t": TaskFormat("i2t", source="image", target="text"),
    "t2a": TaskFormat("t2a", source="text", target="audio"),
    "t2i": TaskFormat("t2i", source="text", target="image"),
}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)  # a task's index (batch["task"]) is its position here
READ_TASKS: tuple[str, ...] = ("a2t", "i2t")  # the model writes text
WRITE_TASKS: tuple[str, ...] = ("t2a", "t2i")  # the model writes image or audio tokens


def task_index(task: str) -> int:
    try:
        return TASK_NAMES.index(task)
    except ValueError:
        raise ValueError(f"unknown MMPT task {task!r}; tasks are {list(TASK_NAMES)}") from None


@dataclass
class LayoutSettings:
    """How the new ranges are laid out after the base vocabulary."""

    multiple_of: int = setting(64, ge=1)  # the total vocabulary is padded to a multiple of this with `reserved`
    extra_specials: list[str] = setting([])  # named specials after the required ones
    reserved_specials: int = setting(0, ge=0)  # unnamed ids kept at the end of the specials range


@dataclass
class FormatSettings:
    """What a well-formed body is, beyond its token ranges (shared by the builders, the decoder and generation)."""

    image_tokens: int = setting(64, ge=1)  # tokens per image: the image tokenizer's grid h*w
    audio_max_frames: int = setting(75, ge=1)  # longest audio body in codec frames (the generation limit)
    audio_min_frames: int = setting(1, ge=1)  # shortest audio body
    text_max_tokens: int = setting(64, ge=1)  # longest text body that is a target (the caption generation limit)
    text_min_tokens: int = setting(1, ge=1)  # shortest text body

    def check(self, key: str) -> None:
        if self.audio_min_frames > self.audio_max_frames:
            fail(
                f"{key}.audio_min_frames",
                f"({self.audio_min_frames}) exceeds audio_max_frames ({self.audio_max_frames})",
            )
        if self.text_min_tokens > self.text_max_tokens:
            fail(f"{key}.text_min_tokens", f"({self.text_min_tokens}) exceeds text_max_tokens ({self.text_max_tokens})")


class DecodeError(ValueError):
    """A sequence that is not a well-formed body or target. ``kind`` names the rule (``missing_end``,
    ``codebook_mismatch``, ...); ``code`` adds the position where there is one (``codebook_mismatch@5``)."""

    def __init__(self, kind: str, message: str, position: int | None = None):
        self.kind = kind
        self.position = position
        self.code = kind if position is None else f"{kind}@{position}"
        super().__init__(f"{self.code}: {message}")


def _ids_array(ids) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.size == 0:
        return arr.astype(np.int64).reshape(0)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"token ids must be a 1-D integer sequence, got dtype {arr.dtype} shape {arr.shape}")
    return arr.astype(np.int64)


class MMPTLayout:
    """A view of an MMPT :class:`TokenSpace`: its ranges by role, special ids and strict body checks.

    Build one with :meth:`build` (from the base's sizes and the tokenizers' codebooks) or wrap a loaded
    space (``MMPTLayout(TokenSpace.load(path))``), which checks that it has the MMPT layout.
    """

    def __init__(self, token_space: TokenSpace, banned_text_ids: Iterable[int] = ()):
        self.token_space = token_space
        names = [r.name for r in token_space]
        where = f"token space {token_space!r}"
        if not names or names[0] != TEXT:
            raise ValueError(f"{where}: an MMPT space starts with the base vocabulary range {TEXT!r}")
        self.text: TokenRange = token_space[TEXT]
        self.text_pad: TokenRange | None = token_space[TEXT_PAD] if TEXT_PAD in token_space else None
        if SPECIALS not in token_space:
            raise ValueError(f"{where}: no {SPECIALS!r} range")
        self.specials: TokenRange = token_space[SPECIALS]
        missing = [t for t in REQUIRED_SPECIALS if t not in token_space.specials]
        if missing:
            raise ValueError(f"{where}: the specials range lacks {missing}")
        if IMAGE not in token_space:
            raise ValueError(f"{where}: no {IMAGE!r} range")
        self.image: TokenRange = token_space[IMAGE]
        audio = []
        while f"{AUDIO_PREFIX}_q{len(audio)}" in token_space:
            audio.append(token_space[f"{AUDIO_PREFIX}_q{len(audio)}"])
        if not audio:
            raise ValueError(f"{where}: no audio ranges ({AUDIO_PREFIX}_q0, ...)")
        if len({r.size for r in audio}) != 1:
            raise ValueError(f"{where}: audio codebooks differ in size {[r.size for r in audio]}")
        self.audio: tuple[TokenRange, ...] = tuple(audio)
        self.reserved: TokenRange | None = token_space[RESERVED] if RESERVED in token_space else None
        expected = [TEXT, *([TEXT_PAD] if self.text_pad else []), SPECIALS, IMAGE, *(r.name for r in audio)]
        expected += [RESERVED] if self.reserved else []
        if names != expected:
            raise ValueError(f"{where}: ranges {names} are not in the MMPT order {expected}")
        self._audio_starts = np.array([r.start for r in audio], dtype=np.int64)
        banned = sorted({int(i) for i in banned_text_ids})
        bad = [i for i in banned if i not in self.text]
        if bad:
            raise ValueError(f"banned text ids {bad[:5]} lie outside the text range {self.text}")
        self.banned_text_ids: tuple[int, ...] = tuple(banned)

    @classmethod
    def build(
        cls,
        text_size: int,
        base_rows: int,
        image_codes: int,
        audio_codebooks: int,
        audio_bins: int,
        settings: LayoutSettings | None = None,
        banned_text_ids: Iterable[int] = (),
    ) -> MMPTLayout:
        """The layout for a base with ``text_size`` tokenizer ids and ``base_rows`` embedding rows, an image
        tokenizer of ``image_codes`` codes and an audio tokenizer of ``audio_codebooks`` x ``audio_bins``."""
        settings = settings or LayoutSettings()
        if base_rows < text_size:
            raise ValueError(f"the base has {base_rows} embedding rows, fewer than its {text_size} tokenizer ids")
        tokens = [*REQUIRED_SPECIALS, *settings.extra_specials]
        ranges: list[tuple[str, int | Sequence[str]]] = [(TEXT, int(text_size))]
        if base_rows > text_size:
            ranges.append((TEXT_PAD, int(base_rows - text_size)))
        space = TokenSpace(ranges)
        space.register_specials(SPECIALS, tokens=tokens, size=len(tokens) + int(settings.reserved_specials))
        space.register(IMAGE, int(image_codes))
        for k in range(int(audio_codebooks)):
            space.register(f"{AUDIO_PREFIX}_q{k}", int(audio_bins))
        total = math.ceil(space.vocab_size / settings.multiple_of) * settings.multiple_of
        if total > space.vocab_size:
            space.register(RESERVED, total - space.vocab_size)
        return cls(space, banned_text_ids)

    # -- sizes and ids ----------------------------------------------------------------------------------------
    @property
    def sha256(self) -> str:
        return self.token_space.sha256

    @property
    def vocab_size(self) -> int:
        """Total rows of the extended embedding and head."""
        return self.token_space.vocab_size

    @property
    def base_rows(self) -> int:
        """Rows of the base model; the first new id."""
        return self.specials.start

    @property
    def n_codebooks(self) -> int:
        return len(self.audio)

    @property
    def audio_bins(self) -> int:
        return self.audio[0].size

    @property
    def text_rows(self) -> range:
        """The base's trained rows (its tokenizer's ids); new rows start at their mean."""
        return range(self.text.start, self.text.stop)

    @property
    def trainable_ids(self) -> range:
        """The new rows that are trained: specials, image and audio (not the reserved tail)."""
        return range(self.specials.start, self.audio[-1].stop)

    @property
    def new_ids(self) -> range:
        """Every row past the base's: the trainable ones and the reserved tail (all initialised by the builder)."""
        return range(self.base_rows, self.vocab_size)

    def never_emitted_ids(self) -> list[int]:
        """Ids no sequence holds and no decoder may emit: the base's padding rows and the reserved tail."""
        out: list[int] = []
        for r in (self.text_pad, self.reserved):
            if r is not None:
                out.extend(range(r.start, r.stop))
        return out

    def special(self, token: str) -> int:
        return self.token_space.special(token)

    @property
    def pad_id(self) -> int:
        return self.special(PAD)

    def tags(self, modality: str) -> tuple[int, int, int]:
        """(open, close, gen) ids of ``modality``."""
        try:
            return tuple(self.special(t) for t in MODALITY_TAGS[modality])  # type: ignore[return-value]
        except KeyError:
            raise ValueError(f"unknown modality {modality!r}; modalities are {list(MODALITY_TAGS)}") from None

    def max_body(self, modality: str, fmt: FormatSettings) -> int:
        """Most tokens a ``modality`` target body may have (the generation limit)."""
        limits = {
            "audio": fmt.audio_max_frames * self.n_codebooks,
            "image": fmt.image_tokens,
            "text": fmt.text_max_tokens,
        }
        if modality not in limits:
            raise ValueError(f"unknown modality {modality!r}; modalities are {list(limits)}")
        return limits[modality]

    def describe(self) -> dict:
        return {
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "base_rows": self.base_rows,
            "ranges": {r.name: [r.start, r.stop] for r in self.token_space},
            "specials": self.token_space.specials,
        }

    # -- strict checks of bodies (never repaired) -------------------------------------------------------------
    def check_body(self, modality: str, ids, fmt: FormatSettings, *, limits: bool = True) -> np.ndarray:
        """``ids`` as an int64 array if they are a well-formed ``modality`` body, else :class:`DecodeError`.

        ``limits`` also applies the length limits of ``fmt`` (audio frames, text tokens) that bound generation;
        the image length is always exact.
        """
        arr = _ids_array(ids)
        check = {"text": self._check_text, "image": self._check_image, "audio": self._check_audio}
        if modality not in check:
            raise ValueError(f"unknown modality {modality!r}; modalities are {list(check)}")
        check[modality](arr, fmt, limits)
        return arr

    def _check_text(self, arr: np.ndarray, fmt: FormatSettings, limits: bool) -> None:
        if arr.size == 0:
            raise DecodeError("empty", "no text tokens")
        bad = (arr < self.text.start) | (arr >= self.text.stop)
        if self.banned_text_ids:
            bad |= np.isin(arr, self.banned_text_ids)
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            raise DecodeError("not_text", f"id {int(arr[j])} is not an allowed text id ({self._where(arr[j])})", j)
        if limits and arr.size > fmt.text_max_tokens:
            raise DecodeError("too_long", f"{arr.size} text tokens, more than format.text_max_tokens")

    def _check_image(self, arr: np.ndarray, fmt: FormatSettings, limits: bool) -> None:
        bad = (arr < self.image.start) | (arr >= self.image.stop)
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            raise DecodeError("not_image", f"id {int(arr[j])} is not an image id ({self._where(arr[j])})", j)
        if arr.size != fmt.image_tokens:
            raise DecodeError("wrong_image_len", f"{arr.size} image tokens, expected {fmt.image_tokens}")

    def _check_audio(self, arr: np.ndarray, fmt: FormatSettings, limits: bool) -> None:
        k_count = self.n_codebooks
        if arr.size == 0:
            raise DecodeError("empty", "no audio tokens")
        lo, hi = self.audio[0].start, self.audio[-1].stop
        not_audio = (arr < lo) | (arr >= hi)
        if not_audio.any():
            j = int(np.flatnonzero(not_audio)[0])
            raise DecodeError("not_audio", f"id {int(arr[j])} is not an audio id ({self._where(arr[j])})", j)
        expected = np.arange(arr.size) % k_count
        got = (arr - lo) // self.audio_bins
        wrong = got != expected
        if wrong.any():
            j = int(np.flatnonzero(wrong)[0])
            raise DecodeError(
                "codebook_mismatch",
                f"id {int(arr[j])} at position {j} is in codebook {int(got[j])}, expected {int(expected[j])} "
                f"(frame-major, {k_count} codebooks)",
                j,
            )
        if arr.size % k_count:
            raise DecodeError("len_not_multiple", f"{arr.size} audio ids is not a whole number of {k_count}-id frames")
        frames = arr.size // k_count
        if frames < fmt.audio_min_frames:
            raise DecodeError("too_short", f"{frames} audio frames, fewer than format.audio_min_frames")
        if limits and frames > fmt.audio_max_frames:
            raise DecodeError("too_long", f"{frames} audio frames, more than format.audio_max_frames")

    def _where(self, token_id) -> str:
        token_id = int(token_id)
        if 0 <= token_id < self.vocab_size:
            r = self.token_space.range_of(token_id)
            name = f" {self.token_space.special_name(token_id)}" if self.token_space.is_special(token_id) else ""
            return f"range {r.name!r}{name}"
        return f"outside the vocabulary of {self.vocab_size}"

    # -- strict decoding of generated targets ----------------------------------------------------------------
    def decode_target(self, modality: str, ids, fmt: FormatSettings) -> np.ndarray:
        """The body of a generated ``modality`` target ``<open> BODY <close> <pad>...`` (what follows the prompt's
        ``<gen_*>``), checked by :meth:`check_body`. Anything else raises :class:`DecodeError`: ``missing_start``,
        ``missing_end``, ``trailing`` (non-pad ids after the close tag) or a body error. Nothing is repaired."""
        arr = _ids_array(ids)
        open_id, close_id, _ = self.tags(modality)
        if arr.size == 0 or arr[0] != open_id:
            first = f"id {int(arr[0])} ({self._where(arr[0])})" if arr.size else "nothing"
            raise DecodeError("missing_start", f"expected {MODALITY_TAGS[modality][0]} first, got {first}")
        ends = np.flatnonzero(arr == close_id)
        if ends.size == 0:
            raise DecodeError("missing_end", f"no {MODALITY_TAGS[modality][1]} in {arr.size} ids")
        end = int(ends[0])
        tail = arr[end + 1 :]
        if (tail != self.pad_id).any():
            j = end + 1 + int(np.flatnonzero(tail != self.pad_id)[0])
            raise DecodeError("trailing", f"id {int(arr[j])} after {MODALITY_TAGS[modality][1]}", j)
        return self.check_body(modality, arr[1:end], fmt)


def text_special_ids(tokenizer, layout: MMPTLayout) -> list[int]:
    """Global ids of a ``tokenizers.Tokenizer``'s own special tokens (Qwen's ``<|im_start|>``, ...): captions
    never contain them (the text tokenizer encodes their strings literally), so text decoding may ban them."""
    decoder = tokenizer.get_added_tokens_decoder()
    return sorted(layout.text.start + int(i) for i, tok in decoder.items() if tok.special)
