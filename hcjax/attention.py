"""The attention dispatch: one function for every DiT attention call.

``dot_product_attention(q, k, v, kv_lengths=..., impl=...)`` with ``q, k, v [B, L, N, K]`` implements the
original's varlen flash attention (spec 5.7) by key-padding: for sample ``b`` every query sees keys
``[0, kv_lengths[b])``. Outputs on valid queries equal the original; padded queries (text padding at the tail)
see the valid keys too, so they stay finite and are discarded later. ``kv_lengths`` may also be ``[B, 3]`` int
rows ``(length, hole_start, hole_end)``: keys in ``[hole_start, hole_end)`` are masked as well (the DiT's padded
reference frames of a mixed-K training batch, issue 24; an empty hole ``start == end`` masks nothing). Every
kernel and sharded path derives the mask from key positions, so holes need no extra communication. Kernels
(``impl``):

* ``xla``     ``jax.nn.dot_product_attention(..., key_value_seq_lengths=...)`` (XLA softmax attention); on an
              XLA:CPU backend :func:`cpu_attention` instead (same maths: per-head row blocks sized by the sequence
              length, the online-softmax ``chunked`` kernel past 16k keys)
* ``cudnn``   the same call with ``implementation="cudnn"`` (GPU only; raises elsewhere, never falls back)
* ``chunked`` blockwise attention with an online softmax in fp32 (flash-style, O(L) memory), pure JAX
* ``splash``  Pallas TPU splash attention with segment ids (``0`` = the valid prefix, ``1`` = padding; exactly
              the original's two varlen segments, spec 7b). TPU only, or ``interpret=True`` (CPU tests).

Sharding. The dispatcher reads the mesh from context (``jax.set_mesh``, see ``hcjax.sharding.use_mesh``) and the
activation layout from the Flax logical rules (``act_batch``, ``act_seq``, ``act_heads``). Under a mesh with
more than one device it always runs inside ``jax.shard_map`` (attention is independent per sample and head):

* sequence degree 1: the kernel runs on the local batch/head shard.
* ``ulysses``: all-to-all over the ``sequence`` axis turns ``[B, L/sp, N/tp]`` into ``[B, L, N/(tp sp)]``, the
  kernel runs on whole sequences, and a second all-to-all restores the layout (needs ``(N/tp) % sp == 0``).
* ``ring``: queries stay put; K/V blocks rotate around the ``sequence`` axis with ``ppermute`` and are folded
  into an online softmax (any degree; kernels ``xla`` = one dense block per step, ``chunked`` = blockwise).
* hybrid (USP, ``ulysses_degree=U`` with ``1 < U < sp``): the ``sequence`` axis of size ``sp = U * R`` is read as
  ``R`` groups of ``U`` consecutive devices. Ulysses all-to-all inside each group (``axis_index_groups``) turns
  ``[B, L/sp, n]`` into ``[B, L/R, n/U]``, then ring attention across the ``R`` groups (``ppermute`` by ``U``
  positions: each device meets the devices holding the same heads in the other groups), then the all-to-all back.
  ``U = sp`` is pure Ulysses, ``U = 1`` pure ring. Needs ``(N/tp) % U == 0`` and a ring kernel.

Token (and batch) counts that the mesh does not divide are padded; padded keys lie beyond every
``kv_lengths[b]`` and are masked, padded queries are dropped. The mode is an explicit argument
(``sequence_parallel``; the DiT passes ``dit.sequence_parallel`` from its static module config, so a jitted
model retraces per mode). Invalid combinations raise; nothing falls back silently.

``masked_attention`` is the small dense-mask variant used by the token refiner (arbitrary boolean masks).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from .axes import RING_KERNELS, SEQUENCE_PARALLEL
from .sharding import target_platform

IMPLS = ("xla", "cudnn", "chunked", "splash")
ATTN_LOGICAL = ("act_batch", "act_seq", "act_heads")
_NEG = -1e30  # finite "minus infinity": a fully masked row can never produce NaN
__all__ = ["ATTN_LOGICAL", "IMPLS", "RING_KERNELS", "SEQUENCE_PARALLEL", "attention_partition",
           "chunked_attention", "cpu_attention", "cpu_block_q", "cpu_heads_per_step", "dot_product_attention",
           "masked_attention", "sequence_plan", "splash_attention"]


# ------------------------------------------------------------------------------------------- dispatch


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    kv_lengths: jax.Array,
    impl: str = "chunked",
    block_q: int = 512,
    block_kv: int = 512,
    mesh=None,
    sequence_parallel: str = "ulysses",
    ulysses_degree: int = 0,
    interpret: bool = False,
) -> jax.Array:
    """Key-padded attention ``[B, L, N, K] -> [B, L, N, K]``; ``mesh`` defaults to the context mesh.

    ``sequence_parallel`` (``ulysses | ring | auto``) applies under a mesh with a ``sequence`` axis;
    ``ulysses_degree`` (``U > 0``, dividing the sequence degree) overrides it with Ulysses in groups of ``U`` x ring
    across the groups (module docstring); ``interpret`` runs the splash kernel in Pallas interpret mode (CPU
    tests)."""
    if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"attention expects q [B,L,N,K] and k, v [B,S,N,K]; got {q.shape}, {k.shape}, {v.shape}")
    if impl not in IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; expected one of {IMPLS}")
    if kv_lengths.shape not in ((q.shape[0],), (q.shape[0], 3)):
        raise ValueError(f"kv_lengths must be [B]=[{q.shape[0]}] (or [B, 3]: length, hole start, hole end); got "
                         f"{tuple(kv_lengths.shape)}")
    if sequence_parallel not in SEQUENCE_PARALLEL:
        raise ValueError(f"sequence_parallel={sequence_parallel!r}; expected one of {SEQUENCE_PARALLEL}")
    if ulysses_degree < 0:
        raise ValueError(f"ulysses_degree={ulysses_degree} must be >= 0 (0: decided by sequence_parallel)")
    kv_lengths = kv_lengths.astype(jnp.int32)
    kernel = functools.partial(_local, impl=impl, block_q=block_q, block_kv=block_kv, interpret=bool(interpret))
    mesh = _context_mesh(mesh)
    if mesh is None:
        return kernel(q, k, v, kv_lengths)
    return _sharded(q, k, v, kv_lengths, mesh, kernel, impl, sequence_parallel, block_q, block_kv, ulysses_degree)


def _key_valid(pos, kv_lengths):
    """``bool [B, len(pos)]``: keys at global positions ``pos`` that sample ``b`` may see (``kv_lengths`` ``[B]``
    or ``[B, 3]`` with a masked hole, module docstring)."""
    if kv_lengths.ndim == 1:
        return pos[None, :] < kv_lengths[:, None]
    n, lo, hi = (kv_lengths[:, i:i + 1] for i in range(3))
    return (pos[None, :] < n) & ~((pos[None, :] >= lo) & (pos[None, :] < hi))


def _local(q, k, v, kv_lengths, *, impl, block_q, block_kv, interpret):
    if impl == "xla" and target_platform() == "cpu":
        return cpu_attention(q, k, v, kv_lengths, block_q=block_q, block_kv=block_kv)
    if impl in ("xla", "cudnn") and kv_lengths.ndim == 2:
        mask = _key_valid(jnp.arange(k.shape[1]), kv_lengths)[:, None, None, :]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
    if impl in ("xla", "cudnn"):
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=kv_lengths, implementation=impl)
    if impl == "chunked":
        return chunked_attention(q, k, v, kv_lengths, block_q=block_q, block_kv=block_kv)
    return splash_attention(q, k, v, kv_lengths, block_q=block_q, block_kv=block_kv, interpret=interpret)


def _context_mesh(mesh):
    """The mesh to shard over, or None for single-device execution."""
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return None
    if math.prod(mesh.shape.values()) == 1:
        return None
    return mesh


def _mesh_axes(entry, mesh) -> tuple[str, ...]:
    if entry is None:
        return ()
    names = (entry,) if isinstance(entry, str) else tuple(entry)
    missing = [n for n in names if n not in mesh.shape]
    if missing:
        raise ValueError(f"logical attention rules name mesh axes {missing} absent from the mesh {dict(mesh.shape)}")
    return names


def attention_partition(mesh) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """Mesh axes of (batch, sequence, heads) of ``q [B, L, N, K]`` from the active Flax logical rules."""
    if not nn.get_logical_axis_rules():
        raise ValueError(
            f"attention under a {dict(mesh.shape)} mesh needs Flax logical axis rules for {ATTN_LOGICAL} "
            "(run the model inside hcjax.sharding.use_mesh(mesh, ...))")
    spec = nn.logical_to_mesh_axes(ATTN_LOGICAL)
    return tuple(_mesh_axes(e, mesh) for e in spec)


def _size(mesh, axes) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def _axis(axes: tuple[str, ...]):
    return axes[0] if len(axes) == 1 else axes


def sequence_plan(heads: int, sp: int, mode: str, ulysses_degree: int = 0, impl: str = "chunked") -> int:
    """The Ulysses degree ``U`` attention uses on a sequence axis of size ``sp`` (``U = sp``: pure Ulysses, ``1``:
    pure ring, between: hybrid) for ``heads`` heads per tensor shard; raises on a combination that cannot run."""
    if sp == 1:
        return 1
    u = ulysses_degree
    if u == 0:
        if mode == "auto":
            mode = "ulysses" if heads % sp == 0 else "ring"
        u = sp if mode == "ulysses" else 1
        if u == sp and heads % sp:
            raise ValueError(f"Ulysses sequence parallelism needs the {heads} heads per tensor shard to be "
                             f"divisible by the sequence degree {sp}; use sequence_parallel='ring' (or 'auto')")
    elif sp % u:
        raise ValueError(f"ulysses_degree={u} must divide the sequence degree {sp} (Ulysses groups x ring)")
    elif heads % u:
        raise ValueError(f"ulysses_degree={u} must divide the {heads} heads per tensor shard")
    if u < sp and impl not in RING_KERNELS:
        raise ValueError(f"ring attention composes with the kernels {RING_KERNELS}, not {impl!r} "
                         "(it needs the running softmax statistics); use ulysses or another kernel")
    return u


def _sharded(q, k, v, kv_lengths, mesh, kernel, impl, sp_mode, block_q, block_kv, ulysses_degree=0):
    batch_ax, seq_ax, head_ax = attention_partition(mesh)
    nb, sp, tp = _size(mesh, batch_ax), _size(mesh, seq_ax), _size(mesh, head_ax)
    b, length, n, _ = q.shape
    if n % tp:
        raise ValueError(f"{n} attention heads cannot be split over the {head_ax} mesh axes of size {tp}")
    u = sequence_plan(n // tp, sp, sp_mode, ulysses_degree, impl)
    # Pad the sequence to a multiple of the degree (padded keys sit beyond every kv_length) and the batch to a
    # multiple of the batch shards (padded samples see their zero keys); both are dropped afterwards.
    qp, kp, vp = (_pad_to(_pad_to(a, 1, sp), 0, nb) for a in (q, k, v))
    lens = jnp.pad(kv_lengths, (0, qp.shape[0] - b), constant_values=length) if kv_lengths.ndim == 1 else \
        jnp.concatenate([kv_lengths, jnp.tile(jnp.asarray([[length, 0, 0]], jnp.int32), (qp.shape[0] - b, 1))])
    spec = P(_axis(batch_ax) if batch_ax else None, _axis(seq_ax) if seq_ax else None,
             _axis(head_ax) if head_ax else None, None)
    lspec = P(spec[0])

    if sp == 1:
        body = kernel
    elif u == sp:
        body = functools.partial(_ulysses, kernel=kernel, axis=_axis(seq_ax))
    else:
        r = sp // u
        block = qp.shape[1] // r            # tokens per ring block (a group's share after its all-to-all)
        bq, bk = (block_q, block_kv) if impl == "chunked" else (block, block)
        body = functools.partial(_hybrid, axis=_axis(seq_ax), u=u, r=r, block_q=bq, block_kv=bk)
    out = jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec, lspec), out_specs=spec,
                        check_vma=impl != "splash")(qp, kp, vp, lens)
    return out[:b, :length]


def _ulysses(q, k, v, kv_lengths, *, kernel, axis):
    """``[B, L/sp, n, K]`` -> all-to-all -> ``[B, L, n/sp, K]`` -> kernel -> back."""
    to_heads = functools.partial(jax.lax.all_to_all, axis_name=axis, split_axis=2, concat_axis=1, tiled=True)
    out = kernel(to_heads(q), to_heads(k), to_heads(v), kv_lengths)
    return jax.lax.all_to_all(out, axis, split_axis=1, concat_axis=2, tiled=True)


def _hybrid(q, k, v, kv_lengths, *, axis, u, r, block_q, block_kv):
    """USP: all-to-all within groups of ``u`` consecutive devices (``[B, L/sp, n] -> [B, L/r, n/u]``), ring over
    the ``r`` groups, all-to-all back. ``u == 1``: the all-to-alls are identities (pure ring)."""
    groups = None if r == 1 else [list(range(g * u, (g + 1) * u)) for g in range(r)]
    if u > 1:
        a2a = functools.partial(jax.lax.all_to_all, axis_name=axis, tiled=True, axis_index_groups=groups)
        q, k, v = (a2a(a, split_axis=2, concat_axis=1) for a in (q, k, v))
    out = _ring(q, k, v, kv_lengths, axis=axis, sp=r, block_q=block_q, block_kv=block_kv, stride=u)
    if u > 1:
        out = a2a(out, split_axis=1, concat_axis=2)
    return out


def _ring(q, k, v, kv_lengths, *, axis, sp, block_q, block_kv, stride=1):
    """Ring attention: the local queries meet every K/V block as the blocks travel around the ring.

    ``sp`` ring positions; with ``stride > 1`` the axis holds ``sp * stride`` devices and each ring links the
    devices ``stride`` apart (the same position inside every Ulysses group), so position = index // stride."""
    idx = jax.lax.axis_index(axis) // stride
    lk = k.shape[1]
    size = sp * stride
    perm = [(i, (i + stride) % size) for i in range(size)]
    state = _init_state(q)

    def fold(state, kv, step):
        src = (idx - step) % sp                     # the ring position this K/V block started on
        return _flash_update(q, kv[0], kv[1], src * lk, kv_lengths, state, block_q, block_kv)

    def body(carry, step):
        state, kv = carry
        nxt = jax.lax.ppermute(kv, axis, perm)      # independent of this step's compute: can overlap
        return (fold(state, kv, step), nxt), None

    (state, kv), _ = jax.lax.scan(body, (state, (k, v)), jnp.arange(sp - 1))
    state = fold(state, kv, sp - 1)
    return _finish(state, q.dtype)


