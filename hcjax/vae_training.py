"""Training the 3D causal VAE from scratch: ``python train.py --config C --stage vae --workdir RUN``.

The original release ships a trained VAE and no VAE training code; this exists for small models (the demo,
``configs/demo.yaml``) whose VAE has no released weights. Objective per window: ``L1 + mse_weight * MSE`` of the
reconstruction of a posterior sample, plus ``kl_weight * KL(q(z|x) || N(0, 1))`` (means over elements). Windows
are random ``vae_train.frames x crop x crop`` crops of the clips of a raw dataset directory (all decoded once
into memory: meant for small datasets). With ``vae_train.ref_fraction > 0`` that fraction of the windows are
static crops of the clips' reference images (``*_ref.png``, the subject on white): the DiT's reference latents
are VAE encodings of such images, which clips alone never show the VAE. AdamW with warmup + cosine decay
(optax), one jitted step.

Writes ``RUN/params`` (an hcjax checkpoint, :func:`hcjax.checkpoint.save_params`, whose config carries the
measured ``vae.scaling_factor`` = 1 / std of the latent means over the data), ``RUN/metrics.jsonl`` and, every
``vae_train.save_every`` steps, ``RUN/checkpoints/<step>`` (:class:`hcjax.checkpoint.TrainCheckpoints`: params,
optimizer state, step; the window sampler's RNG state as the data state; the newest ``vae_train.keep`` kept).
``resume=True`` (``train.py --stage vae --resume``) continues from the latest one: the same windows, noise and
updates as an uninterrupted run (the step key is ``fold_in(key(seed), step)``). A run with checkpoints refuses to
start over without ``resume``; resuming with another ``vae:`` architecture is an error naming the fields.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image
from tqdm import tqdm

from . import vae
from .checkpoint import TrainCheckpoints, load_params, random_params, save_params
from .config import Config, ConfigError, to_dict
from .data.sources import mask_videos
from .media import decode_frames, probe
from .training import MetricsLog

log = logging.getLogger("hcjax.vae_training")


def load_clips(data_dir: str | Path, limit: int | None = None) -> np.ndarray:
    """Every ``*.mp4`` of ``data_dir`` but the clips' mask videos, decoded to ``uint8 [N, F, H, W, 3]`` (all clips
    must share their shape)."""
    masks = mask_videos(data_dir)
    paths = sorted(p for p in Path(data_dir).glob("*.mp4") if p.resolve() not in masks)[:limit]
    if not paths:
        raise FileNotFoundError(f"vae training data: no .mp4 files in {data_dir}")
    clips = [decode_frames(p, np.arange(probe(p).frames)) for p in paths]
    shapes = {c.shape for c in clips}
    if len(shapes) != 1:
        raise ValueError(f"vae training data {data_dir}: clips differ in shape {sorted(shapes)}; use one size")
    return np.stack(clips)


def load_references(data_dir: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """Every ``*_ref.png`` of ``data_dir`` as ``uint8 [N, H, W, 3]``; each must be ``shape`` (the clips' H, W)."""
    paths = sorted(Path(data_dir).glob("*_ref.png"))
    if not paths:
        raise FileNotFoundError(f"vae_train.ref_fraction > 0 but {data_dir} has no *_ref.png reference images")
    refs = []
    for p in paths:
        img = np.asarray(Image.open(p).convert("RGB"))
        if img.shape[:2] != tuple(shape):
            raise ValueError(f"vae training data: {p} is {img.shape[1]}x{img.shape[0]}, the clips are "
                             f"{shape[1]}x{shape[0]}")
        refs.append(img)
    return np.stack(refs)


def sample_windows(clips: np.ndarray, rng: np.random.Generator, batch: int, frames: int, crop: int,
                   refs: np.ndarray | None = None, ref_fraction: float = 0.0) -> np.ndarray:
    """Random ``[batch, frames, crop, crop, 3]`` windows in [-1, 1] (random clip, start frame, position); with
    ``refs`` ``[N, H, W, 3]``, each window is with probability ``ref_fraction`` a random reference image's crop
    repeated over the frames (a still)."""
    n, f, h, w, _ = clips.shape
    if frames > f or crop > min(h, w):
        raise ValueError(f"vae_train window {frames}x{crop}x{crop} does not fit the clips ({f} frames {h}x{w})")
    out = np.empty((batch, frames, crop, crop, 3), np.float32)
    for b in range(batch):
        i, t = rng.integers(n), rng.integers(f - frames + 1)
        y, x = rng.integers(h - crop + 1), rng.integers(w - crop + 1)
        if refs is not None and ref_fraction > 0 and rng.random() < ref_fraction:
            out[b] = refs[rng.integers(len(refs)), None, y:y + crop, x:x + crop]
        else:
            out[b] = clips[i, t:t + frames, y:y + crop, x:x + crop]
    return out / 127.5 - 1.0


def init_params(cfg: Config, seed: int) -> dict:
    """Random weights (:func:`hcjax.checkpoint.random_params`, fan-in scaled) with the posterior log-variance
    starting at ``vae_train.init_logvar`` (a narrow posterior: reconstructions learn from the start instead of
    fighting unit noise on the latents)."""
    params = random_params(vae.abstract_params(cfg.vae), seed, std=None)
    bias = params["quant_conv"]["bias"]
    bias[cfg.vae.latent_channels:] = cfg.vae_train.init_logvar
    return jax.tree.map(jnp.asarray, params)


def vae_loss(params, x, key, cfg: Config, eps=None):
    """L1 + MSE reconstruction + ``kl_weight`` x KL of ``x`` through the VAE, the latent sampled from the posterior
    with ``eps`` (standard normal, the latent's shape; default: drawn from ``key``)."""
    model = vae.AutoencoderKLCausal3D(cfg.vae)
    mean, logvar = model.apply({"params": params}, x, method="encode")
    if eps is None:
        eps = jax.random.normal(key, mean.shape)
    z = mean + jnp.exp(0.5 * logvar) * eps
    y = model.apply({"params": params}, z, method="decode").astype(jnp.float32)
    l1 = jnp.mean(jnp.abs(y - x))
    mse = jnp.mean(jnp.square(y - x))
    kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    vc = cfg.vae_train
    return vc.l1_weight * l1 + vc.mse_weight * mse + vc.kl_weight * kl, {"l1": l1, "mse": mse, "kl": kl}


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    vc = cfg.vae_train
    warm = min(max(vc.warmup_steps, 1), vc.steps - 1) if vc.steps > 1 else 0
    schedule = optax.warmup_cosine_decay_schedule(0.0, vc.learning_rate, warm, max(vc.steps, warm + 1),
                                                  end_value=0.05 * vc.learning_rate)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))


