"""Text tokenizer: strings <-> global token ids of one :class:`TokenSpace` range.

One interface over two kinds of Hugging Face ``tokenizers`` models:

- a byte-level BPE trained here (:func:`train_bpe`, saved as ``tokenizer.json``): GPT-2 style byte-level
  pre-tokenizer and decoder over all 256 bytes, so ``decode(encode(s)) == s`` for every string and no
  character is ever unknown; the vocabulary holds no special tokens;
- any pretrained tokenizer in a *local* directory (e.g. a Qwen3 tokenizer folder): its ``tokenizer.json``
  is read directly, otherwise ``transformers.AutoTokenizer`` loads the folder with ``local_files_only``.
  Nothing is downloaded; a missing path is a :class:`FileNotFoundError` naming it.

Ids are global: local tokenizer id + ``token_space[range_name].start``. Control tokens (bos/eos/pad) are the
token space's named specials (:meth:`TokenSpace.special`), added by id, never found by matching strings in
the text. By default even a pretrained tokenizer's own special strings (``<|im_end|>``, ...) appearing in the
input are encoded as plain text (``literal_specials=True``), so a caption cannot inject a control token.

From a config (``conf/tokenizer/text_bpe.yaml``, ``hf_text.yaml``): :func:`train_text_tokenizer` trains the
BPE once per data set and settings on the train split's captions, which its caller reads from the shards
(``mmsuite.datamodules.base.prepare_text_tokenizer``, run by ``prepare.py tokenizer=text_bpe``), and
:func:`text_tokenizer_from_config` loads either kind, checked against the config and the token space.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mmsuite.tokenizers.token_space import TokenRange, TokenSpace, file_sha256, settings_hash

TOKENIZER_FILE = "tokenizer.json"
SETTINGS_SUFFIX = ".settings.json"  # tokenizer.json -> tokenizer.settings.json: what it was trained with
TRAIN_SPLIT = "train"  # the only split a tokenizer learns from: val/test text must not shape the vocabulary
BPE_RECIPE = 1  # bump when train_bpe would turn the same captions into a different tokenizer
TEXT_TOKENIZERS = ("text_bpe", "hf_text")  # tokenizer config names that this module serves


def train_bpe(texts: Iterable[str], vocab_size: int, out_path: str | os.PathLike, *, min_frequency: int = 2) -> Path:
    """Train a byte-level BPE with at most ``vocab_size`` tokens on ``texts``; write it to ``out_path``.

    ``out_path`` is the ``tokenizer.json`` to write (a directory means ``<dir>/tokenizer.json``). The file is
    written atomically (temporary file + ``os.replace``). Returns the path written.
    """
    if isinstance(texts, (str, bytes)):
        raise TypeError("train_bpe expects an iterable of strings, got a single string")
    n_bytes = len(pre_tokenizers.ByteLevel.alphabet())
    if int(vocab_size) != vocab_size or vocab_size < n_bytes:
        raise ValueError(
            f"train_bpe: vocab_size must be an integer >= {n_bytes} (one token per byte), got {vocab_size}"
        )
    out = Path(out_path)
    if out.is_dir():
        out = out / TOKENIZER_FILE

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=int(vocab_size),
        min_frequency=min_frequency,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, seen or not: nothing is unknown
        show_progress=False,
    )
    tok.train_from_iterator(_checked_strings(texts), trainer)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tok.save(str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _checked_strings(texts: Iterable[str]):
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"train_bpe: text #{i} is {type(t).__name__}, not str")
        yield t


def load_hf_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` from a local ``tokenizer.json`` file or a local tokenizer directory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"text tokenizer not found: {path} (a tokenizer.json file or a local tokenizer folder)")
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if file.is_file():
        try:
            return Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{file}: not a valid Hugging Face tokenizer.json ({e})") from None
    # A folder without tokenizer.json (vocab/merges files, ...): let transformers convert it, offline.
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"{path}: no {TOKENIZER_FILE} and transformers cannot load a tokenizer from it ({e})"
        ) from None
    backend = getattr(hf, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise ValueError(
            f"{path}: {type(hf).__name__} has no Hugging Face `tokenizers` backend; save it with a fast tokenizer"
        )
    return backend


def vocab_size_of(tokenizer: Tokenizer) -> int:
    """Local ids ``tokenizer`` can produce: its vocabulary and added tokens (= ``len(AutoTokenizer)``)."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    return max(tokenizer.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)


