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


# ------------------------------------------------------------------------ adaptive step caches (issue 26)
#
# TeaCache and MagCache decide per step whether to run the block stacks ("full step") or reuse the residual of the
# last full step (output - input of the stacks on the video tokens). The decisions are pure functions of a small
# carried state, evaluated inside the compiled loop (``hcjax.pipeline.make_denoise_fn``).

CACHE_MODES = ("deepcache", "teacache", "magcache", "none")
DEFAULT_THRESHOLDS = {"teacache": 0.15, "magcache": 0.12}

# TeaCache's rescaling polynomial for HunyuanVideo (highest power first), mapping the relative L1 distance of the
# first double block's modulated image input between steps to an estimate of the output's change. Published in
# TeaCache4HunyuanVideo/teacache_sample_video.py of the TeaCache repository (github.com/ali-vilab/TeaCache; the
# same file in the wallkop/TeaCache mirror), used there with thresholds 0.1 (1.6x) and 0.15 (2.1x).
TEACACHE_HUNYUAN_POLY = (7.33226126e+02, -4.01131952e+02, 6.75869174e+01, -3.14987800e+00, 9.61237896e-02)


def teacache_rescale(rel_l1: jax.Array) -> jax.Array:
    """The polynomial of the relative L1 distance, clamped at 0 (distances only accumulate)."""
    return jnp.maximum(jnp.polyval(jnp.asarray(TEACACHE_HUNYUAN_POLY, jnp.float32), rel_l1.astype(jnp.float32)),
                       0.0)


def teacache_decide(step, num_steps: int, rel_l1, acc, threshold: float):
    """-> ``(skip, acc')``: accumulate the rescaled distance; skip while the sum stays below ``threshold``;
    a full step (and the first and last steps always) resets the sum."""
    acc_new = acc + teacache_rescale(rel_l1)
    forced = (step == 0) | (step == num_steps - 1)
    skip = jnp.logical_not(forced) & (acc_new < threshold)
    return skip, jnp.where(skip, acc_new, 0.0)


def magcache_decide(step, num_steps: int, ratio_i, state, threshold: float, max_skip: int, retain: int):
    """-> ``(skip, state')`` with ``state = (accumulated ratio, accumulated error, skipped in a row)``: the
    product of the calibrated magnitude ratios since the last full step estimates how far the residual has
    drifted; its error ``|1 - prod|`` accumulates; skip while the error stays below ``threshold`` and at most
    ``max_skip`` steps in a row. The first ``retain`` steps and the last step always run in full."""
    ratio, err, k = state
    ratio_new = ratio * ratio_i
    err_new = err + jnp.abs(1.0 - ratio_new)
    k_new = k + 1
    forced = (step < retain) | (step == num_steps - 1)
    skip = jnp.logical_not(forced) & (err_new < threshold) & (k_new <= max_skip)
    keep = lambda a, reset: jnp.where(skip, a, reset)  # noqa: E731
    return skip, (keep(ratio_new, 1.0), keep(err_new, 0.0), keep(k_new, 0))


def magcache_ratios(ratios, num_steps: int) -> np.ndarray:
    """Calibrated per-step magnitude ratios ``[M]`` resampled to ``num_steps`` (linear in the step fraction)."""
    r = np.asarray(ratios, np.float64)
    if r.ndim != 1 or len(r) < 2 or not np.all(np.isfinite(r)) or np.any(r <= 0):
        raise ValueError(f"magcache ratios must be a list of >= 2 positive numbers; got {list(r)[:8]}...")
    if len(r) == num_steps:
        return r.astype(np.float32)
    return np.interp(np.linspace(0, 1, num_steps), np.linspace(0, 1, len(r)), r).astype(np.float32)


def training_sigmas(key: jax.Array, batch: int, shift: float = 1.0, mode: str = "logit_normal") -> jax.Array:
    """Per-sample training noise levels in (0, 1): logit-normal (SD3-style) or uniform, then shifted."""
    if mode == "logit_normal":
        s = jax.nn.sigmoid(jax.random.normal(key, (batch,)))
    elif mode == "uniform":
        s = jax.random.uniform(key, (batch,), minval=1e-3, maxval=1.0)
    else:
        raise ValueError(f"unknown timestep sampling mode {mode!r}; expected logit_normal or uniform")
    return shift * s / (1.0 + (shift - 1.0) * s)
