"""The global token space: named, non-overlapping ID ranges shared by every tokenizer and model.

A token space is an ordered list of ``(name, size)`` ranges laid out back to back from id 0.
Its identity is the sha256 of its canonical JSON; that hash is written into every shard manifest,
checkpoint and run dir, and compared at every load (:func:`check_same`).

A range may instead hold named special tokens (:meth:`TokenSpace.register_specials`): its ids map to
names such as ``<pad>``/``<bos>``/``<eos>`` in order, optionally followed by reserved, unnamed ids. Code
asks for a special by name (:meth:`TokenSpace.special`), never by tokenizing its string. Such a range
carries a ``tokens`` list in the JSON; a space without specials serialises exactly as before.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

FORMAT_VERSION = 1


class TokenSpaceMismatch(RuntimeError):
    """Raised when two token spaces that must agree do not."""


class UnknownSpecialToken(KeyError):
    """A special token name (or id) that the token space does not define."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


def _is_token_list(spec) -> bool:
    return isinstance(spec, Iterable) and not isinstance(spec, (str, bytes, Mapping))


@dataclass(frozen=True)
class TokenRange:
    name: str
    start: int
    size: int

    @property
    def stop(self) -> int:
        return self.start + self.size

    def __contains__(self, token_id: int) -> bool:
        return self.start <= token_id < self.stop


class TokenSpace:
    """Ordered, named, non-overlapping global ID ranges.

    ``ranges`` holds ``(name, size)`` pairs; a pair ``(name, [token, ...])`` registers named specials.
    """

    def __init__(self, ranges: Iterable[tuple[str, int | Sequence[str]]] = ()):
        self._ranges: dict[str, TokenRange] = {}
        self._next = 0
        self._range_tokens: dict[str, tuple[str, ...]] = {}  # specials range name -> its token names
        self._special_ids: dict[str, int] = {}  # token name -> global id
        self._special_names: dict[int, str] = {}  # global id -> token name
        for name, spec in ranges:
            if _is_token_list(spec):
                self.register_specials(name, tokens=spec)
            else:
                self.register(name, spec)

    # -- building -------------------------------------------------------------------------------
    def register(self, name: str, size: int) -> TokenRange:
        """Append a range called ``name`` with ``size`` ids; returns it."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"token range name must be a non-empty string, got {name!r}")
        if name in self._ranges:
            raise ValueError(f"token range {name!r} is already registered ({self._ranges[name]})")
        if int(size) != size or size <= 0:
            raise ValueError(f"token range {name!r}: size must be a positive integer, got {size!r}")
        rng = TokenRange(name, self._next, int(size))
        self._ranges[name] = rng
        self._next = rng.stop
        return rng

    def register_specials(
        self, name: str = "specials", *, tokens: Iterable[str], size: int | None = None
    ) -> TokenRange:
        """Append a range ``name`` whose first ids are the named special ``tokens``, in order.

        ``size`` (default ``len(tokens)``) may be larger to reserve unnamed ids for later specials; note
        that naming a reserved id later changes the space (and its sha256) all the same.
        """
        if not _is_token_list(tokens):
            raise ValueError(f"token range {name!r}: tokens must be a list of strings, got {tokens!r}")
        tokens = tuple(tokens)
        if not tokens:
            raise ValueError(f"token range {name!r}: tokens must not be empty")
        seen: set[str] = set()
        for t in tokens:
            if not isinstance(t, str) or not t:
                raise ValueError(f"token range {name!r}: special token names must be non-empty strings, got {t!r}")
            if t in seen:
                raise ValueError(f"token range {name!r}: special token {t!r} is listed twice")
            if t in self._special_ids:
                other = self.range_of(self._special_ids[t]).name
                raise ValueError(f"token range {name!r}: special token {t!r} is already registered in range {other!r}")
            seen.add(t)
        if size is None:
            size = len(tokens)
        elif int(size) != size or size < len(tokens):
            raise ValueError(f"token range {name!r}: size {size!r} is smaller than its {len(tokens)} special tokens")
        rng = self.register(name, size)
        self._range_tokens[name] = tokens
        for i, t in enumerate(tokens):
            self._special_ids[t] = rng.start + i
            self._special_names[rng.start + i] = t
        return rng

    @classmethod
    def from_config(cls, ranges: Iterable[Mapping] | Mapping) -> TokenSpace:
        """Build from config: a list of ``{name, size}`` / ``{name, tokens[, size]}`` entries, or an
        ordered mapping ``name: size`` / ``name: [token, ...]``."""
        space = cls()
        if isinstance(ranges, Mapping):
            for k, v in ranges.items():
                if _is_token_list(v):
                    space.register_specials(str(k), tokens=[str(t) for t in v])
                else:
                    space.register(str(k), int(v))
            return space
        for i, r in enumerate(ranges):
            if "name" not in r or ("size" not in r and "tokens" not in r):
                raise ValueError(
                    f"token_space.ranges[{i}] needs 'name' and 'size' (or 'tokens' for specials), got {dict(r)}"
                )
            if "tokens" in r:
                if not _is_token_list(r["tokens"]):
                    raise ValueError(f"token_space.ranges[{i}].tokens must be a list of strings, got {r['tokens']!r}")
                size = int(r["size"]) if r.get("size") is not None else None
                space.register_specials(str(r["name"]), tokens=[str(t) for t in r["tokens"]], size=size)
            else:
                space.register(str(r["name"]), int(r["size"]))
        return space

    # -- queries --------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> TokenRange:
        try:
            return self._ranges[name]
        except KeyError:
            raise KeyError(f"no token range {name!r}; known ranges: {list(self._ranges)}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._ranges

    def __iter__(self):
        return iter(self._ranges.values())

    def __len__(self) -> int:
        return len(self._ranges)

    @property
    def vocab_size(self) -> int:
        return self._next

    def range_of(self, token_id: int) -> TokenRange:
        for r in self._ranges.values():
            if token_id in r:
                return r
        raise ValueError(f"token id {token_id} lies outside every range (vocab size {self.vocab_size})")

    # -- named specials -------------------------------------------------------------------------
    @property
    def specials(self) -> dict[str, int]:
        """Every named special token -> its global id, in id order."""
        return dict(self._special_ids)

    def special(self, token: str) -> int:
        """Global id of the special ``token`` (e.g. ``"<eos>"``)."""
        try:
            return self._special_ids[token]
        except KeyError:
            known = list(self._special_ids) or "none (register_specials / a config entry with 'tokens')"
            raise UnknownSpecialToken(
                f"no special token {token!r} in the token space; known specials: {known}"
            ) from None

    def special_name(self, token_id: int) -> str:
        """Name of the special token with global id ``token_id``."""
        try:
            return self._special_names[int(token_id)]
        except KeyError:
            where = self.range_of(token_id) if 0 <= token_id < self.vocab_size else None
            why = "an unnamed (reserved) special id" if where and where.name in self._range_tokens else "not a special"
            place = f"range {where.name!r} [{where.start},{where.stop})" if where else "no range"
            raise UnknownSpecialToken(f"token id {token_id} is {why} (it lies in {place})") from None

    def is_special(self, token_id: int) -> bool:
        """True when ``token_id`` is a named special token."""
        return int(token_id) in self._special_names

    def special_tokens(self, range_name: str) -> tuple[str, ...]:
        """The named specials of range ``range_name`` in id order (empty for an ordinary range)."""
        self[range_name]  # clear error for an unknown range
        return self._range_tokens.get(range_name, ())

    # -- identity and persistence ---------------------------------------------------------------
    def to_dict(self) -> dict:
        ranges = []
        for r in self._ranges.values():
            entry = {"name": r.name, "start": r.start, "size": r.size}
            if r.name in self._range_tokens:  # only specials ranges carry the key: old spaces keep their sha256
                entry["tokens"] = list(self._range_tokens[r.name])
            ranges.append(entry)
        return {"format": FORMAT_VERSION, "ranges": ranges, "vocab_size": self.vocab_size}

    def canonical_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``token_space.json`` (pretty, with its sha256) atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        body = dict(self.to_dict(), sha256=self.sha256)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(body, indent=2) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> TokenSpace:
        path = Path(path)
        try:
            body = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"token space file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if body.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported token space format {body.get('format')!r}")
        space = cls()
        for r in body["ranges"]:
            if "tokens" in r:
                got = space.register_specials(r["name"], tokens=r["tokens"], size=r["size"])
            else:
                got = space.register(r["name"], r["size"])
            if got.start != r["start"]:
                raise ValueError(f"{path}: range {r['name']!r} starts at {r['start']}, expected {got.start}")
        if "sha256" in body and body["sha256"] != space.sha256:
            raise ValueError(f"{path}: stored sha256 {body['sha256']} does not match its ranges ({space.sha256})")
        return space

    def __eq__(self, other) -> bool:
        return isinstance(other, TokenSpace) and self.sha256 == other.sha256

    def __repr__(self) -> str:
        inner = ", ".join(f"{r.name}=[{r.start},{r.stop})" for r in self._ranges.values())
        return f"TokenSpace({inner}; sha256={self.sha256[:12]})"


def settings_hash(settings: Mapping) -> str:
    """Short stable hash of a settings dict (keys sorted, non-JSON values as ``str``): names cached folders (data
    sets, trained text tokenizers, token shards) after everything that decides their contents."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks: the identity of checkpoints and tokenizer files."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_SHA256_CACHE: dict[tuple[str, int, int], str] = {}