def loss_and_grads(params, x, key, cfg: Config):
    """``((loss, parts), grads)`` of :func:`vae_loss` on the batch ``x``. With ``vae_train.microbatch`` the batch
    goes through the VAE in slices whose values and gradients are averaged: the same result (the posterior noise
    is drawn for the whole batch), cheaper on CPU, where time per window grows with the batch (a step on batch 4
    of 5x32x32 windows on this 2-core machine: 0.18 s whole, 0.09 s as two slices of 2). The slices are unrolled:
    as a ``lax.scan`` the same step took 0.9 s."""
    mb = cfg.vae_train.microbatch
    grad_fn = jax.value_and_grad(vae_loss, has_aux=True)
    n = x.shape[0] // mb if mb else 1
    if n <= 1:
        return grad_fn(params, x, key, cfg)
    model = vae.AutoencoderKLCausal3D(cfg.vae)
    latent = jax.eval_shape(lambda p, v: model.apply({"params": p}, v, method="encode")[0], params, x)
    eps = jax.random.normal(key, latent.shape)
    total = None
    for i in range(n):
        sl = slice(i * mb, (i + 1) * mb)
        out = grad_fn(params, x[sl], None, cfg, eps[sl])
        total = out if total is None else jax.tree.map(jnp.add, total, out)
    return jax.tree.map(lambda v: v / n, total)


def make_step(cfg: Config, optimizer) -> Callable:
    """Jitted ``(params, opt_state, x, key) -> (params, opt_state, metrics)``."""
    def step(params, opt_state, x, key):
        (loss, parts), grads = loss_and_grads(params, x, key, cfg)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, dict(parts, loss=loss)

    return jax.jit(step, donate_argnums=(0, 1))


def measure_scaling(params, cfg: Config, clips: np.ndarray, max_clips: int = 64) -> float:
    """``1 / std`` of the (unscaled) latent means of up to ``max_clips`` whole clips: the latent scaling factor."""
    model = vae.AutoencoderKLCausal3D(cfg.vae)
    enc = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode")[0])
    f = 1 + 4 * ((clips.shape[1] - 1) // 4)
    means = [np.asarray(enc(params, clips[i:i + 8, :f].astype(np.float32) / 127.5 - 1.0))
             for i in range(0, min(len(clips), max_clips), 8)]
    return float(1.0 / np.concatenate(means).std())


def abstract_state(cfg: Config, optimizer) -> dict:
    """``ShapeDtypeStruct`` tree of the checkpointed state ``{"step", "params", "opt_state"}`` (restore target)."""
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nn.unbox(vae.abstract_params(cfg.vae)))
    return {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
            "opt_state": jax.eval_shape(optimizer.init, params)}


def _check_resumable(saved: dict, cfg: Config, where: Path) -> None:
    """The checkpoint's ``vae:`` architecture must equal the config's (the measured scaling factor aside)."""
    now = to_dict(cfg)["vae"]
    old = saved.get("vae", {})
    diff = [f"vae.{k}: checkpoint {old.get(k, '<missing>')!r}, config {v!r}" for k, v in now.items()
            if k != "scaling_factor" and old.get(k, "<missing>") != v]
    if diff:
        raise ConfigError(f"cannot resume from {where}: the config's VAE differs: " + "; ".join(diff))


