"""Transformer blocks of the HunyuanCustom MM-DiT (``hymm_sp/modules/models.py``, ``token_refiner.py``) in Flax.

The text refiner (``SingleTokenRefiner`` + ``RefinerBlock``, spec 5.3), the double-stream (spec 5.5) and
single-stream (spec 5.6) blocks, the final layer, and the layer-stack runner: stacks are created by ``nn.scan``
at init (params on a leading ``layers`` axis) and run by ``jax.lax.scan`` over any layer range at apply time.

Shapes: tokens ``[B, N, D]``; per-head tensors ``[B, N, heads, head_dim]``; conditioning vector ``vec [B, D]``;
RoPE tables ``cos, sin [L_img, head_dim]`` (image tokens only).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from .. import attention as attn_lib
from ..config import DiTConfig
from ..layers import (
    Dense, LayerNorm, MLP, MLPEmbedder, Modulation, RMSNorm, TimestepEmbedder, constrain, layer_norm, modulate,
    to_dtype, token_chunks, write_tokens,
)
from ..rope import apply_rope
from .storage import STACKS, slice_layer, take_layer, to_device

ACT = ("act_batch", "act_seq", "act_embed")
ACT_HEADS = ("act_batch", "act_seq", "act_heads", None)

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def dtype_kwargs(cfg: DiTConfig) -> dict:
    """``dtype``/``param_dtype`` keyword arguments of the layers, from the config."""
    return dict(dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype))


def _attend(cfg: DiTConfig, q, k, v, kv_lengths):
    q, k, v = (constrain(a, ACT_HEADS) for a in (q, k, v))
    out = attn_lib.dot_product_attention(
        q, k, v, kv_lengths=kv_lengths, impl=cfg.attention, block_q=cfg.attention_block_q,
        block_kv=cfg.attention_block_kv, sequence_parallel=cfg.sequence_parallel, ulysses_degree=cfg.ulysses_degree,
        interpret=cfg.attention_interpret,
    )
    return constrain(out, ACT_HEADS)


# ------------------------------------------------------------------------------------------- refiner


class RefinerBlock(nn.Module):
    """``IndividualTokenRefinerBlock``: gated self-attention + SiLU MLP, no QK norm, no RoPE, dense mask."""

    cfg: DiTConfig

    @nn.compact
    def __call__(self, h, c, mask):
        cfg, kw = self.cfg, dtype_kwargs(self.cfg)
        dt = kw["dtype"]
        gates = Modulation(2, name="adaLN_modulation", **kw)(c)                  # (gate_msa, gate_mlp)
        a = LayerNorm(cfg.norm_eps, name="norm1", param_dtype=kw["param_dtype"])(h).astype(dt)
        qkv = Dense((3, cfg.num_heads, cfg.head_dim), ("embed", None, "heads", "head_dim"),
                    use_bias=cfg.qkv_bias, name="self_attn_qkv", **kw)(a)
        o = attn_lib.masked_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask)
        o = Dense(cfg.hidden_size, ("heads", "head_dim", "embed"), in_ndim=2, name="self_attn_proj", **kw)(o)
        h = h + o * gates[:, None, 0].astype(dt)
        m = LayerNorm(cfg.norm_eps, name="norm2", param_dtype=kw["param_dtype"])(h).astype(dt)
        m = MLP(cfg.mlp_hidden, act=jax.nn.silu, name="mlp", **kw)(m)
        return h + m * gates[:, None, 1].astype(dt), None


class SingleTokenRefiner(nn.Module):
    """``txt_in``: projects LLaVA states to D and refines them conditioned on t and the masked mean (spec 5.3)."""

    cfg: DiTConfig

    @nn.compact
    def __call__(self, x, t, mask):
        cfg, kw = self.cfg, dtype_kwargs(self.cfg)
        m = mask.astype(jnp.float32)
        pooled = (x.astype(jnp.float32) * m[..., None]).sum(1) / m.sum(1, keepdims=True)
        c = TimestepEmbedder(cfg.hidden_size, name="t_embedder", **kw)(t)
        c = c + MLPEmbedder(cfg.hidden_size, ("linear_1", "linear_2"), name="c_embedder", **kw)(pooled)
        h = Dense(cfg.hidden_size, (None, "embed"), name="input_embedder", **kw)(x)
        mb = jnp.asarray(mask).astype(bool)
        attn_mask = mb[:, None, :, None] & mb[:, None, None, :]
        attn_mask = attn_mask.at[:, :, :, 0].set(True)                          # key 0 always visible
        return run_stack(self, RefinerBlock, cfg, "individual_token_refiner", cfg.refiner_depth, h,
                         (c, attn_mask), remat=False)


# ------------------------------------------------------------------------------------------- MM-DiT blocks


class DoubleStreamBlock(nn.Module):
    """``MMDoubleStreamBlock``: separate img/txt weights, joint attention over ``[img ; txt]`` (spec 5.5).

    The token-wise parts (norm, modulate, qkv + QK norm + RoPE before attention; proj, gate, norm, MLP after it)
    run in chunks of ``cfg.ffn_chunk`` tokens (:func:`token_chunks`)."""

    cfg: DiTConfig

    def _pre(self, prefix):
        """-> ``f(x, shift, scale, cos, sin) -> (q, k, v)`` over the stream's submodules (created here)."""
        cfg, kw = self.cfg, dtype_kwargs(self.cfg)
        qkv_d = Dense((3, cfg.num_heads, cfg.head_dim), ("embed", None, "heads", "head_dim"),
                      use_bias=cfg.qkv_bias, name=f"{prefix}_attn_qkv", **kw)
        q_norm = RMSNorm(cfg.norm_eps, name=f"{prefix}_attn_q_norm", param_dtype=kw["param_dtype"])
        k_norm = RMSNorm(cfg.norm_eps, name=f"{prefix}_attn_k_norm", param_dtype=kw["param_dtype"])

        def f(x, shift, scale, cos=None, sin=None):
            xm = modulate(layer_norm(x, cfg.norm_eps), shift, scale).astype(kw["dtype"])
            qkv = qkv_d(xm)
            q, k, v = q_norm(qkv[:, :, 0]), k_norm(qkv[:, :, 1]), qkv[:, :, 2]
            if cos is not None:
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            return q, k, v

        return f

    def _post(self, prefix, mod):
        """-> ``f(x, attn_out) -> x'``: proj, gated residual, norm, modulate, MLP, gated residual."""
        cfg, kw = self.cfg, dtype_kwargs(self.cfg)
        dt = kw["dtype"]
        proj = Dense(cfg.hidden_size, ("heads", "head_dim", "embed"), in_ndim=2, name=f"{prefix}_attn_proj", **kw)
        mlp = MLP(cfg.mlp_hidden, name=f"{prefix}_mlp", **kw)

        def f(x, attn_out):
            x = x + proj(attn_out) * mod[:, None, 2].astype(dt)
            h = modulate(layer_norm(x, cfg.norm_eps), mod[:, 3], mod[:, 4]).astype(dt)
            return constrain(x + mlp(h) * mod[:, None, 5].astype(dt), ACT)

        return f

    @nn.compact
    def __call__(self, carry, vec, cos, sin, kv_lengths):
        img, txt = carry
        cfg, kw = self.cfg, dtype_kwargs(self.cfg)
        chunk = 0 if self.is_initializing() else cfg.ffn_chunk
        img_mod = Modulation(6, name="img_mod", **kw)(vec)
        txt_mod = Modulation(6, name="txt_mod", **kw)(vec)
        img_pre, txt_pre = self._pre("img"), self._pre("txt")
        n_img = img.shape[1]
        # the video q/k/v are written into [img ; txt]-long buffers, the text rows then in place: no concatenation
        qkv = token_chunks(lambda x, c, s: img_pre(x, img_mod[:, 0], img_mod[:, 1], c, s), chunk,
                           img, cos, sin, axes=(1, 0, 0), out_len=n_img + txt.shape[1])
        tqkv = token_chunks(lambda x: txt_pre(x, txt_mod[:, 0], txt_mod[:, 1]), chunk, txt)
        q, k, v = (write_tokens(a, t, n_img) for a, t in zip(qkv, tqkv))
        o = _attend(cfg, q, k, v, kv_lengths)
        img = token_chunks(self._post("img", img_mod), chunk, img, o)            # reads o's first n_img rows
        txt = token_chunks(self._post("txt", txt_mod), chunk, txt, o[:, n_img:])
        return (img, txt), None


