"""The denoising loop of HunyuanCustom sampling as ONE compiled function (spec 6).

``Conditions`` holds everything the DiT consumes, already batched for guidance: ``[uncond, cond]`` for CFG
(``cfg_scale > 1``), ``[neg/white-ref, pos/white-ref, pos/real-ref]`` for ip-CFG, or ``[cond]`` alone.
``make_denoise_fn`` returns a jitted ``(params, noise, conds, sigmas) -> latents`` that runs all N steps inside
``lax.fori_loop``: CFG / ip-CFG combination in the DiT compute dtype (bf16 in the released setting), the Euler
update in fp32, and the step cache (spec 6.4) as an explicit carry: full steps store the input of the last single
block; cached steps run only that block (``lax.cond``), so a cached step costs one block.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from .config import DiTConfig
from .dit import HunyuanDiT, StepCache
from .layers import to_dtype
from .scheduler import deepcache_mask, euler_step


@flax.struct.dataclass
class Conditions:
    text_states: jax.Array            # [Bc, S, Dt]
    text_mask: jax.Array              # [Bc, S]
    text_states_2: jax.Array          # [Bc, D2]
    ref_latents: Any = None           # [Bc, 1, H, W, C]
    audio_features: Any = None        # [Bc, F, 10, 5, 384]
    bg_latents: Any = None            # [Bc, T, H, W, 32]

    @property
    def batch(self) -> int:
        return self.text_states.shape[0]


@dataclasses.dataclass(frozen=True)
class Guidance:
    cfg_scale: float = 7.5
    ip_cfg_scale: float = 0.0
    use_deepcache: bool = True
    audio_strength: float = 1.0

    def branches(self) -> int:
        if self.ip_cfg_scale > 0:
            return 3
        return 2 if self.cfg_scale > 1.0 else 1


def combine(v: jax.Array, step: jax.Array, num_steps: int, g: Guidance, dtype) -> jax.Array:
    """Guidance combination of the per-branch velocities ``v [Bc, ...]`` -> ``[1, ...]`` (spec 6.3)."""
    v = v.astype(dtype)
    if g.ip_cfg_scale > 0:
        s = g.ip_cfg_scale - step.astype(jnp.float32) * (g.ip_cfg_scale - 1.0) / (num_steps - 1 + 1e-3)
        vu, vt, vip = v[0:1], v[1:2], v[2:3]
        return vu + jnp.asarray(g.cfg_scale, dtype) * (vt - vu) + s.astype(dtype) * (vip - vt)
    if g.cfg_scale > 1.0:
        vu, vc = v[0:1], v[1:2]
        return vu + jnp.asarray(g.cfg_scale, dtype) * (vc - vu)
    return v


def _cache_shape(cfg: DiTConfig, latents_shape, conds: Conditions):
    _, t, h, w, _ = latents_shape
    pt, ph, pw = cfg.patch_size
    n = (t // pt) * (h // ph) * (w // pw)
    if conds.ref_latents is not None:
        n += (h // ph) * (w // pw)
    return (conds.batch, n + conds.text_states.shape[1], cfg.hidden_size)


def make_denoise_fn(cfg: DiTConfig, num_steps: int, guidance: Guidance):
    """Build the compiled N-step loop for fixed settings (one compilation per input shape)."""
    dit = HunyuanDiT(cfg)
    dtype = to_dtype(cfg.dtype)
    cached_steps = deepcache_mask(num_steps, guidance.use_deepcache)
    use_cache = bool(cached_steps.any())

    def model(params, x, t, conds: Conditions, **kw):
        b = conds.batch
        xb = jnp.broadcast_to(x, (b, *x.shape[1:])).astype(dtype)
        extra = {}
        if conds.audio_features is not None:
            extra = dict(audio_features=conds.audio_features, audio_strength=guidance.audio_strength)
        return dit.apply({"params": params}, xb, jnp.full((b,), t, jnp.float32), conds.text_states,
                         conds.text_mask, conds.text_states_2, ref_latents=conds.ref_latents,
                         bg_latents=conds.bg_latents, **extra, **kw)

    @jax.jit
    def denoise(params, noise, conds: Conditions, sig):
        if conds.batch != guidance.branches():
            raise ValueError(f"conditions have batch {conds.batch}; guidance {guidance} needs "
                             f"{guidance.branches()} branches")
        sig = sig.astype(jnp.float32)
        flags = jnp.asarray(cached_steps)

        def body(i, carry):
            x, cache = carry
            t = sig[i] * 1000.0
            if use_cache:
                def full(_):
                    v, c = model(params, x, t, conds, return_cache=True)
                    return v, c.x.astype(cache.dtype)

                def cached(_):
                    return model(params, x, t, conds, cache=StepCache(cache)), cache

                v, cache = jax.lax.cond(flags[i], cached, full, None)
            else:
                v = model(params, x, t, conds)
            v = combine(v, i, num_steps, guidance, dtype)
            return euler_step(x, v, sig[i], sig[i + 1]), cache

        cache0 = jnp.zeros(_cache_shape(cfg, noise.shape, conds) if use_cache else (0,), dtype)
        x0 = noise.astype(jnp.float16).astype(jnp.float32)   # the original draws fp16 noise (spec 6.2)
        x, _ = jax.lax.fori_loop(0, num_steps, body, (x0, cache0))
        return x

    return denoise


@functools.partial(jax.jit, static_argnames=("shape",))
def initial_noise(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Initial latents ``[1, T, H, W, C]`` (a JAX RNG stream; the original's CUDA generator is not reproducible)."""
    return jax.random.normal(key, shape, jnp.float32)


def python_loop_reference(cfg: DiTConfig, num_steps: int, guidance: Guidance, params, noise, conds, sig):
    """The same steps as ``make_denoise_fn`` as a plain Python loop of jitted single steps (for tests/debugging)."""
    dit = HunyuanDiT(cfg)
    dtype = to_dtype(cfg.dtype)
    flags = deepcache_mask(num_steps, guidance.use_deepcache)
    x = jnp.asarray(noise).astype(jnp.float16).astype(jnp.float32)
    cache = None
    b = conds.batch
    kw = dict(ref_latents=conds.ref_latents, bg_latents=conds.bg_latents)
    if conds.audio_features is not None:
        kw.update(audio_features=conds.audio_features, audio_strength=guidance.audio_strength)
    plain = jax.jit(lambda p, a, k: dit.apply({"params": p}, *a, **k))
    store = jax.jit(lambda p, a, k: dit.apply({"params": p}, *a, **k, return_cache=True))
    reuse = jax.jit(lambda p, a, k, c: dit.apply({"params": p}, *a, **k, cache=StepCache(c)))
    for i in range(num_steps):
        t = jnp.full((b,), np.float32(sig[i]) * np.float32(1000.0), jnp.float32)
        xb = jnp.broadcast_to(x, (b, *x.shape[1:])).astype(dtype)
        args = (xb, t, conds.text_states, conds.text_mask, conds.text_states_2)
        if flags[i]:
            v = reuse(params, args, kw, cache)
        elif flags.any():
            v, stored = store(params, args, kw)
            cache = stored.x
        else:
            v = plain(params, args, kw)
        v = combine(v, jnp.asarray(i), num_steps, guidance, dtype)
        x = euler_step(x, v, jnp.float32(sig[i]), jnp.float32(sig[i + 1]))
    return x
