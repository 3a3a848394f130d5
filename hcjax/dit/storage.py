"""Run-time storage of the DiT block stacks for low-memory inference (issue 23): raw bits, fp8 + scale, host offload.

The double/single block parameters are stacked ``[layers, ...]`` and the blocks run in a ``lax.scan`` that takes one
layer per step (:func:`take_layer`). :func:`runtime_params` turns an ordinary params tree into the form the scan
reads; :func:`take_layer` turns one layer of it back into ordinary per-layer params, inside the loop, so only one
layer's bf16 weights exist at a time:

* **bits** (always): every sub-32-bit float leaf of a stack is held as the unsigned integer of its width (a free
  ``bitcast``). XLA:CPU has no bf16 / fp8 ``dynamic-slice``: its float normalisation converts the whole stacked
  operand to fp32, and loop-invariant code motion hoists that convert out of the layer loop -- an fp32 copy of
  every block weight (51 GB at 13B, 80 % of the 65 GB of temporaries the issue measured). Slicing integers avoids
  it; on GPU/TPU the bitcasts are no-ops. Passing plain float stacks still works (then sliced as floats).
* **fp8** (``cfg.use_fp8``): each Linear kernel of the original's fp8 layer list (every ``nn.Linear`` of the
  double/single blocks, spec 7 "fp8 variant") becomes ``{"fp8": uint8 bits of float8_e4m3fn [n, ...],
  "fp8_scale": float32 [n]}``, de-quantised per layer exactly as the original does: ``W = bf16(W_fp8) *
  bf16(scale)`` (product rounded to bf16), then the ordinary bf16 matmul; biases and norms are unchanged. The
  original's fused ``linear1`` / ``linear2`` are split here (``linear1_qkv + linear1_mlp``, ``linear2_attn +
  linear2_mlp``): both halves share the original layer's one scale.
* **offload** (``cfg.cpu_offload``): the stacks' weight matrices live in ``pinned_host`` memory (vectors and
  ``[6, D]``-like leaves -- biases, norm scales, fp8 scales, under 0.1 % of the bytes -- stay on the device:
  :func:`host_resident`); :func:`take_layer` copies one layer
  (as raw bits, so fp8 moves 1 byte/weight) to device memory inside the jitted loop, and ``run_stack`` prefetches
  layer ``i + 1`` while layer ``i`` computes (double buffering).

Why not ``qwix``: it rewrites Flax modules' dot_generals through interception/``nn.Module`` wrapping and keeps its
own quantised-parameter containers, while here the whole point is *where* the de-quantisation happens (inside the
layer loop, after the host->device copy) in the plain params-dict design; a 100-line explicit transform of the
stacked tree does exactly that and stays readable (qwix is also not installed in this environment).
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

STACKS = ("double_blocks", "single_blocks")
FP8 = "fp8"
FP8_SCALE = "fp8_scale"
E4M3_MAX = 448.0

# original fp8 layer (suffix after "<stack>.<i>.") -> the Flax module paths (inside one stack) holding its kernel
FP8_GROUPS: dict[str, dict[str, tuple[tuple[str, ...], ...]]] = {
    "double_blocks": {
        name: paths for p in ("img", "txt") for name, paths in (
            (f"{p}_mod.linear", ((f"{p}_mod", "linear"),)),
            (f"{p}_attn_qkv", ((f"{p}_attn_qkv",),)),
            (f"{p}_attn_proj", ((f"{p}_attn_proj",),)),
            (f"{p}_mlp.fc1", ((f"{p}_mlp", "fc1"),)),
            (f"{p}_mlp.fc2", ((f"{p}_mlp", "fc2"),)),
        )
    },
    "single_blocks": {
        "linear1": (("linear1_qkv",), ("linear1_mlp",)),
        "linear2": (("linear2_attn",), ("linear2_mlp",)),
        "modulation.linear": (("modulation", "linear"),),
    },
}


def is_fp8(node) -> bool:
    return isinstance(node, Mapping) and set(node) == {FP8, FP8_SCALE}


def _bits_dtype(dtype):
    return np.dtype(f"uint{8 * np.dtype(dtype).itemsize}")


def _to_bits(a):
    """Sub-32-bit floats -> unsigned integers of the same width (numpy view / jax bitcast); others unchanged."""
    dt = np.dtype(a.dtype)
    if dt.kind not in "fV" or dt.itemsize >= 4 or not jnp.issubdtype(dt, jnp.floating):
        return a
    if isinstance(a, np.ndarray):
        return a.view(_bits_dtype(dt))
    return jax.lax.bitcast_convert_type(a, _bits_dtype(dt))     # a copy on CPU; the caller drops the original


# ------------------------------------------------------------------------------------------- quantisation


def _bf16(x):
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def quantize_fp8(w, scale):
    """``w [..]`` (any float) with a per-tensor ``scale`` -> uint8 bits of ``float8_e4m3fn(clip(w / scale))`` (fp32
    division, as the original's quantiser; de-quantisation uses ``bf16(scale)``).

    Re-quantising a kernel that was de-quantised with the same scale, ``bf16(q * bf16(s))``, gives ``q`` back
    exactly: the two bf16 roundings (relative <= 2**-8 together) are far below half an fp8 step (2**-4).
    """
    s = np.float32(np.asarray(scale, np.float32).reshape(()))
    if not np.isfinite(s) or s <= 0:
        raise ValueError(f"an fp8 scale must be a positive finite number, got {float(scale)!r}")
    q = np.clip(np.asarray(w, np.float32) / s, -E4M3_MAX, E4M3_MAX)
    return q.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)


def dequantize_fp8_bits(bits, scale, dtype=jnp.bfloat16):
    """Inside jit: uint8 bits of float8_e4m3fn + scale -> ``bf16(W_fp8) * bf16(scale)`` (bf16), cast to ``dtype``."""
    w = jax.lax.bitcast_convert_type(bits, jnp.float8_e4m3fn).astype(jnp.bfloat16)
    return (w * jnp.asarray(scale).astype(jnp.bfloat16)).astype(dtype)


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree[k]
    tree[path[-1]] = value


def _copy(tree):
    return {k: _copy(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def _quantize_stack(stack: dict, kind: str, fp8_scales: Mapping | None) -> None:
    for layer, paths in FP8_GROUPS[kind].items():
        kernels = [np.asarray(_get(stack, (*p, "kernel"))) for p in paths]
        n = kernels[0].shape[0]
        if fp8_scales is None:   # the original quantiser: per-tensor max|W| / 448 over the fused original weight
            peak = np.max(np.stack([np.abs(k.astype(np.float32)).reshape(n, -1).max(1) for k in kernels]), 0)
            scales = (np.maximum(peak, np.finfo(np.float32).tiny) / np.float32(E4M3_MAX)).astype(np.float32)
        else:
            names = [f"{kind}.{i}.{layer}" for i in range(n)]
            missing = [m for m in names if m not in fp8_scales]
            if missing:
                raise ValueError(f"fp8 scales: no scale for {', '.join(missing[:4])}"
                                 f"{' ...' if len(missing) > 4 else ''} (keys are the original layer names, e.g. "
                                 f"'{names[0]}')")
            scales = np.array([float(np.asarray(fp8_scales[m], np.float32).reshape(())) for m in names], np.float32)
        for p, k in zip(paths, kernels):
            bits = np.stack([quantize_fp8(k[i], scales[i]) for i in range(n)])
            _set(stack, (*p, "kernel"), {FP8: bits, FP8_SCALE: _bf16(scales).astype(np.float32)})


def runtime_params(params, cfg, fp8_scales: Mapping | None = None, host_memory_kind: str = "pinned_host"):
    """An ordinary DiT params tree -> the tree ``HunyuanDiT(cfg)`` runs with at low memory (module docstring).

    ``cfg.use_fp8``: block Linear kernels quantised to fp8 + per-layer scale; ``fp8_scales`` (the fp8 release's map,
    ``{original layer name: scale}``, e.g. from ``convert_weights.dit.read_original``) gives the scales -- with the
    de-quantised kernels that ``convert_weights`` produced from that release this recovers its fp8 weights exactly --
    otherwise the scale is ``max|W| / 448`` per original layer, as the original's quantiser computes it.
    ``cfg.cpu_offload``: the block stacks are placed in host memory (``host_memory_kind``) with the device layout of
    their current sharding (jax arrays) or of device 0 (numpy). Leaves outside the block stacks are untouched.
    Quantisation runs on the host (numpy), one layer group at a time.
    """
    params = nn.unbox(params)
    if not isinstance(params, Mapping) or not all(k in params for k in STACKS):
        raise ValueError(f"runtime_params needs a DiT params tree with {STACKS}; got keys "
                         f"{sorted(params) if isinstance(params, Mapping) else type(params).__name__}")
    if fp8_scales is not None and not cfg.use_fp8:
        raise ValueError("fp8_scales were given but the config has use_fp8=False (set dit.use_fp8=true)")
    out = dict(params)
    for kind in STACKS:
        stack = _copy(params[kind])
        if any(is_fp8(n) for n in _nodes(stack)):
            raise ValueError(f"params[{kind!r}] is already in run-time form (fp8 leaves); pass the ordinary tree")
        if cfg.use_fp8:
            _quantize_stack(stack, kind, fp8_scales)
        stack = jax.tree.map(_to_bits, stack)
        if cfg.cpu_offload:
            stack = jax.tree.map(lambda a: _to_host(a, host_memory_kind) if host_resident(a.shape) else a, stack)
        out[kind] = stack
    return out


def _nodes(tree):
    if isinstance(tree, Mapping):
        yield tree
        for v in tree.values():
            yield from _nodes(v)


def host_resident(shape) -> bool:
    """Whether a stacked leaf of ``shape`` (``[layers, ...]``) is kept in host memory under ``cfg.cpu_offload``: when
    one layer of it is at least a matrix with a dimension of 8 or more before the last. XLA:TPU (libtpu 0.0.42)
    fails to compile a dynamic slice of a packed (16/8-bit) host array whose per-layer slice is a vector or a
    ``[6, D]`` matrix (layout RET_CHECK / "sublane slicing size" errors, found by AOT compiles for v5p), so those
    small leaves stay on the device; every weight matrix goes to the host."""
    layer = tuple(shape)[1:]
    return len(layer) >= 2 and max(layer[:-1]) >= 8


def _to_host(a, kind: str):
    if isinstance(a, jax.Array):
        return jax.device_put(a, a.sharding.with_memory_kind(kind))
    return jax.device_put(a, jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind=kind))


# ------------------------------------------------------------------------------------------- inside the loop


def slice_layer(stacked, i):
    """Raw layer ``i`` of a (run-time form) stack: sub-32-bit floats sliced as integers (see module docstring)."""
    def one(a):
        if jnp.issubdtype(a.dtype, jnp.floating) and jnp.dtype(a.dtype).itemsize < 4:
            bits = jax.lax.bitcast_convert_type(a, _bits_dtype(a.dtype))
            return jax.lax.bitcast_convert_type(jax.lax.dynamic_index_in_dim(bits, i, keepdims=False), a.dtype)
        return jax.lax.dynamic_index_in_dim(a, i, keepdims=False)

    return jax.tree.map(one, stacked)


def to_device(layer):
    """Inside jit: one layer's leaves copied to device memory (the ``cpu_offload`` transfer)."""
    return jax.tree.map(lambda a: jax.device_put(a, jax.memory.Space.Device), layer)


def decode_layer(layer, cfg):
    """One raw layer -> ordinary per-layer params: integer bits -> ``cfg.param_dtype``, fp8 -> bf16 kernels."""
    pdt = jnp.dtype(cfg.param_dtype)

    def walk(node, path):
        if is_fp8(node):
            return dequantize_fp8_bits(node[FP8], node[FP8_SCALE])
        if isinstance(node, Mapping):
            return {k: walk(v, f"{path}/{k}") for k, v in node.items()}
        if jnp.issubdtype(node.dtype, jnp.unsignedinteger):
            if jnp.dtype(node.dtype).itemsize != pdt.itemsize:
                raise ValueError(f"block parameter {path} is held as {node.dtype} bits but param_dtype is "
                                 f"{cfg.param_dtype}; build the run-time tree with runtime_params(params, cfg)")
            return jax.lax.bitcast_convert_type(node, pdt)
        return node

    if cfg.use_fp8 and not any(is_fp8(n) for n in _nodes(layer)):
        raise ValueError("dit.use_fp8 is set but the block params hold no fp8 kernels; convert the params with "
                         "hcjax.dit.runtime_params(params, cfg) before running")
    return walk(layer, "")


def take_layer(stacked, i, cfg):
    """Ordinary params of layer ``i`` of a block stack (plain or run-time form), on the device.

    ``i=None``: ``stacked`` is already one raw layer on the device (the prefetched buffer of ``run_stack``)."""
    if i is None:
        return decode_layer(stacked, cfg)
    layer = slice_layer(stacked, i)
    if cfg.cpu_offload:
        layer = to_device(layer)
    return decode_layer(layer, cfg)


def abstract_runtime_params(abstract, cfg, sharding=None, host_memory_kind: str = "pinned_host"):
    """``jax.ShapeDtypeStruct`` tree of :func:`runtime_params` (nothing allocated; for AOT memory analysis).

    ``sharding``: the (device) sharding given to every leaf (e.g. a single-device sharding); the block stacks'
    :func:`host_resident` leaves get its ``host_memory_kind`` variant when ``cfg.cpu_offload``."""
    abstract = nn.unbox(abstract)

    def sds(shape, dtype, host=False):
        sh = sharding.with_memory_kind(host_memory_kind) if (sharding is not None and host) else sharding
        return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sh)

    out = {k: jax.tree.map(lambda a: sds(a.shape, a.dtype), v) for k, v in abstract.items() if k not in STACKS}
    for kind in STACKS:
        stack = _copy(abstract[kind])
        if cfg.use_fp8:
            for paths in FP8_GROUPS[kind].values():
                for p in paths:
                    k = _get(stack, (*p, "kernel"))
                    _set(stack, (*p, "kernel"), {FP8: jax.ShapeDtypeStruct(k.shape, np.uint8),
                                                 FP8_SCALE: jax.ShapeDtypeStruct(k.shape[:1], np.float32)})
        out[kind] = jax.tree.map(
            lambda a: sds(a.shape, _bits_dtype(a.dtype) if np.dtype(a.dtype).itemsize < 4 and
                          jnp.issubdtype(a.dtype, jnp.floating) else a.dtype,
                          cfg.cpu_offload and host_resident(a.shape)), stack)
    return out
