"""Attention dispatch: kernels against a float64 numpy reference, padding semantics, splash segment ids,
Ulysses / ring sequence parallelism on the 8 fake CPU devices (with sequence and batch padding), bad input."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hcjax import attention as A
from hcjax.axes import AXES, DEFAULT_RULES

TOL = 2e-5  # fp32 kernels vs the float64 reference (measured ~5e-7)


def reference(q, k, v, kv_lengths, segments: bool = False) -> np.ndarray:
    """Float64 attention. Key padding: query i sees keys < V_b. ``segments``: the original's varlen semantics
    (spec 5.7): tokens < V_b and tokens >= V_b form two segments that attend only within themselves."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s = np.einsum("bqnd,bknd->bnqk", q, k) / math.sqrt(q.shape[-1])
    lens = np.asarray(kv_lengths)[:, None]
    kval = np.arange(k.shape[1])[None, :] < lens                        # [B, Lk]
    if segments:
        qval = np.arange(q.shape[1])[None, :] < lens
        allowed = qval[:, :, None] == kval[:, None, :]                  # [B, Lq, Lk]
    else:
        allowed = np.broadcast_to(kval[:, None, :], (q.shape[0], q.shape[1], k.shape[1]))
    s = np.where(allowed[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnqk,bknd->bqnd", p, v)


def qkv(b, length, n, d, seed=0, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(key, (b, length, n, d), dtype) for key in ks)


def mesh_of(shape):
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)


# ------------------------------------------------------------------------------------------- local kernels


@pytest.mark.parametrize("length, lens, bq, bk", [
    (32, (32, 32), 8, 8),          # no padding, blocks divide L
    (27, (27, 11), 8, 8),          # padding; L not a multiple of the blocks
    (27, (20, 1), 16, 5),          # a single valid key; unequal, non-dividing blocks
    (40, (40, 3), 64, 64),         # blocks larger than L
])
def test_chunked_equals_xla_with_and_without_padding(length, lens, bq, bk):
    q, k, v = qkv(2, length, 3, 8, seed=length)
    kv = jnp.asarray(lens)
    want = reference(q, k, v, kv)
    xla = np.asarray(A.dot_product_attention(q, k, v, kv_lengths=kv, impl="xla"))
    chunked = np.asarray(A.dot_product_attention(q, k, v, kv_lengths=kv, impl="chunked", block_q=bq, block_kv=bk))
    assert np.isfinite(chunked).all() and np.isfinite(xla).all()      # padded query rows included
    err_c, err_x, err_cx = (float(np.abs(a - b).max()) for a, b in ((chunked, want), (xla, want), (chunked, xla)))
    print(f"L={length} lens={lens}: chunked {err_c:.1e}, xla {err_x:.1e}, chunked-xla {err_cx:.1e}")
    assert max(err_c, err_x, err_cx) <= TOL


def test_padded_rows_finite_in_bf16_and_masked_keys_ignored():
    q, k, v = qkv(2, 24, 2, 16, seed=3, dtype=jnp.bfloat16)
    kv = jnp.asarray([5, 1])
    out = A.dot_product_attention(q, k, v, kv_lengths=kv, impl="chunked", block_q=8, block_kv=8)
    assert np.isfinite(np.asarray(out, np.float32)).all()
    # Keys beyond kv_lengths must not matter: replace them by huge values.
    k2 = k.at[:, 5:].set(1e4)
    v2 = v.at[:, 5:].set(-3e4)
    out2 = A.dot_product_attention(q, k2, v2, kv_lengths=kv, impl="chunked", block_q=8, block_kv=8)
    np.testing.assert_array_equal(np.asarray(out[0], np.float32), np.asarray(out2[0], np.float32))


def test_chunked_gradients_match_xla_with_ragged_blocks():
    q, k, v = qkv(2, 13, 2, 8, seed=9)                 # 13 = 2 blocks of 5 + an overlapping last block
    kv = jnp.asarray([13, 7])
    w = jnp.arange(13.0)[None, :, None, None]

    def grads(impl, **kw):
        def loss(q, k, v):
            return jnp.sum(A.dot_product_attention(q, k, v, kv_lengths=kv, impl=impl, **kw) ** 2 * w)

        return jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v)

    err = max(float(jnp.abs(a - b).max()) for a, b in zip(grads("chunked", block_q=5, block_kv=5), grads("xla")))
    print(f"chunked grad max abs err {err:.1e}")
    assert err <= 1e-4


