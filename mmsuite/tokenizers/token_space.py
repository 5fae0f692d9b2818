"""The global token space: named, non-overlapping ID ranges shared by every tokenizer and model.

A token space is an ordered list of ``(name, size)`` ranges laid out back to back from id 0.
Its identity is the sha256 of its canonical JSON; that hash is written into every shard manifest,
checkpoint and run dir, and compared at every load (:func:`check_same`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

FORMAT_VERSION = 1


class TokenSpaceMismatch(RuntimeError):
    """Raised when two token spaces that must agree do not."""


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
    """Ordered, named, non-overlapping global ID ranges."""

    def __init__(self, ranges: Iterable[tuple[str, int]] = ()):
        self._ranges: dict[str, TokenRange] = {}
        self._next = 0
        for name, size in ranges:
            self.register(name, size)

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

    @classmethod
    def from_config(cls, ranges: Iterable[Mapping] | Mapping) -> TokenSpace:
        """Build from config: a list of ``{name, size}`` or an ordered mapping ``name: size``."""
        if isinstance(ranges, Mapping):
            return cls((str(k), int(v)) for k, v in ranges.items())
        out = []
        for i, r in enumerate(ranges):
            if "name" not in r or "size" not in r:
                raise ValueError(f"token_space.ranges[{i}] needs 'name' and 'size', got {dict(r)}")
            out.append((str(r["name"]), int(r["size"])))
        return cls(out)

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

    # -- identity and persistence ---------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": FORMAT_VERSION,
            "ranges": [{"name": r.name, "start": r.start, "size": r.size} for r in self._ranges.values()],
            "vocab_size": self.vocab_size,
        }

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