class TextTokenizer:
    """Strings <-> global ids of the ``range_name`` range of ``token_space``.

    ``bos``/``eos``/``pad`` name specials of the token space; they are looked up when first used, so a space
    without specials still serves plain :meth:`encode`/:meth:`decode`. ``literal_specials`` (default True)
    encodes the tokenizer's own special strings found in the input as plain text; it is set on ``tokenizer``
    itself (``tokenizer.encode_special_tokens``).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        token_space: TokenSpace,
        range_name: str = "text",
        *,
        bos: str = "<bos>",
        eos: str = "<eos>",
        pad: str = "<pad>",
        literal_specials: bool = True,
        source: str | os.PathLike | None = None,
    ):
        self.tokenizer = tokenizer
        self.token_space = token_space
        self.range_name = range_name
        self.source = str(source) if source is not None else "<in-memory tokenizer>"
        self.bos_token, self.eos_token, self.pad_token = bos, eos, pad
        tokenizer.encode_special_tokens = literal_specials
        self._vocab_size = vocab_size_of(tokenizer)
        rng = token_space[range_name]
        if rng.size < self._vocab_size:
            raise ValueError(
                f"token range {range_name!r} has {rng.size} ids but the text tokenizer {self.source} has "
                f"{self._vocab_size} tokens; set that range's size to at least {self._vocab_size}"
            )
        self.range: TokenRange = rng

    @classmethod
    def from_file(
        cls, path: str | os.PathLike, token_space: TokenSpace, range_name: str = "text", **kw
    ) -> TextTokenizer:
        """Load a local ``tokenizer.json`` or tokenizer directory (see :func:`load_hf_tokenizer`)."""
        return cls(load_hf_tokenizer(path), token_space, range_name, source=path, **kw)

    # -- sizes and specials ---------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of local ids the tokenizer can produce (its added tokens included)."""
        return self._vocab_size

    @property
    def bos_id(self) -> int:
        return self.token_space.special(self.bos_token)

    @property
    def eos_id(self) -> int:
        return self.token_space.special(self.eos_token)

    @property
    def pad_id(self) -> int:
        return self.token_space.special(self.pad_token)

    # -- encode / decode ------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """``text`` -> global ids, optionally framed by the token space's bos/eos specials."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._frame(self.tokenizer.encode(text, add_special_tokens=False).ids, add_bos, add_eos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
        """Several strings at once (the Rust tokenizer encodes them in parallel)."""
        if isinstance(texts, str):
            raise TypeError("encode_batch expects a list of strings, got a single string; use encode")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"encode_batch: item {i} is {type(t).__name__}, not str")
        encs = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return [self._frame(e.ids, add_bos, add_eos) for e in encs]

    def _frame(self, local: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        start = self.range.start
        ids = [start + i for i in local]
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_specials: bool = False) -> str:
        """Global ids -> text. Ids outside the text range raise, except named specials when ``skip_specials``."""
        if hasattr(ids, "tolist"):  # numpy array / torch tensor
            ids = ids.tolist()
        rng, local = self.range, []
        for pos, i in enumerate(ids):
            i = int(i)
            if rng.start <= i < rng.start + self._vocab_size:
                local.append(i - rng.start)
            elif skip_specials and self.token_space.is_special(i):
                continue
            else:
                raise ValueError(f"cannot decode token id {i} at position {pos}: {self._why_not_text(i)}")
        return self.tokenizer.decode(local, skip_special_tokens=False)

    def decode_batch(self, batch: Iterable[Iterable[int]], skip_specials: bool = False) -> list[str]:
        return [self.decode(ids, skip_specials=skip_specials) for ids in batch]

    def _why_not_text(self, i: int) -> str:
        rng = self.range
        text = f"text range {rng.name!r} [{rng.start},{rng.stop})"
        if i in rng:
            return f"it lies in the {text} but past the tokenizer's {self._vocab_size} tokens (unused id)"
        if self.token_space.is_special(i):
            name = self.token_space.special_name(i)
            return f"it is the special {name!r}, outside the {text}; pass skip_specials=True to drop specials"
        try:
            other = self.token_space.range_of(i)
            where = f"range {other.name!r} [{other.start},{other.stop})"
        except ValueError:
            where = f"no range (vocab size {self.token_space.vocab_size})"
        return f"it lies outside the {text}, in {where}"

    def __repr__(self) -> str:
        r = self.range
        return f"TextTokenizer({self.source}, vocab={self._vocab_size}, range={r.name}=[{r.start},{r.stop}))"


