"""Audio conditioning modules of the audio DiT: ``AudioProjNet2`` and ``PerceiverAttentionCA``.

Ports ``hymm_sp/modules/audio_adapters.py`` (spec 5.10). Whisper window features ``[B, F, W, Lw, Ca]``
(``F`` video frames, ``W=10`` window, ``Lw=5`` hidden states, ``Ca=384``) are projected to ``context_tokens``
tokens per frame, regrouped into ``4 * context_tokens`` tokens per latent frame, and attended to by the video
tokens of that latent frame after selected double blocks.

``HunyuanDiT._double_blocks`` runs all double blocks in one ``lax.scan`` and applies adapter ``k`` (its params
stacked on the fly) under ``lax.cond`` after block ``audio_inject_blocks[k]``; reference tokens get zero and the
update is scaled by ``audio_strength``. Numerics: LayerNorms eps 1e-5 in fp32, scores formed in the compute dtype
with ``dh^-1/4`` on both q and k, softmax in fp32 (spec 5.10).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..config import DiTConfig
from ..layers import Dense, LayerNorm, to_dtype


def audio_feature_shape(cfg: DiTConfig, batch: int, latent_frames: int) -> tuple[int, ...]:
    frames = 4 * (latent_frames - 1) + 1
    return (batch, frames, cfg.audio_seq_len, cfg.audio_blocks, cfg.audio_channels)


class AudioProjNet2(nn.Module):
    """``[B, F, W, Lw, Ca]`` -> per-latent-frame tokens ``[B, T, 4*ctx, D]`` (frame 0 repeated 4 times)."""

    cfg: DiTConfig

    @nn.compact
    def __call__(self, feats):
        cfg = self.cfg
        kw = dict(dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype))
        b, f = feats.shape[:2]
        if (f - 1) % 4:
            raise ValueError(f"audio features cover {f} video frames; expected 4k+1 frames")
        x = feats.reshape(b, f, -1).astype(kw["dtype"])
        h = jax.nn.relu(Dense(cfg.audio_intermediate_dim, (None, "mlp"), name="proj1", **kw)(x))
        h = jax.nn.relu(Dense(cfg.audio_intermediate_dim, ("mlp", None), name="proj2", **kw)(h))
        h = Dense((cfg.audio_context_tokens, cfg.hidden_size), (None, None, "embed"), name="proj3", **kw)(h)
        h = LayerNorm(1e-5, name="norm", param_dtype=kw["param_dtype"])(h).astype(kw["dtype"])
        h = jnp.concatenate([jnp.repeat(h[:, :1], 3, axis=1), h], axis=1)            # [B, F+3, ctx, D]
        t = (f + 3) // 4
        return h.reshape(b, t, 4 * cfg.audio_context_tokens, cfg.hidden_size)


class PerceiverAttentionCA(nn.Module):
    """Per latent frame: video tokens (queries) attend to that frame's audio tokens; returns the update."""

    cfg: DiTConfig

    @nn.compact
    def __call__(self, video, audio_tokens, grid):
        cfg = self.cfg
        kw = dict(dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype))
        dt = kw["dtype"]
        b, _, d = video.shape
        t, h, w = grid
        heads = cfg.audio_ca_heads
        dh = cfg.audio_ca_dim_hidden // heads
        v = video.reshape(b * t, h * w, d)
        a = audio_tokens.reshape(b * t, -1, d)
        a = LayerNorm(1e-5, name="norm1", param_dtype=kw["param_dtype"])(a).astype(dt)
        z = LayerNorm(1e-5, name="norm2", param_dtype=kw["param_dtype"])(v).astype(dt)
        q = Dense((heads, dh), ("embed", "heads", "head_dim"), use_bias=False, name="to_q", **kw)(z)
        kv = Dense((2, heads, dh), ("embed", None, "heads", "head_dim"), use_bias=False, name="to_kv", **kw)(a)
        s = dh ** -0.25
        scores = jnp.einsum("bqnd,bknd->bnqk", q * jnp.asarray(s, dt), kv[:, :, 0] * jnp.asarray(s, dt),
                            preferred_element_type=jnp.float32)
        # the original forms the scores in the compute dtype (autocast), then runs the softmax in fp32
        p = jax.nn.softmax(scores.astype(dt).astype(jnp.float32), axis=-1).astype(dt)
        o = jnp.einsum("bnqk,bknd->bqnd", p, kv[:, :, 1])
        o = Dense(d, ("heads", "head_dim", "embed"), in_ndim=2, use_bias=False, name="to_out", **kw)(o)
        return o.reshape(b, t * h * w, d)
