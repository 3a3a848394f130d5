"""The HunyuanCustom MM-DiT (``HYVideoDiffusionTransformer``, ``hymm_sp/modules/models.py``) in Flax.

Shapes: video latents ``x [B, T, H, W, C]`` (channels-last), timestep ``t [B]`` on the 0..1000 scale, LLaVA
states ``text_states [B, S, Dt]`` with ``text_mask [B, S]``, CLIP pooled ``text_states_2 [B, D2]``, reference
latents ``ref_latents [B, 1, H, W, C]``. Tokens: ``L`` video (``T'H'W'``), ``R`` reference (``H'W'``), ``S`` text.

Structure (spec 5.13): ``vec = time_in(t) + vector_in(clip) [+ guidance_in(g)]``; ``txt = txt_in(...)`` (the
SingleTokenRefiner with the element-wise mask); ``img = [img_in(ref) ; img_in(x) (+ bg_proj(bg_in(bg)))]``;
20 double-stream blocks (audio injections after the configured ones), 40 single-stream blocks over
``[img ; txt]``, then the final layer on the video tokens and unpatchify.

Blocks are stored stacked on a leading ``layers`` axis (``nn.scan`` at init) and run by ``jax.lax.scan`` over
layer ranges, so the sampler can stop before / resume at the last single block (the step cache of spec 6.4)
and the audio path can inject between double blocks, all over one parameter stack. ``cfg.remat`` selects a
``jax.checkpoint`` policy per block.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from . import attention as attn_lib
from .config import DiTConfig
from .layers import (
    Dense, LayerNorm, MLP, MLPEmbedder, Modulation, PatchEmbed, RMSNorm, TimestepEmbedder, constrain,
    layer_norm, modulate, to_dtype,
)
from .rope import apply_rope, rope_tables

ACT = ("act_batch", "act_seq", "act_embed")
ACT_HEADS = ("act_batch", "act_seq", "act_heads", None)

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _kw(cfg: DiTConfig) -> dict:
    return dict(dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype))


def _attend(cfg: DiTConfig, q, k, v, kv_lengths):
    q, k, v = (constrain(a, ACT_HEADS) for a in (q, k, v))
    out = attn_lib.dot_product_attention(
        q, k, v, kv_lengths=kv_lengths, impl=cfg.attention, block_q=cfg.attention_block_q,
        block_kv=cfg.attention_block_kv,
    )
    return constrain(out, ACT_HEADS)


# ------------------------------------------------------------------------------------------- refiner


class RefinerBlock(nn.Module):
    """``IndividualTokenRefinerBlock``: gated self-attention + SiLU MLP, no QK norm, no RoPE, dense mask."""

    cfg: DiTConfig

    @nn.compact
    def __call__(self, h, c, mask):
        cfg, kw = self.cfg, _kw(self.cfg)
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
        cfg, kw = self.cfg, _kw(self.cfg)
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
    """``MMDoubleStreamBlock``: separate img/txt weights, joint attention over ``[img ; txt]`` (spec 5.5)."""

    cfg: DiTConfig

    def _qkv(self, prefix, x, shift, scale, cos=None, sin=None):
        cfg, kw = self.cfg, _kw(self.cfg)
        xm = modulate(layer_norm(x, cfg.norm_eps), shift, scale).astype(kw["dtype"])
        qkv = Dense((3, cfg.num_heads, cfg.head_dim), ("embed", None, "heads", "head_dim"),
                    use_bias=cfg.qkv_bias, name=f"{prefix}_attn_qkv", **kw)(xm)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = RMSNorm(cfg.norm_eps, name=f"{prefix}_attn_q_norm", param_dtype=kw["param_dtype"])(q)
        k = RMSNorm(cfg.norm_eps, name=f"{prefix}_attn_k_norm", param_dtype=kw["param_dtype"])(k)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def _post(self, prefix, x, attn_out, mod):
        cfg, kw = self.cfg, _kw(self.cfg)
        dt = kw["dtype"]
        o = Dense(cfg.hidden_size, ("heads", "head_dim", "embed"), in_ndim=2, name=f"{prefix}_attn_proj",
                  **kw)(attn_out)
        x = x + o * mod[:, None, 2].astype(dt)
        h = modulate(layer_norm(x, cfg.norm_eps), mod[:, 3], mod[:, 4]).astype(dt)
        h = MLP(cfg.mlp_hidden, name=f"{prefix}_mlp", **kw)(h)
        return constrain(x + h * mod[:, None, 5].astype(dt), ACT)

    @nn.compact
    def __call__(self, carry, vec, cos, sin, kv_lengths):
        img, txt = carry
        cfg, kw = self.cfg, _kw(self.cfg)
        img_mod = Modulation(6, name="img_mod", **kw)(vec)
        txt_mod = Modulation(6, name="txt_mod", **kw)(vec)
        iq, ik, iv = self._qkv("img", img, img_mod[:, 0], img_mod[:, 1], cos, sin)
        tq, tk, tv = self._qkv("txt", txt, txt_mod[:, 0], txt_mod[:, 1])
        cat = lambda a, b: jnp.concatenate([a, b], axis=1)  # noqa: E731
        o = _attend(cfg, cat(iq, tq), cat(ik, tk), cat(iv, tv), kv_lengths)
        n_img = img.shape[1]
        img = self._post("img", img, o[:, :n_img], img_mod)
        txt = self._post("txt", txt, o[:, n_img:], txt_mod)
        return (img, txt), None


class SingleStreamBlock(nn.Module):
    """``MMSingleStreamBlock`` (spec 5.6). ``linear1`` is stored as ``linear1_qkv [D,3,N,K]`` + ``linear1_mlp
    [D,F]`` and ``linear2`` as ``linear2_attn [N,K,D]`` + ``linear2_mlp [F,D]`` (bias): the same maps, split so
    that tensor parallelism shards heads and MLP columns without gathering a fused axis."""

    cfg: DiTConfig

    @nn.compact
    def __call__(self, x, vec, cos, sin, kv_lengths):
        cfg, kw = self.cfg, _kw(self.cfg)
        dt = kw["dtype"]
        mod = Modulation(3, name="modulation", **kw)(vec)
        xm = modulate(layer_norm(x, cfg.norm_eps), mod[:, 0], mod[:, 1]).astype(dt)
        qkv = Dense((3, cfg.num_heads, cfg.head_dim), ("embed", None, "heads", "head_dim"),
                    use_bias=cfg.qkv_bias, name="linear1_qkv", **kw)(xm)
        mlp = Dense(cfg.mlp_hidden, ("embed", "mlp"), name="linear1_mlp", **kw)(xm)
        mlp = constrain(mlp, ("act_batch", "act_seq", "act_mlp"))
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = RMSNorm(cfg.norm_eps, name="q_norm", param_dtype=kw["param_dtype"])(q)
        k = RMSNorm(cfg.norm_eps, name="k_norm", param_dtype=kw["param_dtype"])(k)
        n_img = cos.shape[0]
        q = jnp.concatenate([apply_rope(q[:, :n_img], cos, sin), q[:, n_img:]], axis=1)
        k = jnp.concatenate([apply_rope(k[:, :n_img], cos, sin), k[:, n_img:]], axis=1)
        o = _attend(cfg, q, k, v, kv_lengths)
        out = Dense(cfg.hidden_size, ("heads", "head_dim", "embed"), in_ndim=2, use_bias=False,
                    name="linear2_attn", **kw)(o)
        out = out + Dense(cfg.hidden_size, ("mlp", "embed"), name="linear2_mlp", **kw)(jax.nn.gelu(mlp, True))
        return constrain(x + out * mod[:, None, 2].astype(dt), ACT), None


class FinalLayer(nn.Module):
    """``adaLN_modulation`` -> (shift, scale) [shift first], non-affine LN, ``linear`` to ``pt*ph*pw*C_out``."""

    cfg: DiTConfig

    @nn.compact
    def __call__(self, x, vec):
        cfg, kw = self.cfg, _kw(self.cfg)
        mod = Modulation(2, name="adaLN_modulation", **kw)(vec)
        h = modulate(layer_norm(x, cfg.norm_eps), mod[:, 0], mod[:, 1]).astype(kw["dtype"])
        p = cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]
        return Dense(p * cfg.out_channels, ("embed", None), name="linear", **kw)(h)


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
    callers run any sub-range of layers without copying the stack.
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

    def body(c, i):
        p = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), stacked)
        return block.apply({"params": p}, c, *bcast)[0], None

    policy = REMAT_POLICIES[cfg.remat]
    if remat and cfg.remat != "none":
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    carry, _ = jax.lax.scan(body, carry, jnp.arange(lo, hi))
    return carry


# ------------------------------------------------------------------------------------------- the model


@flax.struct.dataclass
class StepCache:
    """What a full step stores for a cached (deepcache) step: the input of the last single block."""

    x: jax.Array            # [B, R + L + S, D]


class HunyuanDiT(nn.Module):
    """HunyuanCustom DiT. ``apply({"params": p}, x, t, text_states, text_mask, text_states_2, ...)``.

    Keyword arguments:
      ``ref_latents [B,1,H,W,C]``  reference-image latents (prepended tokens, dropped before the final layer)
      ``guidance [B]``             guidance value for guidance-distilled variants (``guidance_embed``)
      ``bg_latents [B,T,H,W,Cbg]`` editing: background + mask latents (``video_condition``)
      ``audio_features``           audio tokens for the audio model (``audio_condition``; see ``audio_hook``)
      ``return_cache``             also return the input of the last single block (``StepCache``)
      ``cache``                    run only the last single block on ``cache.x`` and the final layer
    """

    cfg: DiTConfig

    def setup(self):
        cfg, kw = self.cfg, _kw(self.cfg)
        self.img_in = PatchEmbed(cfg.hidden_size, tuple(cfg.patch_size), **kw)
        self.time_in = TimestepEmbedder(cfg.hidden_size, **kw)
        self.vector_in = MLPEmbedder(cfg.hidden_size, ("in_layer", "out_layer"), **kw)
        if cfg.guidance_embed:
            self.guidance_in = TimestepEmbedder(cfg.hidden_size, **kw)
        self.txt_in = SingleTokenRefiner(cfg)
        if cfg.video_condition:
            self.bg_in = PatchEmbed(cfg.hidden_size, tuple(cfg.patch_size), **kw)
            self.bg_proj = Dense(cfg.hidden_size, ("embed", "mlp"), **kw)
        if cfg.audio_condition:
            from .conditioning.audio import AudioProjNet2, PerceiverAttentionCA

            self.audio_proj = AudioProjNet2(cfg)
            self.audio_models = [PerceiverAttentionCA(cfg) for _ in cfg.audio_inject_blocks]
        self.double_blocks = scanned(DoubleStreamBlock, cfg, cfg.depth_double_blocks, 4)
        self.single_blocks = scanned(SingleStreamBlock, cfg, cfg.depth_single_blocks, 4)
        self.final_layer = FinalLayer(cfg)

    # -- pieces ---------------------------------------------------------------------------------------

    def conditioning_vector(self, t, text_states_2, guidance=None):
        vec = self.time_in(t) + self.vector_in(text_states_2)
        if self.cfg.guidance_embed:
            if guidance is None:
                raise ValueError("this DiT has guidance_embed=True: pass guidance=[B] (e.g. 1000 * scale)")
            vec = vec + self.guidance_in(guidance)
        elif guidance is not None:
            raise ValueError("guidance was given but the DiT config has guidance_embed=False")
        return vec

    def _final(self, img, vec, n_ref, grid, batch):
        cfg = self.cfg
        tp, hp, wp = grid
        pt, ph, pw = cfg.patch_size
        out = self.final_layer(img[:, n_ref:], vec)
        out = out.reshape(batch, tp, hp, wp, cfg.out_channels, pt, ph, pw)
        out = out.transpose(0, 1, 5, 2, 6, 3, 7, 4).reshape(batch, tp * pt, hp * ph, wp * pw, cfg.out_channels)
        return out.astype(jnp.float32)

    # -- forward --------------------------------------------------------------------------------------

    def __call__(self, x, t, text_states, text_mask, text_states_2, *, ref_latents=None, guidance=None,
                 bg_latents=None, audio_features=None, audio_strength=1.0, return_cache=False, cache=None):
        cfg = self.cfg
        validate_inputs(cfg, x, t, text_states, text_mask, text_states_2, ref_latents, bg_latents, audio_features)
        b, t_, h_, w_, _ = x.shape
        pt, ph, pw = cfg.patch_size
        grid = (t_ // pt, h_ // ph, w_ // pw)
        n_ref = (h_ // ph) * (w_ // pw) if ref_latents is not None else 0
        dt = to_dtype(cfg.dtype)
        t = t.astype(jnp.float32)

        vec = self.conditioning_vector(t, text_states_2, guidance)
        cos, sin = rope_tables(grid, cfg.rope_dim_list, cfg.rope_theta, with_ref=ref_latents is not None)
        n_img = cos.shape[0]
        kv_lengths = n_img + jnp.sum(text_mask.astype(jnp.int32), axis=1)
        depth = cfg.depth_single_blocks

        if cache is not None:
            xs = run_stack(self, SingleStreamBlock, cfg, "single_blocks", depth, cache.x,
                           (vec, cos, sin, kv_lengths), layers=(depth - 1, depth))
            return self._final(xs[:, :n_img], vec, n_ref, grid, b)

        vid = self.img_in(x.astype(dt))
        if cfg.video_condition:
            if bg_latents is None:
                raise ValueError("the editing DiT (video_condition=True) needs bg_latents [B,T,H,W,C]")
            vid = vid + self.bg_proj(self.bg_in(bg_latents.astype(dt)))
        img = vid if ref_latents is None else jnp.concatenate([self.img_in(ref_latents.astype(dt)), vid], axis=1)
        img = constrain(img, ACT)
        txt = constrain(self.txt_in(text_states.astype(dt), t, text_mask), ACT)

        img, txt = self._double_blocks(img, txt, vec, cos, sin, kv_lengths, n_ref, grid, audio_features,
                                       audio_strength)
        xs = constrain(jnp.concatenate([img, txt], axis=1), ACT)
        bcast = (vec, cos, sin, kv_lengths)
        if return_cache:
            xs = run_stack(self, SingleStreamBlock, cfg, "single_blocks", depth, xs, bcast, layers=(0, depth - 1))
            stored = StepCache(xs)
            xs = run_stack(self, SingleStreamBlock, cfg, "single_blocks", depth, xs, bcast,
                           layers=(depth - 1, depth))
            return self._final(xs[:, :n_img], vec, n_ref, grid, b), stored
        xs = run_stack(self, SingleStreamBlock, cfg, "single_blocks", depth, xs, bcast)
        return self._final(xs[:, :n_img], vec, n_ref, grid, b)

    def _double_blocks(self, img, txt, vec, cos, sin, kv_lengths, n_ref, grid, audio_features, audio_strength):
        """The stacked double blocks; the audio model adds adapter ``k`` after block ``audio_inject_blocks[k]``.

        Audio path (spec 5.10): one ``lax.scan`` over all double blocks (one compiled block body, the one parameter
        stack); the adapters' parameters are stacked on the fly ``[n_adapters, ...]`` and the adapter runs under
        ``lax.cond`` only after the injection blocks (one compiled adapter body), adding
        ``[0 (reference tokens) ; strength * CA_k(video tokens)]`` to ``img``.
        """
        cfg = self.cfg
        bcast = (vec, cos, sin, kv_lengths)
        n = cfg.depth_double_blocks
        if cfg.audio_condition:
            if audio_features is None:
                raise ValueError("the audio DiT (audio_condition=True) needs audio_features [B,F,"
                                 f"{cfg.audio_seq_len},{cfg.audio_blocks},{cfg.audio_channels}]; the unconditional "
                                 "CFG branch takes zeros (they still contribute, spec 5.10)")
            b, f_want = img.shape[0], 4 * (grid[0] - 1) + 1
            want = (b, f_want, cfg.audio_seq_len, cfg.audio_blocks, cfg.audio_channels)
            if tuple(audio_features.shape) != want:
                raise ValueError(f"audio_features must be {list(want)} (4(T-1)+1 = {f_want} video frames for T="
                                 f"{grid[0]} latent frames); got {tuple(audio_features.shape)}")
        if not cfg.audio_condition or self.is_initializing():
            img, txt = run_stack(self, DoubleStreamBlock, cfg, "double_blocks", n, (img, txt), bcast)
            if cfg.audio_condition:
                tokens = self.audio_proj(audio_features)
                for module in self.audio_models:
                    img = img + self._audio_delta(lambda v, m=module: m(v, tokens, grid), img, n_ref,
                                                  audio_strength)
            return img, txt
        from .conditioning.audio import PerceiverAttentionCA

        tokens = self.audio_proj(audio_features)
        params = self.variables["params"]
        stacked = params["double_blocks"]
        adapters = jax.tree.map(lambda *a: jnp.stack(a), *[params[f"audio_models_{j}"]
                                                           for j in range(len(cfg.audio_inject_blocks))])
        slot = [-1] * n
        for j, after in enumerate(cfg.audio_inject_blocks):
            slot[after] = j
        block, ca = DoubleStreamBlock(cfg, parent=None), PerceiverAttentionCA(cfg, parent=None)
        take = lambda tree, i: jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), tree)  # noqa: E731

        def body(carry, xs):
            i, j = xs
            img_, txt_ = block.apply({"params": take(stacked, i)}, carry, *bcast)[0]

            def inject(x):
                pa = take(adapters, jnp.maximum(j, 0))
                return x + self._audio_delta(lambda v: ca.apply({"params": pa}, v, tokens, grid), x, n_ref,
                                             audio_strength)

            return (jax.lax.cond(j >= 0, inject, lambda x: x, img_), txt_), None

        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
        (img, txt), _ = jax.lax.scan(body, (img, txt), (jnp.arange(n), jnp.asarray(slot, jnp.int32)))
        return img, txt

    def _audio_delta(self, adapter, img, n_ref, strength):
        """``[zeros for the n_ref reference tokens ; strength * adapter(video tokens)]`` (text untouched)."""
        delta = adapter(img[:, n_ref:]) * jnp.asarray(strength, img.dtype)
        return jnp.pad(delta, ((0, 0), (n_ref, 0), (0, 0)))


# ------------------------------------------------------------------------------------------- validation


def _is_concrete(a) -> bool:
    return a is not None and not isinstance(a, jax.core.Tracer)


def validate_inputs(cfg: DiTConfig, x, t, text_states, text_mask, text_states_2, ref_latents=None,
                    bg_latents=None, audio_features=None) -> None:
    """Raise ``ValueError`` naming the argument, the shape found and the shape expected."""
    pt, ph, pw = cfg.patch_size
    if x.ndim != 5 or x.shape[-1] != cfg.in_channels:
        raise ValueError(f"x must be [B,T,H,W,{cfg.in_channels}] (channels-last latents); got {tuple(x.shape)}")
    b, tt, hh, ww, _ = x.shape
    if tt % pt or hh % ph or ww % pw:
        raise ValueError(f"x latent size T,H,W={tt},{hh},{ww} must be divisible by patch_size {cfg.patch_size}")
    if t.shape != (b,):
        raise ValueError(f"t must be [B]=[{b}] on the 0..1000 scale; got {tuple(t.shape)}")
    if text_states.ndim != 3 or text_states.shape[0] != b or text_states.shape[2] != cfg.text_states_dim:
        raise ValueError(f"text_states must be [B,S,{cfg.text_states_dim}] with B={b}; got {tuple(text_states.shape)}")
    if text_mask.shape != text_states.shape[:2]:
        raise ValueError(f"text_mask must be [B,S]={tuple(text_states.shape[:2])}; got {tuple(text_mask.shape)}")
    if text_states_2.shape != (b, cfg.text_states_dim_2):
        raise ValueError(f"text_states_2 must be [B,{cfg.text_states_dim_2}]=[{b},{cfg.text_states_dim_2}]; "
                         f"got {tuple(text_states_2.shape)}")
    if _is_concrete(text_mask):
        counts = np.sum(np.asarray(text_mask) != 0, axis=1)
        if np.any(counts == 0):
            raise ValueError(f"text_mask has a sample with zero valid tokens (valid counts {counts.tolist()}); "
                             "every sample needs at least one valid text token")
    if ref_latents is not None:
        if pt != 1:
            raise ValueError("reference latents need patch_size[0] == 1")
        want = (b, 1, hh, ww, cfg.in_channels)
        if tuple(ref_latents.shape) != want:
            raise ValueError(f"ref_latents must be {list(want)} (one latent frame, same H,W as x); "
                             f"got {tuple(ref_latents.shape)}")
    if bg_latents is not None:
        if not cfg.video_condition:
            raise ValueError("bg_latents given but the DiT config has video_condition=False")
        want = (b, tt, hh, ww, cfg.bg_in_channels)
        if tuple(bg_latents.shape) != want:
            raise ValueError(f"bg_latents must be {list(want)}; got {tuple(bg_latents.shape)}")
    if audio_features is not None and not cfg.audio_condition:
        raise ValueError("audio_features given but the DiT config has audio_condition=False")


def example_inputs(cfg: DiTConfig, batch: int = 1, latent_thw=(1, 4, 4), text_len: int = 8, ref: bool = True,
                   abstract: bool = False) -> tuple[tuple, dict]:
    """Positional and keyword inputs of the right shapes (zeros / ShapeDtypeStructs) for init and eval_shape."""
    t_, h_, w_ = latent_thw
    mk = (lambda s, d=jnp.float32: jax.ShapeDtypeStruct(s, d)) if abstract else (lambda s, d=jnp.float32: jnp.zeros(s, d))
    args = (
        mk((batch, t_, h_, w_, cfg.in_channels)),
        mk((batch,)),
        mk((batch, text_len, cfg.text_states_dim)),
        jax.ShapeDtypeStruct((batch, text_len), jnp.int32) if abstract else jnp.ones((batch, text_len), jnp.int32),
        mk((batch, cfg.text_states_dim_2)),
    )
    kwargs: dict[str, Any] = {}
    if ref:
        kwargs["ref_latents"] = mk((batch, 1, h_, w_, cfg.in_channels))
    if cfg.guidance_embed:
        kwargs["guidance"] = mk((batch,))
    if cfg.video_condition:
        kwargs["bg_latents"] = mk((batch, t_, h_, w_, cfg.bg_in_channels))
    if cfg.audio_condition:
        from .conditioning.audio import audio_feature_shape

        kwargs["audio_features"] = mk(audio_feature_shape(cfg, batch, t_))
    return args, kwargs


def init_params(cfg: DiTConfig, key: jax.Array) -> dict:
    """Random parameters (boxed with logical axis metadata)."""
    args, kwargs = example_inputs(cfg)
    return jax.jit(lambda k: HunyuanDiT(cfg).init(k, *args, **kwargs)["params"])(key)


def abstract_params(cfg: DiTConfig) -> dict:
    """``jax.eval_shape`` of :func:`init_params` (nothing allocated), boxed with logical axes."""
    return jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))


def count_params(tree) -> int:
    return int(sum(int(jnp.size(x)) if not hasattr(x, "shape") else int(_prod(x.shape))
                   for x in jax.tree.leaves(nn.unbox(tree))))


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out
