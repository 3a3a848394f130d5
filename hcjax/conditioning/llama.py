"""Llama-3 decoder (the language model of LLaVA-Llama-3-8B v1.1) in Flax.

Ports transformers' ``LlamaModel`` (no KV cache, no generation): token embedding, ``num_hidden_layers`` pre-norm
decoder layers (grouped-query attention with RoPE in the HF *rotate-half* convention, SiLU-gated MLP, RMSNorm)
and the final RMSNorm. Shapes: tokens ``[B, S]``, hidden ``[B, S, D]``, attention ``[B, S, N, K]`` (``N`` query
heads, ``Nkv`` key/value heads, ``K`` head dim, ``F`` MLP hidden, ``V`` vocabulary).

Parameter tree (Flax names, torch names in brackets)::

    embed_tokens/embedding            [V, D]            (embed_tokens.weight)
    layers/self_attn/q_proj/kernel    [L, D, N, K]      (layers.{i}.self_attn.q_proj.weight)
    layers/self_attn/{k,v}_proj/kernel[L, D, Nkv, K]
    layers/self_attn/o_proj/kernel    [L, N, K, D]
    layers/mlp/{gate,up}_proj/kernel  [L, D, F];  layers/mlp/down_proj/kernel [L, F, D]
    layers/{input,post_attention}_layernorm/scale [L, D]
    norm/scale                        [D]

Layers are stacked on a leading ``layers`` axis (created with ``nn.scan``) and run with ``jax.lax.scan`` over
layer indices, so a caller can run only the first ``n`` layers (HunyuanCustom needs the output of layer 30 of
32, ``hidden_states[-3]``; the last two layers are never computed).

``hidden_states`` follow transformers: index 0 is the embedding output, index ``i`` the output of layer ``i``,
and the last entry is the *final-normed* output of the last layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..config import LlamaConfig
from ..layers import Dense, RMSNorm, constrain, logical, to_dtype

ACT = ("act_batch", "act_seq", "act_embed")
_NEG = -1e30  # finite "minus infinity": a fully masked row never produces NaN


# ------------------------------------------------------------------------------------------- shared helpers


class Embed(nn.Module):
    """Token embedding table ``embedding [V, D]`` with logical axes ``(vocab, embed)``."""

    num_embeddings: int
    features: int
    axes: tuple[str | None, str | None] = ("vocab", "embed")
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids):
        table = self.param("embedding", logical(nn.initializers.normal(0.02), self.axes),
                           (self.num_embeddings, self.features), self.param_dtype)
        return jnp.take(table, ids, axis=0)


def dense_attention(q, k, v, bias, dtype):
    """Softmax attention with an additive ``bias [B, 1, Sq, Sk]``; GQA when ``k/v`` have fewer heads.

    ``q [B, Sq, N, K]``, ``k, v [B, Sk, Nkv, K]`` with ``N % Nkv == 0`` (query head ``h`` uses kv head
    ``h // (N / Nkv)``, as transformers' ``repeat_kv``). Scores and softmax in fp32; returns ``[B, Sq, N, K]``.
    """
    b, sq, n, kd = q.shape
    nkv = k.shape[2]
    g = n // nkv
    qg = q.reshape(b, sq, nkv, g, kd)
    scores = jnp.einsum("bqhgk,bshk->bhgqs", qg, k, preferred_element_type=jnp.float32) * (kd ** -0.5)
    bias = bias.reshape(bias.shape[0], 1, 1, *bias.shape[-2:])
    probs = jax.nn.softmax(scores + bias, axis=-1).astype(dtype)
    out = jnp.einsum("bhgqs,bshk->bqhgk", probs, v.astype(dtype))
    return out.reshape(b, sq, n, kd)


def mask_bias(attention_mask, causal: bool) -> jax.Array:
    """``attention_mask [B, S]`` (1 = valid key) -> additive bias ``[B, 1, S, S]`` (fp32)."""
    s = attention_mask.shape[-1]
    allowed = (attention_mask[:, None, None, :] > 0)
    if causal:
        allowed = allowed & jnp.tril(jnp.ones((s, s), bool))[None, None]
    return jnp.where(allowed, 0.0, _NEG).astype(jnp.float32)


def scan_stack(layer_cls: type, layer_args: tuple, length: int, n_bcast: int, name: str | None = None):
    """``layer_cls(*layer_args)`` lifted with ``nn.scan``: params stacked on a leading ``layers`` axis.

    Declare it in ``setup()`` (or call it under ``@nn.compact``); it runs only at init, see :func:`run_stack`.
    """
    lifted = nn.scan(layer_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=(nn.broadcast,) * n_bcast, length=length,
                     metadata_params={nn.PARTITION_NAME: "layers"})
    return lifted(*layer_args, name=name)


def run_stack(parent: nn.Module, stack: nn.Module, layer_cls: type, layer_args: tuple, carry, bcast: Sequence[Any],
              run: int, collect: bool = False):
    """Run the first ``run`` layers of the stacked layers ``stack`` (a :func:`scan_stack` child of ``parent``).

    ``layer_cls(*layer_args)`` maps ``(carry, *bcast) -> (carry, y)``. At init the ``nn.scan`` stack runs all
    layers (creating the params). At apply time the stacked params are read from ``parent.variables`` and
    scanned with ``jax.lax.scan`` over layer indices (no copy of the stack), so only ``run`` layers are
    computed. Returns ``(carry, ys)``; ``ys [run, ...]`` are the per-layer ``y`` when ``collect``, else None.
    """
    if parent.is_initializing():
        out, ys = stack(carry, *bcast)
        return out, (ys if collect else None)
    stacked = parent.variables["params"][stack.name]
    length = jax.tree.leaves(stacked)[0].shape[0]
    if not 0 <= run <= length:
        raise ValueError(f"{stack.name}: cannot run {run} of {length} layers")
    if run == 0:
        return carry, (jnp.zeros((0, *carry.shape), carry.dtype) if collect else None)
    layer = layer_cls(*layer_args, parent=None)

    def body(c, i):
        p = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), stacked)
        c, y = layer.apply({"params": p}, c, *bcast)
        return c, (y if collect else None)

    return jax.lax.scan(body, carry, jnp.arange(run))


# ------------------------------------------------------------------------------------------- RoPE


def rope_cos_sin(position_ids, head_dim: int, theta: float):
    """transformers' default RoPE: ``cos, sin [B, S, K]`` (fp32) from ``position_ids [B, S]``."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rotate_half(x, cos, sin):
    """``x [B, S, N, K]`` rotated with ``cos, sin [B, S, K]``: ``x cos + rotate_half(x) sin``."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    c, s = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * c + rot * s


# ------------------------------------------------------------------------------------------- modules


def _kw(cfg: LlamaConfig) -> dict:
    return dict(dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype))


class LlamaAttention(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, bias):
        c, kw = self.cfg, _kw(self.cfg)
        n, nkv, k = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q = Dense((n, k), ("embed", "heads", "head_dim"), use_bias=False, name="q_proj", **kw)(x)
        kk = Dense((nkv, k), ("embed", "heads", "head_dim"), use_bias=False, name="k_proj", **kw)(x)
        v = Dense((nkv, k), ("embed", "heads", "head_dim"), use_bias=False, name="v_proj", **kw)(x)
        q, kk = apply_rotate_half(q, cos, sin), apply_rotate_half(kk, cos, sin)
        out = dense_attention(q, kk, v, bias, kw["dtype"])
        return Dense(c.hidden_size, ("heads", "head_dim", "embed"), in_ndim=2, use_bias=False, name="o_proj",
                     **kw)(out)


class LlamaMLP(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x):
        c, kw = self.cfg, _kw(self.cfg)
        gate = Dense(c.intermediate_size, ("embed", "mlp"), use_bias=False, name="gate_proj", **kw)(x)
        up = Dense(c.intermediate_size, ("embed", "mlp"), use_bias=False, name="up_proj", **kw)(x)
        h = constrain(jax.nn.silu(gate) * up, ("act_batch", "act_seq", "act_mlp"))
        return Dense(c.hidden_size, ("mlp", "embed"), use_bias=False, name="down_proj", **kw)(h)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm decoder layer; scan-compatible: ``(x, cos, sin, bias) -> (x, x)``."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, bias):
        c = self.cfg
        norm = dict(eps=c.rms_norm_eps, axis_name="embed", param_dtype=to_dtype(c.param_dtype))
        h = RMSNorm(**norm, name="input_layernorm")(x)
        x = x + LlamaAttention(c, name="self_attn")(h, cos, sin, bias)
        h = RMSNorm(**norm, name="post_attention_layernorm")(x)
        x = constrain(x + LlamaMLP(c, name="mlp")(h), ACT)
        return x, x


class LlamaModel(nn.Module):
    """transformers ``LlamaModel`` forward (no cache).

    ``__call__(input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, num_layers=None,
    output_hidden_states=False, final_norm=True)``:

    * ``attention_mask [B, S]`` (1 = valid key; default all ones) is combined with the causal mask;
    * ``position_ids [B, S]`` default ``arange(S)``;
    * runs the first ``num_layers`` layers (default all); ``final_norm`` applies the final RMSNorm (only
      allowed when all layers run, as in transformers).

    Returns ``(last, hidden_states)``: ``last [B, S, D]``; ``hidden_states`` a tuple of ``num_layers + 1``
    arrays when ``output_hidden_states`` (the last one normed when ``final_norm``), else ``None``.
    """

    cfg: LlamaConfig
    with_norm: bool = True          # False: no final-norm parameter (then ``final_norm`` must be False)

    def setup(self):
        c = self.cfg
        self.embed_tokens = Embed(c.vocab_size, c.hidden_size, param_dtype=to_dtype(c.param_dtype))
        self.layers = scan_stack(LlamaDecoderLayer, (c,), c.num_hidden_layers, 3)
        if self.with_norm:
            self.norm = RMSNorm(eps=c.rms_norm_eps, axis_name="embed", param_dtype=to_dtype(c.param_dtype))

    def embed(self, input_ids):
        return self.embed_tokens(input_ids).astype(to_dtype(self.cfg.dtype))

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                 num_layers: int | None = None, output_hidden_states: bool = False, final_norm: bool = True):
        c = self.cfg
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("LlamaModel: pass exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(to_dtype(c.dtype))
        b, s = x.shape[:2]
        if attention_mask is None:
            attention_mask = jnp.ones((b, s), jnp.int32)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(s), (b, s))
        n = c.num_hidden_layers if num_layers is None else num_layers
        if self.is_initializing():
            n, final_norm = c.num_hidden_layers, self.with_norm
        if final_norm and not self.with_norm:
            raise ValueError("final_norm=True but this LlamaModel was built without the final norm")
        if final_norm and n != c.num_hidden_layers:
            raise ValueError(f"final_norm needs all {c.num_hidden_layers} layers, got num_layers={n}")
        cos, sin = rope_cos_sin(position_ids, c.head_dim, c.rope_theta)
        bias = mask_bias(attention_mask, causal=True)
        x = constrain(x, ACT)
        out, ys = run_stack(self, self.layers, LlamaDecoderLayer, (c,), x, (cos, sin, bias), run=n,
                            collect=output_hidden_states)
        if final_norm:
            out = self.norm(out)
        if not output_hidden_states:
            return out, None
        hidden = [x] + [ys[i] for i in range(n)]
        if final_norm:
            hidden[-1] = out
        return out, tuple(hidden)


def init_params(cfg: LlamaConfig, key: jax.Array, seq: int = 4) -> dict:
    """Random (boxed) parameters of :class:`LlamaModel`."""
    return LlamaModel(cfg).init(key, input_ids=jnp.zeros((1, seq), jnp.int32))["params"]


def abstract_params(cfg: LlamaConfig) -> dict:
    """``jax.eval_shape`` of :func:`init_params` (nothing allocated), boxed with logical axes."""
    return jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
