"""Orbax checkpoints of plain params dicts plus the hcjax config as JSON.

Layout of a converted-weights directory::

    <dir>/config.json      the full hcjax Config (dataclasses as JSON)
    <dir>/params/          orbax StandardCheckpointer tree (nested dict of arrays)

Writes go to a temporary sibling directory that is renamed into place at the end, so a failed write never
leaves a partial checkpoint, and an existing directory is never overwritten unless ``overwrite=True``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from .config import Config, config_from_json, to_dict


def save_params(path: str | Path, params: Any, cfg: Config, *, overwrite: bool = False) -> Path:
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"output {path} already exists; choose another path or pass --overwrite")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / "params", params)
        ckptr.wait_until_finished()
        (tmp / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_checkpoint_config(path: str | Path) -> Config:
    path = Path(path)
    f = path / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"{path}: not an hcjax checkpoint (missing config.json)")
    return config_from_json(f.read_text())


def load_params(path: str | Path, abstract: Any = None) -> Any:
    """Restore params; ``abstract`` (tree of ``jax.ShapeDtypeStruct`` with shardings) places them directly."""
    path = Path(path).absolute()
    if not (path / "params").is_dir():
        raise FileNotFoundError(f"{path}: not an hcjax checkpoint (missing params/)")
    ckptr = ocp.StandardCheckpointer()
    if abstract is None:
        return ckptr.restore(path / "params")
    return ckptr.restore(path / "params", jax.tree.map(_as_struct, abstract))


def _as_struct(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
