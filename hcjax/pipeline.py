"""The denoising loop of HunyuanCustom sampling as ONE compiled function (spec 6).

``Conditions`` holds everything the DiT consumes, already batched for guidance: ``[uncond, cond]`` for CFG
(``cfg_scale > 1``), ``[neg/white-ref, pos/white-ref, pos/real-ref]`` for ip-CFG, or ``[cond]`` alone.
``make_denoise_fn`` returns a jitted ``(params, noise, conds, sigmas) -> latents`` that runs all N steps inside
``lax.fori_loop``: CFG / ip-CFG combination in the DiT compute dtype (bf16 in the released setting), the Euler
update in fp32, and the step cache (spec 6.4) as an explicit carry: full steps store the input of the last single
block; cached steps run only that block (``lax.cond``), so a cached step costs one block.

On a mesh (:func:`place`, or ``generate(..., mesh=...)``): the DiT's params are sharded by the logical rules
(``embed`` over fsdp x sequence, heads/MLP over tensor), the text towers' by the text rules (fsdp, tensor), the
prepared inputs are replicated and the DiT's activations split by its constraints: guidance branches over
``data x fsdp``, tokens over ``sequence`` (Ulysses / ring / hybrid attention, ``dit.sequence_parallel`` and
``dit.ulysses_degree``). The VAE encode and Whisper run locally on each process (identical inputs, identical
results); the VAE decode spreads its tiles over all the mesh's devices (``Models.vae_on_mesh``). Several samples
share one loop through :mod:`hcjax.batching` (``[N, ...]`` noise, ``[N x Bc, ...]`` conditions, sample-major).
With several processes every process runs the same calls on the same host inputs and gets the same host result;
only the caller decides who writes files (``hcjax.runtime.is_main_process``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from . import sharding
from .axes import TEXT_RULES
from .conditioning import clip, llava, pose
from .conditioning.text import TextConditioning, TextEncoders, encode_prompts
from .conditioning.video import bg_latents_from_files
from .conditioning.whisper import audio_prompts_from_file
from .config import PRESET_DIR, REF_LAYOUTS, Config, DiTConfig, SampleConfig
from .dit import HunyuanDiT, StepCache, abstract_params, reference_tokens
from .layers import to_dtype
from .media import layout_references, pad_resize, read_image, to_uint8
from .scheduler import (
    CACHE_MODES, DEFAULT_THRESHOLDS, deepcache_mask, euler_step, magcache_decide, magcache_ratios, teacache_decide,
)
from .scheduler import sigmas as make_sigmas
from .vae import decode_latents, encode_video
from .vae.tiling import on_mesh as vae_on_mesh

DEFAULT_REF_IMAGE = "assets/demo_subject.png"
MAX_SUBJECTS = 4                      # reference images per request (multi-subject, issue 24)
HOST_MEMORY = "pinned_host"           # where dit.cpu_offload keeps the towers between stages (offload_towers)


@flax.struct.dataclass
class Conditions:
    text_states: jax.Array            # [Bc, S, Dt]
    text_mask: jax.Array              # [Bc, S]
    text_states_2: jax.Array          # [Bc, D2]
    ref_latents: Any = None           # [Bc, K, H, W, C]  one latent frame per subject
    audio_features: Any = None        # [Bc, F, 10, 5, 384]
    bg_latents: Any = None            # [Bc, T, H, W, 32]

    @property
    def batch(self) -> int:
        return self.text_states.shape[0]


@dataclasses.dataclass(frozen=True)
class Guidance:
    """Guidance and step-cache settings of the compiled loop (defaults: :class:`hcjax.config.SampleConfig`)."""

    cfg_scale: float = SampleConfig.cfg_scale
    ip_cfg_scale: float = SampleConfig.ip_cfg_scale
    use_deepcache: bool = SampleConfig.use_deepcache
    audio_strength: float = SampleConfig.audio_strength
    # step cache (issue 26): deepcache (the original's fixed schedule; off with use_deepcache=False) | teacache |
    # magcache | none. threshold None: the mode's default (scheduler.DEFAULT_THRESHOLDS); magcache needs the
    # calibrated per-step ratios (python -m hcjax.calibrate_cache), at most cache_max_skip steps reused in a row
    # and the first cache_retain fraction of the steps always in full.
    cache: str = "deepcache"
    cache_threshold: float | None = None
    cache_ratios: tuple[float, ...] | None = None
    cache_max_skip: int = 3
    cache_retain: float = 0.2

    def __post_init__(self):
        if self.cache not in CACHE_MODES:
            raise ValueError(f"--cache {self.cache!r}: expected one of {', '.join(CACHE_MODES)}")
        if self.cache_threshold is not None and self.cache_threshold < 0:
            raise ValueError(f"--cache-threshold must be >= 0; got {self.cache_threshold}")

    def cache_mode(self) -> str:
        return "none" if self.cache == "deepcache" and not self.use_deepcache else self.cache

    def threshold(self) -> float:
        t = self.cache_threshold
        return float(DEFAULT_THRESHOLDS.get(self.cache_mode(), 0.0) if t is None else t)

    def branches(self) -> int:
        if self.ip_cfg_scale > 0:
            return 3
        return 2 if self.cfg_scale > 1.0 else 1


def combine(v: jax.Array, step: jax.Array, num_steps: int, g: Guidance, dtype) -> jax.Array:
    """Guidance combination of the per-branch velocities ``v [N * Bc, ...]`` (sample-major: each sample's Bc
    branches in a row) -> ``[N, ...]`` (spec 6.3)."""
    v = v.astype(dtype)
    if g.ip_cfg_scale > 0:
        s = g.ip_cfg_scale - step.astype(jnp.float32) * (g.ip_cfg_scale - 1.0) / (num_steps - 1 + 1e-3)
        vu, vt, vip = v[0::3], v[1::3], v[2::3]
        return vu + jnp.asarray(g.cfg_scale, dtype) * (vt - vu) + s.astype(dtype) * (vip - vt)
    if g.cfg_scale > 1.0:
        vu, vc = v[0::2], v[1::2]
        return vu + jnp.asarray(g.cfg_scale, dtype) * (vc - vu)
    return v


def _cache_shape(cfg: DiTConfig, latents_shape, conds: Conditions):
    _, t, h, w, _ = latents_shape
    pt, ph, pw = cfg.patch_size
    n = (t // pt) * (h // ph) * (w // pw)
    if conds.ref_latents is not None:
        n += reference_tokens(cfg, conds.ref_latents.shape[1], h // ph, w // pw)
    return (conds.batch, n + conds.text_states.shape[1], cfg.hidden_size)


_STEP_HOOKS: list = []


def _notify_step(i, _x):
    for hook in list(_STEP_HOOKS):
        hook(int(i))


@functools.lru_cache(maxsize=16)
def make_denoise_fn(cfg: DiTConfig, num_steps: int, guidance: Guidance, report_steps: bool = False,
                    return_stats: bool = False):
    """Build (once per settings, cached) the compiled N-step loop; it compiles once per input shape.

    With ``report_steps`` the loop calls the hooks in ``_STEP_HOOKS`` after each step from inside the compiled
    loop (``jax.debug.callback``), e.g. to advance a progress bar (see :func:`step_hook`). With ``return_stats``
    it returns ``(latents, stats)``: ``full [N]`` bool (steps that ran the block stacks), ``distance [N]`` (the
    TeaCache relative L1 distance of step i's probe to step i-1's, 0 otherwise) and ``residual_norm [N]`` (mean
    token L2 norm of the conditional branch's residual at full steps of teacache/magcache; 0 otherwise).

    Step caches (``guidance.cache_mode()``), all decided inside the loop (``lax.cond``, no host sync; on a mesh
    the statistics are global reductions): deepcache = the fixed schedule of spec 6.4; teacache / magcache run
    the block stacks at "full" steps and store their residual on the video tokens; skipped steps output
    ``input + residual`` (each guidance branch its own residual). The decision uses the conditional branch (the
    last one) and applies to all branches."""
    dit = HunyuanDiT(cfg)
    dtype = to_dtype(cfg.dtype)
    mode = guidance.cache_mode()
    thr = guidance.threshold()
    cached_steps = deepcache_mask(num_steps, mode == "deepcache")
    use_cache = bool(cached_steps.any())
    if mode == "magcache":
        if guidance.cache_ratios is None:
            raise ValueError("--cache magcache needs calibrated ratios: run `python -m hcjax.calibrate_cache "
                             "--ckpt-dir BUNDLE` (writes BUNDLE/magcache_ratios.json) or pass --cache-ratios FILE")
        ratios = magcache_ratios(guidance.cache_ratios, num_steps)
    retain = int(round(guidance.cache_retain * num_steps))

    def model(params, x, t, conds: Conditions, **kw):
        b = conds.batch                 # N samples x their guidance branches (sample-major)
        xb = (jnp.broadcast_to(x, (b, *x.shape[1:])) if x.shape[0] == 1 else
              jnp.repeat(x, b // x.shape[0], axis=0)).astype(dtype)
        extra = {}
        if conds.audio_features is not None:
            extra = dict(audio_features=conds.audio_features, audio_strength=guidance.audio_strength)
        return dit.apply({"params": params}, xb, jnp.full((b,), t, jnp.float32), conds.text_states,
                         conds.text_mask, conds.text_states_2, ref_latents=conds.ref_latents,
                         bg_latents=conds.bg_latents, **extra, **kw)

    def model_passes(params, x, t, conds: Conditions, **kw):
        """``model`` with the guidance branches in passes of ``cfg.cfg_batch`` (0 = one pass); ``lax.map`` runs
        the passes one after another, so only one pass's activations are alive (same numbers)."""
        g, b = cfg.cfg_batch, conds.batch
        if g <= 0 or g >= b:
            return model(params, x, t, conds, **kw)
        if b % g:
            raise ValueError(f"dit.cfg_batch={g} must divide the number of guidance branches ({b})")
        split = lambda a: a.reshape(b // g, g, *a.shape[1:])  # noqa: E731
        per_branch = {k: kw.pop(k) for k in ("cache", "residual") if kw.get(k) is not None}

        def one(xs):
            c, pb = xs
            xi, c = jax.lax.optimization_barrier((x, c))  # x per pass: XLA would hoist img_in(x) out of the map
            return model(params, xi, t, c, **kw, **pb)

        out = jax.lax.map(one, (jax.tree.map(split, conds), jax.tree.map(split, per_branch)))
        return jax.tree.map(lambda a: a.reshape(b, *a.shape[2:]), out)

    def residual_state(conds, noise_shape):
        _, t, h, w, _ = noise_shape
        pt, ph, pw = cfg.patch_size
        return jnp.zeros((conds.batch, (t // pt) * (h // ph) * (w // pw), cfg.hidden_size), dtype)

    @jax.jit
    def denoise(params, noise, conds: Conditions, sig):
        n = noise.shape[0]              # samples run together (hcjax.batching): conds hold n x the branches
        if conds.batch != guidance.branches() * n:
            raise ValueError(f"conditions have batch {conds.batch}; guidance {guidance} needs "
                             f"{guidance.branches()} branches per sample ({n} samples)")
        if n > 1 and (mode not in ("deepcache", "none") or 0 < cfg.cfg_batch < conds.batch):
            raise ValueError(f"{n} samples in one loop need a fixed step schedule (cache deepcache/none, not "
                             f"{mode}) and dit.cfg_batch=0; run them one at a time")
        sig = sig.astype(jnp.float32)
        flags = jnp.asarray(cached_steps)
        last = jax.tree.map(lambda a: a[-1:], conds)          # the conditional branch: the skip statistics

        def step_full_or_reuse(params, x, t, skip, res):
            def full(_):
                v, r = model_passes(params, x, t, conds, return_residual=True)
                r = r.astype(res.dtype)
                norm = jnp.mean(jnp.linalg.norm(r[-1].astype(jnp.float32), axis=-1))
                return v, r, norm

            def reuse(_):
                return model_passes(params, x, t, conds, residual=res), res, jnp.float32(0.0)

            return jax.lax.cond(skip, reuse, full, None)

        def body(i, carry):
            x, st = carry
            st = dict(st)
            t = sig[i] * 1000.0
            dist = jnp.float32(0.0)
            norm = jnp.float32(0.0)
            if mode == "deepcache" and use_cache:
                def full(_):
                    v, c = model_passes(params, x, t, conds, return_cache=True)
                    return v, c.x.astype(st["cache"].dtype)

                def cached(_):
                    return model_passes(params, x, t, conds, cache=StepCache(st["cache"])), st["cache"]

                v, st["cache"] = jax.lax.cond(flags[i], cached, full, None)
                skip = flags[i]
            elif mode == "teacache":
                p = model(params, x, t, last, probe=True).astype(jnp.float32)
                prev = st["probe"]
                dist = jnp.where(i == 0, 0.0, jnp.mean(jnp.abs(p - prev)) / jnp.maximum(jnp.mean(jnp.abs(prev)),
                                                                                        1e-12))
                skip, st["acc"] = teacache_decide(i, num_steps, dist, st["acc"], thr)
                st["probe"] = p.astype(prev.dtype)
                v, st["res"], norm = step_full_or_reuse(params, x, t, skip, st["res"])
            elif mode == "magcache":
                skip, st["mag"] = magcache_decide(i, num_steps, jnp.asarray(ratios)[i], st["mag"], thr,
                                                  guidance.cache_max_skip, retain)
                v, st["res"], norm = step_full_or_reuse(params, x, t, skip, st["res"])
            else:
                v = model_passes(params, x, t, conds)
                skip = jnp.bool_(False)
            v = combine(v, i, num_steps, guidance, dtype)
            x = euler_step(x, v, sig[i], sig[i + 1])
            if report_steps:
                jax.debug.callback(_notify_step, i, x[0, 0, 0, 0, 0])   # data dependency: fires after the step
            st["full"] = st["full"].at[i].set(jnp.logical_not(skip))
            st["distance"] = st["distance"].at[i].set(dist)
            st["residual_norm"] = st["residual_norm"].at[i].set(norm)
            return x, st

        st0 = {"full": jnp.zeros((num_steps,), bool), "distance": jnp.zeros((num_steps,), jnp.float32),
               "residual_norm": jnp.zeros((num_steps,), jnp.float32)}
        if use_cache:
            st0["cache"] = jnp.zeros(_cache_shape(cfg, noise.shape, conds), dtype)
        if mode in ("teacache", "magcache"):
            st0["res"] = residual_state(conds, noise.shape)
        if mode == "teacache":
            st0["probe"] = jnp.zeros((1, *st0["res"].shape[1:]), jnp.float32)
            st0["acc"] = jnp.float32(0.0)
        if mode == "magcache":
            st0["mag"] = (jnp.float32(1.0), jnp.float32(0.0), jnp.int32(0))
        x0 = noise.astype(jnp.float16).astype(jnp.float32)   # the original draws fp16 noise (spec 6.2)
        x, st = jax.lax.fori_loop(0, num_steps, body, (x0, st0))
        if return_stats:
            return x, {k: st[k] for k in ("full", "distance", "residual_norm")}
        return x

    return denoise


@functools.partial(jax.jit, static_argnames=("shape",))
def initial_noise(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Initial latents ``[1, T, H, W, C]`` (a JAX RNG stream; the original's CUDA generator is not reproducible)."""
    return jax.random.normal(key, shape, jnp.float32)


def python_loop_reference(cfg: DiTConfig, num_steps: int, guidance: Guidance, params, noise, conds, sig):
    """The same steps as ``make_denoise_fn`` as a plain Python loop of jitted single steps (for tests/debugging)."""
    dit = HunyuanDiT(cfg)
    dtype = to_dtype(cfg.dtype)
    if guidance.cache_mode() not in ("deepcache", "none"):
        raise ValueError(f"python_loop_reference runs the deepcache/none loops only; got {guidance.cache_mode()}")
    flags = deepcache_mask(num_steps, guidance.cache_mode() == "deepcache")
    x = jnp.asarray(noise).astype(jnp.float16).astype(jnp.float32)
    cache = None
    b = conds.batch
    kw = dict(ref_latents=conds.ref_latents, bg_latents=conds.bg_latents)
    if conds.audio_features is not None:
        kw.update(audio_features=conds.audio_features, audio_strength=guidance.audio_strength)
    plain = jax.jit(lambda p, a, k: dit.apply({"params": p}, *a, **k))
    store = jax.jit(lambda p, a, k: dit.apply({"params": p}, *a, **k, return_cache=True))
    reuse = jax.jit(lambda p, a, k, c: dit.apply({"params": p}, *a, **k, cache=StepCache(c)))
    for i in range(num_steps):
        t = jnp.full((b,), np.float32(sig[i]) * np.float32(1000.0), jnp.float32)
        xb = jnp.broadcast_to(x, (b, *x.shape[1:])).astype(dtype)
        args = (xb, t, conds.text_states, conds.text_mask, conds.text_states_2)
        if flags[i]:
            v = reuse(params, args, kw, cache)
        elif flags.any():
            v, stored = store(params, args, kw)
            cache = stored.x
        else:
            v = plain(params, args, kw)
        v = combine(v, jnp.asarray(i), num_steps, guidance, dtype)
        x = euler_step(x, v, jnp.float32(sig[i]), jnp.float32(sig[i + 1]))
    return x


# ============================================================================================ end to end
#
# generate = prepare (checks, VAE-encoded references, text states, guidance batch, noise) -> denoise (the compiled
# loop) -> decode (VAE) ; each usable alone, e.g. to swap the noise, batch several requests or keep the latents.

_SC = SampleConfig()


@dataclasses.dataclass
class Models:
    """Everything sampling needs, loaded once (by :func:`hcjax.models.load`)."""

    cfg: Config
    dit: Any                          # DiT params tree
    vae: Any                          # VAE params tree
    text: TextEncoders
    whisper: Any = None               # Whisper params (audio model)
    whisper_extractor: Any = None     # transformers WhisperFeatureExtractor (audio model)
    mesh: Any = None                  # jax Mesh the DiT and text params live on (see place); None: one device
    rules: Any = None                 # the DiT's logical-axis rules on that mesh
    vae_on_mesh: Any = None           # the VAE params replicated on that mesh (the decode's tiles spread over it)


def place(models: Models, mesh, mesh_cfg=None) -> Models:
    """``models`` with the DiT params sharded on ``mesh`` by the rule set of ``mesh_cfg`` (default rules
    otherwise) and the LLaVA/CLIP params by the text rules; the VAE and Whisper stay local (encode), plus a copy
    of the VAE replicated on the mesh for the spread tiled decode (``vae_on_mesh``). Checks the mesh
    against the DiT (heads, sequence-parallel mode); a 1-device mesh is allowed."""
    cfg = models.cfg
    degrees = tuple(mesh.shape[a] for a in sharding.AXES)
    sharding.check_mesh(dataclasses.replace(mesh_cfg or cfg.mesh, **dict(zip(sharding.AXES, degrees))), cfg.dit,
                        degrees)
    rules = sharding.rules_for(mesh_cfg)
    if cfg.dit.use_fp8 or cfg.dit.cpu_offload:
        raise ValueError("sampling on a mesh with dit.use_fp8 / dit.cpu_offload is not supported (one-device "
                         "memory options); shard the bf16 params instead (drop --use-fp8 / --cpu-offload)")
    dit_params = sharding.shard_params(models.dit, mesh, like=abstract_params(cfg.dit), rules=rules)
    text = dataclasses.replace(
        models.text,
        llava_params=sharding.shard_params(models.text.llava_params, mesh, like=llava.abstract_params(cfg),
                                           rules=TEXT_RULES),
        clip_params=sharding.shard_params(models.text.clip_params, mesh,
                                          like=clip.abstract_text_params(cfg.clip_text), rules=TEXT_RULES))
    return dataclasses.replace(models, dit=dit_params, text=text, mesh=mesh, rules=rules,
                               vae_on_mesh=vae_on_mesh(models.vae, mesh))


@dataclasses.dataclass(frozen=True)
class Request:
    """One sampling job. Defaults are :class:`hcjax.config.SampleConfig`'s (the released image-mode settings, spec
    6.5); :meth:`from_config` takes them from a model's ``sample:`` section instead."""

    ref_image: Any                    # one image, or a list of 1..MAX_SUBJECTS (multi-subject)
    pos_prompt: str
    neg_prompt: str = _SC.neg_prompt
    item_name: Any = _SC.item_name    # a name (for every image) or a list: one name per image
    video_size: tuple[int, int] = _SC.video_size       # (height, width)
    frames: int = _SC.frames
    steps: int = _SC.steps
    flow_shift: float = _SC.flow_shift
    cfg_scale: float = _SC.cfg_scale
    ip_cfg_scale: float = _SC.ip_cfg_scale
    use_deepcache: bool = _SC.use_deepcache
    cache: str = "deepcache"          # step cache: deepcache | teacache | magcache | none (see Guidance)
    cache_threshold: float | None = None
    cache_ratios: tuple[float, ...] | None = None     # magcache: calibrated ratios (hcjax.calibrate_cache)
    seed: int = _SC.seed
    input_audio: str | None = None
    audio_strength: float = _SC.audio_strength
    input_video: str | None = None
    mask_video: str | None = None
    expand_scale: int = _SC.expand_scale
    ref_layout: str = _SC.ref_layout  # 2-4 reference images: centre | columns (hcjax.media.layout_references)
    pose_enhance: bool = False        # editing: DWPose skeletons drawn into the masked region (issue 27)
    dwpose_dir: str = pose.DEFAULT_DIR  # its ONNX files (yolox_l.onnx, dw-ll_ucoco_384.onnx)
    fps: int = _SC.fps
    sample_posterior: bool = True     # VAE encodes sample the posterior as the original does (spec 4.6)

    @classmethod
    def from_config(cls, sc: SampleConfig, **flags) -> "Request":
        """A request whose unset fields (absent or ``None``) come from ``sc``; ``sc.ref_image`` is relative to the
        repository root."""
        given = {k: v for k, v in flags.items() if v is not None}
        unknown = sorted(set(given) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown request fields {unknown}")
        defaults = {f.name: getattr(sc, f.name) for f in dataclasses.fields(cls) if hasattr(sc, f.name)}
        defaults["ref_image"] = str(PRESET_DIR.parent / (sc.ref_image or DEFAULT_REF_IMAGE))
        merged = {**defaults, **given}
        merged["video_size"] = tuple(merged["video_size"])
        return cls(**merged)

    def ref_images(self) -> list:
        """The reference images as a list (``K`` entries)."""
        return list(self.ref_image) if isinstance(self.ref_image, (list, tuple)) else [self.ref_image]

    def item_names(self) -> list[str]:
        """One item name per reference image (a single name is used for every image)."""
        k = len(self.ref_images())
        return list(self.item_name) if isinstance(self.item_name, (list, tuple)) else [self.item_name] * k

    def guidance(self) -> Guidance:
        return Guidance(cfg_scale=self.cfg_scale, ip_cfg_scale=self.ip_cfg_scale, use_deepcache=self.use_deepcache,
                        audio_strength=self.audio_strength, cache=self.cache, cache_threshold=self.cache_threshold,
                        cache_ratios=None if self.cache_ratios is None else tuple(map(float, self.cache_ratios)))


def validate_request(cfg: Config, req: Request) -> None:
    """Every check that needs no file contents or weights (called before loading anything)."""
    h, w = req.video_size
    k = len(req.ref_images())
    if not 1 <= k <= MAX_SUBJECTS:
        raise ValueError(f"--ref-image takes 1 to {MAX_SUBJECTS} reference images (one per subject); got {k}")
    if len(req.item_names()) != k:
        raise ValueError(f"--item-name: give one name per --ref-image image ({k}); got {len(req.item_names())} "
                         f"names {req.item_names()}")
    if req.ref_layout not in REF_LAYOUTS:
        raise ValueError(f"--ref-layout must be one of {REF_LAYOUTS}; got {req.ref_layout!r}")
    if cfg.dit.ref_tokens == "column" and k > 1 and req.ref_layout != "columns":
        raise ValueError(f"this DiT reads reference k from the k-th column of its frame (dit.ref_tokens=column): "
                         f"{k} reference images need --ref-layout columns (got {req.ref_layout!r})")
    editing = req.input_video is not None or req.mask_video is not None
    if req.pose_enhance and not editing:
        raise ValueError("--pose-enhance draws skeletons into the editing mask: give --input-video and "
                         "--mask-video (editing checkpoint)")
    if editing:
        if not cfg.dit.video_condition:
            raise ValueError("--input-video/--mask-video need the editing checkpoint (dit.video_condition=True)")
        if req.input_video is None or req.mask_video is None:
            raise ValueError("editing needs both --input-video and --mask-video")
    elif cfg.dit.video_condition:
        raise ValueError("the editing checkpoint needs --input-video and --mask-video")
    else:
        if req.frames < 1 or (req.frames - 1) % 4:
            raise ValueError(f"--sample-n-frames must be 4k+1 (1, 5, 9, ..., 129); got {req.frames}")
        if h % 16 or w % 16 or h <= 0 or w <= 0:
            raise ValueError(f"--video-size must be multiples of 16; got {h}x{w}")
    if req.input_audio is not None and not cfg.dit.audio_condition:
        raise ValueError("--input-audio needs the audio checkpoint (dit.audio_condition=True); this DiT has none")
    if cfg.dit.audio_condition and req.input_audio is None:
        raise ValueError("the audio checkpoint needs --input-audio")
    if req.ip_cfg_scale > 0 and (cfg.dit.audio_condition or cfg.dit.video_condition):
        raise ValueError("--ip-cfg-scale is only supported by the image model (spec 6.3)")
    if req.steps < 1:
        raise ValueError(f"--infer-steps must be >= 1; got {req.steps}")
    if req.fps < 1:
        raise ValueError(f"--fps must be >= 1; got {req.fps}")
    if cfg.dit.text_states_dim != cfg.llama.hidden_size or cfg.dit.text_states_dim_2 != cfg.clip_text.hidden_size:
        raise ValueError("config mismatch: dit.text_states_dim/text_states_dim_2 must equal llama.hidden_size/"
                         "clip_text.hidden_size")


@dataclasses.dataclass
class Prepared:
    """The DiT's inputs for one request: guidance-batched conditions, initial latents and the sigma schedule."""

    conds: Conditions
    noise: jax.Array                  # [1, T', H', W', C] initial latents (noise, or a noised start, see init)
    sigmas: np.ndarray                # [steps + 1] (a tail of the schedule when starting from a noised clip)
    guidance: Guidance
    timings: dict


def _pixels(img_uint8: np.ndarray) -> np.ndarray:
    return (img_uint8.astype(np.float32) / 255.0) * 2.0 - 1.0


def latent_shape(cfg: Config, frames: int, height: int, width: int) -> tuple[int, ...]:
    v = cfg.vae
    return (1, (frames - 1) // v.time_compression_ratio + 1, height // v.spatial_compression_ratio,
            width // v.spatial_compression_ratio, cfg.dit.in_channels)


def prepare(models: Models, req: Request, init=None) -> Prepared:
    """Checks, reference/background/audio conditions, text states and the initial latents of one request.

    ``init = (latents, sigma)`` (a diagnostic, SDEdit-style): start from ``latents`` ``[1, T', H', W', C]`` noised
    to the first schedule sigma at or below ``sigma`` and run only the remaining steps, instead of from noise."""
    cfg = models.cfg
    validate_request(cfg, req)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    k_noise, k_ref, k_white, k_bg = jax.random.split(jax.random.key(req.seed), 4)
    post = (lambda k: k) if req.sample_posterior else (lambda k: None)

    g = req.guidance()
    branches = g.branches()
    bg_latents = white = None
    with _offloaded_on_device(models, models.vae) as vae_params:     # the VAE stage
        if cfg.dit.video_condition:
            bg_fn = functools.partial(pose.bg_latents_from_files, dwpose_dir=req.dwpose_dir) if req.pose_enhance \
                else bg_latents_from_files
            bg_latents, (frames, h, w) = bg_fn(req.input_video, req.mask_video, vae_params, cfg.vae,
                                               req.expand_scale, key=post(k_bg))
        else:
            frames, (h, w) = req.frames, req.video_size
        ref_rgb = layout_references([read_image(im) for im in req.ref_images()], h, w, req.ref_layout)  # K images
        ref_pix = np.stack([_pixels(pad_resize(im, h, w)) for im in ref_rgb])[:, None]   # [K, 1, h, w, 3]
        ref_latents = encode_video(vae_params, cfg.vae, jnp.asarray(ref_pix), post(k_ref))
        ref_latents = ref_latents.reshape(1, len(ref_rgb), *ref_latents.shape[2:])        # [1, K, h', w', C]
        if branches == 3:
            white = encode_video(vae_params, cfg.vae, jnp.ones_like(jnp.asarray(ref_pix)), post(k_white))
            white = white.reshape(1, len(ref_rgb), *white.shape[2:])                 # all K references dropped
        jax.block_until_ready((bg_latents, ref_latents, white))
    timings["vae_encode_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    pos, neg = _encode_text(models, req, ref_rgb)
    timings["text_encode_s"] = time.perf_counter() - t1

    audio = None
    if cfg.dit.audio_condition:
        audio = jnp.asarray(audio_prompts_from_file(req.input_audio, models.whisper, cfg.whisper, frames,
                                                    extractor=models.whisper_extractor))
    if branches == 3:
        order = [(neg, white), (pos, white), (pos, ref_latents)]
    elif branches == 2:
        order = [(neg, ref_latents), (pos, ref_latents)]
    else:
        order = [(pos, ref_latents)]
    cat = lambda xs: jnp.concatenate([jnp.asarray(x) for x in xs], axis=0)  # noqa: E731
    dtype = to_dtype(cfg.dit.dtype)
    conds = Conditions(
        text_states=cat([c.text_states for c, _ in order]).astype(dtype),
        text_mask=cat([c.text_mask for c, _ in order]),
        text_states_2=cat([c.text_states_2 for c, _ in order]).astype(dtype),
        ref_latents=cat([r for _, r in order]),
        audio_features=None if audio is None else (
            cat([jnp.zeros_like(audio), audio]) if branches == 2 else audio),
        bg_latents=None if bg_latents is None else jnp.concatenate([bg_latents] * branches, axis=0),
    )
    lat_shape = latent_shape(cfg, frames, h, w)
    noise = initial_noise(k_noise, lat_shape)
    sig = make_sigmas(req.steps, req.flow_shift)
    if init is not None:
        init_latents, start = init
        if tuple(init_latents.shape) != lat_shape:
            raise ValueError(f"init latents must be {list(lat_shape)} for this request; got {list(init_latents.shape)}")
        first = int(np.argmax(sig <= start))
        if not 0.0 < start <= 1.0 or first >= req.steps:
            raise ValueError(f"init sigma must be in (0, 1] and above the last step's {sig[-2]:.3f}; got {start}")
        sig = sig[first:]
        noise = (1.0 - sig[0]) * jnp.asarray(init_latents, jnp.float32) + sig[0] * noise
    if models.mesh is not None:      # host copies (identical on every process) -> replicated on the mesh
        conds, noise = sharding.replicate((conds, noise), models.mesh)
    timings["prepare_s"] = time.perf_counter() - t0
    return Prepared(conds, noise, sig, g, timings)


def offload_towers(models: Models) -> Models:
    """``dit.cpu_offload`` on one device: the text towers (LLaVA, CLIP) and the VAE kept in host memory
    (``pinned_host``); each stage copies its tower to the device and deletes the copy when done
    (:func:`_offloaded_on_device`), so the 16 GB LLaVA-8B is gone before the DiT runs and the VAE is on the device
    only while it encodes or decodes. Without ``cpu_offload`` (or on a mesh) ``models`` is returned unchanged."""
    if not models.cfg.dit.cpu_offload or models.mesh is not None:
        return models
    text = dataclasses.replace(models.text, llava_params=sharding.to_memory(models.text.llava_params, HOST_MEMORY),
                               clip_params=sharding.to_memory(models.text.clip_params, HOST_MEMORY))
    return dataclasses.replace(models, text=text, vae=sharding.to_memory(models.vae, HOST_MEMORY))


def _offloaded_on_device(models: Models, tree):
    """A context giving ``tree`` in device memory: a temporary copy when ``models`` keeps its towers in host
    memory (:func:`offload_towers`), ``tree`` itself otherwise."""
    if models.cfg.dit.cpu_offload and models.mesh is None:
        return sharding.on_device(tree)
    return contextlib.nullcontext(tree)


def _encode_text(models: Models, req: Request, ref_rgb) -> tuple[TextConditioning, TextConditioning]:
    """The LLaVA/CLIP branches of one request (``ref_rgb``: its K images); on a mesh the towers run sharded and the
    states come back as host copies (so they combine with the locally computed VAE latents)."""
    images, names = (ref_rgb[0], req.item_names()[0]) if len(ref_rgb) == 1 else (ref_rgb, req.item_names())
    if models.mesh is None:
        text = models.text
        with _offloaded_on_device(models, (text.llava_params, text.clip_params)) as (lp, cp):
            out = encode_prompts(dataclasses.replace(text, llava_params=lp, clip_params=cp), req.pos_prompt, images,
                                 negative_prompts=req.neg_prompt, item_names=names)
            return jax.block_until_ready(out)
    with sharding.use_mesh(models.mesh, rules=TEXT_RULES):
        pos, neg = encode_prompts(models.text, req.pos_prompt, images, negative_prompts=req.neg_prompt,
                                  item_names=names)
    return tuple(TextConditioning(*(sharding.to_host(x) for x in c)) for c in (pos, neg))


_COMPILED: dict = {}
COMPILE_COUNT = [0]                   # denoise loops compiled in this process (tests, batch runs)


def _signature(tree) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((tuple(x.shape), str(x.dtype), getattr(x, "sharding", None)) for x in leaves)


def compile_denoise(models: Models, prep: Prepared, report_steps: bool = False):
    """The AOT-compiled denoise loop for ``prep``'s shapes: compiled once per (settings, shapes, shardings) in this
    process and reused for every later request of the same kind."""
    steps = len(prep.sigmas) - 1
    fn = make_denoise_fn(models.cfg.dit, steps, prep.guidance, report_steps=report_steps)
    args = (models.dit, prep.noise, prep.conds, jnp.asarray(prep.sigmas))
    key = (fn, _signature(args))
    if key not in _COMPILED:
        if models.mesh is None:
            _COMPILED[key] = fn.lower(*args).compile()
        else:                           # traced under the mesh + the DiT's logical rules (activation constraints)
            with sharding.use_mesh(models.mesh, rules=models.rules):
                _COMPILED[key] = fn.lower(*args).compile()
        COMPILE_COUNT[0] += 1
    return _COMPILED[key]


def denoise(models: Models, prep: Prepared, on_step=None) -> jax.Array:
    """The compiled loop over ``prep``'s schedule -> final latents ``[N, T', H', W', C]`` (fp32; N = 1, or the
    samples stacked by :func:`hcjax.batching.stack`).
    ``on_step(i)`` is called after each step (from inside the compiled loop)."""
    steps = len(prep.sigmas) - 1
    fn = compile_denoise(models, prep, report_steps=on_step is not None)
    t0 = time.perf_counter()
    if on_step is not None:
        _STEP_HOOKS.append(on_step)
    try:
        latents = jax.block_until_ready(fn(models.dit, prep.noise, prep.conds, jnp.asarray(prep.sigmas)))
    finally:
        if on_step is not None:
            _STEP_HOOKS.remove(on_step)
    prep.timings["denoise_s"] = time.perf_counter() - t0
    prep.timings["s_per_step"] = prep.timings["denoise_s"] / steps
    if models.mesh is not None:
        latents = jnp.asarray(sharding.to_host(latents))       # a local copy on every process
    return latents


def decode(models: Models, latents: jax.Array) -> np.ndarray:
    """Latents ``[1, T', H', W', C]`` -> uint8 frames ``[F, h, w, 3]`` (tiled VAE decode; on a mesh the tiles are
    spread over its devices, one per device at a time)."""
    return decode_batch(models, latents)[0]


def decode_batch(models: Models, latents: jax.Array) -> np.ndarray:
    """Latents ``[N, T', H', W', C]`` -> uint8 frames ``[N, F, h, w, 3]``: every sample's tiles spread over the
    mesh's devices (one tile of one sample per device at a time), or one tile at a time on one device."""
    if models.mesh is None:
        with _offloaded_on_device(models, models.vae) as vae_params:
            return to_uint8(np.asarray(decode_latents(vae_params, models.cfg.vae, latents)))
    params = models.vae_on_mesh if models.vae_on_mesh is not None else models.vae
    return to_uint8(np.asarray(decode_latents(params, models.cfg.vae, latents, mesh=models.mesh)))


def generate(models: Models, req: Request, on_step=None, init=None, mesh=None) -> tuple[np.ndarray, dict]:
    """One request -> (uint8 frames ``[F, h, w, 3]``, timings): :func:`prepare`, :func:`denoise`, :func:`decode`.

    ``mesh``: run on it (params placed by :func:`place` unless ``models`` already live there; for many requests
    place once and pass the placed models)."""
    if mesh is not None and models.mesh is not mesh:
        models = place(models, mesh)
    t0 = time.perf_counter()
    prep = prepare(models, req, init=init)
    latents = denoise(models, prep, on_step)
    t1 = time.perf_counter()
    frames = decode(models, latents)
    prep.timings["vae_decode_s"] = time.perf_counter() - t1
    prep.timings["total_s"] = time.perf_counter() - t0
    return frames, prep.timings
