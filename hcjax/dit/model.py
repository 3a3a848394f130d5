"""The HunyuanCustom MM-DiT (``HYVideoDiffusionTransformer``, ``hymm_sp/modules/models.py``) in Flax.

Shapes: video latents ``x [B, T, H, W, C]`` (channels-last), timestep ``t [B]`` on the 0..1000 scale, LLaVA
states ``text_states [B, S, Dt]`` with ``text_mask [B, S]``, CLIP pooled ``text_states_2 [B, D2]``, reference
latents ``ref_latents [B, K, H, W, C]`` (``K`` subjects, 1 in the release). Tokens: ``L`` video (``T'H'W'``),
``R`` reference (``K H'W'``), ``S`` text.

Structure (spec 5.13): ``vec = time_in(t) + vector_in(clip) [+ guidance_in(g)]``; ``txt = txt_in(...)`` (the
SingleTokenRefiner with the element-wise mask); ``img = [img_in(ref) ; img_in(x) (+ bg_proj(bg_in(bg)))]``;
20 double-stream blocks (audio injections after the configured ones), 40 single-stream blocks over
``[img ; txt]``, then the final layer on the video tokens and unpatchify.

Multi-subject (issue 24; the paper's "multi-subject" results, not in the release): the ``K`` reference latent
frames are concatenated in time ahead of the video, ``img = [img_in(ref_1) ; ... ; img_in(ref_K) ; img_in(x)]``.
RoPE (:func:`hcjax.rope.position_grid`): reference ``k`` sits at time ``-k`` (``-1, -2, ..., -K``) with the SAME
spatial shift ``w + W'`` as the single reference. Why: the paper names temporal concatenation as the mechanism, so
each subject gets its own time slot, which keeps the subjects' tokens apart in position (a token of subject 1 and
the same (h, w) of subject 2 rotate differently), while the shared ``w`` shift is the one the released weights
learned to mean "reference, not video" for every reference; ``K = 1`` reproduces the release bit for bit. All
``K H'W'`` reference tokens are dropped before the final layer and get no audio/background features; attention
sees them as valid image tokens (the kv-length prefix counts them), so sequence padding/sharding are unchanged.
Training batches that mix clips with different ``K`` pad the references to ``K_max`` and pass ``ref_mask [B,
K_max]`` (1 on a sample's real subjects, which come first): the padded frames' tokens are masked out of every
attention as keys (a per-sample key hole, :mod:`hcjax.attention`), so they do not reach the video tokens and a
padded sample's output equals its unpadded one; without ``ref_mask`` (or all ones) nothing changes.
``dit.ref_tokens = "column"`` (references laid out in columns, ``ref_layout: columns``, where the rest of reference
``k``'s frame is white padding): reference ``k`` brings only the tokens of its ``k``-th of ``K`` equal columns, at
the positions they have in the whole frame, so ``K`` references cost ``H'W'`` tokens instead of ``K H'W'``; the
parameters are the same, ``K = 1`` is unchanged, and every sample of a batch must then have the same ``K``.

Blocks are stored stacked on a leading ``layers`` axis (``nn.scan`` at init) and run by ``jax.lax.scan`` over
layer ranges, so the sampler can stop before / resume at the last single block (the step cache of spec 6.4)
and the audio path can inject between double blocks, all over one parameter stack. ``cfg.remat`` selects a
``jax.checkpoint`` policy per block.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ..config import DiTConfig
from ..layers import (
    Dense, MLPEmbedder, Modulation, PatchEmbed, TimestepEmbedder, concat, constrain, layer_norm, modulate,
    to_dtype,
)
from ..rope import rope_tables
from .audio import AudioProjNet2, PerceiverAttentionCA, audio_feature_shape
from .blocks import (
    ACT, REMAT_POLICIES, DoubleStreamBlock, FinalLayer, SingleStreamBlock, SingleTokenRefiner, dtype_kwargs, run_stack,
    scanned,
)
from .storage import slice_layer, take_layer


# ------------------------------------------------------------------------------------------- the model


@flax.struct.dataclass
class StepCache:
    """What a full step stores for a cached (deepcache) step: the input of the last single block."""

    x: jax.Array            # [B, R + L + S, D]


class HunyuanDiT(nn.Module):
    """HunyuanCustom DiT. ``apply({"params": p}, x, t, text_states, text_mask, text_states_2, ...)``.

    Keyword arguments:
      ``ref_latents [B,K,H,W,C]``  reference-image latents, one frame per subject (prepended tokens at RoPE times
                                   -1..-K, dropped before the final layer)
      ``ref_mask [B,K]``           1 on real reference frames, 0 on padding (the real ones first): padded frames
                                   are masked out of attention (mixed-K training batches)
      ``guidance [B]``             guidance value for guidance-distilled variants (``guidance_embed``)
      ``bg_latents [B,T,H,W,Cbg]`` editing: background + mask latents (``video_condition``)
      ``audio_features``           audio tokens for the audio model (``audio_condition``; see ``audio_hook``)
      ``return_cache``             also return the input of the last single block (``StepCache``)
      ``cache``                    run only the last single block on ``cache.x`` and the final layer
      ``return_residual``          also return the residual of the block stacks on the video tokens ``[B, L, D]``
                                   (their output minus their input; TeaCache / MagCache full steps)
      ``residual``                 residual reuse: the video tokens' output is ``input + residual``, no blocks run
      ``probe``                    return only the modulated input of the first double block on the video tokens
                                   ``[B, L, D]`` (``modulate(LN(img), shift1, scale1)``; TeaCache's statistic)
    """

    cfg: DiTConfig

    def setup(self):
        cfg, kw = self.cfg, dtype_kwargs(self.cfg)
        self.img_in = PatchEmbed(cfg.hidden_size, tuple(cfg.patch_size), chunk=cfg.ffn_chunk, **kw)
        self.time_in = TimestepEmbedder(cfg.hidden_size, **kw)
        self.vector_in = MLPEmbedder(cfg.hidden_size, ("in_layer", "out_layer"), **kw)
        if cfg.guidance_embed:
            self.guidance_in = TimestepEmbedder(cfg.hidden_size, **kw)
        self.txt_in = SingleTokenRefiner(cfg)
        if cfg.video_condition:
            self.bg_in = PatchEmbed(cfg.hidden_size, tuple(cfg.patch_size), chunk=cfg.ffn_chunk, **kw)
            self.bg_proj = Dense(cfg.hidden_size, ("embed", "mlp"), **kw)
        if cfg.audio_condition:
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
                 bg_latents=None, audio_features=None, audio_strength=1.0, return_cache=False, cache=None,
                 return_residual=False, residual=None, probe=False, ref_mask=None):
        cfg = self.cfg
        validate_inputs(cfg, x, t, text_states, text_mask, text_states_2, ref_latents, bg_latents, audio_features)
        validate_ref_mask(ref_mask, ref_latents)
        b, t_, h_, w_, _ = x.shape
        pt, ph, pw = cfg.patch_size
        grid = (t_ // pt, h_ // ph, w_ // pw)
        k_ref = 0 if ref_latents is None else ref_latents.shape[1]
        columns = cfg.ref_tokens == "column" and k_ref > 1
        n_ref = reference_tokens(cfg, k_ref, h_ // ph, w_ // pw)
        dt = to_dtype(cfg.dtype)
        t = t.astype(jnp.float32)

        vec = self.conditioning_vector(t, text_states_2, guidance)
        cos, sin = rope_tables(grid, cfg.rope_dim_list, cfg.rope_theta, with_ref=k_ref, ref_columns=columns)
        n_img = cos.shape[0]
        kv_lengths = n_img + jnp.sum(text_mask.astype(jnp.int32), axis=1)
        if ref_mask is not None:        # [B, 3]: (length, hole start, hole end): the padded reference tokens
            hole = jnp.sum(ref_mask.astype(jnp.int32), axis=1) * (n_ref // k_ref)
            kv_lengths = jnp.stack([kv_lengths, hole, jnp.full_like(hole, n_ref)], axis=1)
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
        if probe:
            return self._modulated_input(vid, vec)
        if residual is not None:
            return self._final(vid + residual.astype(vid.dtype), vec, 0, grid, b)
        if ref_latents is not None and columns:
            ref_latents = reference_columns(ref_latents)
        img = vid if ref_latents is None else concat([self.img_in(ref_latents.astype(dt)), vid])
        img = constrain(img, ACT)
        txt = constrain(self.txt_in(text_states.astype(dt), t, text_mask), ACT)

        img, txt = self._double_blocks(img, txt, vec, cos, sin, kv_lengths, n_ref, grid, audio_features,
                                       audio_strength)
        xs = constrain(concat([img, txt]), ACT)
        bcast = (vec, cos, sin, kv_lengths)
        if return_cache:
            xs = run_stack(self, SingleStreamBlock, cfg, "single_blocks", depth, xs, bcast, layers=(0, depth - 1))
            stored = StepCache(xs)
            xs = run_stack(self, SingleStreamBlock, cfg, "single_blocks", depth, xs, bcast,
                           layers=(depth - 1, depth))
            return self._final(xs[:, :n_img], vec, n_ref, grid, b), stored
        xs = run_stack(self, SingleStreamBlock, cfg, "single_blocks", depth, xs, bcast)
        out = self._final(xs[:, :n_img], vec, n_ref, grid, b)
        if return_residual:
            return out, xs[:, n_ref:n_img] - vid
        return out

    def _modulated_input(self, vid, vec):
        """``modulate(LN(vid), shift1, scale1)`` with the first double block's image modulation ``[B, L, D]``."""
        cfg, kw = self.cfg, dtype_kwargs(self.cfg)
        p0 = take_layer(self.variables["params"]["double_blocks"], 0, cfg)
        mod = Modulation(6, parent=None, **kw).apply({"params": p0["img_mod"]}, vec)
        return modulate(layer_norm(vid, cfg.norm_eps), mod[:, 0], mod[:, 1]).astype(kw["dtype"])

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
        tokens = self.audio_proj(audio_features)
        params = self.variables["params"]
        stacked = params["double_blocks"]
        adapters = jax.tree.map(lambda *a: jnp.stack(a), *[params[f"audio_models_{j}"]
                                                           for j in range(len(cfg.audio_inject_blocks))])
        slot = [-1] * n
        for j, after in enumerate(cfg.audio_inject_blocks):
            slot[after] = j
        block, ca = DoubleStreamBlock(cfg, parent=None), PerceiverAttentionCA(cfg, parent=None)

        def body(carry, xs):
            i, j = xs
            img_, txt_ = block.apply({"params": take_layer(stacked, i, cfg)}, carry, *bcast)[0]

            def inject(x):
                pa = slice_layer(adapters, jnp.maximum(j, 0))
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


def reference_tokens(cfg: DiTConfig, k: int, hp: int, wp: int) -> int:
    """Tokens of ``k`` reference frames on an ``hp x wp`` token grid: ``k hp wp``, or ``hp wp`` when
    ``dit.ref_tokens = "column"`` (each reference one of ``k`` columns)."""
    return k * hp * wp // (k if cfg.ref_tokens == "column" and k > 1 else 1)


def reference_columns(ref_latents: jax.Array) -> jax.Array:
    """``[B, K, H, W, C] -> [B, K, H, W / K, C]``: of reference ``k`` only the ``k``-th of ``K`` equal columns
    (``dit.ref_tokens = "column"``)."""
    k, w = ref_latents.shape[1], ref_latents.shape[3]
    c = w // k
    return jnp.stack([ref_latents[:, i, :, i * c:(i + 1) * c] for i in range(k)], axis=1)


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
        k = ref_latents.shape[1] if ref_latents.ndim == 5 else 0
        want = (b, max(k, 1), hh, ww, cfg.in_channels)
        if tuple(ref_latents.shape) != want:
            raise ValueError(f"ref_latents must be [B,K,H,W,C]={list(want[:1]) + ['K>=1'] + list(want[2:])} (one "
                             f"latent frame per subject, same H,W as x); got {tuple(ref_latents.shape)}")
        if cfg.ref_tokens == "column" and k > 1 and (ww // pw) % k:
            raise ValueError(f"dit.ref_tokens=column: {k} reference columns do not divide a latent {ww // pw} "
                             f"tokens wide (W={ww}, patch {pw})")
    if bg_latents is not None:
        if not cfg.video_condition:
            raise ValueError("bg_latents given but the DiT config has video_condition=False")
        want = (b, tt, hh, ww, cfg.bg_in_channels)
        if tuple(bg_latents.shape) != want:
            raise ValueError(f"bg_latents must be {list(want)}; got {tuple(bg_latents.shape)}")
    if audio_features is not None and not cfg.audio_condition:
        raise ValueError("audio_features given but the DiT config has audio_condition=False")


def validate_ref_mask(ref_mask, ref_latents) -> None:
    """``ref_mask [B, K]`` (with ``ref_latents [B, K, ...]``): each row ones then zeros, at least one one."""
    if ref_mask is None:
        return
    if ref_latents is None:
        raise ValueError("ref_mask given without ref_latents")
    if tuple(ref_mask.shape) != tuple(ref_latents.shape[:2]):
        raise ValueError(f"ref_mask must be [B,K]={list(ref_latents.shape[:2])} (1 on real reference frames); got "
                         f"{tuple(ref_mask.shape)}")
    if _is_concrete(ref_mask):
        m = np.asarray(ref_mask) != 0
        if not np.all(m[:, 0]) or np.any(m[:, 1:] & ~m[:, :-1]):
            raise ValueError(f"ref_mask rows must be ones then zeros (a sample's real reference frames first, at "
                             f"least one); got {m.astype(int).tolist()}")


def example_inputs(cfg: DiTConfig, batch: int = 1, latent_thw=(1, 4, 4), text_len: int = 8, ref: bool = True,
                   abstract: bool = False, n_ref: int = 1) -> tuple[tuple, dict]:
    """Positional and keyword inputs of the right shapes (zeros / ShapeDtypeStructs) for init and eval_shape
    (``n_ref`` reference frames when ``ref``)."""
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
        kwargs["ref_latents"] = mk((batch, n_ref, h_, w_, cfg.in_channels))
    if cfg.guidance_embed:
        kwargs["guidance"] = mk((batch,))
    if cfg.video_condition:
        kwargs["bg_latents"] = mk((batch, t_, h_, w_, cfg.bg_in_channels))
    if cfg.audio_condition:
        kwargs["audio_features"] = mk(audio_feature_shape(cfg, batch, t_))
    return args, kwargs


def init_params(cfg: DiTConfig, key: jax.Array) -> dict:
    """Random parameters (boxed with logical axis metadata). The forward pass ``init`` traces runs the portable
    ``chunked`` attention: the parameters do not depend on the kernel, and a device kernel (``splash``, ``cudnn``)
    would tie shaping a model to that device (AOT for a TPU topology shapes its state on a CPU host)."""
    if cfg.attention in ("splash", "cudnn"):
        cfg = dataclasses.replace(cfg, attention="chunked")
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
