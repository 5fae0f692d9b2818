"""Turn a source data set (shards of frames / images / audio / captions) into TOKEN shards.

``python prepare.py experiment=X tokenize.image=... tokenize.text=... [tokenize.audio=...] [tokenize.out=DIR]``

Each ``tokenize.<modality>`` entry names one tokenizer and how to load it:

* image: ``{ckpt: PATH}`` (an ImageTokenizerModule checkpoint) or ``{config: conf/tokenizer/<x>.yaml | {...}}``
  (a pretrained adapter, :func:`image_tokenizer_from_config`);
* audio: ``{ckpt: PATH}`` (an AudioTokenizerModule checkpoint) or ``{config: ...}``
  (:meth:`AudioTokenizer.from_config`);
* text: ``{path: tokenizer.json}`` or ``{config: ...}``
  (:func:`text_tokenizer_from_config`, ``text_bpe`` / ``hf_text``).

A plain string is short for ``ckpt`` (image/audio) or ``path`` (text), or for ``config`` when it ends in ``.yaml``;
the other keys of an entry with ``config`` override that config's fields. One token space holds every chosen
tokenizer's ranges in a fixed order (text + specials, image, audio); the output manifest records it and its sha256.
Per sample: ``tok_image.npy`` (int32 ``[T, h*w]`` for clips, ``[h*w]`` for one image), ``tok_text.npy``,
``tok_audio.npy`` (frame-major) and ``caption.txt``, under the source's split and key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from mmsuite.datamodules.shards import (
    MANIFEST,
    SPLITS,
    WRITER_VERSION,
    DatasetWriter,
    decode_member,
    iter_raw_samples,
    members_of,
    read_manifest,
    split_shards,
)
from mmsuite.tokenizers.token_space import TokenSpace, file_sha256, settings_hash

TOKENIZE_VERSION = 1
MODALITIES = ("text", "image", "audio")  # the token space's order
DEFAULT_SPECIALS = {"pad": "<pad>", "bos": "<bos>", "eos": "<eos>"}
# source fields each modality reads, in order of preference
SOURCE_FIELDS = {"image": ("frames.npy", "image.npy", "image.png"), "audio": ("audio.wav",), "text": ("caption.txt",)}


class TokenizeError(ValueError):
    """Bad tokenize.* input: names the key and the file."""


# ---------------------------------------------------------------------------------------------------
# entries: what each tokenize.<modality> asks for
# ---------------------------------------------------------------------------------------------------
def normalize_entry(modality: str, entry) -> dict:
    """``tokenize.<modality>`` -> ``{"ckpt": p}`` / ``{"path": p}`` / ``{"config": {...resolved}}``."""
    key = f"tokenize.{modality}"
    if isinstance(entry, DictConfig):
        entry = OmegaConf.to_container(entry, resolve=True)
    if isinstance(entry, str | Path):
        entry = str(entry)
        if entry.endswith((".yaml", ".yml")):
            entry = {"config": entry}
        else:
            entry = {"path" if modality == "text" else "ckpt": entry}
    if not isinstance(entry, Mapping):
        raise TokenizeError(f"{key} must be a path or a mapping ({{ckpt|path|config: ...}}), got {entry!r}")
    entry = dict(entry)
    allowed = ("path",) if modality == "text" else ("ckpt",)
    ways = [k for k in (*allowed, "config") if entry.get(k) is not None]
    if "config" in ways:
        cfg = entry.pop("config")
        if isinstance(cfg, str | Path):
            file = Path(cfg)
            if not file.is_file():
                raise TokenizeError(f"{key}.config: tokenizer config file {file} does not exist")
            cfg = OmegaConf.load(file)
        cfg = OmegaConf.merge(OmegaConf.create(dict(cfg) if isinstance(cfg, Mapping) else cfg), entry)
        return {"config": OmegaConf.to_container(cfg, resolve=True)}
    if len(ways) != 1 or set(entry) - set(allowed) - {"vocab_size", "specials"}:
        raise TokenizeError(f"{key} needs exactly one of {[*allowed, 'config']}, got {entry}")
    file = Path(entry[ways[0]]).expanduser()
    if not file.exists():
        raise TokenizeError(f"{key}.{ways[0]}: {file} does not exist")
    return {**entry, ways[0]: str(file.resolve())}


def _fingerprint(path: str | Path) -> str:
    """sha256 of a file; for a folder, of its files' names, sizes and sha256 (pretrained model folders)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return hashlib.sha256(
            json.dumps([(str(p.relative_to(path)), _fingerprint(p)) for p in files]).encode()
        ).hexdigest()
    return "missing"