# ------------------------------------------------------------------------------------------- chunked


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    n = x.shape[axis]
    extra = (-n) % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def _init_state(q):
    """Online-softmax state ``(m, l, acc)``: running max, sum ``[B, N, Lq]`` and numerator ``[B, N, Lq, K]``."""
    b, lq, n, d = q.shape
    state = (jnp.full((b, n, lq), _NEG, jnp.float32), jnp.zeros((b, n, lq), jnp.float32),
             jnp.zeros((b, n, lq, d), jnp.float32))
    vary = _varying_axes(q)                            # inside shard_map: vary like q (scan carry types)
    return tuple(jax.lax.pcast(s, vary, to="varying") for s in state) if vary else state


def _varying_axes(x) -> tuple[str, ...]:
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)
    return tuple(sorted(mat.varying)) if mat is not None else tuple(sorted(getattr(aval, "vma", ())))


def _finish(state, dtype):
    _, l, acc = state
    out = acc / jnp.maximum(l, 1e-30)[..., None]                       # [B, N, Lq, K]
    return out.transpose(0, 2, 1, 3).astype(dtype)


def _flash_update(q, k, v, key_offset, kv_lengths, state, block_q: int, block_kv: int):
    """Fold keys ``k, v [B, Lk, N, K]`` at global positions ``key_offset + [0, Lk)`` into ``state``.

    Keys at positions ``>= kv_lengths[b]`` are masked. Query blocks are mapped (``lax.map``), key blocks scanned
    with a rematerialised step, so memory is ``O(block_q * block_kv)`` per head beyond the state.
    """
    b, lq, n, d = q.shape
    lk = k.shape[1]
    bq, bk = min(block_q, lq), min(block_kv, lk)
    qp, kp, vp = _pad_to(q, 1, bq), _pad_to(k, 1, bk), _pad_to(v, 1, bk)
    nq, nk = qp.shape[1] // bq, kp.shape[1] // bk
    scale = d ** -0.5
    qb = qp.reshape(b, nq, bq, n, d).transpose(1, 0, 3, 2, 4)          # [nq, B, N, bq, K]
    kb = kp.reshape(b, nk, bk, n, d).transpose(1, 0, 3, 2, 4)          # [nk, B, N, bk, K]
    vb = vp.reshape(b, nk, bk, n, d).transpose(1, 0, 3, 2, 4)
    m0, l0, a0 = (_pad_to(s, 2, bq) for s in state)
    m0 = m0.reshape(b, n, nq, bq).transpose(2, 0, 1, 3)                # [nq, B, N, bq]
    l0 = l0.reshape(b, n, nq, bq).transpose(2, 0, 1, 3)
    a0 = a0.reshape(b, n, nq, bq, d).transpose(2, 0, 1, 3, 4)          # [nq, B, N, bq, K]

    def q_block(args):
        qi, init = args[0], args[1:]

        def step(carry, inp):
            kj, vj, j = inp
            s = jnp.einsum("bnqd,bnkd->bnqk", qi, kj, preferred_element_type=jnp.float32) * scale
            local = j * bk + jnp.arange(bk)
            valid = (local < lk)[None, :] & _key_valid(key_offset + local, kv_lengths)   # [B, bk]
            return _fold(carry, s, valid[:, None, None, :], vj, "bnqk,bnkd->bnqd"), None

        out, _ = jax.lax.scan(jax.checkpoint(step), init, (kb, vb, jnp.arange(nk)))
        return out

    m, l, acc = jax.lax.map(q_block, (qb, m0, l0, a0))
    m = m.transpose(1, 2, 0, 3).reshape(b, n, nq * bq)[:, :, :lq]
    l = l.transpose(1, 2, 0, 3).reshape(b, n, nq * bq)[:, :, :lq]
    acc = acc.transpose(1, 2, 0, 3, 4).reshape(b, n, nq * bq, d)[:, :, :lq]
    return m, l, acc


