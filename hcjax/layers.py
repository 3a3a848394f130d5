"""Shared Flax building blocks with logical axis names.

Ports the small modules of HunyuanVideo's ``hymm_sp/modules`` (``embed_layers.py``, ``mlp_layers.py``,
``modulate_layers.py``, ``norm_layers.py``). Tokens are ``[B, L, D]``; video is channels-last ``[B, T, H, W, C]``.
Norms, timestep sinusoids and modulation arithmetic run in fp32; matmuls in the configured compute dtype.
``token_chunks`` runs a token-wise function a chunk of tokens at a time (``dit.ffn_chunk``; PatchEmbed, blocks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .axes import fit_spec

Dtype = Any


def to_dtype(name: str | Dtype) -> Dtype:
    return jnp.dtype(name) if isinstance(name, str) else name


def logical(init, names: Sequence[str | None]):
    return nn.with_logical_partitioning(init, tuple(names))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Activation sharding constraint by logical names (a no-op outside a mesh / rules context)."""
    return nn.with_logical_constraint(x, tuple(names))


def gathered(w: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """A weight as the computation uses it: gathered over its ``embed`` dimension, tensor-parallel dims kept.

    Weights are *stored* sharded over ``embed`` (the FSDP / sequence axes of ``hcjax.sharding``, ZeRO-3) and must
    be all-gathered per layer before use; this states that explicitly (the gradient gets the matching
    reduce-scatter). A no-op outside a mesh / rules context; mesh axes that do not divide a dimension are dropped
    (``hcjax.axes.fit_spec``), as in the stored sharding.

    Without it the SPMD partitioner picks the strategy itself, and XLA (jaxlib 0.10.2; GSPMD and Shardy alike)
    miscompiles a matmul whose LHS rows are sharded over two mesh axes (``data, fsdp``), one of which (``fsdp``)
    also shards the RHS's output dimension, with the contraction and the result's columns over a third
    (``tensor``): it collective-permutes the LHS shards into the RHS's device order (swapping devices
    (data 0, fsdp 1) and (data 1, fsdp 0)) and never permutes the result back, so batch shards land on the wrong
    devices (issue 5: the DiT on mesh data=2 x fsdp=2 x tensor=2 was off by up to ~4). Size dependent (not with
    256x64 -> 128x32 below). Minimal reproduction (8 CPU devices; max error ~80 instead of ~1e-5)::

        mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
        s = lambda *spec: NamedSharding(mesh, P(*spec))
        a, w = rand(4, 24, 256), rand(256, 64)
        f = jax.jit(lambda a, w: a @ w, out_shardings=s(("data", "fsdp"), None, "tensor"))
        f(jax.device_put(a, s(("data", "fsdp"), None, "tensor")), jax.device_put(w, s("tensor", "fsdp")))
    """
    rules = nn.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return w
    names = tuple(None if n == "embed" else n for n in names)
    spec = fit_spec(nn.logical_to_mesh_axes(names, rules), tuple(w.shape), mesh)
    return jax.lax.with_sharding_constraint(w, spec)


class Dense(nn.Module):
    """Linear map contracting the last ``in_ndim`` dims of ``x`` into ``features`` (any shape).

    The kernel has shape ``(*x.shape[-in_ndim:], *features)`` and one logical name per dimension, e.g. a fused
    qkv projection ``[D, 3, N, K]`` named ``("embed", None, "heads", "head_dim")``.
    """

    features: int | tuple[int, ...]
    axes: tuple[str | None, ...]
    in_ndim: int = 1
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        feats = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        in_shape = x.shape[x.ndim - self.in_ndim :]
        kshape = (*in_shape, *feats)
        if len(self.axes) != len(kshape):
            raise ValueError(f"{self.name}: {len(self.axes)} logical names for a kernel of rank {len(kshape)}")
        n_in = len(in_shape)
        init = self.kernel_init or nn.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, len(kshape)))
        )
        kernel = self.param("kernel", logical(init, self.axes), kshape, self.param_dtype)
        dtype = to_dtype(self.dtype)
        y = jax.lax.dot_general(
            x.astype(dtype),
            gathered(kernel.astype(dtype), self.axes),              # gathered in the compute dtype
            ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())),
        )
        if self.use_bias:
            bias = self.param("bias", logical(nn.initializers.zeros, self.axes[n_in:]), feats, self.param_dtype)
            y = y + gathered(bias.astype(dtype), self.axes[n_in:])
        return y


