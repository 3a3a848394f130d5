"""CLIP towers in Flax: the ViT vision tower of LLaVA (hidden state -2) and the CLIP-L text tower (pooled).

Ports transformers' ``CLIPVisionModel`` / ``CLIPTextModel`` (``models/clip/modeling_clip.py``). Both towers are
pre-LayerNorm transformers with ``quick_gelu`` MLPs sharing :class:`ClipEncoderLayer`; layers are stacked on a
leading ``layers`` axis (see :func:`hcjax.conditioning.llama.run_stack`).

Vision: pixels channels-last ``[B, H, W, C]`` (already normalised) -> patches (``P = (H/p)(W/p)``) ->
``[CLS ; patches] + position_embedding`` -> ``pre_layrnorm`` -> layers. ``hidden_states`` are (pre-LN
embeddings, layer 1 .. layer L); :meth:`ClipVisionModel.__call__` returns ``hidden_states[feature_layer]`` and
runs only the layers needed for it (LLaVA uses -2, the output of layer 23 of 24). ``post_layernorm`` exists
for checkpoint fidelity (it only feeds the unused pooled output).

Text: ``input_ids [B, 77]`` -> token + position embeddings -> causal layers (padding keys masked by
``attention_mask``) -> ``final_layer_norm`` -> ``last_hidden_state [B, 77, D]`` and ``pooled [B, D]``: the row
at ``argmax(input_ids)`` when ``eos_token_id == 2`` (the legacy rule of the released config: the EOS token has
the highest id, and argmax returns its first occurrence), else the first position equal to ``eos_token_id``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..config import ClipTextConfig, ClipVisionConfig
from ..layers import Dense, LayerNorm, constrain, logical, to_dtype
from .llama import Embed, dense_attention, mask_bias, run_stack, scan_stack

ACT = ("act_batch", "act_seq", "act_embed")

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
}

ClipConfig = ClipVisionConfig | ClipTextConfig


def _kw(cfg: ClipConfig) -> dict:
    return dict(dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype))


def _act(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported CLIP hidden_act {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class ClipAttention(nn.Module):
    cfg: ClipConfig

    @nn.compact
    def __call__(self, x, bias):
        c, kw = self.cfg, _kw(self.cfg)
        n = c.num_attention_heads
        k = c.hidden_size // n
        q, kk, v = (Dense((n, k), ("embed", "heads", "head_dim"), name=f"{p}_proj", **kw)(x) for p in "qkv")
        out = dense_attention(q, kk, v, bias, kw["dtype"])
        return Dense(c.hidden_size, ("heads", "head_dim", "embed"), in_ndim=2, name="out_proj", **kw)(out)


class ClipMLP(nn.Module):
    cfg: ClipConfig

    @nn.compact
    def __call__(self, x):
        c, kw = self.cfg, _kw(self.cfg)
        h = Dense(c.intermediate_size, ("embed", "mlp"), name="fc1", **kw)(x)
        h = constrain(_act(c.hidden_act)(h), ("act_batch", "act_seq", "act_mlp"))
        return Dense(c.hidden_size, ("mlp", "embed"), name="fc2", **kw)(h)


class ClipEncoderLayer(nn.Module):
    """Pre-LN layer; scan-compatible ``(x, bias) -> (x, x)``."""

    cfg: ClipConfig

    @nn.compact
    def __call__(self, x, bias):
        c = self.cfg
        dt = to_dtype(c.dtype)
        ln = dict(eps=c.layer_norm_eps, param_dtype=to_dtype(c.param_dtype))
        x = x + ClipAttention(c, name="self_attn")(LayerNorm(**ln, name="layer_norm1")(x).astype(dt), bias)
        x = x + ClipMLP(c, name="mlp")(LayerNorm(**ln, name="layer_norm2")(x).astype(dt))
        x = constrain(x.astype(dt), ACT)
        return x, x


class ClipEncoder(nn.Module):
    """``layers``: the stacked :class:`ClipEncoderLayer` (Flax path ``encoder/layers``)."""

    cfg: ClipConfig

    def setup(self):
        self.layers = scan_stack(ClipEncoderLayer, (self.cfg,), self.cfg.num_hidden_layers, 1)

    def __call__(self, x, bias, run: int, collect: bool = False):
        return run_stack(self, self.layers, ClipEncoderLayer, (self.cfg,), x, (bias,), run=run, collect=collect)


# ------------------------------------------------------------------------------------------- vision


class ClipVisionEmbeddings(nn.Module):
    cfg: ClipVisionConfig

    @nn.compact
    def __call__(self, pixels):
        c, kw = self.cfg, _kw(self.cfg)
        b, h, w, ch = pixels.shape
        p = c.patch_size
        if h != c.image_size or w != c.image_size or ch != c.num_channels:
            raise ValueError(f"CLIP vision: expected pixels [B, {c.image_size}, {c.image_size}, {c.num_channels}] "
                             f"(channels-last), got {tuple(pixels.shape)}")
        gh, gw = h // p, w // p
        patches = pixels.reshape(b, gh, p, gw, p, ch).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, p, p, ch)
        x = Dense(c.hidden_size, (None, None, None, "embed"), in_ndim=3, use_bias=False, name="patch_embedding",
                  **kw)(patches)
        cls = self.param("class_embedding", logical(nn.initializers.normal(0.02), ("embed",)), (c.hidden_size,),
                         kw["param_dtype"])
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, c.hidden_size)), x], axis=1)
        pos = Embed(gh * gw + 1, c.hidden_size, axes=(None, "embed"), param_dtype=kw["param_dtype"],
                    name="position_embedding")(jnp.arange(gh * gw + 1))
        return x + pos.astype(x.dtype)[None]


class ClipVisionModel(nn.Module):
    """transformers ``CLIPVisionModel``; ``__call__(pixels [B,H,W,C], feature_layer=-2) -> [B, P+1, D]``."""

    cfg: ClipVisionConfig
    with_post_layernorm: bool = True    # the (unused) post_layernorm parameters

    def setup(self):
        c = self.cfg
        ln = dict(eps=c.layer_norm_eps, param_dtype=to_dtype(c.param_dtype))
        self.embeddings = ClipVisionEmbeddings(c)
        self.pre_layrnorm = LayerNorm(**ln)
        self.encoder = ClipEncoder(c)
        if self.with_post_layernorm:
            self.post_layernorm = LayerNorm(**ln)

    def __call__(self, pixels, feature_layer: int = -2, output_hidden_states: bool = False):
        """``hidden_states[feature_layer]`` (index into (embeddings, layer 1..L)); with ``output_hidden_states``
        returns ``(selected, all_hidden_states)`` running every layer."""
        c = self.cfg
        n_states = c.num_hidden_layers + 1
        if not -n_states <= feature_layer < n_states:
            raise ValueError(f"feature_layer={feature_layer} out of range for {c.num_hidden_layers} layers")
        run = feature_layer % n_states
        dt = to_dtype(c.dtype)
        x = self.pre_layrnorm(self.embeddings(pixels.astype(dt))).astype(dt)
        if self.is_initializing():
            out, _ = self.encoder(x, jnp.zeros((1, 1, 1, x.shape[1]), jnp.float32), run=c.num_hidden_layers)
            if self.with_post_layernorm:
                self.post_layernorm(out[:, 0])
            return x
        bias = jnp.zeros((1, 1, 1, x.shape[1]), jnp.float32)
        if output_hidden_states:
            _, ys = self.encoder(x, bias, run=c.num_hidden_layers, collect=True)
            hidden = (x,) + tuple(ys[i] for i in range(c.num_hidden_layers))
            return hidden[feature_layer], hidden
        out, _ = self.encoder(x, bias, run=run)
        return out


# ------------------------------------------------------------------------------------------- text


class ClipTextEmbeddings(nn.Module):
    cfg: ClipTextConfig

    @nn.compact
    def __call__(self, input_ids):
        c = self.cfg
        s = input_ids.shape[-1]
        if s > c.max_position_embeddings:
            raise ValueError(f"CLIP text: {s} tokens exceed max_position_embeddings={c.max_position_embeddings}")
        pd = to_dtype(c.param_dtype)
        tok = Embed(c.vocab_size, c.hidden_size, param_dtype=pd, name="token_embedding")(input_ids)
        pos = Embed(c.max_position_embeddings, c.hidden_size, axes=(None, "embed"), param_dtype=pd,
                    name="position_embedding")(jnp.arange(s))
        return (tok + pos[None]).astype(to_dtype(c.dtype))


class ClipTextModel(nn.Module):
    """transformers ``CLIPTextModel``: ``(input_ids, attention_mask=None) -> (last_hidden_state, pooled)``."""

    cfg: ClipTextConfig

    def setup(self):
        c = self.cfg
        self.embeddings = ClipTextEmbeddings(c)
        self.encoder = ClipEncoder(c)
        self.final_layer_norm = LayerNorm(eps=c.layer_norm_eps, param_dtype=to_dtype(c.param_dtype))

    def __call__(self, input_ids, attention_mask=None):
        c = self.cfg
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        x = self.embeddings(input_ids)
        out, _ = self.encoder(x, mask_bias(attention_mask, causal=True), run=c.num_hidden_layers)
        last = self.final_layer_norm(out).astype(to_dtype(c.dtype))
        if c.eos_token_id == 2:
            idx = jnp.argmax(input_ids, axis=-1)
        else:
            idx = jnp.argmax((input_ids == c.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = jnp.take_along_axis(last, idx[:, None, None], axis=1)[:, 0]
        return last, pooled


# ------------------------------------------------------------------------------------------- params


def init_vision_params(cfg: ClipVisionConfig, key: jax.Array) -> dict:
    x = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32)
    return ClipVisionModel(cfg).init(key, x)["params"]


def init_text_params(cfg: ClipTextConfig, key: jax.Array) -> dict:
    return ClipTextModel(cfg).init(key, jnp.zeros((1, cfg.max_position_embeddings), jnp.int32))["params"]


def abstract_vision_params(cfg: ClipVisionConfig) -> dict:
    return jax.eval_shape(lambda k: init_vision_params(cfg, k), jax.random.key(0))


def abstract_text_params(cfg: ClipTextConfig) -> dict:
    return jax.eval_shape(lambda k: init_text_params(cfg, k), jax.random.key(0))