class SingleStreamBlock(nn.Module):
    """``MMSingleStreamBlock`` (spec 5.6). ``linear1`` is stored as ``linear1_qkv [D,3,N,K]`` + ``linear1_mlp
    [D,F]`` and ``linear2`` as ``linear2_attn [N,K,D]`` + ``linear2_mlp [F,D]`` (bias): the same maps, split so
    that tensor parallelism shards heads and MLP columns without gathering a fused axis.

    Before attention only the qkv half of ``linear1`` runs; the MLP half, its GELU and ``linear2`` run after it
    (re-normalising the input), so the ``[tokens, F]`` hidden never lives across attention; both parts run in
    chunks of ``cfg.ffn_chunk`` tokens. RoPE uses identity rows (cos 1, sin 0: exact) for the text tokens."""

    cfg: DiTConfig

    @nn.compact
    def __call__(self, x, vec, cos, sin, kv_lengths):
        cfg, kw = self.cfg, dtype_kwargs(self.cfg)
        dt = kw["dtype"]
        chunk = 0 if self.is_initializing() else cfg.ffn_chunk
        mod = Modulation(3, name="modulation", **kw)(vec)
        qkv_d = Dense((3, cfg.num_heads, cfg.head_dim), ("embed", None, "heads", "head_dim"),
                      use_bias=cfg.qkv_bias, name="linear1_qkv", **kw)
        mlp_d = Dense(cfg.mlp_hidden, ("embed", "mlp"), name="linear1_mlp", **kw)
        q_norm = RMSNorm(cfg.norm_eps, name="q_norm", param_dtype=kw["param_dtype"])
        k_norm = RMSNorm(cfg.norm_eps, name="k_norm", param_dtype=kw["param_dtype"])
        out_attn = Dense(cfg.hidden_size, ("heads", "head_dim", "embed"), in_ndim=2, use_bias=False,
                         name="linear2_attn", **kw)
        out_mlp = Dense(cfg.hidden_size, ("mlp", "embed"), name="linear2_mlp", **kw)
        normed = lambda x: modulate(layer_norm(x, cfg.norm_eps), mod[:, 0], mod[:, 1]).astype(dt)  # noqa: E731

        def pre(x, c, s):
            qkv = qkv_d(normed(x))
            q, k, v = q_norm(qkv[:, :, 0]), k_norm(qkv[:, :, 1]), qkv[:, :, 2]
            return apply_rope(q, c, s), apply_rope(k, c, s), v

        def post(x, o):
            h = constrain(mlp_d(normed(x)), ("act_batch", "act_seq", "act_mlp"))
            out = out_attn(o) + out_mlp(jax.nn.gelu(h, True))
            return constrain(x + out * mod[:, None, 2].astype(dt), ACT)

        n_txt = x.shape[1] - cos.shape[0]
        cos = jnp.concatenate([cos, jnp.ones((n_txt, cos.shape[1]), cos.dtype)])
        sin = jnp.concatenate([sin, jnp.zeros((n_txt, sin.shape[1]), sin.dtype)])
        q, k, v = token_chunks(pre, chunk, x, cos, sin, axes=(1, 0, 0))
        o = _attend(cfg, q, k, v, kv_lengths)
        return token_chunks(post, chunk, x, o), None


