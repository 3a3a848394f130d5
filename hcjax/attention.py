"""The attention dispatch: one function for every DiT attention call.

``dot_product_attention(q, k, v, kv_lengths=..., impl=...)`` with ``q, k, v [B, L, N, K]`` implements the
original's varlen flash attention (spec 5.7) by key-padding: for sample ``b`` every query sees keys
``[0, kv_lengths[b])``. Outputs on valid queries equal the original; padded queries (text padding at the tail)
see the valid keys too, so they stay finite and are discarded later. Implementations:

* ``xla``     ``jax.nn.dot_product_attention(..., key_value_seq_lengths=...)`` (XLA softmax attention)
* ``cudnn``   the same call with ``implementation="cudnn"`` (GPU only; raises elsewhere, never falls back)
* ``chunked`` blockwise attention with an online softmax in fp32 (flash-style, O(L) memory), pure JAX

``masked_attention`` is the small dense-mask variant used by the token refiner (arbitrary boolean masks).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

IMPLS = ("xla", "cudnn", "chunked")
_NEG = -1e30  # finite "minus infinity": a fully masked row can never produce NaN


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    kv_lengths: jax.Array,
    impl: str = "chunked",
    block_q: int = 512,
    block_kv: int = 512,
) -> jax.Array:
    if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"attention expects q [B,L,N,K] and k, v [B,S,N,K]; got {q.shape}, {k.shape}, {v.shape}")
    kv_lengths = kv_lengths.astype(jnp.int32)
    if impl in ("xla", "cudnn"):
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=kv_lengths, implementation=impl)
    if impl == "chunked":
        return chunked_attention(q, k, v, kv_lengths, block_q=block_q, block_kv=block_kv)
    raise ValueError(f"unknown attention implementation {impl!r}; expected one of {IMPLS}")


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    n = x.shape[axis]
    extra = (-n) % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


@functools.partial(jax.jit, static_argnames=("block_q", "block_kv"))
def chunked_attention(q, k, v, kv_lengths, *, block_q: int = 512, block_kv: int = 512):
    """Online-softmax attention over key blocks, one query block at a time. Scores in fp32."""
    b, lq, n, d = q.shape
    lk = k.shape[1]
    bq, bk = min(block_q, lq), min(block_kv, lk)
    qp, kp, vp = _pad_to(q, 1, bq), _pad_to(k, 1, bk), _pad_to(v, 1, bk)
    nq, nk = qp.shape[1] // bq, kp.shape[1] // bk
    scale = d ** -0.5
    qb = qp.reshape(b, nq, bq, n, d).transpose(1, 0, 3, 2, 4)          # [nq, B, N, bq, K]
    kb = kp.reshape(b, nk, bk, n, d).transpose(1, 0, 3, 2, 4)          # [nk, B, N, bk, K]
    vb = vp.reshape(b, nk, bk, n, d).transpose(1, 0, 3, 2, 4)

    def q_block(qi):
        def step(carry, inp):
            m, l, acc = carry
            kj, vj, j = inp
            s = jnp.einsum("bnqd,bnkd->bnqk", qi, kj, preferred_element_type=jnp.float32) * scale
            valid = (j * bk + jnp.arange(bk))[None, :] < kv_lengths[:, None]            # [B, bk]
            valid = valid[:, None, None, :]
            s = jnp.where(valid, s, _NEG)
            m_new = jnp.maximum(m, s.max(axis=-1))
            p = jnp.where(valid, jnp.exp(s - m_new[..., None]), 0.0)
            alpha = jnp.exp(m - m_new)
            l = l * alpha + p.sum(axis=-1)
            acc = acc * alpha[..., None] + jnp.einsum(
                "bnqk,bnkd->bnqd", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32
            )
            return (m_new, l, acc), None

        init = (
            jnp.full((b, n, bq), _NEG, jnp.float32),
            jnp.zeros((b, n, bq), jnp.float32),
            jnp.zeros((b, n, bq, d), jnp.float32),
        )
        (m, l, acc), _ = jax.lax.scan(jax.checkpoint(step), init, (kb, vb, jnp.arange(nk)))
        return (acc / jnp.maximum(l, 1e-30)[..., None]).astype(q.dtype)

    out = jax.lax.map(q_block, qb)                                      # [nq, B, N, bq, K]
    out = out.transpose(1, 0, 3, 2, 4).reshape(b, nq * bq, n, d)
    return out[:, :lq]


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Dense attention with a boolean ``mask [B, 1|N, Lq, Lk]`` (True = may attend); softmax in fp32."""
    scale = q.shape[-1] ** -0.5
    s = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32) * scale
    s = jnp.where(mask, s, _NEG)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(mask, p, 0.0)
    return jnp.einsum("bnqk,bknd->bqnd", p.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(q.dtype)
