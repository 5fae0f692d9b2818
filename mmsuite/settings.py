"""Typed settings: every module's and data module's settings are dataclasses with one default per field.

A settings class is a dataclass whose fields are made with :func:`setting` (a default, plus optional bounds,
choices or a nested schema); :func:`parse` turns a config block (a dict or DictConfig) into an instance and
stops with a :class:`SettingsError` that names the full key (``model.noise.tau_ctx``) for an unknown key, a
value of the wrong type, a value out of its bounds, or a rule between fields (a class's ``check(key)``).
OmegaConf does the typing (the values assigned into ``OmegaConf.structured(schema)``, then ``OmegaConf.to_object``);
this module adds what it has no words for: bounds, the key path of every error, and fields that hold a config
interpolated from elsewhere (``schedule: ${schedule}``), which OmegaConf cannot merge into a dataclass-typed field
(those are typed ``Any`` with ``schema=``, and parsed here). Leaf module: imports nothing from mmsuite.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

T = TypeVar("T")

__all__ = ["MISSING", "SettingsError", "as_dict", "parse", "setting", "fail"]


class SettingsError(ValueError):
    """A setting that is unknown, of the wrong type or invalid; the message starts with its full key."""


def fail(key: str, message: str) -> None:
    """Raise :class:`SettingsError` for ``key`` (for a settings class's ``check(key)``)."""
    raise SettingsError(f"{key} {message}")


def setting(
    default: Any = MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: Sequence | None = None,
    schema: type | None = None,
    items: type | None = None,
) -> Any:
    """A dataclass field: ``default`` (lists and dicts are copied per instance; MISSING: required), numeric bounds
    (``ge`` ``gt`` ``le`` ``lt``; for a list or dict, every value), allowed ``choices``, and for an ``Any``-typed field
    the settings class its value is parsed into (``schema``: a dict, or None where None is the default;
    ``items``: every element of a list)."""
    meta = dict(ge=ge, gt=gt, le=le, lt=lt, choices=choices, schema=schema, items=items)
    meta = {k: v for k, v in meta.items() if v is not None}
    if isinstance(default, list | dict) or (dataclasses.is_dataclass(default) and not isinstance(default, type)):
        return dataclasses.field(default_factory=lambda d=default: copy.deepcopy(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def parse(schema: type[T], values: Mapping | DictConfig | None, key: str) -> T:
    """``values`` as a ``schema`` instance (defaults filled in, every rule checked); errors name ``key`` + the path."""
    if isinstance(values, DictConfig | ListConfig):
        values = OmegaConf.to_container(values, resolve=True)
    if values is not None and not isinstance(values, Mapping):
        raise SettingsError(f"{key} must be a mapping of settings ({schema.__name__}), got {values!r}")
    values = {k: v for k, v in (values or {}).items() if k != "_target_"}
    try:
        node = OmegaConf.structured(schema)
        _assign(node, values)
        obj = OmegaConf.to_object(node)
    except OmegaConfBaseException as e:
        raise SettingsError(_message(e, key, schema)) from None
    _check_fields(obj, key)
    return obj


def _assign(node: DictConfig, values: Mapping) -> None:
    """``values`` into the typed ``node``: nested settings classes key by key (their other fields keep their
    defaults), every other value as given (a dict or list replaces the default instead of merging into it)."""
    hints = typing.get_type_hints(OmegaConf.get_type(node))
    for key, value in values.items():
        schema = _settings_class(hints.get(key))
        if schema is not None and isinstance(value, Mapping):
            if not isinstance(OmegaConf.select(node, key, throw_on_missing=False), DictConfig):  # None or missing
                node[key] = OmegaConf.structured(schema)
            _assign(node[key], value)
        else:
            node[key] = value  # an unknown key or a wrong type raises here, naming the key


def _settings_class(hint) -> type | None:
    """The dataclass a field's type names (``X`` or ``X | None``), or None."""
    for t in (hint, *typing.get_args(hint)):
        if isinstance(t, type) and dataclasses.is_dataclass(t):
            return t
    return None


def as_dict(obj) -> dict:
    """A settings instance as plain dicts, lists and scalars (what checkpoints and ``save_hyperparameters`` hold)."""
    return dataclasses.asdict(obj)


def _message(e: OmegaConfBaseException, key: str, schema: type) -> str:
    where = ".".join(p for p in (key, getattr(e, "full_key", None) or "") if p)
    if isinstance(e, ConfigKeyError | ConfigAttributeError):
        owner = getattr(e, "object_type", None) or schema
        known = ", ".join(f.name for f in dataclasses.fields(owner)) if dataclasses.is_dataclass(owner) else ""
        return f"{where}: unknown setting" + (f" ({owner.__name__} has: {known})" if known else "")
    if isinstance(e, MissingMandatoryValue):
        return f"{where}: required setting is missing"
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return f"{where}: {first}"


def _check_fields(obj, key: str) -> None:
    """Bounds, choices and nested schemas of every field of ``obj`` (a settings instance), then ``obj.check``."""
    for f in dataclasses.fields(obj):
        value, meta, where = getattr(obj, f.name), f.metadata, f"{key}.{f.name}"
        if "schema" in meta and value is not None:
            value = parse(meta["schema"], value, where)
            object.__setattr__(obj, f.name, value)
        elif "items" in meta and value is not None:
            if not isinstance(value, list):
                raise SettingsError(f"{where} must be a list, got {value!r}")
            value = [parse(meta["items"], v, f"{where}[{i}]") for i, v in enumerate(value)]
            object.__setattr__(obj, f.name, value)
        elif dataclasses.is_dataclass(value):
            _check_fields(value, where)
        _check_value(value, meta, where)
    check = getattr(obj, "check", None)
    if callable(check):
        check(key)


def _check_value(value, meta: Mapping, where: str) -> None:
    if value is None:
        return
    if "choices" in meta and value not in meta["choices"]:
        raise SettingsError(f"{where} must be one of {list(meta['choices'])}, got {value!r}")
    bounds = [(b, meta[b]) for b in ("ge", "gt", "le", "lt") if b in meta]
    if not bounds:
        return
    values = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
    for v in values:
        ok = all({"ge": v >= lim, "gt": v > lim, "le": v <= lim, "lt": v < lim}[b] for b, lim in bounds)
        if not ok:
            words = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
            rule = " and ".join(f"{words[b]} {lim}" for b, lim in bounds)
            raise SettingsError(f"{where} must be {rule}, got {value!r}")