def train_vae(cfg: Config, workdir: str | Path, *, resume: bool = False, print_fn: Callable = print,
              progress: bool | None = None) -> Path:
    """Train ``cfg.vae`` on ``cfg.vae_train`` (data: ``vae_train.data`` or ``train.data.path``); returns the
    checkpoint dir ``workdir/params`` (module docstring: checkpoints and ``resume``)."""
    vc = cfg.vae_train
    workdir = Path(workdir)
    out = workdir / "params"
    if out.exists():
        raise FileExistsError(f"{out} exists: the VAE of this run is already trained (choose another --workdir)")
    s = cfg.vae.spatial_compression_ratio
    if vc.crop % s:
        raise ValueError(f"vae_train.crop={vc.crop} must be a multiple of the spatial compression {s}")
    data = vc.data or cfg.train.data.path
    if not data:
        raise ValueError("no VAE training data: set vae_train.data (or train.data.path) to a raw clip directory")
    t0 = time.perf_counter()
    clips = load_clips(data)
    print_fn(f"vae: {clips.shape[0]} clips of {clips.shape[1]} frames {clips.shape[3]}x{clips.shape[2]} "
             f"loaded in {time.perf_counter() - t0:.1f}s")
    refs = load_references(data, clips.shape[2:4]) if vc.ref_fraction > 0 else None
    if refs is not None:
        print_fn(f"vae: {len(refs)} reference images, {vc.ref_fraction:.0%} of the windows")
    workdir.mkdir(parents=True, exist_ok=True)
    optimizer = make_optimizer(cfg)
    rng = np.random.default_rng(vc.seed)
    ckpts = TrainCheckpoints(workdir / "checkpoints", keep=vc.keep)
    try:
        latest = ckpts.latest_step()
        if latest is not None and not resume:
            raise FileExistsError(f"{ckpts.directory} already holds VAE checkpoints (latest step {latest}); pass "
                                  "--resume to continue that run, or choose a new --workdir")
        if latest is not None:
            _check_resumable(ckpts.config_dict(latest), cfg, ckpts.directory)
            state, data_state = ckpts.restore(latest, abstract_state(cfg, optimizer))
            params, opt_state, start = state["params"], state["opt_state"], int(state["step"])
            rng.bit_generator.state = data_state["rng"]
            print_fn(f"vae: resumed from step {start} ({ckpts.directory})")
        else:
            if resume:
                print_fn(f"--resume: no VAE checkpoint in {ckpts.directory} yet; starting at step 0")
            if vc.init_from:
                params = jax.tree.map(jnp.asarray, load_params(vc.init_from))
                print_fn(f"vae: continuing from {vc.init_from}")
            else:
                params = init_params(cfg, vc.seed)
            opt_state, start = optimizer.init(params), 0
        (workdir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
        print_fn(f"vae: {vae.count_params(params) / 1e6:.2f}M parameters, {vc.steps} steps of batch "
                 f"{vc.batch_size} ({vc.frames}x{vc.crop}x{vc.crop} windows"
                 f"{f', slices of {vc.microbatch}' if vc.microbatch else ''})")
        step = make_step(cfg, optimizer)
        key = jax.random.key(vc.seed)
        bar = tqdm(range(start, vc.steps), desc="vae", unit="step", disable=progress is False, initial=start,
                   total=vc.steps)
        metrics = MetricsLog(workdir, tensorboard=False)         # written by process 0 only
        try:
            for i in bar:
                x = sample_windows(clips, rng, vc.batch_size, vc.frames, vc.crop, refs, vc.ref_fraction)
                params, opt_state, m = step(params, opt_state, x, jax.random.fold_in(key, i))
                if (i + 1) % vc.log_every == 0 or i + 1 == vc.steps:
                    m = {k: float(v) for k, v in m.items()}
                    if not np.isfinite(m["loss"]):
                        raise FloatingPointError(f"vae training: non-finite loss at step {i + 1}: {m}; the last good "
                                                 f"checkpoint is step {ckpts.latest_step()} in {ckpts.directory}")
                    metrics.write(i + 1, dict(time_s=time.perf_counter() - t0, **m))
                    bar.set_postfix(l1=f"{m['l1']:.4f}", kl=f"{m['kl']:.3f}")
                    if progress is False:
                        print_fn(f"vae step {i + 1}: l1 {m['l1']:.4f} mse {m['mse']:.5f} kl {m['kl']:.3f}")
                if (i + 1) % vc.save_every == 0 and i + 1 < vc.steps:
                    ckpts.save(i + 1, {"step": np.int32(i + 1), "params": params, "opt_state": opt_state},
                               {"rng": rng.bit_generator.state}, cfg)
        finally:
            metrics.close()
    finally:
        ckpts.close()
    scale = measure_scaling(params, cfg, clips)
    cfg = dataclasses.replace(cfg, vae=dataclasses.replace(cfg.vae, scaling_factor=scale))
    save_params(out, jax.device_get(params), cfg)
    print_fn(f"vae: trained in {time.perf_counter() - t0:.0f}s; scaling_factor {scale:.4f}; wrote {out}")
    return out
