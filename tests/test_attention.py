"""Attention dispatch: kernels against a float64 numpy reference (incl. the XLA:CPU row-block kernel behind
impl='xla'), padding semantics, splash segment ids,
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


def _hole_reference(q, k, v, rows):
    """Float64 attention where sample b sees keys ``< rows[b, 0]`` outside ``[rows[b, 1], rows[b, 2])``."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s = np.einsum("bqnd,bknd->bnqk", q, k) / math.sqrt(q.shape[-1])
    pos, rows = np.arange(k.shape[1])[None, :], np.asarray(rows)
    ok = (pos < rows[:, :1]) & ~((pos >= rows[:, 1:2]) & (pos < rows[:, 2:3]))             # [B, Lk]
    s = np.where(ok[:, None, None, :], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bnqk,bknd->bqnd", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("shift_bound", [40.0, 0.0], ids=["norm-bound shift", "row-max shift"])
@pytest.mark.parametrize("length, lens, budget", [
    (27, (27, 11), 8 * 27),        # 4 query blocks of 8, the last overlapping; padding
    (40, (40, 1), 16 * 40),        # a single valid key; 3 blocks
    (40, (40, 3), 10 ** 6),        # one block holds every query
])
def test_cpu_kernel_equals_reference(monkeypatch, shift_bound, length, lens, budget):
    """The XLA:CPU kernel behind impl='xla' (row blocks per head, exact softmax) against float64, with the
    softmax shifted by the Cauchy-Schwarz bound (inputs of moderate norm) and by the row max (bound forced off)."""
    monkeypatch.setattr(A, "CPU_SCORES_PER_STEP", budget)
    monkeypatch.setattr(A, "CPU_MIN_BLOCK_Q", 8)
    monkeypatch.setattr(A, "_CPU_BOUND", shift_bound)
    q, k, v = qkv(2, length, 3, 8, seed=length)
    kv = jnp.asarray(lens)
    assert A.cpu_block_q(length, length) == (8 if length == 27 else 16 if budget < 10 ** 6 else 40)
    got = np.asarray(A.cpu_attention.__wrapped__(q, k, v, kv))     # unjitted: traced with the patched constants
    err = float(np.abs(got - reference(q, k, v, kv)).max())
    print(f"L={length} lens={lens} budget={budget} bound={shift_bound}: max abs err {err:.1e}")
    assert np.isfinite(got).all() and err <= TOL


@pytest.mark.parametrize("budget, group", [(24 * 24 * 2, 2), (24 * 24 * 6, 6), (24 * 24 * 5, 3), (24 * 20, 1)])
def test_cpu_kernel_head_groups(monkeypatch, budget, group):
    """Short sequences: whole heads per step (a divisor of B*N within the score budget), values against float64
    and gradients against the chunked kernel; a budget under one head's scores goes back to row blocks."""
    monkeypatch.setattr(A, "CPU_SCORES_PER_STEP", budget)
    monkeypatch.setattr(A, "CPU_MIN_BLOCK_Q", 8)
    q, k, v = qkv(2, 24, 3, 8, seed=21)
    kv = jnp.asarray([[24, 3, 7], [13, 0, 0]], jnp.int32)
    assert A.cpu_heads_per_step(6, 24, 24) == group
    assert A.cpu_block_q(24, 24) == (24 if group > 1 else 16)
    jaxpr = str(jax.make_jaxpr(lambda *a: A.cpu_attention.__wrapped__(*a, kv))(q, k, v))
    assert f"f32[{group},{24 if group > 1 else 16},24]" in jaxpr                     # one step's scores
    got = np.asarray(A.cpu_attention.__wrapped__(q, k, v, kv))
    err = float(np.abs(got - _hole_reference(q, k, v, kv)).max())
    assert err <= TOL, err
    w = jnp.arange(24.0)[None, :, None, None]

    def grads(fn):
        return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) ** 2 * w), (0, 1, 2))(q, k, v)

    got_g = grads(lambda *a: A.cpu_attention.__wrapped__(*a, kv))
    want_g = grads(lambda *a: A.chunked_attention(*a, kv, block_q=8, block_kv=8))
    assert max(float(jnp.abs(a - b).max()) for a, b in zip(got_g, want_g)) <= 1e-4