# ---------------------------------------------------------------------------------------------------
# from a config: train once per data set (prepare.py), load checked
# ---------------------------------------------------------------------------------------------------
def bpe_settings(cfg: Mapping, data_root: str | os.PathLike) -> dict:
    """Everything that decides what a ``text_bpe`` config trains on ``data_root``; recorded next to it."""
    return {
        "kind": "byte_level_bpe",
        "recipe": BPE_RECIPE,
        "vocab_size": int(cfg["vocab_size"]),
        "min_frequency": int(cfg.get("min_frequency", 2)),
        "text_field": str(cfg.get("text_field", "caption.txt")),
        "data": Path(data_root).name,  # the data set folder's name carries the hash of its settings
        "split": TRAIN_SPLIT,
    }


def text_bpe_path(cfg: Mapping, data_root: str | os.PathLike) -> Path:
    """``tokenizer.path`` (a ``.json`` file, else a folder holding tokenizer.json), by default
    ``<data_root>/text_bpe-<hash of the settings>/tokenizer.json``: one folder per settings, next to the shards."""
    if cfg.get("path"):
        path = Path(cfg["path"])
        return path if path.suffix == ".json" else path / TOKENIZER_FILE
    return Path(data_root) / f"text_bpe-{settings_hash(bpe_settings(cfg, data_root))}" / TOKENIZER_FILE


def settings_path(tokenizer_path: str | os.PathLike) -> Path:
    path = Path(tokenizer_path)
    return path.with_name(path.stem + SETTINGS_SUFFIX)


