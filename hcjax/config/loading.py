"""YAML/JSON loading of :class:`~hcjax.config.run.Config` and ``--set a.b=value`` overrides.

A file's top-level sections are the fields of ``Config`` (``dit``, ``vae``, ``llama``, ``clip_vision``,
``clip_text``, ``llava``, ``whisper``, ``mesh``, ``train``, ``vae_train``, ``sample``). Values are coerced to the
annotated field types; an unknown key or a wrong type is a :class:`ConfigError` naming the key and the file.
Presets live in ``configs/<name>.yaml`` (:data:`PRESET_DIR`).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .base import ConfigError
from .run import Config


# ----------------------------------------------------------------------------------------------- building


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Convert a YAML value to the annotated field type, with an error naming ``where``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        elem = args[0] if args else Any
        if len(args) > 1 and args[1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} entries, got {list(value)}")
            return tuple(_coerce(a, v, where) for a, v in zip(args, value))
        return tuple(_coerce(elem, v, where) for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):     # YAML 1.1 reads 1e-9 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys raise naming the key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            loc = f"{where}.{key}" if where else key
            raise ConfigError(f"unknown config key {loc!r} (valid keys of {cls.__name__}: {sorted(names)})")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """A config dataclass as plain JSON types (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _apply_override(data: dict, item: str) -> None:
    """Apply one ``a.b=value`` (value parsed as YAML) to the nested dict ``data`` in place."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected the form a.b=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {item!r}: empty key component")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {p!r} is not a section")
    node[parts[-1]] = yaml.safe_load(raw)


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load a YAML preset (or the defaults when ``path`` is None) and apply ``a.b=value`` overrides."""
    data: dict = {}
    where = "<defaults>"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        where = str(path)
        text = path.read_text()     # a run's config.json too (JSON writes 1e-06, which YAML 1.1 reads as a string)
        try:
            loaded = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where_ = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ConfigError(f"{path}: not valid YAML{where_}: {getattr(e, 'problem', None) or e}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        data = loaded
    for item in overrides:
        _apply_override(data, item)
    try:
        return _build(data)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def apply_overrides(cfg: Config, overrides: typing.Sequence[str]) -> Config:
    """``cfg`` with ``a.b=value`` overrides applied (the ``--set`` mechanism); the result is validated."""
    data = to_dict(cfg)
    for item in overrides:
        _apply_override(data, item)
    return _build(data)


def config_from_json(text: str) -> Config:
    return _build(json.loads(text))


def _build(data: dict) -> Config:
    """Validated :class:`Config` from a nested dict, after moving keys of older versions to their new place."""
    mesh = data.get("mesh")
    if isinstance(mesh, dict) and "sequence_parallel" in mesh:     # before it moved to the DiT (issue 20)
        data = {**data, "mesh": {k: v for k, v in mesh.items() if k != "sequence_parallel"}}
        dit = data.get("dit") or {}
        if not isinstance(dit, dict):
            raise ConfigError(f"dit: expected a mapping, got {type(dit).__name__}")
        data["dit"] = {**dit, "sequence_parallel": mesh["sequence_parallel"]}
    return from_dict(Config, data).validate()


PRESET_DIR = Path(__file__).resolve().parents[2] / "configs"


def preset(name: str, overrides: typing.Sequence[str] = ()) -> Config:
    """Load ``configs/<name>.yaml``."""
    return load_config(PRESET_DIR / f"{name}.yaml", overrides)