def _bits(a):
    """Sub-32-bit floats as same-width unsigned integers (XLA:CPU slices bf16 by converting the whole operand)."""
    if jnp.issubdtype(a.dtype, jnp.floating) and jnp.dtype(a.dtype).itemsize < 4:
        return jax.lax.bitcast_convert_type(a, jnp.dtype(f"uint{8 * jnp.dtype(a.dtype).itemsize}"))
    return a


def _unbits(a, dtype):
    return jax.lax.bitcast_convert_type(a, dtype) if a.dtype != dtype else a


def concat(xs, axis: int = 1):
    """``jnp.concatenate`` on the bits of sub-32-bit floats (XLA:CPU concatenates bf16 in fp32, and may keep an
    fp32 copy of an operand alive, e.g. hoisted out of the CFG loop)."""
    dtype = xs[0].dtype
    return _unbits(jnp.concatenate([_bits(x.astype(dtype)) for x in xs], axis=axis), dtype)


def token_chunks(fn, chunk: int, *xs, axes=None, out_len: int | None = None):
    """``fn(*xs)`` computed ``chunk`` tokens at a time (``cfg.ffn_chunk``; 0 = one call on all tokens).

    ``fn`` must treat tokens independently; ``xs`` carry the tokens on ``axes`` (default 1 for all), every output
    on axis 1. A ``fori_loop`` slices the inputs and writes each chunk's outputs into full-length buffers, so only
    a chunk of the wide intermediates ([tokens, 4D] MLP hidden, fp32 norm/modulate copies) is alive. The last
    chunk starts at ``L - chunk`` (it overlaps the previous one and rewrites identical values), so no padding.

    ``n`` tokens are those of ``xs[0]``; later inputs may be longer (only their first ``n`` tokens are read, no
    sliced copy is made). ``out_len > n``: the outputs are ``out_len`` tokens long, rows ``>= n`` zero, for the
    caller to fill in place (``write_tokens``) instead of concatenating.
    """
    axes = axes or (1,) * len(xs)
    n = xs[0].shape[axes[0]]
    out_len = n if out_len is None else out_len
    if out_len < n:
        raise ValueError(f"token_chunks: out_len={out_len} is shorter than the {n} input tokens")
    if chunk <= 0 or n <= chunk:
        ys = fn(*[jax.lax.slice_in_dim(x, 0, n, axis=ax) for x, ax in zip(xs, axes)])
        if out_len == n:
            return ys
        return jax.tree.map(lambda y: concat([y, jnp.zeros((y.shape[0], out_len - n, *y.shape[2:]), y.dtype)]), ys)
    steps = -(-n // chunk)
    raw = [_bits(x) for x in xs]

    def piece(start):
        return fn(*[_unbits(jax.lax.dynamic_slice_in_dim(r, start, chunk, ax), x.dtype)
                    for r, x, ax in zip(raw, xs, axes)])

    first = piece(0)
    leaves, tree = jax.tree.flatten(first)
    bufs = [_bits(jnp.zeros((y.shape[0], out_len, *y.shape[2:]), y.dtype)) for y in leaves]
    bufs = [jax.lax.dynamic_update_slice_in_dim(b, _bits(y), 0, 1) for b, y in zip(bufs, leaves)]

    def body(i, bufs):
        start = jnp.minimum(i * chunk, n - chunk)
        ys = jax.tree.leaves(piece(start))
        return [jax.lax.dynamic_update_slice_in_dim(b, _bits(y), start, 1) for b, y in zip(bufs, ys)]

    bufs = jax.lax.fori_loop(1, steps, body, bufs)
    return jax.tree.unflatten(tree, [_unbits(b, y.dtype) for b, y in zip(bufs, leaves)])


def write_tokens(buf: jax.Array, x: jax.Array, start: int) -> jax.Array:
    """``buf`` with ``x`` written at token ``start`` (axis 1), on the bits (an in-place update for XLA)."""
    return _unbits(jax.lax.dynamic_update_slice_in_dim(_bits(buf), _bits(x.astype(buf.dtype)), start, 1), buf.dtype)


def layer_norm(x: jax.Array, eps: float, scale=None, bias=None) -> jax.Array:
    """LayerNorm over the last axis in fp32 (returns fp32)."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + eps)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y


class LayerNorm(nn.Module):
    """Affine LayerNorm (params ``scale``, ``bias``), statistics and output in fp32."""

    eps: float = 1e-6
    axis_name: str | None = "embed"
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param("scale", logical(nn.initializers.ones, (self.axis_name,)), (d,), self.param_dtype)
        bias = self.param("bias", logical(nn.initializers.zeros, (self.axis_name,)), (d,), self.param_dtype)
        return layer_norm(x, self.eps, scale, bias)


class RMSNorm(nn.Module):
    """QK RMSNorm: normalise in fp32, cast back to the input dtype, multiply by ``scale``."""

    eps: float = 1e-6
    axis_name: str | None = "head_dim"
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param("scale", logical(nn.initializers.ones, (self.axis_name,)), (d,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return y.astype(x.dtype) * scale.astype(x.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """``x * (1 + scale) + shift`` with per-sample ``shift``/``scale`` ``[B, D]`` broadcast over tokens (fp32)."""
    return x * (1.0 + scale[:, None, :].astype(jnp.float32)) + shift[:, None, :].astype(jnp.float32)


def gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


def timestep_embedding(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal features ``[cos(t w_j), sin(t w_j)]``, ``w_j = exp(-ln(max_period) j / (dim/2))``, fp32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _two_layer(x, hidden: int, names: tuple[str, str], dtype, param_dtype):
    """Linear -> SiLU -> Linear; called inside a compact method, so the Denses are named children."""
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    h = Dense(hidden, (None, "embed"), name=names[0], **kw)(x)
    return Dense(hidden, ("embed", "mlp"), name=names[1], **kw)(jax.nn.silu(h))


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear with the reference's submodule names (``in_layer/out_layer``, ``linear_1/2``)."""

    hidden: int
    names: tuple[str, str] = ("in_layer", "out_layer")
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return _two_layer(x, self.hidden, self.names, self.dtype, self.param_dtype)


class TimestepEmbedder(nn.Module):
    """Sinusoid (256, fp32) cast to the compute dtype -> ``mlp_0`` -> SiLU -> ``mlp_2`` (original ``mlp.0/mlp.2``)."""

    hidden: int
    freq_dim: int = 256
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t):
        feats = timestep_embedding(t, self.freq_dim).astype(to_dtype(self.dtype))
        return _two_layer(feats, self.hidden, ("mlp_0", "mlp_2"), self.dtype, self.param_dtype)