def test_chunked_bf16_keeps_no_full_size_fp32_copies():
    """Beyond its inputs and output, the kernel holds one query block's fp32 state and scores, not fp32 (or
    padded / transposed) copies of the whole q, k, v or output (the previous kernel held ~6 fp32 copies). XLA
    copies the three bf16 entry parameters for the loop (1.5 fp32 copies of q): temporaries < 2 fp32 copies."""
    b, length, n, d, blk = 1, 16411, 4, 64, 256         # ragged: the blocks do not divide the length
    shape = jax.ShapeDtypeStruct((b, length, n, d), jnp.bfloat16)
    lens = jax.ShapeDtypeStruct((b,), jnp.int32)
    compiled = jax.jit(lambda q, k, v, kv: A.chunked_attention(q, k, v, kv, block_q=blk, block_kv=blk)).lower(
        shape, shape, shape, lens).compile()
    mem = compiled.memory_analysis()
    fp32_q = b * length * n * d * 4
    print(f"temporaries {mem.temp_size_in_bytes / 1e6:.2f} MB; fp32 q {fp32_q / 1e6:.2f} MB")
    assert mem.temp_size_in_bytes < 2 * fp32_q
    assert mem.output_size_in_bytes == b * length * n * d * 2           # written in bf16


def test_splash_interpret_equals_xla_with_segment_ids():
    q, k, v = qkv(2, 150, 2, 16, seed=4)           # 150: padded to the 128-multiple block grid
    kv = jnp.asarray([150, 100])
    xla = np.asarray(A.dot_product_attention(q, k, v, kv_lengths=kv, impl="xla"))
    splash = np.asarray(A.dot_product_attention(q, k, v, kv_lengths=kv, impl="splash", interpret=True,
                                                block_q=128, block_kv=128))
    valid = np.arange(150)[None, :] < np.asarray(kv)[:, None]
    err_valid = float(np.abs(splash - xla)[valid].max())
    # Padded rows follow the original's segments exactly (and differ from key-padding there).
    err_seg = float(np.abs(splash - reference(q, k, v, kv, segments=True)).max())
    print(f"splash vs xla on valid rows {err_valid:.1e}; vs the segment reference on all rows {err_seg:.1e}")
    assert err_valid <= TOL and err_seg <= TOL
    assert np.abs(splash - xla)[~valid].max() > 1e-3
    assert np.isfinite(splash).all()


def test_splash_needs_tpu_or_interpret():
    q, k, v = qkv(1, 16, 2, 8)
    with pytest.raises(ValueError, match="TPU kernel"):
        A.dot_product_attention(q, k, v, kv_lengths=jnp.asarray([16]), impl="splash")


def test_bad_inputs():
    q, k, v = qkv(2, 16, 2, 8)
    kv = jnp.asarray([16, 16])
    with pytest.raises(ValueError, match="unknown attention implementation"):
        A.dot_product_attention(q, k, v, kv_lengths=kv, impl="flash")
    with pytest.raises(ValueError, match="kv_lengths"):
        A.dot_product_attention(q, k, v, kv_lengths=jnp.asarray([16]), impl="xla")
    with pytest.raises(ValueError, match="q \\[B,L,N,K\\]"):
        A.dot_product_attention(q, k[:, :, :1], v, kv_lengths=kv, impl="xla")
    with pytest.raises(ValueError, match="sequence_parallel='stripes'"):
        A.dot_product_attention(q, k, v, kv_lengths=kv, impl="xla", sequence_parallel="stripes")


# ------------------------------------------------------------------------------------------- sequence parallel


def _sharded(q, k, v, kv, mesh, impl, mode, bq=4, bk=4, interpret=False):
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        fn = jax.jit(lambda *a: A.dot_product_attention(*a[:3], kv_lengths=a[3], impl=impl, block_q=bq,
                                                        block_kv=bk, sequence_parallel=mode, interpret=interpret))
        jaxpr = str(jax.make_jaxpr(fn)(q, k, v, kv))
        return np.asarray(fn(q, k, v, kv)), jaxpr


