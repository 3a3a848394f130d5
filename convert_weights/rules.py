"""Strict conversion tables: ``Rule`` rows, ``apply_rules`` (tensors) and ``check_rules`` (shapes only).

A table maps every hcjax parameter (a ``/``-joined Flax path) to one or more PyTorch state-dict keys and a
transform (layout change, slicing, fusing). ``layers > 0`` stacks that many per-layer tensors (``{i}`` in the
key) along a new leading axis, the scan axis of ``nn.scan``. Both entry points fail, naming the keys, on any
missing, unused or mis-shaped tensor, and on any hcjax parameter that no rule produces; :func:`apply_rules` also
on a source tensor that is not floating point (e.g. int32 where a weight belongs: never silently promoted) and on
a converted parameter holding NaN/Inf (also after a ``dtype`` cast that overflows).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np


class ConversionError(ValueError):
    """A state dict does not match the conversion table."""


def identity(w):
    return w


@dataclasses.dataclass(frozen=True)
class Rule:
    flax_path: str                                   # "double_blocks/img_attn_qkv/kernel"
    torch_key: str | tuple[str, ...]                 # "double_blocks.{i}.img_attn_qkv.weight" or several
    transform: Callable[..., Any] = identity         # f(*tensors) -> hcjax layout
    layers: int = 0                                  # >0: stack per-layer tensors on a leading axis

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.torch_key,) if isinstance(self.torch_key, str) else tuple(self.torch_key)

    def torch_keys(self) -> list[str]:
        if self.layers:
            return [k.format(i=i) for i in range(self.layers) for k in self.keys]
        return list(self.keys)


# ------------------------------------------------------------------------------------------- transforms
# Transforms use array methods / these helpers so that they run on numpy arrays (conversion) and on
# abstract jax values (shape-only checks through jax.eval_shape).


def _xp(x):
    return jnp if isinstance(x, jax.core.Tracer) else np


def concat(arrays: Sequence[Any], axis: int = 0):
    return _xp(arrays[0]).concatenate(list(arrays), axis=axis)


def stack(arrays: Sequence[Any], axis: int = 0):
    if isinstance(arrays[0], jax.ShapeDtypeStruct):
        shapes = [tuple(a.shape) for a in arrays]
        odd = [i for i, s in enumerate(shapes) if s != shapes[0]]
        if odd:
            raise ValueError(f"per-layer shapes differ: layer 0 {shapes[0]} vs layer {odd[0]} {shapes[odd[0]]}")
        shape = list(arrays[0].shape)
        shape.insert(axis, len(arrays))
        return jax.ShapeDtypeStruct(tuple(shape), arrays[0].dtype)
    return _xp(arrays[0]).stack(list(arrays), axis=axis)


def linear(w):
    """torch Linear weight [out, in] -> Flax kernel [in, out]."""
    return w.T


def linear_to(*out_shape: int):
    """torch Linear [out, in] -> kernel [in, *out_shape]."""
    return lambda w: w.T.reshape(w.shape[1], *out_shape)


def linear_from(*in_shape: int):
    """torch Linear [out, in] -> kernel [*in_shape, out]."""
    return lambda w: w.T.reshape(*in_shape, w.shape[0])


def reshape_to(*shape: int):
    return lambda w: w.reshape(*shape)


def conv3d(w):
    """torch Conv3d [out, in, kt, kh, kw] -> Flax [kt, kh, kw, in, out]."""
    return w.transpose(2, 3, 4, 1, 0)


def conv2d(w):
    """torch Conv2d [out, in, kh, kw] -> Flax [kh, kw, in, out]."""
    return w.transpose(2, 3, 1, 0)


def conv1d(w):
    """torch Conv1d [out, in, k] -> Flax [k, in, out]."""
    return w.transpose(2, 1, 0)


# ------------------------------------------------------------------------------------------- flat trees


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, path))
        else:
            out[path] = v
    return out


def unflatten(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        parts = path.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return tree


def expected_shapes(abstract_params: Mapping) -> dict[str, tuple[int, ...]]:
    """Flat path -> shape of an abstract (``jax.eval_shape``) params tree (boxed or not)."""
    return {k: tuple(v.shape) for k, v in flatten(nn.unbox(abstract_params)).items()}


# ------------------------------------------------------------------------------------------- applying


def _format_list(title: str, items: Sequence[str], limit: int = 20) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return f"{title} ({len(items)}): {shown}{more}"


def _validate_table(rules: Sequence[Rule], expected: Mapping[str, tuple[int, ...]], what: str) -> list[str]:
    problems = []
    produced = [r.flax_path for r in rules]
    dup = sorted({p for p in produced if produced.count(p) > 1})
    if dup:
        problems.append(_format_list(f"{what}: conversion table produces a parameter twice", dup))
    unknown = sorted(set(produced) - set(expected))
    if unknown:
        problems.append(_format_list(f"{what}: table produces parameters the model does not have", unknown))
    unproduced = sorted(set(expected) - set(produced))
    if unproduced:
        problems.append(_format_list(f"{what}: model parameters with no conversion rule", unproduced))
    return problems


FLOAT_DTYPES = {np.dtype(d) for d in (np.float64, np.float32, np.float16, ml_dtypes.bfloat16,
                                     ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2)}


class _BadDtype(Exception):
    pass


def all_finite(a) -> bool:
    """No NaN/Inf in ``a`` (checked one leading slice at a time: no full-size temporary)."""
    a = np.asarray(a)
    if a.ndim < 2:
        return bool(np.isfinite(a).all())
    return all(bool(np.isfinite(x).all()) for x in a)


def _run(rules, source_keys, load, expected, what, dtype=None):
    problems = _validate_table(rules, expected, what)
    available = set(source_keys)
    needed: list[str] = []
    for r in rules:
        needed.extend(r.torch_keys())
    missing = [k for k in dict.fromkeys(needed) if k not in available]
    unused = sorted(available - set(needed))
    if missing:
        problems.append(_format_list(f"{what}: missing tensors", missing))
    if unused:
        problems.append(_format_list(f"{what}: unexpected tensors", unused))
    if problems:
        raise ConversionError("\n".join(problems))
    out: dict[str, Any] = {}
    bad_shapes, bad_dtypes, non_finite = [], [], []
    raw_load = load

    def load(k):
        v = raw_load(k)
        if not isinstance(v, jax.ShapeDtypeStruct) and np.dtype(v.dtype) not in FLOAT_DTYPES:
            raise _BadDtype(f"{k} ({np.dtype(v.dtype)})")
        return v

    for r in rules:
        try:
            if r.layers:
                per = [r.transform(*[load(k.format(i=i)) for k in r.keys]) for i in range(r.layers)]
                value = stack(per, axis=0)
            else:
                value = r.transform(*[load(k) for k in r.keys])
        except _BadDtype as e:
            bad_dtypes.append(str(e))
            continue
        except (ValueError, TypeError, IndexError) as e:
            bad_shapes.append(f"{r.flax_path} <- {', '.join(r.keys)}: {e}")
            continue
        want = expected[r.flax_path]
        if tuple(value.shape) != tuple(want):
            src = {k.format(i=0): tuple(load(k.format(i=0)).shape) for k in r.keys}
            bad_shapes.append(f"{r.flax_path}: got {tuple(value.shape)} from {src}, expected {tuple(want)}")
            continue
        if dtype is not None and not isinstance(value, jax.ShapeDtypeStruct):
            value = np.asarray(value).astype(dtype, copy=False)
        if not isinstance(value, jax.ShapeDtypeStruct) and not all_finite(value):
            non_finite.append(f"{r.flax_path} <- {', '.join(r.keys)}")
            continue
        out[r.flax_path] = value
    if bad_dtypes:
        raise ConversionError(_format_list(f"{what}: tensors that are not floating point where a weight belongs "
                                           "(a corrupt or foreign checkpoint?)", bad_dtypes, limit=10))
    if non_finite:
        raise ConversionError(_format_list(f"{what}: tensors with NaN/Inf values" + (
            f" (after the cast to {np.dtype(dtype).name}: out of range?)" if dtype is not None else ""),
            non_finite, limit=10))
    if bad_shapes:
        raise ConversionError(_format_list(f"{what}: mis-shaped tensors", bad_shapes, limit=10))
    return out


def apply_rules(
    rules: Sequence[Rule],
    state_dict: Mapping[str, Any],
    expected: Mapping[str, tuple[int, ...]],
    *,
    what: str = "state dict",
    dtype: Any = None,
) -> dict:
    """Convert ``state_dict`` (name -> numpy array) into a nested hcjax params dict (numpy)."""
    flat = _run(rules, state_dict.keys(), lambda k: state_dict[k], expected, what, dtype)
    return unflatten(flat)


def check_rules(
    rules: Sequence[Rule],
    shapes: Mapping[str, Sequence[int]],
    expected: Mapping[str, tuple[int, ...]],
    *,
    what: str = "manifest",
) -> dict[str, tuple[int, ...]]:
    """Shape-only version of :func:`apply_rules`: ``shapes`` maps name -> shape; no tensor data needed."""

    def load(k):
        return jax.ShapeDtypeStruct(tuple(shapes[k]), jnp.float32)

    rules_abstract = [
        dataclasses.replace(r, transform=_abstract(r.transform)) for r in rules
    ]
    flat = _run(rules_abstract, shapes.keys(), load, expected, what)
    return {k: tuple(v.shape) for k, v in flat.items()}


def _abstract(fn):
    def run(*structs):
        return jax.eval_shape(fn, *structs)

    return run