def _fold(carry, s, valid, vj, pv: str):
    """One online-softmax step: fold fp32 scores ``s [B, N, bq, bk]`` (``valid``: broadcastable mask) and the
    values ``vj`` (contracted with the probabilities, cast to ``vj``'s dtype, by ``pv``) into ``(m, l, acc)``."""
    m, l, acc = carry
    s = jnp.where(valid, s, _NEG)
    m_new = jnp.maximum(m, s.max(axis=-1))
    p = jnp.where(valid, jnp.exp(s - m_new[..., None]), 0.0)
    alpha = jnp.exp(m - m_new)
    l = l * alpha + p.sum(axis=-1)
    acc = acc * alpha[..., None] + jnp.einsum(pv, p.astype(vj.dtype), vj, preferred_element_type=jnp.float32)
    return m_new, l, acc


def _bits(x):
    """Sub-32-bit floats as same-width unsigned ints: XLA:CPU slices a bf16 array by converting all of it to fp32."""
    if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize < 4:
        return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))
    return x


def _unbits(x, dtype):
    return jax.lax.bitcast_convert_type(x, dtype) if x.dtype != dtype else x


@functools.partial(jax.jit, static_argnames=("block_q", "block_kv"))
def chunked_attention(q, k, v, kv_lengths, *, block_q: int = 512, block_kv: int = 512):
    """Online-softmax attention over key blocks, one query block at a time; scores and statistics in fp32.

    Memory beyond q, k, v and the output (both in the input dtype, never padded, copied or transposed whole) is
    one query block's state: a ``fori_loop`` over query blocks slices ``q`` (``[B, bq, N, K]``), scans the key
    blocks (sliced from ``k, v`` inside the step), normalises and writes the block into the output in the input
    dtype. Lengths that the blocks do not divide: the last block starts at ``L - block`` (queries: recomputes rows of
    the previous block identically; keys: the positions already folded are masked), so nothing is padded.
    """
    b, lq, n, d = q.shape
    lk = k.shape[1]
    bq, bk = min(block_q, lq), min(block_kv, lk)
    nq, nk = -(-lq // bq), -(-lk // bk)
    lens = kv_lengths.astype(jnp.int32)
    scale = d ** -0.5
    qr, kr, vr = _bits(q), _bits(k), _bits(v)

    def take(raw, start, size, dtype):
        return _unbits(jax.lax.dynamic_slice_in_dim(raw, start, size, 1), dtype)

    def q_block(i, out):
        q0 = jnp.minimum(i * bq, lq - bq)
        qi = take(qr, q0, bq, q.dtype)                                     # [B, bq, N, K]

        def step(carry, j):
            k0 = jnp.minimum(j * bk, lk - bk)
            kj, vj = take(kr, k0, bk, k.dtype), take(vr, k0, bk, v.dtype)   # [B, bk, N, K]
            s = jnp.einsum("bqnd,bknd->bnqk", qi, kj, preferred_element_type=jnp.float32) * scale
            pos = k0 + jnp.arange(bk)
            valid = (pos >= j * bk)[None, :] & _key_valid(pos, lens)   # [B, bk]; overlap: folded
            return _fold(carry, s, valid[:, None, None, :], vj, "bnqk,bknd->bnqd"), None

        state, _ = jax.lax.scan(jax.checkpoint(step), _init_state(qi), jnp.arange(nk))
        return jax.lax.dynamic_update_slice_in_dim(out, _bits(_finish(state, q.dtype)), q0, 1)

    out = jnp.zeros(qr.shape, qr.dtype)
    vary = _varying_axes(q)                            # inside shard_map: the loop carry varies like q
    out = jax.lax.pcast(out, vary, to="varying") if vary else out
    return _unbits(jax.lax.fori_loop(0, nq, q_block, out), q.dtype)


# ------------------------------------------------------------------------------------------- CPU


CPU_SCORES_PER_STEP = 1 << 20   # fp32 scores per step of cpu_attention (4 MB: one head's row block, ~L2/L3)
CPU_MIN_BLOCK_Q = 64            # below this many query rows per step (keys > 16k) cpu_attention goes blockwise
_CPU_BOUND = 40.0               # softmax shift bound: exp arguments of valid keys stay >= -80 (fp32 normal range)


def cpu_block_q(lq: int, lk: int) -> int:
    """Query rows per step of :func:`cpu_attention`: at most ``CPU_SCORES_PER_STEP // lk`` rounded down to a
    multiple of 8 (whole rows of one head), then evened out over the blocks ``lq`` needs (a multiple of 8; ``lq``
    itself when one block holds it); 0 when that bound is under ``CPU_MIN_BLOCK_Q`` (use the online softmax)."""
    bq = min(lq, CPU_SCORES_PER_STEP // max(lk, 1) // 8 * 8)
    if bq < min(lq, CPU_MIN_BLOCK_Q):
        return 0
    rows = -(-lq // -(-lq // bq))                      # as many blocks, evened out: little overlap recomputed
    return min(lq, _round_up(rows, 8))


def cpu_heads_per_step(heads: int, lq: int, lk: int) -> int:
    """Heads per step of :func:`cpu_attention` when one row block holds a head's every query: the most (a divisor
    of ``heads``) whose ``[g, Lq, Lk]`` scores stay within ``CPU_SCORES_PER_STEP``; 1 when a head alone does not.
    Short sequences (the demo DiT's 320 tokens: all 8 heads of a slice in one step) then run as a few large
    matmuls instead of a loop of small ones with their slicing and copies (1.2x on the demo's train step)."""
    g = max(1, CPU_SCORES_PER_STEP // max(lq * lk, 1))
    return max(c for c in range(1, min(g, heads) + 1) if heads % c == 0)


def _shift_exp(s, bias, bound):
    return jnp.exp(s + bias - bound)


def _max_exp(s, bias, bound):
    s = s + bias
    return jnp.exp(s - s.max(axis=-1, keepdims=True))


@functools.partial(jax.jit, static_argnames=("block_q", "block_kv"))
def cpu_attention(q, k, v, kv_lengths, *, block_q: int = 512, block_kv: int = 512):
    """The ``xla`` kernel on an XLA:CPU backend (same semantics; the GPU/TPU path is untouched).

    ``jax.nn.dot_product_attention`` contracts the ``[B, L, N, K]`` operands as they lie (strided per head) and
    streams the whole ``[B, N, Lq, Lk]`` fp32 score tensor through memory several times (scores, mask, max, exp,
    sum): ~3x slower than torch's SDPA at 3.6k tokens on this CPU. Here q (pre-scaled), k and v are transposed
    once to ``[B*N, L, K]`` and a loop over (head, query block) computes the exact row softmax of one head's
    ``[bq, Lk]`` score block (:func:`cpu_block_q`: ~4 MB, cache-resident) between two plain matmuls (short
    sequences: ``g`` whole heads per step within the same budget, :func:`cpu_heads_per_step`), each step's
    scores and probabilities materialised once (``optimization_barrier``: XLA would otherwise fuse the softmax
    into the matmul and recompute it). Softmax shift: instead of the row max (one more pass over the block), the
    Cauchy-Schwarz bound ``|q_i| max_j |k_j|`` over the valid keys when it is <= ``_CPU_BOUND`` for every row of
    the block (QK-normed activations: ~10), so every valid ``exp`` argument lies in ``[-2 bound, 0]``: no overflow,
    no underflow, the same relative rounding as with the max; otherwise (``lax.cond``) the row max. Scores fp32,
    masked keys get probability 0: the maths of ``xla``, differing only in rounding. Keys past 16k (a row block
    would drop below ``CPU_MIN_BLOCK_Q`` rows) use :func:`chunked_attention` with ``block_q``/``block_kv``."""
    b, lq, n, d = q.shape
    lk = k.shape[1]
    bq = cpu_block_q(lq, lk)
    if not bq:
        return chunked_attention(q, k, v, kv_lengths, block_q=block_q, block_kv=block_kv)
    heads = lambda a: a.transpose(0, 2, 1, 3).reshape(b * n, a.shape[1], d)  # noqa: E731  [B*N, L, K]
    q32 = heads(q.astype(jnp.float32) * d ** -0.5)
    qh, kh, vh = q32.astype(q.dtype), heads(k), heads(v)
    valid = _key_valid(jnp.arange(lk), kv_lengths.astype(jnp.int32))                   # [B, Lk]
    bias = jnp.where(valid, 0.0, _NEG)                                                   # fp32: masked -1e30
    k_norm2 = jnp.where(jnp.repeat(valid, n, axis=0), jnp.sum(jnp.square(kh.astype(jnp.float32)), -1), 0.0)
    bound = jnp.sqrt(jnp.sum(jnp.square(q32), -1) * k_norm2.max(-1, keepdims=True))     # [B*N, Lq] >= |s_ij|
    nq = -(-lq // bq)
    g = cpu_heads_per_step(b * n, lq, lk) if bq == lq else 1
    bias = jnp.repeat(bias, n, axis=0)                                                 # [B*N, Lk]
    barrier = jax.lax.optimization_barrier

    def group(j, out):                                   # heads j*g .. j*g + g - 1
        h = j * g
        kj, vj, bias_h = (jax.lax.dynamic_slice_in_dim(a, h, g, 0) for a in (kh, vh, bias))  # [g, Lk(, K)]

        def step(i, out):
            q0 = jnp.minimum(i * bq, lq - bq)                    # the last block overlaps the previous one
            qi = jax.lax.dynamic_slice(qh, (h, q0, 0), (g, bq, d))                      # [g, bq, K]
            s = jnp.einsum("gqd,gkd->gqk", qi, kj, preferred_element_type=jnp.float32)  # [g, bq, Lk]
            m = jax.lax.dynamic_slice(bound, (h, q0), (g, bq))[..., None]               # [g, bq, 1]
            p = barrier(jax.lax.cond(jnp.all(m <= _CPU_BOUND), _shift_exp, _max_exp, s, bias_h[:, None], m))
            o = jnp.einsum("gqk,gkd->gqd", p.astype(v.dtype), vj, preferred_element_type=jnp.float32)
            o = o / p.sum(axis=-1, keepdims=True)
            return jax.lax.dynamic_update_slice(out, o.astype(q.dtype), (h, q0, 0))

        return jax.lax.fori_loop(0, nq, jax.checkpoint(step), out)

    out = jnp.zeros(qh.shape, q.dtype)
    vary = _varying_axes(q)                            # inside shard_map: the loop carry varies like q
    out = jax.lax.pcast(out, vary, to="varying") if vary else out
    out = jax.lax.fori_loop(0, b * n // g, group, out)
    return out.reshape(b, n, lq, d).transpose(0, 2, 1, 3)


# ------------------------------------------------------------------------------------------- splash


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _splash_kernel(length: int, heads: int, bq: int, bk: int, interpret: bool):
    """Built inside the trace that uses it (its mask tables become constants of that program): evaluating them
    eagerly would run on the context mesh's devices, which an ahead-of-time compile for a TPU topology does not
    have, and a kernel holding one trace's constants cannot be cached for another."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    mask = sa.MultiHeadMask([sa.FullMask((length, length))] * heads)
    sizes = sa.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                          block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q, k, v, kv_lengths, *, block_q: int = 512, block_kv: int = 512, interpret: bool = False):
    """Pallas TPU splash attention with segment ids: queries and keys ``< kv_lengths[b]`` form segment 0, the
    padded tail segment 1 (the original's two varlen segments). Valid rows equal ``xla``/``chunked``; padded rows
    attend only within the padding (finite). Sequences are padded to the block size (a multiple of 128); those
    extra tokens form segment 2 and are dropped."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    if not interpret and target_platform() != "tpu":
        raise ValueError(f"splash attention is a TPU kernel (target platform is {target_platform()!r}); use "
                         "attention 'chunked'/'xla'/'cudnn' here, or interpret=True for testing")
    b, length, n, d = q.shape
    lane = 128
    bq = min(_round_up(block_q, lane), _round_up(length, lane))
    bk = min(_round_up(block_kv, lane), _round_up(length, lane))
    lp = _round_up(length, math.lcm(bq, bk))
    scale = d ** -0.5
    qs = (q.astype(jnp.float32) * scale).astype(q.dtype)
    qh, kh, vh = (_pad_to(a, 1, lp).transpose(0, 2, 1, 3) for a in (qs, k, v))        # [B, N, Lp, K]
    pos = jnp.arange(lp)[None, :]
    seg = jnp.where(pos >= length, 2, (~_key_valid(pos[0], kv_lengths.astype(jnp.int32))).astype(jnp.int32))
    kernel = _splash_kernel(lp, n, bq, bk, bool(interpret))
    out = jax.vmap(lambda qq, kk, vv, s: kernel(qq, kk, vv, segment_ids=sa.SegmentIds(s, s)))(qh, kh, vh, seg)
    return out.transpose(0, 2, 1, 3)[:, :length].astype(q.dtype)


# ------------------------------------------------------------------------------------------- refiner


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Dense attention with a boolean ``mask [B, 1|N, Lq, Lk]`` (True = may attend); softmax in fp32."""
    scale = q.shape[-1] ** -0.5
    s = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32) * scale
    s = jnp.where(mask, s, _NEG)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(mask, p, 0.0)
    return jnp.einsum("bnqk,bknd->bqnd", p.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(q.dtype)

