"""The 3D causal VAE (HunyuanVideo ``AutoencoderKLCausal3D``, 884-16c-hy0801) and its tiled encode/decode.

Ports ``hymm_sp/vae/autoencoder_kl_causal_3d.py`` (+ ``unet_causal_3d_blocks.py``, ``vae.py``) as used by
HunyuanCustom; diffusers' ``AutoencoderKLHunyuanVideo`` has the same parameter names and numerics and is the
test reference. Spec: ``hunyuancustom.md`` section 4.

Layouts (channels-last): video ``[B, T, H, W, 3]`` in [-1, 1]; latents ``[B, t, h, w, C]`` with
``t = (T - 1) / 4 + 1``, ``h = H / 8``, ``w = W / 8``; moments ``[B, t, h, w, 2C]`` (mean, logvar).
Submodule names follow the reference attributes with list indices joined by ``_`` (``down_blocks_0``,
``resnets_1``, ``attentions_0/to_out_0``); leaves are ``kernel`` (conv ``[kt, kh, kw, in, out]``, linear
``[in, out]``), ``bias`` and ``scale`` (GroupNorm).

Tiling (spec 4.5) runs on the host as a loop over ONE compiled tile function per direction and batch size:
every tile is padded to the same fixed shape and carries its valid extent ``(t, h, w)``; the masked model
(replicate padding read through clamped indices, GroupNorm statistics and attention keys restricted to the
valid region) gives the valid region exactly what the unpadded tile would give. Invalid trailing frames
need no mask in the convs and attention because both are causal in time. Blending follows the original's
in-place, row-major order on full (uncropped) neighbour tiles; only the blend tails of neighbours are kept,
so device memory is one tile's working set whatever the video length or resolution.

The mid-block attention is frame-causal (a token of frame i sees every token of frames <= i). It never
builds an ``[L, L]`` mask: a ``lax.scan`` over key frames updates an online softmax for all queries, so
the working set is ``[B, T*HW, HW]`` scores per step.

Numerics: convolutions/linears in ``cfg.dtype``; GroupNorm, softmax and blending in fp32. Posterior:
``encode_video`` returns the scaled mean when ``key`` is None and ``mean + std * N(0, 1)`` drawn with
``key`` otherwise; the original samples with the torch global RNG (spec 4.6), which cannot be reproduced
bit-exactly here, so pass a key to match its distribution or omit it for the deterministic mean.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .config import Config, VAEConfig

Valid = tuple[Any, Any, Any] | None      # traced (t, h, w) extents of the valid prefix, or None = all valid
_NEG = -1e30


def _vae_cfg(cfg: Config | VAEConfig) -> VAEConfig:
    return cfg.vae if isinstance(cfg, Config) else cfg


def _dt(name):
    return jnp.dtype(name)


def _logical(init, names):
    return nn.with_logical_partitioning(init, tuple(names))


def block_plan(cfg: VAEConfig) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Per block ``(time_factor, space_factor)`` of the encoder downsamplers and decoder upsamplers."""
    n = len(cfg.block_out_channels)
    n_space = int(round(math.log2(cfg.spatial_compression_ratio)))
    n_time = int(round(math.log2(cfg.time_compression_ratio)))
    plan = []
    for i in range(n):
        final = i == n - 1
        space = 2 if i < n_space else 1
        time = 2 if (i >= n - 1 - n_time and not final) else 1
        plan.append((time, space))
    return plan, plan


# ----------------------------------------------------------------------------------------------- layers


class Conv(nn.Module):
    """Plain Conv3d without padding (``kernel [k, k, k, in, out]``); k=1 is a channel matmul."""

    features: int
    kernel: int = 3
    stride: tuple[int, int, int] = (1, 1, 1)
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        k, cin = self.kernel, x.shape[-1]
        init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=(0, 1, 2, 3), out_axis=4)
        kernel = self.param("kernel", _logical(init, (None, None, None, "conv_in", "conv_out")),
                            (k, k, k, cin, self.features), _dt(self.param_dtype))
        bias = self.param("bias", _logical(nn.initializers.zeros, ("conv_out",)), (self.features,),
                          _dt(self.param_dtype))
        dt = _dt(self.dtype)
        x = x.astype(dt)
        if k == 1 and self.stride == (1, 1, 1):
            y = jnp.einsum("...c,cd->...d", x, kernel.reshape(cin, self.features).astype(dt))
        else:
            y = conv3d(x, kernel.astype(dt), self.stride)
        return y + bias.astype(dt)


