"""Flow matching (``FlowMatchDiscreteScheduler``, Euler, reverse) as used by HunyuanCustom (spec 6.1).

``sigma_i = shift(linspace(1, 0, N+1))`` with ``shift(s) = k s / (1 + (k - 1) s)``; the DiT sees
``t_i = 1000 sigma_i`` (float, first step exactly 1000); the model predicts the velocity and the update is
``x_{i+1} = x_i + v_i (sigma_{i+1} - sigma_i)`` in fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Steps run as "cached" (only the last single block) when sampling with exactly 30 steps (spec 6.4).
DEEPCACHE_STEPS = (11, 12, 14, 15, 17, 18, 20, 21)
DEEPCACHE_NUM_STEPS = 30


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    return (shift * sigmas / (1.0 + (shift - 1.0) * sigmas)).astype(np.float32)


def sigmas(num_steps: int, shift: float) -> np.ndarray:
    """``[N+1]`` float32 noise levels from 1 to 0 (shifted)."""
    if num_steps < 1:
        raise ValueError(f"number of inference steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"flow shift must be > 0, got {shift}")
    return shift_sigmas(np.linspace(1.0, 0.0, num_steps + 1, dtype=np.float32), shift)


def timesteps(sig: np.ndarray) -> np.ndarray:
    """DiT timesteps ``1000 * sigma_i`` for the ``N`` steps (float32)."""
    return (np.float32(1000.0) * sig[:-1]).astype(np.float32)


def euler_step(x: jax.Array, v: jax.Array, sigma: jax.Array, sigma_next: jax.Array) -> jax.Array:
    """One Euler update in fp32."""
    return x.astype(jnp.float32) + v.astype(jnp.float32) * (sigma_next - sigma).astype(jnp.float32)


def deepcache_mask(num_steps: int, enabled: bool = True) -> np.ndarray:
    """Boolean ``[N]``: which steps reuse the stored last-single-block input (only at exactly 30 steps)."""
    mask = np.zeros(num_steps, bool)
    if enabled and num_steps == DEEPCACHE_NUM_STEPS:
        mask[list(DEEPCACHE_STEPS)] = True
    return mask


def training_sigmas(key: jax.Array, batch: int, shift: float = 1.0, mode: str = "logit_normal") -> jax.Array:
    """Per-sample training noise levels in (0, 1): logit-normal (SD3-style) or uniform, then shifted."""
    if mode == "logit_normal":
        s = jax.nn.sigmoid(jax.random.normal(key, (batch,)))
    elif mode == "uniform":
        s = jax.random.uniform(key, (batch,), minval=1e-3, maxval=1.0)
    else:
        raise ValueError(f"unknown timestep sampling mode {mode!r}; expected logit_normal or uniform")
    return shift * s / (1.0 + (shift - 1.0) * s)
