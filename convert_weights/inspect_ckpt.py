"""``python -m convert_weights inspect FILE``: metadata-only summary of a checkpoint.

Reads names, shapes and dtypes only (``torch.load(mmap=True, weights_only=True)`` maps the file without reading
tensor data; safetensors: the JSON header), detects the component and variant, and validates the names/shapes
against the matching hcjax table, printing every mismatch. For an fp8 DiT (float8 tensors) it reports the float8
tensors and whether the scale map (``X_map.pt`` beside ``X.pt``, or ``--fp8-map``) exists and covers them.
A truncated or corrupt file is an error starting with ``broken checkpoint:`` (exit 2 from the CLI).
"""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

from hcjax.config import load_config

from . import dit
from .readers import float8_keys, read_state_dict
from .rules import ConversionError


def inspect_file(file: str, key: str | None = None, fp8_map: str | None = None) -> str:
    path = Path(file)
    try:
        sd = dit.open_state_dict(path, key)
    except ValueError as e:                 # truncated / corrupt: the readers name the file and the problem
        raise ValueError(f"broken checkpoint: {e}") from None
    shapes = sd.shapes()
    dtypes = sd.dtypes()
    n_params = 0
    for s in shapes.values():
        n = 1
        for d in s:
            n *= int(d)
        n_params += n
    lines = [f"file: {path}", f"tensors: {len(shapes)}", f"parameters: {n_params:,}"]
    counts = collections.Counter(dtypes.values())
    lines.append("dtypes: " + ", ".join(f"{k} x{v}" for k, v in counts.most_common()))
    lines += _fp8_report(sd, path, fp8_map)
    lines += _component_report(shapes)
    return "\n".join(lines)


def _fp8_report(sd, path: Path, fp8_map: str | None) -> list[str]:
    f8 = float8_keys(sd)
    if not f8:
        return ["fp8: no float8 tensors" + (f" (--fp8-map {fp8_map} is not needed)" if fp8_map else "")]
    kinds = collections.Counter(sd.dtypes()[k] for k in f8)
    out = [f"fp8: {len(f8)} float8 tensors (" + ", ".join(f"{k} x{v}" for k, v in kinds.items()) + ")"]
    map_file = Path(fp8_map) if fp8_map else dit.fp8_map_path(path)
    if not map_file.is_file():
        return out + [f"fp8 map: MISSING {map_file} (conversion will fail without it)"]
    scales = read_state_dict(map_file, "module")
    out.append(f"fp8 map: found {map_file} ({len(scales)} scales)")
    layers = {k[: -len(".weight")] for k in f8 if k.endswith(".weight")}
    missing = sorted(layers - set(scales))
    unused = sorted(set(scales) - layers)
    odd = sorted(k for k in f8 if not k.endswith(".weight"))
    if not (missing or unused or odd):
        out.append("fp8 map: OK (one scale per float8 weight)")
    for title, items in (("float8 weights without a scale", missing), ("scales without a float8 weight", unused),
                         ("float8 tensors that are not weights", odd)):
        if items:
            out.append(f"fp8 map: MISMATCH {title} ({len(items)}): " + ", ".join(items[:10]) +
                       (" ..." if len(items) > 10 else ""))
    return out


def _component_report(shapes) -> list[str]:
    keys = set(shapes)
    try:
        fmt = dit.detect_format(keys)
    except ConversionError:
        return ["component: not a DiT checkpoint (no img_in / x_embedder keys); no table check run"]
    variant = dit.detect_variant(keys, fmt)
    cfg = load_config(dit.preset_for(keys, fmt)).dit
    if variant.guidance:
        cfg = dataclasses.replace(cfg, guidance_embed=True)
    out = [f"component: DiT ({fmt} format)", f"variant: {variant.name}" + (" + guidance" if variant.guidance else "")]
    try:
        produced = dit.check(shapes, cfg, fmt)
        out.append(f"check: OK against the {variant.name} preset ({len(produced)} hcjax parameters)")
    except ConversionError as e:
        out.append("check: MISMATCH against the released configuration")
        out += ["  " + line for line in str(e).splitlines()]
    return out