def check_trained_bpe(path: str | os.PathLike, settings: Mapping) -> dict:
    """Stop unless ``path`` is a BPE that prepare.py trained with exactly ``settings``, unchanged since.

    Returns its record (``tokenizer.settings.json``). Never retrains by itself: shards and checkpoints made
    with a tokenizer hold its ids, so replacing it is the user's decision.
    """
    path = Path(path)
    record_path = settings_path(path)
    if not record_path.is_file():
        raise ValueError(
            f"{path} exists but {record_path.name} does not: it was not trained by prepare.py (or training was "
            f"interrupted). Delete {path} to train it, or wrap an existing tokenizer with tokenizer=hf_text"
        )
    try:
        record = json.loads(record_path.read_text())
        trained_with = dict(record["settings"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{record_path}: not a tokenizer settings record ({e}); delete it and {path}") from None
    if trained_with != dict(settings):
        keys = sorted(set(trained_with) | set(settings), key=str)
        diff = [
            f"{k}: {trained_with.get(k)!r} there, {settings.get(k)!r} now"
            for k in keys
            if trained_with.get(k) != settings.get(k)
        ]
        raise ValueError(
            f"the text tokenizer {path} was trained with other settings than the config asks for "
            f"({'; '.join(diff)}; from {record_path}). It is not retrained silently: shards and checkpoints "
            f"may hold its ids. Delete {path} and {record_path.name} to retrain, or set tokenizer.path elsewhere"
        )
    sha = file_sha256(path)
    if record.get("tokenizer_sha256") != sha:
        raise ValueError(
            f"{path} changed since prepare.py trained it: sha256 {sha}, recorded {record.get('tokenizer_sha256')} "
            f"in {record_path}. Delete both files to retrain"
        )
    return record


def train_text_tokenizer(cfg: Mapping, data_root: str | os.PathLike, texts: Iterable[str]) -> Path:
    """Train the byte-level BPE of a ``text_bpe`` config on ``texts``, the captions of ``data_root``'s train split
    (the caller reads them: :func:`mmsuite.datamodules.base.prepare_text_tokenizer`), once per settings.

    ``texts`` is only iterated when training. ``tokenizer.settings.json`` (settings, sha256, sizes) and then
    ``tokenizer.json`` are written atomically, so an interrupted run never leaves a tokenizer.json without its
    record. An existing tokenizer with the same settings is reused; one with other settings stops with the
    difference. Returns the tokenizer.json path.
    """
    data_root = Path(data_root)
    settings = bpe_settings(cfg, data_root)
    path = text_bpe_path(cfg, data_root)
    if path.exists():
        record = check_trained_bpe(path, settings)
        print(f"[mmsuite] text tokenizer {path} exists with these settings ({record['trained_vocab_size']} tokens)")
        return path

    print(
        f"[mmsuite] training a byte-level BPE (vocab_size {settings['vocab_size']}, min_frequency "
        f"{settings['min_frequency']}) on the {TRAIN_SPLIT} captions ({settings['text_field']}) of {data_root}"
    )
    seen = {"texts": 0}

    def counted():
        for text in texts:
            seen["texts"] += 1
            yield text

    record_path = settings_path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    record_tmp = record_path.with_name(f".{record_path.name}.tmp-{os.getpid()}")
    try:
        train_bpe(counted(), settings["vocab_size"], tmp, min_frequency=settings["min_frequency"])  # makes the folder
        if seen["texts"] == 0:
            raise ValueError(f"{data_root}: the {TRAIN_SPLIT} split holds no {settings['text_field']} to train on")
        record = {
            "settings": settings,
            "tokenizer_sha256": file_sha256(tmp),
            "trained_vocab_size": vocab_size_of(Tokenizer.from_file(str(tmp))),
            "n_texts": seen["texts"],
            "tokenizers_version": tokenizers.__version__,
        }
        record_tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        os.replace(record_tmp, record_path)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        record_tmp.unlink(missing_ok=True)
    print(f"[mmsuite] trained on {seen['texts']} captions: {record['trained_vocab_size']} tokens -> {path}")
    return path


def text_tokenizer_from_config(
    cfg: Mapping, token_space: TokenSpace, data_root: str | os.PathLike | None = None
) -> TextTokenizer:
    """The :class:`TextTokenizer` of a ``text_bpe`` or ``hf_text`` tokenizer config, checked.

    ``text_bpe``: the tokenizer.json prepare.py trained for ``data_root`` with these very settings.
    ``hf_text``: ``tokenizer.path`` (local), whose vocabulary size must equal the token space's ``text`` range.
    Every special the config names (``tokenizer.specials``) must be a special of ``token_space``.
    """
    name = cfg.get("name")
    if name == "text_bpe":
        if data_root is None:
            raise ValueError("a text_bpe tokenizer is loaded for a data set: pass data_root (the data set folder)")
        path = text_bpe_path(cfg, data_root)
        if not path.exists():
            raise FileNotFoundError(
                f"no trained text tokenizer at {path}: run `python prepare.py tokenizer=text_bpe` with the same "
                "experiment and data settings"
            )
        check_trained_bpe(path, bpe_settings(cfg, data_root))
    elif name == "hf_text":
        path = Path(cfg["path"])
    else:
        raise ValueError(f"tokenizer {name!r} is not a text tokenizer (expected one of {TEXT_TOKENIZERS})")
    tokenizer = load_hf_tokenizer(path)
    range_name = "text"
    declared, got = token_space[range_name].size, vocab_size_of(tokenizer)
    if name == "hf_text" and got != declared:
        raise ValueError(
            f"the text tokenizer {path} has {got} tokens but the token space's {range_name!r} range "
            f"(tokenizer.vocab_size) declares {declared}: set tokenizer.vocab_size={got}"
        )
    specials = dict(cfg.get("specials") or {})
    for special in specials.values():
        token_space.special(special)  # a clear error naming the known specials
    roles = {role: specials[role] for role in ("bos", "eos", "pad") if role in specials}
    return TextTokenizer(
        tokenizer,
        token_space,
        range_name,
        literal_specials=bool(cfg.get("literal_specials", True)),
        source=path,
        **roles,
    )