def conv3d(x, kernel, stride, impl: str | None = None):
    """VALID 3D convolution ``[B, T, H, W, Ci] x [kt, kh, kw, Ci, Co]``.

    ``impl="taps"`` folds the ``kt`` temporal taps into the channels of one 2D convolution over ``B * T_out``
    frames (the same sum, in another order); ``"native"`` is XLA's 3D convolution. ``None`` picks ``taps`` on
    CPU, where XLA's 3D convolution is slower than its 2D one (forward + backward measured here: 8x at 8
    channels 32x32, 2x at 32 channels 64x64), and ``native`` on accelerators."""
    impl = impl or ("taps" if jax.default_backend() == "cpu" else "native")
    if impl == "native":
        return jax.lax.conv_general_dilated(x, kernel, stride, "VALID", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    if impl != "taps":
        raise ValueError(f"conv3d impl must be 'taps' or 'native', got {impl!r}")
    kt, kh, kw, cin, cout = kernel.shape
    st = stride[0]
    b, t = x.shape[:2]
    t_out = (t - kt) // st + 1
    stop = st * (t_out - 1) + 1
    taps = [x[:, j:j + stop:st] for j in range(kt)]
    xs = (jnp.concatenate(taps, axis=-1) if kt > 1 else taps[0]).reshape(b * t_out, *x.shape[2:4], kt * cin)
    k2 = kernel.transpose(1, 2, 0, 3, 4).reshape(kh, kw, kt * cin, cout)
    y = jax.lax.conv_general_dilated(xs, k2, stride[1:], "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y.reshape(b, t_out, *y.shape[1:])


def _replicate_pad(x, axis: int, before: int, after: int, valid=None):
    """Replicate-pad ``axis``: the edge slices concatenated (cheaper to compile and run on CPU than
    ``jnp.pad(mode="edge")``, and a plain slice-add in the backward pass). With a traced ``valid`` extent it
    gathers clamped indices so that the pad repeats element ``valid-1`` instead of the last array element, and a
    padded tile behaves like the unpadded one inside its valid prefix."""
    if before == 0 and after == 0:
        return x
    n = x.shape[axis]
    if valid is None:
        first, last = jax.lax.slice_in_dim(x, 0, 1, axis=axis), jax.lax.slice_in_dim(x, n - 1, n, axis=axis)
        return jnp.concatenate([first] * before + [x] + [last] * after, axis=axis)
    idx = jnp.clip(jnp.arange(-before, n + after), 0, valid - 1)
    return jnp.take(x, idx, axis=axis, mode="clip")


class CausalConv3d(nn.Module):
    """Replicate padding: W and H by k//2 on both sides, T by k-1 in front; then ``conv`` (no padding)."""

    features: int
    kernel: int = 3
    stride: tuple[int, int, int] = (1, 1, 1)
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x, valid: Valid = None):
        k, p = self.kernel, self.kernel // 2
        x = _replicate_pad(x, 1, k - 1, 0)
        x = _replicate_pad(x, 2, p, p, None if valid is None else valid[1])
        x = _replicate_pad(x, 3, p, p, None if valid is None else valid[2])
        return Conv(self.features, k, self.stride, self.dtype, self.param_dtype, name="conv")(x)


def _valid_mask(shape_thw, valid: Valid):
    """Float mask ``[T, H, W]`` of the valid prefix (None when everything is valid)."""
    if valid is None:
        return None
    t, h, w = shape_thw
    mt = jnp.arange(t) < valid[0]
    mh = jnp.arange(h) < valid[1]
    mw = jnp.arange(w) < valid[2]
    return (mt[:, None, None] & mh[None, :, None] & mw[None, None, :]).astype(jnp.float32)


class GroupNorm(nn.Module):
    """GroupNorm over (channels of the group, T, H, W) in fp32, statistics over the valid prefix only."""

    groups: int
    eps: float = 1e-6
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x, valid: Valid = None):
        b, t, h, w, c = x.shape
        g = self.groups
        if c % g:
            raise ValueError(f"GroupNorm: {c} channels are not divisible by {g} groups")
        scale = self.param("scale", _logical(nn.initializers.ones, ("conv_out",)), (c,), _dt(self.param_dtype))
        bias = self.param("bias", _logical(nn.initializers.zeros, ("conv_out",)), (c,), _dt(self.param_dtype))
        # Per-channel sums over (T, H, W) then per-group sums: simple reductions over leading axes (much
        # cheaper to compile and run on CPU than a 6-D reshape reduced over non-adjacent axes).
        xf = x.astype(jnp.float32)
        m = _valid_mask((t, h, w), valid)
        if m is None:
            count = float(t * h * w * (c // g))
        else:
            m = m[None, :, :, :, None]
            count = (valid[0] * valid[1] * valid[2] * (c // g)).astype(jnp.float32)

        def group_mean(v):                           # [B, T, H, W, C] -> per-channel [B, 1, 1, 1, C]
            if m is not None:
                v = v * m
            per_group = jnp.sum(v, axis=(1, 2, 3)).reshape(b, g, c // g).sum(-1) / count
            return jnp.repeat(per_group, c // g, axis=-1)[:, None, None, None, :]

        d = xf - group_mean(xf)
        y = d * jax.lax.rsqrt(group_mean(jnp.square(d)) + self.eps)
        return y * scale.astype(jnp.float32) + bias.astype(jnp.float32)


class ResnetBlock(nn.Module):
    """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> conv2, plus (conv_shortcut(x) if channels change else x)."""

    features: int
    cfg: VAEConfig

    @nn.compact
    def __call__(self, x, valid: Valid = None):
        c = self.cfg
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        h = nn.silu(GroupNorm(c.norm_num_groups, c.norm_eps, c.param_dtype, name="norm1")(x, valid))
        h = CausalConv3d(self.features, 3, name="conv1", **kw)(h, valid)
        h = nn.silu(GroupNorm(c.norm_num_groups, c.norm_eps, c.param_dtype, name="norm2")(h, valid))
        h = CausalConv3d(self.features, 3, name="conv2", **kw)(h, valid)
        if x.shape[-1] != self.features:
            x = CausalConv3d(self.features, 1, name="conv_shortcut", **kw)(x, valid)
        return x.astype(h.dtype) + h


def frame_causal_attention(q, k, v, key_valid=None):
    """Single-head attention where queries of frame i see all keys of frames <= i.

    ``q, k, v``: ``[B, T, S, C]`` (S = tokens per frame); ``key_valid``: optional bool ``[S]`` restricting
    the keys of every frame. Online softmax in fp32 over a scan of key frames; no ``[L, L]`` mask.
    """
    b, t, s, c = q.shape
    qf = q.astype(jnp.float32) * (1.0 / math.sqrt(c))
    kt = jnp.moveaxis(k, 1, 0)
    vt = jnp.moveaxis(v, 1, 0)
    q_frame = jnp.arange(t)

    def step(carry, inp):
        m, l, acc = carry
        kj, vj, j = inp
        sc = jnp.einsum("btqc,bkc->btqk", qf, kj.astype(jnp.float32))
        allowed = (q_frame >= j)[:, None, None]
        if key_valid is not None:
            allowed = allowed & key_valid[None, None, :]
        sc = jnp.where(allowed[None], sc, _NEG)
        m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
        p = jnp.exp(sc - m_new[..., None])
        corr = jnp.exp(m - m_new)
        l = l * corr + jnp.sum(p, axis=-1)
        acc = acc * corr[..., None] + jnp.einsum("btqk,bkc->btqc", p, vj.astype(jnp.float32))
        return (m_new, l, acc), None

    init = (jnp.full((b, t, s), _NEG, jnp.float32), jnp.zeros((b, t, s), jnp.float32),
            jnp.zeros((b, t, s, c), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(step, init, (kt, vt, jnp.arange(t)))
    return (acc / l[..., None]).astype(q.dtype)


class Dense(nn.Module):
    features: int
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        cin = x.shape[-1]
        kernel = self.param("kernel", _logical(nn.initializers.lecun_normal(), ("conv_in", "conv_out")),
                            (cin, self.features), _dt(self.param_dtype))
        bias = self.param("bias", _logical(nn.initializers.zeros, ("conv_out",)), (self.features,),
                          _dt(self.param_dtype))
        dt = _dt(self.dtype)
        return jnp.einsum("...c,cd->...d", x.astype(dt), kernel.astype(dt)) + bias.astype(dt)


class Attention(nn.Module):
    """Mid-block self-attention: group_norm -> to_q/to_k/to_v -> frame-causal attention -> to_out_0, + x."""

    cfg: VAEConfig

    @nn.compact
    def __call__(self, x, valid: Valid = None):
        c = self.cfg
        b, t, h, w, ch = x.shape
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        y = GroupNorm(c.norm_num_groups, c.norm_eps, c.param_dtype, name="group_norm")(x, valid)
        y = y.reshape(b, t, h * w, ch)
        q = Dense(ch, name="to_q", **kw)(y)
        k = Dense(ch, name="to_k", **kw)(y)
        v = Dense(ch, name="to_v", **kw)(y)
        key_valid = None
        if valid is not None:
            key_valid = ((jnp.arange(h) < valid[1])[:, None] & (jnp.arange(w) < valid[2])[None, :]).reshape(-1)
        o = frame_causal_attention(q, k, v, key_valid)
        o = Dense(ch, name="to_out_0", **kw)(o).reshape(b, t, h, w, ch)
        return o + x.astype(o.dtype)


class MidBlock(nn.Module):
    cfg: VAEConfig

    @nn.compact
    def __call__(self, x, valid: Valid = None):
        ch = x.shape[-1]
        x = ResnetBlock(ch, self.cfg, name="resnets_0")(x, valid)
        if self.cfg.mid_block_add_attention:
            x = Attention(self.cfg, name="attentions_0")(x, valid)
        return ResnetBlock(ch, self.cfg, name="resnets_1")(x, valid)


class Downsample(nn.Module):
    features: int
    time: int
    space: int
    cfg: VAEConfig

    @nn.compact
    def __call__(self, x, valid: Valid = None):
        c = self.cfg
        x = CausalConv3d(self.features, 3, (self.time, self.space, self.space), c.dtype, c.param_dtype,
                         name="conv")(x, valid)
        if valid is not None:
            valid = ((valid[0] - 1) // self.time + 1, (valid[1] - 1) // self.space + 1,
                     (valid[2] - 1) // self.space + 1)
        return x, valid


class Upsample(nn.Module):
    """Nearest upsampling; the first frame spatially only, the others also in time (T -> 2T-1); then conv."""

    features: int
    time: int
    space: int
    cfg: VAEConfig

    @nn.compact
    def __call__(self, x, valid: Valid = None):
        c = self.cfg
        s = self.space

        def up_space(y):
            return jnp.repeat(jnp.repeat(y, s, axis=2), s, axis=3) if s > 1 else y

        first = up_space(x[:, :1])
        if x.shape[1] > 1:
            rest = up_space(jnp.repeat(x[:, 1:], self.time, axis=1))
            x = jnp.concatenate([first, rest], axis=1)
        else:
            x = first
        if valid is not None:
            valid = ((valid[0] - 1) * self.time + 1, valid[1] * s, valid[2] * s)
        x = CausalConv3d(self.features, 3, (1, 1, 1), c.dtype, c.param_dtype, name="conv")(x, valid)
        return x, valid


class DownBlock(nn.Module):
    features: int
    time: int
    space: int
    cfg: VAEConfig

    @nn.compact
    def __call__(self, x, valid: Valid = None):
        for j in range(self.cfg.layers_per_block):
            x = ResnetBlock(self.features, self.cfg, name=f"resnets_{j}")(x, valid)
        if self.time > 1 or self.space > 1:
            x, valid = Downsample(self.features, self.time, self.space, self.cfg, name="downsamplers_0")(x, valid)
        return x, valid


class UpBlock(nn.Module):
    features: int
    time: int
    space: int
    cfg: VAEConfig

    @nn.compact
    def __call__(self, x, valid: Valid = None):
        for j in range(self.cfg.layers_per_block + 1):
            x = ResnetBlock(self.features, self.cfg, name=f"resnets_{j}")(x, valid)
        if self.time > 1 or self.space > 1:
            x, valid = Upsample(self.features, self.time, self.space, self.cfg, name="upsamplers_0")(x, valid)
        return x, valid


class Encoder(nn.Module):
    cfg: VAEConfig

    @nn.compact
    def __call__(self, x, valid: Valid = None):
        c = self.cfg
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        x = CausalConv3d(c.block_out_channels[0], 3, name="conv_in", **kw)(x, valid)
        down, _ = block_plan(c)
        for i, (ch, (ft, fs)) in enumerate(zip(c.block_out_channels, down)):
            x, valid = DownBlock(ch, ft, fs, c, name=f"down_blocks_{i}")(x, valid)
        x = MidBlock(c, name="mid_block")(x, valid)
        x = nn.silu(GroupNorm(c.norm_num_groups, c.norm_eps, c.param_dtype, name="conv_norm_out")(x, valid))
        return CausalConv3d(2 * c.latent_channels, 3, name="conv_out", **kw)(x, valid)


class Decoder(nn.Module):
    cfg: VAEConfig

    @nn.compact
    def __call__(self, z, valid: Valid = None):
        c = self.cfg
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        rev = list(reversed(c.block_out_channels))
        x = CausalConv3d(rev[0], 3, name="conv_in", **kw)(z, valid)
        x = MidBlock(c, name="mid_block")(x, valid)
        _, up = block_plan(c)
        for i, (ch, (ft, fs)) in enumerate(zip(rev, up)):
            x, valid = UpBlock(ch, ft, fs, c, name=f"up_blocks_{i}")(x, valid)
        x = nn.silu(GroupNorm(c.norm_num_groups, c.norm_eps, c.param_dtype, name="conv_norm_out")(x, valid))
        return CausalConv3d(c.out_channels, 3, name="conv_out", **kw)(x, valid)


class AutoencoderKLCausal3D(nn.Module):
    """The VAE. Methods (``apply(..., method=...)``): ``moments`` (raw ``[B,t,h,w,2C]``), ``encode`` ->
    ``(mean, logvar)`` with logvar clamped to [-30, 20], ``decode`` (unscaled latents -> pixels) and
    ``__call__`` (decode of the mean; used for init). ``valid`` = traced ``(t, h, w)`` extents for padded
    tiles (see module docstring); None for a whole input."""

    cfg: VAEConfig

    def setup(self):
        c = _vae_cfg(self.cfg)
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.quant_conv = Conv(2 * c.latent_channels, 1, dtype=c.dtype, param_dtype=c.param_dtype)
        self.post_quant_conv = Conv(c.latent_channels, 1, dtype=c.dtype, param_dtype=c.param_dtype)

    def moments(self, x, valid: Valid = None):
        return self.quant_conv(self.encoder(x, valid))

    def encode(self, x, valid: Valid = None):
        return split_moments(self.moments(x, valid))

    def decode(self, z, valid: Valid = None):
        return self.decoder(self.post_quant_conv(z), valid)

    def __call__(self, x):
        mean, _ = self.encode(x)
        return self.decode(mean)


def split_moments(moments):
    """``[..., 2C]`` -> ``(mean, logvar)`` (fp32) with logvar clamped to [-30, 20] (DiagonalGaussian)."""
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)


# ----------------------------------------------------------------------------------------------- params


def init_params(cfg: Config | VAEConfig, key: jax.Array) -> dict:
    """Random parameters (boxed with logical axis metadata)."""
    c = _vae_cfg(cfg)
    s = c.spatial_compression_ratio
    x = jnp.zeros((1, 1, s, s, c.in_channels), jnp.float32)
    return AutoencoderKLCausal3D(c).init(key, x)["params"]


def abstract_params(cfg: Config | VAEConfig) -> dict:
    """``jax.eval_shape`` of :func:`init_params`: nothing is allocated."""
    return jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))


def count_params(tree) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(tree))))


def _unwrap(params):
    """Accept ``{"params": tree}`` or the tree, boxed or not; numpy leaves go to the device once here (so a
    tiled call does not re-send host weights for every tile). Pass device arrays to avoid even that copy."""
    params = nn.unbox(params)
    if isinstance(params, dict) and set(params) == {"params"}:
        params = params["params"]
    return jax.tree.map(jnp.asarray, params)


# ----------------------------------------------------------------------------------------------- input checks


def validate_video(cfg: VAEConfig, video) -> None:
    shape = getattr(video, "shape", None)
    if shape is None or len(shape) != 5:
        raise ValueError(f"video must be [B, T, H, W, C] (channels-last), got shape {shape}")
    b, t, h, w, ch = shape
    if ch != cfg.in_channels:
        raise ValueError(f"video has {ch} channels in its last axis; expected {cfg.in_channels} "
                         f"(layout [B, T, H, W, C], channels-last)")
    r = cfg.time_compression_ratio
    if t < 1 or (t - 1) % r:
        raise ValueError(f"video has {t} frames; the causal VAE needs {r}k+1 frames (1, {r + 1}, {2 * r + 1}, ...)")
    s = cfg.spatial_compression_ratio
    for name, n in (("height", h), ("width", w)):
        if n < 1 or n % s:
            kind = "odd" if n % 2 else "not a multiple of the spatial compression"
            raise ValueError(f"video {name} {n} is {kind}; it must be a positive multiple of {s}")
    if b < 1:
        raise ValueError("video batch is empty")


def validate_latents(cfg: VAEConfig, z) -> None:
    shape = getattr(z, "shape", None)
    if shape is None or len(shape) != 5:
        raise ValueError(f"latents must be [B, T, H, W, C] (channels-last), got shape {shape}")
    b, t, h, w, ch = shape
    if ch != cfg.latent_channels:
        raise ValueError(f"latents have {ch} channels in their last axis; expected {cfg.latent_channels} "
                         f"(layout [B, T, H, W, C], channels-last)")
    if min(b, t, h, w) < 1:
        raise ValueError(f"latents have an empty axis: shape {tuple(shape)}")


# ----------------------------------------------------------------------------------------------- compiled fns


@functools.lru_cache(maxsize=None)
def _whole_fn(cfg: VAEConfig, method: str) -> Callable:
    model = AutoencoderKLCausal3D(cfg)
    return jax.jit(lambda p, x: model.apply({"params": p}, x, method=method))


@functools.lru_cache(maxsize=None)
def tile_fn(cfg: VAEConfig, method: str) -> Callable:
    """The jitted masked tile function ``(params, tile, valid[3]) -> output`` for ``moments``/``decode``.
    It is compiled once per tile shape; all tiles of one call share that shape."""
    model = AutoencoderKLCausal3D(cfg)

    def run(p, x, valid):
        return model.apply({"params": p}, x, (valid[0], valid[1], valid[2]), method=method)

    return jax.jit(run)


# ----------------------------------------------------------------------------------------------- tiling


def tiling_constants(cfg: VAEConfig) -> dict[str, int]:
    """Tile sizes, strides, blend extents and crop sizes of the original (spec 4.5), in their own units."""
    f = cfg.tile_overlap_factor
    s, r = cfg.spatial_compression_ratio, cfg.time_compression_ratio
    px, fr = cfg.sample_size, cfg.sample_tsize
    lat, lat_t = int(px / s), int(fr / r)
    k = dict(
        tile_px=px, tile_lat=lat, tile_fr=fr, tile_lat_t=lat_t,
        enc_stride_px=int(px * (1 - f)), enc_blend_lat=int(lat * f), enc_limit_lat=lat - int(lat * f),
        enc_stride_fr=int(fr * (1 - f)), enc_blend_lat_t=int(lat_t * f), enc_limit_lat_t=lat_t - int(lat_t * f),
        dec_stride_lat=int(lat * (1 - f)), dec_blend_px=int(px * f), dec_limit_px=px - int(px * f),
        dec_stride_lat_t=int(lat_t * (1 - f)), dec_blend_fr=int(fr * f), dec_limit_fr=fr - int(fr * f),
    )
    ok = (k["enc_stride_px"] % s == 0 and k["enc_limit_lat"] * s == k["enc_stride_px"]
          and k["enc_stride_fr"] % r == 0 and k["enc_limit_lat_t"] * r == k["enc_stride_fr"]
          and k["dec_limit_px"] == k["dec_stride_lat"] * s and k["dec_limit_fr"] == k["dec_stride_lat_t"] * r
          and min(k["enc_stride_px"], k["enc_stride_fr"], k["dec_stride_lat"], k["dec_stride_lat_t"]) > 0)
    if not ok:
        raise ValueError(f"vae tiling: sample_size={px}, sample_tsize={fr}, tile_overlap_factor={f} give tiles whose "
                         f"crops do not tile the output (use e.g. 256/64/0.25 or 32/16/0.25): {k}")
    return k


def _blend(tail, b, extent: int, axis: int) -> None:
    """In place: ``b[y] = a[len_a - e + y] (1 - y/e) + b[y] y/e`` for ``y < e = min(len_a, len_b, extent)``,
    where ``tail`` holds (at least) the last ``e`` entries of ``a`` along ``axis``."""
    e = min(tail.shape[axis], b.shape[axis], extent)
    if e <= 0:
        return
    shape = [1] * b.ndim
    shape[axis] = e
    wgt = (np.arange(e, dtype=np.float32) / np.float32(e)).reshape(shape)
    a_sl = [slice(None)] * b.ndim
    a_sl[axis] = slice(tail.shape[axis] - e, tail.shape[axis])
    b_sl = [slice(None)] * b.ndim
    b_sl[axis] = slice(0, e)
    b[tuple(b_sl)] = tail[tuple(a_sl)] * (1 - wgt) + b[tuple(b_sl)] * wgt


def _tail(x, extent: int, axis: int):
    sl = [slice(None)] * x.ndim
    sl[axis] = slice(max(x.shape[axis] - extent, 0), None)
    return np.array(x[tuple(sl)])


class _TileRunner:
    """Runs the masked tile function on host chunks, padding each to one fixed shape (edge values)."""

    def __init__(self, fn, params, shape_thw, out_size: Callable[[int, int, int], tuple[int, int, int]]):
        self.fn, self.params, self.shape, self.out_size = fn, params, shape_thw, out_size
        self.calls = 0

    def __call__(self, chunk):
        t, h, w = chunk.shape[1:4]
        tt, th, tw = self.shape
        if (t, h, w) != (tt, th, tw):
            chunk = np.pad(chunk, [(0, 0), (0, tt - t), (0, th - h), (0, tw - w), (0, 0)], mode="edge")
        out = self.fn(self.params, chunk, np.array([t, h, w], np.int32))
        self.calls += 1
        ot, oh, ow = self.out_size(t, h, w)
        return np.array(out, dtype=np.float32)[:, :ot, :oh, :ow]


def _spatial_tiled(run, x, out, tile: int, stride: int, blend: int, limit: int, active: bool) -> None:
    """Spatial tiles of ``x`` (row-major, blend above then left, crop); writes the result into ``out``."""
    h, w = x.shape[2], x.shape[3]
    if not active:
        out[...] = run(x)
        return
    above: dict[int, np.ndarray] = {}
    for ri, i in enumerate(range(0, h, stride)):
        left = None
        for ci, j in enumerate(range(0, w, stride)):
            t = run(x[:, :, i:i + tile, j:j + tile])
            if ri > 0:
                _blend(above[ci], t, blend, axis=2)
            if left is not None:
                _blend(left, t, blend, axis=3)
            crop = t[:, :, :limit, :limit]
            out[:, :, ri * limit:ri * limit + crop.shape[2], ci * limit:ci * limit + crop.shape[3]] = crop
            left = _tail(t, blend, axis=3)
            above[ci] = _tail(t, blend, axis=2)


def _tiled(run, x, out_shape, *, t_tile, t_stride, t_blend, t_limit, t_active,
           s_tile, s_stride, s_blend, s_limit, s_active, out_thw) -> np.ndarray:
    """Temporal tiles ``[i, i + t_tile + 1)`` every ``t_stride`` (drop the first output frame of later tiles,
    blend over ``t_blend``, keep ``t_limit`` (+1 for the first)); each one spatially tiled."""
    out = np.empty(out_shape, np.float32)
    b, ch = out_shape[0], out_shape[-1]
    t = x.shape[1]
    if not t_active:
        _spatial_tiled(run, x, out, s_tile, s_stride, s_blend, s_limit, s_active)
        return out
    pos, prev = 0, None
    for n, i in enumerate(range(0, t, t_stride)):
        chunk = x[:, i:i + t_tile + 1]
        if n > 0 and chunk.shape[1] == 1:
            continue                                   # one frame -> one output frame, dropped below
        ot, oh, ow = out_thw(chunk.shape[1], x.shape[2], x.shape[3])
        tile = np.empty((b, ot, oh, ow, ch), np.float32)
        _spatial_tiled(run, chunk, tile, s_tile, s_stride, s_blend, s_limit, s_active)
        if n > 0:
            tile = tile[:, 1:]
        if prev is not None:
            _blend(prev, tile, t_blend, axis=1)
        keep = tile[:, :t_limit + 1 if n == 0 else t_limit]
        out[:, pos:pos + keep.shape[1]] = keep
        pos += keep.shape[1]
        prev = _tail(tile, t_blend, axis=1)
    if pos != out_shape[1]:
        raise AssertionError(f"temporal tiling produced {pos} frames, expected {out_shape[1]}")
    return out


def tiled_moments(params, cfg: Config | VAEConfig, video) -> np.ndarray:
    """Tiled encoder + quant_conv (spec 4.5, blending on the moments): ``[B,T,H,W,3] -> [B,t,h,w,2C]``."""
    c = _vae_cfg(cfg)
    validate_video(c, video)
    k = tiling_constants(c)
    x = np.asarray(video, np.float32)
    b, t, h, w, _ = x.shape
    s, r = c.spatial_compression_ratio, c.time_compression_ratio

    def out_thw(tt, hh, ww):
        return (tt - 1) // r + 1, hh // s, ww // s

    shape = (min(t, k["tile_fr"] + 1), min(h, k["tile_px"]), min(w, k["tile_px"]))
    run = _TileRunner(tile_fn(c, "moments"), _unwrap(params), shape, out_thw)
    return _tiled(run, x, (b, *out_thw(t, h, w), 2 * c.latent_channels),
                  t_tile=k["tile_fr"], t_stride=k["enc_stride_fr"], t_blend=k["enc_blend_lat_t"],
                  t_limit=k["enc_limit_lat_t"], t_active=t > k["tile_fr"],
                  s_tile=k["tile_px"], s_stride=k["enc_stride_px"], s_blend=k["enc_blend_lat"],
                  s_limit=k["enc_limit_lat"], s_active=h > k["tile_px"] or w > k["tile_px"], out_thw=out_thw)


def tiled_decode(params, cfg: Config | VAEConfig, z) -> np.ndarray:
    """Tiled post_quant_conv + decoder (spec 4.5) of unscaled latents: ``[B,t,h,w,C] -> [B,T,H,W,3]``."""
    c = _vae_cfg(cfg)
    validate_latents(c, z)
    k = tiling_constants(c)
    x = np.asarray(z, np.float32)
    b, t, h, w, _ = x.shape
    s, r = c.spatial_compression_ratio, c.time_compression_ratio

    def out_thw(tt, hh, ww):
        return (tt - 1) * r + 1, hh * s, ww * s

    shape = (min(t, k["tile_lat_t"] + 1), min(h, k["tile_lat"]), min(w, k["tile_lat"]))
    run = _TileRunner(tile_fn(c, "decode"), _unwrap(params), shape, out_thw)
    return _tiled(run, x, (b, *out_thw(t, h, w), c.out_channels),
                  t_tile=k["tile_lat_t"], t_stride=k["dec_stride_lat_t"], t_blend=k["dec_blend_fr"],
                  t_limit=k["dec_limit_fr"], t_active=t > k["tile_lat_t"],
                  s_tile=k["tile_lat"], s_stride=k["dec_stride_lat"], s_blend=k["dec_blend_px"],
                  s_limit=k["dec_limit_px"], s_active=h > k["tile_lat"] or w > k["tile_lat"], out_thw=out_thw)


# ----------------------------------------------------------------------------------------------- helpers


def encode_moments(params, cfg: Config | VAEConfig, video, tiled: bool = True):
    """Moments ``[B,t,h,w,2C]`` (fp32) of a video, tiled as the original or in one pass."""
    c = _vae_cfg(cfg)
    validate_video(c, video)
    if tiled:
        return jnp.asarray(tiled_moments(params, c, video))
    return _whole_fn(c, "moments")(_unwrap(params), jnp.asarray(video, jnp.float32)).astype(jnp.float32)


def encode_posterior(params, cfg: Config | VAEConfig, video, tiled: bool = True):
    """``(mean, logvar)`` (fp32, logvar clamped to [-30, 20]) of the diagonal Gaussian posterior."""
    c = _vae_cfg(cfg)
    validate_video(c, video)
    if tiled:
        return split_moments(jnp.asarray(tiled_moments(params, c, video)))
    return _whole_fn(c, "encode")(_unwrap(params), jnp.asarray(video, jnp.float32))


def encode_video(params, cfg: Config | VAEConfig, video, key: jax.Array | None = None, tiled: bool = True):
    """Video ``[B,T,H,W,3]`` in [-1, 1] (T = 4k+1, H and W multiples of 8) -> scaled latents ``[B,t,h,w,C]``.

    ``key`` None: the posterior mean (deterministic; the original samples instead, spec 4.6).
    ``key`` given: ``mean + exp(logvar / 2) * N(0, 1)`` drawn with ``key`` (the original's behaviour, with a
    JAX RNG instead of torch's). Either way the result is multiplied by ``cfg.scaling_factor``.
    """
    c = _vae_cfg(cfg)
    mean, logvar = encode_posterior(params, c, video, tiled)
    z = mean
    if key is not None:
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, jnp.float32)
    return z * c.scaling_factor


def decode_latents(params, cfg: Config | VAEConfig, latents, tiled: bool = True, clip: bool = True):
    """Scaled latents ``[B,t,h,w,C]`` -> pixels ``[B,4(t-1)+1,8h,8w,3]`` (fp32) in [-1, 1].

    Latents are divided by ``cfg.scaling_factor`` first. ``clip`` clamps to [-1, 1], which is what the
    pipeline's ``clamp(x/2 + 0.5, 0, 1)`` amounts to; ``clip=False`` returns the raw decoder output.
    """
    c = _vae_cfg(cfg)
    validate_latents(c, latents)
    z = jnp.asarray(latents, jnp.float32) / c.scaling_factor
    if tiled:
        x = jnp.asarray(tiled_decode(params, c, np.asarray(z)))
    else:
        x = _whole_fn(c, "decode")(_unwrap(params), z).astype(jnp.float32)
    return jnp.clip(x, -1.0, 1.0) if clip else x
