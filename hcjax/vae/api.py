"""Encode videos to scaled latents and decode latents to pixels with the 3D causal VAE, tiled or in one pass.

Video ``[B, T, H, W, 3]`` in [-1, 1] (T = 4k+1, H and W multiples of 8); latents ``[B, t, h, w, C]`` multiplied
by ``cfg.scaling_factor``. Posterior: ``encode_video`` returns the scaled mean when ``key`` is None and
``mean + std * N(0, 1)`` drawn with ``key`` otherwise; the original samples with the torch global RNG (spec 4.6),
which cannot be reproduced bit-exactly here, so pass a key to match its distribution or omit it for the
deterministic mean.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ..config import Config, VAEConfig
from .checks import validate_latents, validate_video
from .model import AutoencoderKLCausal3D, split_moments, unwrap_params, vae_config
from .tiling import tiled_decode, tiled_moments


@functools.lru_cache(maxsize=None)
def _whole_fn(cfg: VAEConfig, method: str) -> Callable:
    model = AutoencoderKLCausal3D(cfg)
    return jax.jit(lambda p, x: model.apply({"params": p}, x, method=method))


def encode_moments(params, cfg: Config | VAEConfig, video, tiled: bool = True):
    """Moments ``[B,t,h,w,2C]`` (fp32) of a video, tiled as the original or in one pass."""
    c = vae_config(cfg)
    validate_video(c, video)
    if tiled:
        return jnp.asarray(tiled_moments(params, c, video))
    return _whole_fn(c, "moments")(unwrap_params(params), jnp.asarray(video, jnp.float32)).astype(jnp.float32)


def encode_posterior(params, cfg: Config | VAEConfig, video, tiled: bool = True):
    """``(mean, logvar)`` (fp32, logvar clamped to [-30, 20]) of the diagonal Gaussian posterior."""
    c = vae_config(cfg)
    validate_video(c, video)
    if tiled:
        return split_moments(jnp.asarray(tiled_moments(params, c, video)))
    return _whole_fn(c, "encode")(unwrap_params(params), jnp.asarray(video, jnp.float32))


def encode_video(params, cfg: Config | VAEConfig, video, key: jax.Array | None = None, tiled: bool = True):
    """Video ``[B,T,H,W,3]`` in [-1, 1] (T = 4k+1, H and W multiples of 8) -> scaled latents ``[B,t,h,w,C]``.

    ``key`` None: the posterior mean (deterministic; the original samples instead, spec 4.6).
    ``key`` given: ``mean + exp(logvar / 2) * N(0, 1)`` drawn with ``key`` (the original's behaviour, with a
    JAX RNG instead of torch's). Either way the result is multiplied by ``cfg.scaling_factor``.
    """
    c = vae_config(cfg)
    mean, logvar = encode_posterior(params, c, video, tiled)
    z = mean
    if key is not None:
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, jnp.float32)
    return z * c.scaling_factor


def decode_latents(params, cfg: Config | VAEConfig, latents, tiled: bool = True, clip: bool = True, mesh=None):
    """Scaled latents ``[B,t,h,w,C]`` -> pixels ``[B,4(t-1)+1,8h,8w,3]`` (fp32) in [-1, 1].

    Latents are divided by ``cfg.scaling_factor`` first. ``clip`` clamps to [-1, 1], which is what the
    pipeline's ``clamp(x/2 + 0.5, 0, 1)`` amounts to; ``clip=False`` returns the raw decoder output.
    ``mesh`` (tiled only): the tiles of all B samples spread over its devices, one per device at a time
    (:func:`hcjax.vae.tiling.tiled_decode`); the same result as one device.
    """
    c = vae_config(cfg)
    validate_latents(c, latents)
    if mesh is not None and not tiled:
        raise ValueError("decode_latents(mesh=...) spreads the tiles of the tiled decode; pass tiled=True")
    z = np.asarray(latents, np.float32) / np.float32(c.scaling_factor)
    if tiled:
        x = jnp.asarray(tiled_decode(params, c, z, mesh=mesh))
    else:
        x = _whole_fn(c, "decode")(unwrap_params(params), jnp.asarray(z)).astype(jnp.float32)
    return jnp.clip(x, -1.0, 1.0) if clip else x