def tokenize_settings(entries: Mapping[str, dict], source_root: Path) -> dict:
    """Everything that decides the token shards: entries, checkpoint/tokenizer file hashes, the source."""
    files = {}
    for modality, entry in entries.items():
        cfg = entry.get("config") or {}
        target = entry.get("ckpt") or entry.get("path") or cfg.get("path")
        if target:
            files[modality] = _fingerprint(target)
    return {
        "version": TOKENIZE_VERSION,
        "writer": WRITER_VERSION,
        "source": source_root.name,
        "entries": {m: entries[m] for m in sorted(entries)},
        "files_sha256": files,
    }


# ---------------------------------------------------------------------------------------------------
# tokenizers, then one token space
# ---------------------------------------------------------------------------------------------------
def _text_ranges(entry: dict, source_root: Path) -> list:
    cfg = entry.get("config")
    if cfg is not None:
        ranges = cfg.get("token_ranges")
        if not ranges:
            raise TokenizeError(f"tokenize.text.config ({cfg.get('name')}) declares no token_ranges")
        return [(r["name"], r["tokens"]) if "tokens" in r else (r["name"], int(r["size"])) for r in ranges]
    from mmsuite.tokenizers.text import load_hf_tokenizer, vocab_size_of

    size = int(entry.get("vocab_size") or vocab_size_of(load_hf_tokenizer(entry["path"])))
    return [("text", size), ("specials", list(dict(entry.get("specials") or DEFAULT_SPECIALS).values()))]


def _load_image(entry: dict):
    if "ckpt" in entry:
        from mmsuite.tokenizers.image import ImageTokenizer

        tok = ImageTokenizer.from_checkpoint(entry["ckpt"])
    else:
        from mmsuite.tokenizers.pretrained_image import image_tokenizer_from_config

        tok = image_tokenizer_from_config(entry["config"])
    if tok.range is None:
        raise TokenizeError(f"tokenize.image: {entry} is a continuous image tokenizer (no token ids)")
    return tok


def _load_audio(entry: dict):
    if "ckpt" in entry:
        from mmsuite.tokenizers.audio import audio_tokenizer_from_checkpoint

        return audio_tokenizer_from_checkpoint(entry["ckpt"])
    from mmsuite.tokenizers.audio import AudioTokenizer

    return AudioTokenizer.from_config(entry["config"])


def build_tokenizers(entries: Mapping[str, dict], source_root: Path) -> tuple[TokenSpace, dict]:
    """Load each chosen tokenizer, lay their ranges out in one space (text, image, audio) and bind them to it."""
    loaded, ranges = {}, []
    for modality in MODALITIES:
        if modality not in entries:
            continue
        try:
            if modality == "text":
                ranges += _text_ranges(entries["text"], source_root)
            elif modality == "image":
                loaded["image"] = tok = _load_image(entries["image"])
                ranges.append((tok.range_name, tok.range.size))
            else:
                loaded["audio"] = tok = _load_audio(entries["audio"])
                ranges += [(r.name, r.size) for r in tok.ranges]
        except TokenizeError:
            raise
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise TokenizeError(f"tokenize.{modality}: cannot load {entries[modality]}: {e}") from e
    try:
        space = TokenSpace(ranges)
    except ValueError as e:
        raise TokenizeError(f"the chosen tokenizers' ranges do not fit in one token space: {e}") from None
    tokenizers = {}
    if "text" in entries:
        from mmsuite.tokenizers.text import TextTokenizer, text_tokenizer_from_config

        entry = entries["text"]
        if "config" in entry:
            if entry["config"].get("name") == "text_bpe":
                from mmsuite.datamodules.base import prepare_text_tokenizer

                prepare_text_tokenizer(entry["config"], source_root)  # train split only, once per settings
            tokenizers["text"] = text_tokenizer_from_config(entry["config"], space, source_root)
        else:
            roles = dict(entry.get("specials") or DEFAULT_SPECIALS)
            tokenizers["text"] = TextTokenizer.from_file(entry["path"], space, **roles)
    if "image" in loaded:
        tok = loaded["image"]
        rng = space[tok.range_name]
        assert rng.size == tok.range.size
        tok.token_space, tok.range = space, rng  # same codebook, ids now offset to this space's range
        tokenizers["image"] = tok
    if "audio" in loaded:
        from mmsuite.tokenizers.audio import AudioTokenizer

        tok = loaded["audio"]
        tokenizers["audio"] = AudioTokenizer(
            tok.model, space, prefix=tok.prefix, bandwidth=tok.bandwidth, decode_scale=tok.decode_scale
        )
    return space, tokenizers