class FinalLayer(nn.Module):
    """``adaLN_modulation`` -> (shift, scale) [shift first], non-affine LN, ``linear`` to ``pt*ph*pw*C_out``."""

    cfg: DiTConfig

    @nn.compact
    def __call__(self, x, vec):
        cfg, kw = self.cfg, dtype_kwargs(self.cfg)
        mod = Modulation(2, name="adaLN_modulation", **kw)(vec)
        p = cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]
        linear = Dense(p * cfg.out_channels, ("embed", None), name="linear", **kw)
        chunk = 0 if self.is_initializing() else cfg.ffn_chunk
        return token_chunks(lambda x: linear(modulate(layer_norm(x, cfg.norm_eps), mod[:, 0], mod[:, 1])
                                             .astype(kw["dtype"])), chunk, x)


# ------------------------------------------------------------------------------------------- stacks


def scanned(block_cls, cfg: DiTConfig, length: int, n_bcast: int, **kw):
    """``block_cls`` lifted with ``nn.scan``: params stacked on a leading ``layers`` axis."""
    lifted = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=(nn.broadcast,) * n_bcast, length=length,
                     metadata_params={nn.PARTITION_NAME: "layers"})
    return lifted(cfg, **kw)


def run_stack(parent: nn.Module, block_cls, cfg: DiTConfig, name: str, length: int, carry, bcast: tuple,
              layers: tuple[int, int] | None = None, remat: bool = True):
    """Run layers ``[lo, hi)`` of the stacked block ``name`` (params ``[length, ...]``) over ``carry``.

    At init the stack is created with ``nn.scan`` (leading ``layers`` axis). At apply time the same stacked
    params are read from ``parent.variables`` and scanned with ``jax.lax.scan`` over layer indices, which lets
    callers run any sub-range of layers without copying the stack. ``cfg.unroll_layers`` unrolls that scan
    (straight-line code: no per-layer slicing of the stack, nor of its gradient in the backward pass).
    """
    lo, hi = layers if layers is not None else (0, length)
    if parent.is_initializing():
        module = getattr(parent, name, None)        # declared in setup(), or created here under @compact
        if module is None:
            module = scanned(block_cls, cfg, length, len(bcast), name=name)
        carry, _ = module(carry, *bcast)
        return carry
    if lo >= hi:
        return carry
    stacked = parent.variables["params"][name]
    block = block_cls(cfg, parent=None)
    if name not in STACKS:          # the refiner: always ordinary params
        def body(c, i):
            return block.apply({"params": slice_layer(stacked, i)}, c, *bcast)[0], None
    elif cfg.cpu_offload:           # double buffering: layer i+1 is copied in while layer i computes
        fetch = lambda i: to_device(slice_layer(stacked, i))  # noqa: E731

        def body(c, i):
            c, cur = c
            nxt = fetch(jnp.minimum(i + 1, hi - 1))
            return (block.apply({"params": take_layer(cur, None, cfg)}, c, *bcast)[0], nxt), None
    else:
        def body(c, i):
            return block.apply({"params": take_layer(stacked, i, cfg)}, c, *bcast)[0], None

    policy = REMAT_POLICIES[cfg.remat]
    if remat and cfg.remat != "none":
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    if name in STACKS and cfg.cpu_offload:
        (carry, _), _ = jax.lax.scan(body, (carry, fetch(lo)), jnp.arange(lo, hi))
        return carry
    carry, _ = jax.lax.scan(body, carry, jnp.arange(lo, hi), unroll=bool(cfg.unroll_layers))
    return carry
