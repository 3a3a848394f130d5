"""``python -m convert_weights inspect FILE``: metadata-only summary of a checkpoint.

Reads names, shapes and dtypes only (``torch.load(mmap=True, weights_only=True)`` maps the file without reading
tensor data; safetensors: the JSON header), detects the component and variant, and validates the names/shapes
against the matching hcjax table, printing every mismatch.
"""

from __future__ import annotations

import collections
from pathlib import Path

from .readers import read_state_dict
from .rules import ConversionError


def _open(path: Path, key: str | None):
    if key is not None or path.suffix == ".safetensors" or path.is_dir():
        return read_state_dict(path, key)
    try:
        return read_state_dict(path, "module")
    except ValueError:
        return read_state_dict(path)


def inspect_file(file: str, key: str | None = None) -> str:
    path = Path(file)
    sd = _open(path, key)
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
    lines += _component_report(shapes)
    return "\n".join(lines)


def _component_report(shapes) -> list[str]:
    keys = set(shapes)
    from . import dit

    try:
        fmt = dit.detect_format(keys)
    except ConversionError:
        return ["component: not a DiT checkpoint (no img_in / x_embedder keys); no table check run"]
    variant = dit.detect_variant(keys, fmt)
    from hcjax.config import load_config

    cfg = load_config(dit.preset_for(keys, fmt)).dit
    if variant.guidance:
        import dataclasses

        cfg = dataclasses.replace(cfg, guidance_embed=True)
    out = [f"component: DiT ({fmt} format)", f"variant: {variant.name}" + (" + guidance" if variant.guidance else "")]
    try:
        produced = dit.check(shapes, cfg, fmt)
        out.append(f"check: OK against the {variant.name} preset ({len(produced)} hcjax parameters)")
    except ConversionError as e:
        out.append("check: MISMATCH against the released configuration")
        out += ["  " + line for line in str(e).splitlines()]
    return out