# (mesh data, fsdp, sequence, tensor), mode, kernel. Batch 3 and L=27 divide none of the degrees: both padded
# (Ulysses + xla runs batch 4, L=32: nothing padded).
SP_CASES = [
    ((1, 2, 4, 1), "ulysses", "chunked"),
    ((1, 2, 4, 1), "ring", "chunked"),
    ((2, 1, 2, 2), "ulysses", "xla"),
    ((2, 1, 2, 2), "ring", "xla"),
    ((1, 1, 8, 1), "ring", "chunked"),      # 4 heads cannot take Ulysses at degree 8
    ((1, 1, 8, 1), "auto", "xla"),          # auto picks ring there
    ((1, 8, 1, 1), "ulysses", "chunked"),   # no sequence axis: batch-sharded kernel only
]


@pytest.mark.parametrize("shape, mode, impl", SP_CASES, ids=lambda c: str(c))
def test_sequence_parallel_equals_reference(shape, mode, impl):
    b, length = (3, 27) if impl == "chunked" or mode != "ulysses" else (4, 32)   # padded / divisible
    q, k, v = qkv(b, length, 4, 8, seed=5)
    kv = jnp.asarray([length, 13, 2, 30][:b])
    got, jaxpr = _sharded(q, k, v, kv, mesh_of(shape), impl, mode)
    err = float(np.abs(got - reference(q, k, v, kv)).max())
    print(f"{shape} {mode} {impl}: max abs err {err:.1e}")
    assert err <= TOL
    assert "shard_map" in jaxpr
    sp = shape[2]
    uses_ring = sp > 1 and (mode == "ring" or (mode == "auto" and (4 // shape[3]) % sp != 0))
    assert ("ppermute" in jaxpr) == uses_ring
    assert ("all_to_all" in jaxpr) == (sp > 1 and not uses_ring)


def test_ring_gradients_match_local():
    q, k, v = qkv(2, 13, 4, 8, seed=6)
    kv = jnp.asarray([13, 6])

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) ** 2 * jnp.arange(13.0)[None, :, None, None])

    local = jax.grad(loss(lambda *a: A.dot_product_attention(*a, kv_lengths=kv, impl="xla")), (0, 1, 2))(q, k, v)
    for mode in ("ring",):                     # the ring's scan/ppermute/online-softmax backward (training)
        with jax.set_mesh(mesh_of((1, 2, 4, 1))), nn.logical_axis_rules(DEFAULT_RULES):
            attend = lambda *a: A.dot_product_attention(  # noqa: E731
                *a, kv_lengths=kv, impl="chunked", block_q=4, block_kv=4, sequence_parallel=mode)
            g = jax.jit(jax.grad(loss(attend), (0, 1, 2)))(q, k, v)
        err = max(float(jnp.abs(a - b).max()) for a, b in zip(g, local))
        print(f"{mode} grad max abs err {err:.1e}")
        assert err <= 1e-4


def test_splash_under_ulysses_mesh():
    q, k, v = qkv(2, 130, 4, 8, seed=7)
    kv = jnp.asarray([130, 77])
    got, jaxpr = _sharded(q, k, v, kv, mesh_of((1, 1, 2, 2)), "splash", "ulysses", bq=128, bk=128, interpret=True)
    valid = np.arange(130)[None, :] < np.asarray(kv)[:, None]
    want = reference(q, k, v, kv, segments=True)
    assert float(np.abs(got - want).max()) <= TOL
    assert float(np.abs(got - reference(q, k, v, kv))[valid].max()) <= TOL
    assert "all_to_all" in jaxpr


def test_sequence_parallel_bad_combinations():
    q, k, v = qkv(2, 16, 4, 8)
    kv = jnp.asarray([16, 9])
    with pytest.raises(ValueError, match="Ulysses .* divisible by the sequence degree 8"):
        _sharded(q, k, v, kv, mesh_of((1, 1, 8, 1)), "chunked", "ulysses")
    with pytest.raises(ValueError, match="ring attention composes with"):
        _sharded(q, k, v, kv, mesh_of((1, 1, 8, 1)), "splash", "ring", interpret=True)
    with pytest.raises(ValueError, match="cannot be split"):
        _sharded(*qkv(2, 16, 3, 8), kv, mesh_of((1, 1, 4, 2)), "chunked", "ring")
    with jax.set_mesh(mesh_of((1, 2, 4, 1))):            # a mesh but no logical rules: refuse, don't replicate
        with pytest.raises(ValueError, match="logical axis rules"):
            A.dot_product_attention(q, k, v, kv_lengths=kv, impl="xla")