def test_cpu_kernel_large_scores_holes_and_bf16(monkeypatch):
    """Scores far beyond the shift bound (|s| ~ 1e3: the row-max path runs, no overflow), key holes ([B, 3] rows)
    and bf16 inputs, all against float64."""
    monkeypatch.setattr(A, "CPU_SCORES_PER_STEP", 8 * 33)
    monkeypatch.setattr(A, "CPU_MIN_BLOCK_Q", 8)
    q, k, v = qkv(2, 33, 2, 16, seed=11)
    rows = jnp.asarray([[33, 4, 9], [20, 0, 0]], jnp.int32)
    big = np.asarray(A.cpu_attention.__wrapped__(q * 30.0, k * 30.0, v, rows))
    err = float(np.abs(big - _hole_reference(q * 30.0, k * 30.0, v, rows)).max())
    # fp32 scores this large are rounded by about |s| * 2^-24 each, and the softmax hands that to the output
    # (5.2e-5 on an AVX2-only CPU, under 2e-5 on others): the bound scales with the largest score
    s_max = float(np.abs(np.einsum("bqnd,bknd->bnqk", *(np.asarray(a, np.float64) * 30.0 for a in (q, k)))).max())
    tol = max(TOL, np.finfo(np.float32).eps * s_max / math.sqrt(q.shape[-1]))        # one rounding of the largest
    assert np.isfinite(big).all() and err <= tol, (err, tol)
    lo = [a.astype(jnp.bfloat16) for a in (q, k, v)]
    out = A.cpu_attention.__wrapped__(*lo, rows)
    assert out.dtype == jnp.bfloat16
    err16 = float(np.abs(np.asarray(out, np.float32) - _hole_reference(*lo, rows)).max())
    print(f"large scores with holes {err:.1e} (bound {tol:.1e}); bf16 {err16:.1e}")
    assert err16 <= 2e-2


def test_cpu_dispatch_by_length(monkeypatch):
    """On XLA:CPU impl='xla' runs the row-block kernel (a loop, no [B, N, L, L] tensor), and the online-softmax
    chunked kernel once a row block would fall under CPU_MIN_BLOCK_Q rows (keys past 16k at the defaults)."""
    assert jax.default_backend() == "cpu"
    assert A.cpu_block_q(3620, 3620) == 280 and A.cpu_block_q(16384, 16384) > 0 and A.cpu_block_q(17000, 17000) == 0
    big = jax.ShapeDtypeStruct((1, 3620, 8, 64), jnp.float32)
    jaxpr = str(jax.make_jaxpr(lambda *a: A.dot_product_attention(*a, kv_lengths=jnp.asarray([3500]), impl="xla"))(
        big, big, big))                                                              # traced only
    assert "cpu_attention" in jaxpr and "f32[1,280,3620]" in jaxpr                 # one head x 280 rows
    assert "3620,3620]" not in jaxpr
    q, k, v = qkv(1, 40, 2, 8, seed=2)
    kv = jnp.asarray([31])
    monkeypatch.setattr(A, "CPU_SCORES_PER_STEP", 40 * 4)                       # 4 rows < CPU_MIN_BLOCK_Q
    assert A.cpu_block_q(40, 40) == 0
    got = np.asarray(A.cpu_attention.__wrapped__(q, k, v, kv, block_q=8, block_kv=8))
    want = np.asarray(A.chunked_attention(q, k, v, kv, block_q=8, block_kv=8))
    np.testing.assert_array_equal(got, want)


def test_cpu_kernel_gradients_match_chunked(monkeypatch):
    monkeypatch.setattr(A, "CPU_SCORES_PER_STEP", 8 * 21)
    monkeypatch.setattr(A, "CPU_MIN_BLOCK_Q", 8)
    q, k, v = qkv(2, 21, 2, 8, seed=12)
    kv = jnp.asarray([21, 9])
    w = jnp.arange(21.0)[None, :, None, None]

    def grads(fn):
        return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) ** 2 * w), (0, 1, 2))(q, k, v)

    got = grads(lambda *a: A.cpu_attention.__wrapped__(*a, kv))
    want = grads(lambda *a: A.chunked_attention(*a, kv, block_q=5, block_kv=5))
    err = max(float(jnp.abs(a - b).max()) for a, b in zip(got, want))
    print(f"cpu kernel grad max abs err {err:.1e}")
    assert err <= 1e-4


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


def test_dispatch_follows_the_traced_platform():
    """``xla`` on a CPU target is the blocked CPU kernel; traced for an accelerator (``trace_for``, or a
    mesh of accelerator devices in AOT) it is the dense ``jax.nn`` attention; splash is refused only for a non-TPU
    target."""
    from hcjax import sharding as S

    q = jnp.zeros((1, 64, 2, 16), jnp.float32)
    lens = jnp.asarray([60], jnp.int32)
    def jaxpr():         # a new function each time: jax's trace caches do not key on trace_for
        return str(jax.make_jaxpr(lambda q: A.dot_product_attention(q, q, q, kv_lengths=lens, impl="xla"))(q))

    assert S.target_platform() == "cpu"
    assert "cpu_attention" in jaxpr()
    with S.trace_for("gpu"):
        assert S.target_platform() == "gpu"
        assert "cpu_attention" not in jaxpr() and "dot_general" in jaxpr()
        with pytest.raises(ValueError, match="splash attention is a TPU kernel .*'gpu'"):
            A.dot_product_attention(q, q, q, kv_lengths=lens, impl="splash")
    assert S.target_platform() == "cpu"
