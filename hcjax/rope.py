"""3D rotary position embedding of HunyuanVideo, with HunyuanCustom's reference-frame positions.

Ports ``get_nd_rotary_pos_embed`` (``hymm_sp/modules/posemb_layers.py``) for the ``timecat-w`` mode: the video
grid ``(t, h, w)`` in row-major order, optionally preceded by one reference slice at ``t = -1`` with ``w``
shifted by ``W'``. Multi-subject (issue 24, not in the release): ``K`` reference slices, slice ``k = 1..K`` at
``t = -k``, each with the same ``w + W'`` shift, in that order ahead of the video (``K = 1`` is the release).
Per axis ``d`` (``rope_dim_list``), ``omega_j = theta^(-2j/d)``; cos/sin are repeated interleaved (``c0, c0, c1,
c1, ...``) and concatenated over (t, h, w) -> tables ``[L, sum(dims)]`` in fp32. Rotation uses
interleaved pairs ``(x_2i, x_2i+1)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def axis_freqs(pos: jax.Array, dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin ``[n, dim]`` for positions ``pos [n]`` on one axis (interleaved repeat), fp32."""
    omega = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32)[: dim // 2] / dim))
    ang = pos.astype(jnp.float32)[:, None] * omega[None, :]
    return jnp.repeat(jnp.cos(ang), 2, axis=-1), jnp.repeat(jnp.sin(ang), 2, axis=-1)


def position_grid(grid: Sequence[int], with_ref: bool | int, ref_columns: bool = False) -> jax.Array:
    """Positions ``[L, 3]`` (t, h, w): ``K = int(with_ref)`` reference slices first (slice ``k`` at ``t = -k``,
    ``w + W'``; ``True`` = one), then the video grid. ``ref_columns``: slice ``k`` holds only the ``k``-th of ``K``
    equal columns of its frame (``W' / K`` wide, at the same ``w + W'`` as in the whole frame)."""
    t, h, w = grid
    n_ref = int(with_ref)
    if n_ref < 0:
        raise ValueError(f"rope: the number of reference slices must be >= 0; got {n_ref}")
    tt, hh, ww = jnp.meshgrid(jnp.arange(t), jnp.arange(h), jnp.arange(w), indexing="ij")
    pos = jnp.stack([tt, hh, ww], axis=-1).reshape(-1, 3).astype(jnp.float32)
    if n_ref:
        cols = n_ref if ref_columns else 1
        if w % cols:
            raise ValueError(f"rope: {n_ref} reference columns do not divide a grid {w} tokens wide")
        rk, rh, rw = jnp.meshgrid(jnp.arange(1, n_ref + 1), jnp.arange(h), jnp.arange(w // cols), indexing="ij")
        if ref_columns:
            rw = rw + (rk - 1) * (w // cols)
        ref = jnp.stack([-rk, rh, rw + w], axis=-1).reshape(-1, 3).astype(jnp.float32)
        pos = jnp.concatenate([ref, pos], axis=0)
    return pos


def rope_tables(grid: Sequence[int], dims: Sequence[int], theta: float, with_ref: bool | int = False,
                ref_columns: bool = False):
    """cos, sin ``[L, sum(dims)]`` for the token grid ``(T', H', W')`` (+ ``int(with_ref)`` reference slices, each
    one column of its frame with ``ref_columns``: :func:`position_grid`)."""
    if len(grid) != len(dims):
        raise ValueError(f"rope: grid {tuple(grid)} and rope_dim_list {tuple(dims)} must have the same length")
    pos = position_grid(grid, with_ref, ref_columns)
    parts = [axis_freqs(pos[:, i], d, theta) for i, d in enumerate(dims)]
    return jnp.concatenate([c for c, _ in parts], axis=-1), jnp.concatenate([s for _, s in parts], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [B, L, N, K]`` by tables ``[L, K]`` (interleaved pairs) in fp32; returns ``x.dtype``."""
    x32 = x.astype(jnp.float32)
    pairs = x32.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    out = x32 * cos[None, :, None, :] + rotated * sin[None, :, None, :]
    return out.astype(x.dtype)