class Modulation(nn.Module):
    """``Linear(SiLU(vec))`` split into ``factor`` chunks: kernel ``[D, factor, D]``; returns ``[B, factor, D]``."""

    factor: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, vec):
        d = vec.shape[-1]
        return Dense((self.factor, d), ("embed", None, "mlp"), name="linear", dtype=self.dtype,
                     param_dtype=self.param_dtype)(jax.nn.silu(vec))


class MLP(nn.Module):
    """``fc1`` -> activation -> ``fc2``."""

    hidden: int
    act: Any = gelu_tanh
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = Dense(self.hidden, ("embed", "mlp"), name="fc1", **kw)(x)
        h = constrain(h, ("act_batch", "act_seq", "act_mlp"))
        return Dense(x.shape[-1], ("mlp", "embed"), name="fc2", **kw)(self.act(h))


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = ``patch`` as a matmul over patches: ``[B,T,H,W,C] -> [B, T'H'W', D]``.

    Kernel ``proj/kernel`` has the Flax conv layout ``[pt, ph, pw, C, D]``; tokens are in (t, h, w) row-major order.
    """

    hidden: int
    patch: tuple[int, int, int]
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    chunk: int = 0          # tokens per matmul (:func:`token_chunks`; 0 = all at once)

    @nn.compact
    def __call__(self, x):
        b, t, h, w, c = x.shape
        pt, ph, pw = self.patch
        x = x.reshape(b, t // pt, pt, h // ph, ph, w // pw, pw, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
        x = x.reshape(b, (t // pt) * (h // ph) * (w // pw), pt, ph, pw, c)
        proj = Dense(self.hidden, (None, None, None, "conv_in", "embed"), in_ndim=4, name="proj",
                     dtype=self.dtype, param_dtype=self.param_dtype)
        return token_chunks(proj, 0 if self.is_initializing() else self.chunk, x)