def checkpoint_sha256(path: str | os.PathLike) -> str | None:
    """:func:`file_sha256` of a checkpoint, computed once per (path, size, mtime) in this process (data sets name
    themselves by their tokenizers' hashes and are asked often); None if the file does not exist."""
    path = Path(path)
    if not path.exists():
        return None
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256_CACHE:
        _SHA256_CACHE[key] = file_sha256(path)
    return _SHA256_CACHE[key]


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".jit")


def weights_sha256(path: str | os.PathLike) -> str | None:
    """The identity of pretrained weights: :func:`checkpoint_sha256` of a file, or for a folder (a
    ``save_pretrained`` model) the sha256 of its weight files' names and hashes, in name order; None if missing."""
    path = Path(path)
    if path.is_file():
        return checkpoint_sha256(path)
    if not path.is_dir():
        return None
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    listing = [[str(p.relative_to(path)), checkpoint_sha256(p)] for p in files]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def check_same(expected_sha: str, expected_from: str, got_sha: str, got_from: str) -> None:
    """Stop with both hashes and both sources when two token spaces differ."""
    if expected_sha != got_sha:
        raise TokenSpaceMismatch(
            "token space mismatch:\n"
            f"  {expected_from}: sha256 {expected_sha}\n"
            f"  {got_from}: sha256 {got_sha}\n"
            "The ids in one mean different things in the other. Rebuild the data "
            "(delete the dataset folder) or use the matching checkpoint/config."
        )
