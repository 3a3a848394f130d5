"""The 3D causal VAE (HunyuanVideo ``AutoencoderKLCausal3D``, 884-16c-hy0801) as Flax modules, and its params.

Ports ``hymm_sp/vae/autoencoder_kl_causal_3d.py`` (+ ``unet_causal_3d_blocks.py``, ``vae.py``) as used by
HunyuanCustom; diffusers' ``AutoencoderKLHunyuanVideo`` has the same parameter names and numerics and is the
test reference. Spec: ``hunyuancustom.md`` section 4.

Layouts (channels-last): video ``[B, T, H, W, 3]`` in [-1, 1]; latents ``[B, t, h, w, C]`` with
``t = (T - 1) / 4 + 1``, ``h = H / 8``, ``w = W / 8``; moments ``[B, t, h, w, 2C]`` (mean, logvar).
Submodule names follow the reference attributes with list indices joined by ``_`` (``down_blocks_0``,
``resnets_1``, ``attentions_0/to_out_0``); leaves are ``kernel`` (conv ``[kt, kh, kw, in, out]``, linear
``[in, out]``), ``bias`` and ``scale`` (GroupNorm). Convolutions/linears run in ``cfg.dtype``.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..config import Config, VAEConfig
from ..layers import Dense, to_dtype
from .layers import CausalConv3d, Conv, GroupNorm, Valid, frame_causal_attention


def vae_config(cfg: Config | VAEConfig) -> VAEConfig:
    """The VAE section of a full config (or the VAE config itself)."""
    return cfg.vae if isinstance(cfg, Config) else cfg


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


# ----------------------------------------------------------------------------------------------- blocks


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


class Attention(nn.Module):
    """Mid-block self-attention: group_norm -> to_q/to_k/to_v -> frame-causal attention -> to_out_0, + x."""

    cfg: VAEConfig

    @nn.compact
    def __call__(self, x, valid: Valid = None):
        c = self.cfg
        b, t, h, w, ch = x.shape
        # the shared Dense with kernel [in, out] on (conv_in, conv_out) and bias [out] on conv_out: the same
        # parameter tree (and fan-in truncated-normal = LeCun init) as the reference's nn.Linear layout
        kw = dict(axes=("conv_in", "conv_out"), dtype=to_dtype(c.dtype), param_dtype=to_dtype(c.param_dtype),
                  kernel_init=nn.initializers.lecun_normal())
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
        c = vae_config(self.cfg)
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
    c = vae_config(cfg)
    s = c.spatial_compression_ratio
    x = jnp.zeros((1, 1, s, s, c.in_channels), jnp.float32)
    return AutoencoderKLCausal3D(c).init(key, x)["params"]


def abstract_params(cfg: Config | VAEConfig) -> dict:
    """``jax.eval_shape`` of :func:`init_params`: nothing is allocated."""
    return jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))


def count_params(tree) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(tree))))


def unwrap_params(params):
    """Accept ``{"params": tree}`` or the tree, boxed or not; numpy leaves go to the device once here (so a
    tiled call does not re-send host weights for every tile). Pass device arrays to avoid even that copy."""
    params = nn.unbox(params)
    if isinstance(params, dict) and set(params) == {"params"}:
        params = params["params"]
    return jax.tree.map(jnp.asarray, params)