# ---------------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------------
def _source_field(modality: str, entry: dict, fields: list[str], source_root: Path) -> str:
    want = SOURCE_FIELDS[modality]
    if modality == "text" and "config" in entry:
        want = (str(entry["config"].get("text_field", "caption.txt")),)
    for name in want:
        if name in fields:
            return name
    raise TokenizeError(
        f"tokenize.{modality}: the source data set {source_root / MANIFEST} has no {modality} field "
        f"({' or '.join(want)}); its sample fields are {fields}"
    )


def _images(value) -> tuple[np.ndarray, bool]:
    arr = np.asarray(value)
    return (arr, True) if arr.ndim == 4 else (arr[None], False)


def tokenize_dataset(
    source_root: str | Path,
    image=None,
    text=None,
    audio=None,
    out: str | Path | None = None,
    batch_size: int = 32,
) -> Path:
    """Write the token shards of ``source_root`` with the chosen tokenizers; reuse a complete folder."""
    source_root = Path(source_root)
    given = {"image": image, "text": text, "audio": audio}
    entries = {m: normalize_entry(m, e) for m, e in given.items() if e is not None}
    if not entries:
        raise TokenizeError("tokenize: choose at least one of tokenize.image, tokenize.text, tokenize.audio")
    manifest = read_manifest(source_root)
    fields = list(manifest.get("sample_fields") or [])
    field_of = {m: _source_field(m, entries[m], fields, source_root) for m in MODALITIES if m in entries}
    settings = tokenize_settings(entries, source_root)
    out = Path(out) if out else source_root / f"tokens-{settings_hash(settings)}"
    if (out / MANIFEST).exists():
        done = read_manifest(out).get("tokenize", {}).get("settings")
        if done != settings:
            raise TokenizeError(
                f"tokenize.out={out} holds token shards made with other settings ({out / MANIFEST}); "
                "delete it or choose another tokenize.out"
            )
        print(f"[mmsuite] token shards {out} exist with these settings: reusing them")
        return out

    space, tokenizers = build_tokenizers(entries, source_root)
    caption_field = "caption.txt" if "caption.txt" in fields else None
    out_fields = sorted({f"tok_{m}.npy" for m in entries} | ({caption_field} if caption_field else set()))
    total = sum(int(manifest["splits"][s]["samples"]) for s in manifest["splits"])
    per_shard = max((sh["count"] for s in manifest["splits"].values() for sh in s["shards"]), default=1)
    describe = {m: str(t) for m, t in tokenizers.items()}
    if "audio" in tokenizers:
        describe["audio"] = tokenizers["audio"].describe()
    info = {
        "source": {"kind": "tokens", "root": str(source_root), "source": manifest.get("source")},
        "sample_fields": out_fields,
        "tokenize": {"settings": settings, "tokenizers": describe, "fields": field_of},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with DatasetWriter(out, per_shard, info=info, token_space=space) as writer:
        bar = tqdm(total=total, desc=f"tokenize -> {out.name}", unit="sample")
        for split in [s for s in SPLITS if s in manifest["splits"]]:
            for shard in split_shards(source_root, split, manifest):
                for raw in iter_raw_samples(shard.path):
                    key = raw["__key__"]
                    writer.write(split, key, _tokenize_sample(raw, tokenizers, field_of, caption_field, batch_size))
                    bar.update(1)
        bar.close()
    print(f"[mmsuite] wrote token shards {out} ({total} samples; {space!r})")
    return out


def _tokenize_sample(raw: dict, tokenizers: dict, field_of: dict, caption_field: str | None, batch_size: int) -> dict:
    def member(name):
        if name not in raw:
            raise TokenizeError(f"sample {raw['__key__']} has no {name} (it has {members_of(raw)})")
        return decode_member("." + name.split(".", 1)[1], raw[name])

    members = {}
    if "image" in tokenizers:
        images, is_clip = _images(member(field_of["image"]))
        tok = tokenizers["image"]
        ids = np.concatenate(
            [tok.encode(images[i : i + batch_size]).numpy() for i in range(0, len(images), batch_size)]
        )
        ids = ids.reshape(len(images), -1).astype(np.int32)
        members["tok_image.npy"] = ids if is_clip else ids[0]
    if "text" in tokenizers:
        members["tok_text.npy"] = np.asarray(tokenizers["text"].encode(member(field_of["text"])), dtype=np.int32)
    if "audio" in tokenizers:
        from mmsuite.sources.wav import decode_wav

        tok = tokenizers["audio"]
        wav, rate = decode_wav(member(field_of["audio"]), name=f"sample {raw['__key__']} {field_of['audio']}")
        members["tok_audio.npy"] = tok.encode(wav[None], sample_rate=rate)[0].numpy().astype(np.int32)
    if caption_field:
        members[caption_field] = member(caption_field)
    return members
