"""Flow-matching training of the HunyuanCustom DiT (no reference: the original release has no training code).

Objective, consistent with the sampler (:mod:`hcjax.scheduler`): ``sigma ~ shift(logit-normal | uniform)``,
``x_sigma = (1 - sigma) x0 + sigma eps``, the DiT sees ``t = 1000 sigma`` and regresses the velocity
``eps - x0`` (MSE, fp32). The batch is a :class:`hcjax.data.TrainBatch` (shapes there): reference-image
conditioning uses ``ref_latents [B, K, H, W, C]`` (a frame of the clip or separate images, one per subject, see
:mod:`hcjax.data`; a batch mixing clips of different K pads the references and passes ``ref_mask [B, K]`` to the
DiT, which masks the padded frames out of attention, so padding does not change a sample's loss term);
the audio model gets ``audio_features``, the editing model ``bg_latents [B, T, H, W, 2C]`` (the clip with the
subject masked out + the mask, :mod:`hcjax.data.encode`). Condition dropout for CFG, per sample: text -> the
negative-branch conditioning (``null``: ``text_states [S, D]``, ``text_mask [S]``, ``text_states_2 [D2]``),
image -> white-image reference latents for all K, audio -> zeros (spec 3.4, 2.1, 2.3); ``bg_latents`` are never dropped
(sampling gives both CFG branches the same ones, spec 5.11).

State: a plain dict ``{"step": int32[], "params", "opt_state", ("ema")}``; params are fp32 master weights,
the DiT computes in ``dit.dtype`` (bf16 for mixed precision) and ``dit.remat`` picks the checkpoint policy of
the scanned blocks. Optimiser: global-norm clipping then AdamW (decay on kernels/embeddings) with linear warmup
and cosine (or constant) decay; ``train.microbatch`` runs the batch through the DiT in slices with averaged
gradients (:func:`microbatch_value_and_grad`). :func:`make_train_step` returns a pure jitted ``(state, batch,
null) -> (state, metrics)`` with explicit in/out shardings over the mesh and the state donated; a non-finite
loss or gradient leaves the state unchanged and reports ``finite = False``. The per-step RNG is
``fold_in(key(seed), step)``, so a resumed run draws the same noise. :func:`train` is the loop behind
``train.py``; in raw mode it encodes each batch with :class:`hcjax.data.encode.Encoders` over the text encoders it
is given (``train.py`` loads them).

LoRA (``train.lora.rank > 0``, :mod:`hcjax.lora`): the state holds ``"adapters"`` (fp32, sharded like their
kernels: :func:`hcjax.lora.boxed`) instead of ``"params"``, so the optimizer state and checkpoints hold adapters
only. The frozen base is a separate, non-donated input of the step (:func:`load_base`: ``dit.param_dtype``, bf16
or fp8 with ``dit.use_fp8``, in the DiT's run-time form), never differentiated; the DiT runs it unmerged under
:func:`hcjax.lora.lora_scope` with scale ``alpha / rank`` and optional LoRA dropout (per-layer keys).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from . import dit, lora, sharding
from .checkpoint import (TrainCheckpoints, dit_differences, load_checkpoint_config, load_params,
                         resume_differences)
from .config import Config, ConfigError, to_dict
from .dit.storage import abstract_runtime_params
from .data import Loader, TrainBatch, sources
from .data.batch import TEXT_KEYS
from .data.encode import Encoders, check_compatible
from .data.npz import load_npz
from .scheduler import training_sigmas

log = logging.getLogger("hcjax.training")

NULL_KEYS = TEXT_KEYS           # the null (negative-branch) text conditioning: text_states, text_mask, text_states_2


class NonFiniteError(RuntimeError):
    """Training produced a NaN/Inf loss or gradient norm."""


# ------------------------------------------------------------------------------------------- mesh / sharding


def default_rules(cfg: Config):
    return sharding.rules_for(cfg.mesh)


def make_mesh(cfg: Config, devices=None):
    return sharding.make_mesh(cfg.mesh, cfg.dit, devices)


@contextlib.contextmanager
def mesh_context(mesh, rules, cfg: Config | None = None):
    """Trace the model under ``mesh`` with the logical ``rules`` (activation constraints); attention's sequence
    parallelism comes from ``cfg.dit`` (static module config)."""
    with sharding.use_mesh(mesh, None if cfg is None else cfg.mesh, rules=rules):
        yield


def check_batch(cfg: Config, mesh) -> int:
    """The number of batch shards; raises when the global batch does not divide over them."""
    shards = math.prod(mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape)
    b = cfg.train.batch_size
    if b % shards:
        raise ConfigError(f"train.batch_size={b} is not divisible by the {shards} batch shards of the mesh "
                          f"(data x fsdp = {dict((a, mesh.shape[a]) for a in ('data', 'fsdp') if a in mesh.shape)});"
                          f" use a multiple of {shards}")
    if b % jax.process_count():
        raise ConfigError(f"train.batch_size={b} does not divide over {jax.process_count()} hosts")
    mb = cfg.train.microbatch
    if mb and mb < b and mb % shards:
        raise ConfigError(f"train.microbatch={mb} is not divisible by the {shards} batch shards of the mesh "
                          f"(every slice is spread over them); use a multiple of {shards}")
    return shards


def param_shardings(cfg: Config, mesh, rules):
    return sharding.param_shardings(dit.abstract_params(cfg.dit), mesh, rules)


def batch_sharding(mesh, rules) -> NamedSharding:
    return nn.logical_to_mesh_sharding(P("act_batch"), mesh, rules)


# ------------------------------------------------------------------------------------------- optimiser / state


def make_schedule(tc) -> optax.Schedule:
    warm = optax.linear_schedule(0.0, tc.learning_rate, max(tc.warmup_steps, 1))
    if tc.lr_schedule == "constant":
        after = optax.constant_schedule(tc.learning_rate)
    else:
        after = optax.cosine_decay_schedule(tc.learning_rate, max(tc.steps - tc.warmup_steps, 1),
                                            alpha=tc.end_lr_ratio)
    return optax.join_schedules([warm, after], [tc.warmup_steps]) if tc.warmup_steps else after


def _decay_mask(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) in ("kernel", "embedding", lora.LORA_A, lora.LORA_B), params)


def make_optimizer(tc) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Global-norm clipping (always in the chain, ``inf`` when off, so the state structure is fixed) + AdamW."""
    schedule = make_schedule(tc)
    opt = optax.chain(
        optax.clip_by_global_norm(tc.grad_clip if tc.grad_clip > 0 else float("inf")),
        optax.adamw(schedule, b1=tc.adam_b1, b2=tc.adam_b2, eps=tc.adam_eps, weight_decay=tc.weight_decay,
                    mask=_decay_mask),
    )
    return opt, schedule


def trainable_key(cfg: Config) -> str:
    """The state entry the optimizer trains: ``"params"`` (full fine-tuning) or ``"adapters"`` (LoRA)."""
    return "adapters" if cfg.train.lora.enabled else "params"


def abstract_trainable(cfg: Config):
    """Boxed (logical axes) fp32 abstract tree of what the optimizer trains: the DiT params, or the LoRA adapters
    of ``train.lora`` (boxed like their kernels)."""
    boxed = dit.abstract_params(cfg.dit)
    f32 = lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32)  # noqa: E731
    if not cfg.train.lora.enabled:
        return jax.tree.map(f32, boxed)
    lc = cfg.train.lora
    ad = jax.eval_shape(lambda k: lora.init_adapters(boxed, lc.rank, lc.targets, key=k, init=lc.init),
                        jax.random.key(0))
    return lora.boxed(boxed, ad)


def init_state(cfg: Config, params, optimizer) -> dict:
    """``params``: the trainable tree (DiT params, or LoRA adapters: see :func:`trainable_key`)."""
    state = {"step": jnp.zeros((), jnp.int32), trainable_key(cfg): params, "opt_state": optimizer.init(params)}
    if cfg.train.ema_decay > 0:
        state["ema"] = jax.tree.map(jnp.copy, params)
    return state


def state_shardings(cfg: Config, mesh, rules, optimizer) -> dict:
    """Shardings of the train state: params (or adapters) by logical axes, optimizer moments like their params,
    scalars replicated."""
    boxed = abstract_trainable(cfg)
    ps = sharding.param_shardings(boxed, mesh, rules)
    replicated = NamedSharding(mesh, P())
    abstract_opt = jax.eval_shape(optimizer.init, nn.unbox(boxed))
    opt_sh = optax.tree_utils.tree_map_params(optimizer, lambda _, s: s, abstract_opt, ps,
                                              transform_non_params=lambda _: replicated)
    out = {"step": replicated, trainable_key(cfg): ps, "opt_state": opt_sh}
    if cfg.train.ema_decay > 0:
        out["ema"] = ps
    return out


def abstract_state(cfg: Config, mesh, rules, optimizer) -> dict:
    """``ShapeDtypeStruct`` tree (with shardings) of the train state: the restore target."""
    shapes = jax.eval_shape(lambda p: init_state(cfg, p, optimizer), nn.unbox(abstract_trainable(cfg)))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                        state_shardings(cfg, mesh, rules, optimizer))


def create_state(cfg: Config, mesh, rules, optimizer, key=None, params=None) -> dict:
    """A fresh sharded train state from random init (``key``) or given fp32 ``params`` (with ``train.lora``: new
    adapters, ``lora_b = 0``, from ``fold_in(key, 1)``, or the given adapters)."""
    tk = trainable_key(cfg)
    sh = state_shardings(cfg, mesh, rules, optimizer)
    if params is None:
        key = jax.random.key(cfg.train.seed) if key is None else key
        if cfg.train.lora.enabled:
            lc, boxed = cfg.train.lora, dit.abstract_params(cfg.dit)
            init = lambda k: lora.init_adapters(boxed, lc.rank, lc.targets, key=jax.random.fold_in(k, 1),  # noqa
                                                init=lc.init)
        else:
            init = lambda k: nn.unbox(dit.init_params(cfg.dit, k))  # noqa: E731
        params = jax.jit(init, out_shardings=sh[tk])(key)
    params = jax.device_put(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), nn.unbox(params)), sh[tk])
    return jax.jit(lambda p: init_state(cfg, p, optimizer), out_shardings=sh)(params)


def load_init_params(cfg: Config, mesh, rules):
    """Converted DiT weights from ``train.init_from`` restored straight into their shardings (fp32)."""
    path = cfg.train.init_from
    errors, _ = dit_differences(to_dict(load_checkpoint_config(path))["dit"], cfg)
    errors = [e for e in errors if not e.startswith("dit.param_dtype")]     # restored (cast) into fp32
    if errors:
        raise ConfigError(f"train.init_from={path}: the checkpoint's DiT differs from dit: " + "; ".join(errors))
    abstract = jax.tree.map(lambda s, x: jax.ShapeDtypeStruct(s.shape, jnp.float32, sharding=x),
                            nn.unbox(dit.abstract_params(cfg.dit)), param_shardings(cfg, mesh, rules))
    return load_params(path, abstract)


def abstract_base(cfg: Config, mesh, rules):
    """``ShapeDtypeStruct`` tree (with shardings) of the frozen LoRA base: the DiT params in ``dit.param_dtype`` in
    run-time form (``hcjax.dit.runtime_params``: sub-32-bit block weights as raw bits, fp8 kernels + scale with
    ``dit.use_fp8``), sharded like the DiT (an fp8 kernel like its kernel, its per-layer scales replicated)."""
    boxed = dit.abstract_params(cfg.dit)
    shardings = lora._flatten(sharding.param_shardings(boxed, mesh, rules))
    pdt = jnp.dtype(cfg.dit.param_dtype)
    runtime = abstract_runtime_params(jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, pdt), nn.unbox(boxed)),
                                      cfg.dit)

    def attach(path, leaf):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        stem, _, last = name.rpartition("/")
        sh = shardings.get(stem if last == "fp8" else name, NamedSharding(mesh, P()))
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sh)

    return jax.tree_util.tree_map_with_path(attach, runtime)


def load_base(cfg: Config, mesh, rules, params=None):
    """The frozen base of a LoRA run on ``mesh`` (:func:`abstract_base`): ``params`` if given, else the converted
    weights of ``train.init_from``, else random init from ``key(train.seed)`` (tests, demos)."""
    if cfg.dit.cpu_offload:
        raise ConfigError("dit.cpu_offload is for sampling; LoRA training keeps the base on the devices (use "
                          "dit.use_fp8 and dit.remat to save memory)")
    target = abstract_base(cfg, mesh, rules)
    pdt = jnp.dtype(cfg.dit.param_dtype)
    plain = jax.tree.map(lambda s, x: jax.ShapeDtypeStruct(s.shape, pdt, sharding=x),
                         nn.unbox(dit.abstract_params(cfg.dit)), param_shardings(cfg, mesh, rules))
    if params is None and cfg.train.init_from:
        path = cfg.train.init_from
        errors, _ = dit_differences(to_dict(load_checkpoint_config(path))["dit"], cfg)
        errors = [e for e in errors if not e.startswith(("dit.param_dtype", "dit.use_fp8"))]
        if errors:
            raise ConfigError(f"train.init_from={path}: the checkpoint's DiT differs from dit: " + "; ".join(errors))
        params = load_params(path, plain)
    elif params is None:
        init = lambda k: jax.tree.map(lambda a: a.astype(pdt), nn.unbox(dit.init_params(cfg.dit, k)))  # noqa
        params = jax.jit(init, out_shardings=jax.tree.map(lambda s: s.sharding, plain))(
            jax.random.key(cfg.train.seed))
    params = jax.tree.map(lambda a: jnp.asarray(a, pdt), nn.unbox(params))
    return jax.device_put(dit.runtime_params(params, cfg.dit), jax.tree.map(lambda s: s.sharding, target))


def lora_resume_errors(saved: dict, cfg: Config) -> list[str]:
    """Settings that change the structure of a LoRA train state: LoRA on/off, rank, targets."""
    old, new = saved.get("train", {}).get("lora", {}), cfg.train.lora
    if old.get("rank", 0) != new.rank:
        return [f"train.lora.rank: checkpoint {old.get('rank', 0)}, config {new.rank}"]
    if new.enabled and old.get("targets") != new.targets:
        return [f"train.lora.targets: checkpoint {old.get('targets')!r}, config {new.targets!r}"]
    return []


# ------------------------------------------------------------------------------------------- objective


def apply_dropout(batch: TrainBatch, null: dict, key, tc) -> TrainBatch:
    """Per-sample condition dropout for CFG (text -> ``null``, image -> white reference, audio -> zeros)."""
    b = batch.latents.shape[0]
    u = jax.random.uniform(key, (3, b))
    drop_t, drop_i, drop_a = u[0] < tc.drop_text, u[1] < tc.drop_image, u[2] < tc.drop_audio

    def sel(mask, a, b_):
        return jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b_)

    new = {}
    for k in NULL_KEYS:
        x, n = getattr(batch, k), null[k]
        if k != "text_states_2" and n.shape[0] < x.shape[1]:    # shorter null text (multi-subject batch): zero-pad
            n = jnp.pad(n, [(0, x.shape[1] - n.shape[0])] + [(0, 0)] * (n.ndim - 1))
        new[k] = sel(drop_t, jnp.broadcast_to(n.astype(x.dtype), x.shape), x)
    new["ref_latents"] = sel(drop_i, batch.null_ref_latents, batch.ref_latents)     # all K references at once
    if batch.audio_features is not None:
        new["audio_features"] = sel(drop_a, jnp.zeros_like(batch.audio_features), batch.audio_features)
    return batch.replace(**new)


def training_draws(batch: TrainBatch, null: dict, key, tc):
    """The per-sample draws of one step for the whole batch: ``(x_sigma, sigma, target, conditioned batch)`` with
    ``target = eps - x0`` and the condition dropout applied (:func:`apply_dropout`)."""
    x0 = batch.latents.astype(jnp.float32)
    b = x0.shape[0]
    k_sigma, k_noise, k_drop = jax.random.split(key, 3)
    sigma = training_sigmas(k_sigma, b, tc.flow_shift, tc.timestep_sampling)
    eps = jax.random.normal(k_noise, x0.shape, jnp.float32)
    s = sigma.reshape(b, 1, 1, 1, 1)
    return (1.0 - s) * x0 + s * eps, sigma, eps - x0, apply_dropout(batch, null, k_drop, tc)


def velocity_loss(params, xt, sigma, target, c: TrainBatch, cfg: Config, adapters=None, dropout_key=None):
    """MSE (fp32) between the DiT velocity at ``xt`` (conditioned on ``c``) and ``target``."""
    args = (xt, 1000.0 * sigma, c.text_states, c.text_mask, c.text_states_2)
    kw = dict(ref_latents=c.ref_latents, bg_latents=c.bg_latents, audio_features=c.audio_features)
    if c.ref_mask is not None:          # mixed-K batch: padded reference frames masked out of attention
        kw["ref_mask"] = c.ref_mask
    model = dit.HunyuanDiT(cfg.dit)
    if adapters is None:
        v = model.apply({"params": params}, *args, **kw)
    else:
        lc = cfg.train.lora
        v = lora.apply(model, params, adapters, lc.scale, *args, dropout=lc.dropout, dropout_key=dropout_key, **kw)
    return jnp.mean(jnp.square(v.astype(jnp.float32) - target))


def flow_matching_loss(params, batch: TrainBatch, null: dict, key, cfg: Config, adapters=None):
    """``(loss, aux)``: MSE between the DiT velocity at ``x_sigma`` and ``eps - x0`` (fp32). ``adapters``: the
    DiT runs ``params`` with these LoRA adapters unmerged (``train.lora``: scale, dropout keyed ``fold_in(key,
    3)``)."""
    xt, sigma, target, c = training_draws(batch, null, key, cfg.train)
    loss = velocity_loss(params, xt, sigma, target, c, cfg, adapters, jax.random.fold_in(key, 3))
    return loss, {"sigma_mean": jnp.mean(sigma)}


def microbatch_value_and_grad(trainable, batch: TrainBatch, null: dict, key, cfg: Config, frozen=None):
    """``((loss, aux), grads)`` of :func:`flow_matching_loss` with the batch through the DiT in slices of
    ``train.microbatch`` samples, values and gradients averaged: the same objective (the draws are made for the
    whole batch first; slices are equal, so the mean of their means is the batch mean) with one slice's
    activations alive at a time (gradient accumulation). Slice i holds samples ``i, i + n, i + 2n, ...`` (n
    slices), so a batch sharded over the data axes stays sharded the same way in every slice. The slices run in
    a ``lax.scan``: unrolled, XLA kept every slice's activations alive at once (the demo DiT's step at batch 8:
    587 MB of temporaries whole, 569 MB unrolled in slices of 2, 165 MB scanned). With LoRA (``frozen`` the
    base) slice i draws its dropout from ``fold_in(fold_in(key, 3), i)``."""
    mb, b = cfg.train.microbatch, batch.latents.shape[0]
    xt, sigma, target, c = training_draws(batch, null, key, cfg.train)
    n = b // mb

    def split(a):                      # [B, ...] -> [n, mb, ...]: slice i = samples i, i + n, ...
        return jnp.moveaxis(a.reshape((mb, n) + a.shape[1:]), 1, 0)

    def body(total, xs):
        i, sl = xs
        if frozen is None:
            out = jax.value_and_grad(lambda p: velocity_loss(p, *sl, cfg))(trainable)
        else:
            dkey = jax.random.fold_in(jax.random.fold_in(key, 3), i)
            out = jax.value_and_grad(lambda a: velocity_loss(frozen, *sl, cfg, a, dkey))(trainable)
        return jax.tree.map(jnp.add, total, out), None

    zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, trainable))
    total, _ = jax.lax.scan(body, zero, (jnp.arange(n), jax.tree.map(split, (xt, sigma, target, c))))
    loss, grads = jax.tree.map(lambda v: v / n, total)
    return (loss, {"sigma_mean": jnp.mean(sigma)}), grads


def make_train_step(cfg: Config, optimizer, mesh, rules=None, *, with_grads: bool = False,
                    compiler_options: dict | None = None, base=None) -> Callable:
    """Jitted ``(state, batch, null) -> (state, metrics)`` with in/out shardings on ``mesh``, state donated.

    With ``train.lora``: ``base`` is the frozen DiT (:func:`load_base`), passed to the compiled step as a fourth,
    non-donated argument (``train_step.jitted(state, batch, null, base)``; ``base_shardings`` for AOT lowering).

    ``batch`` is a :class:`TrainBatch` of global arrays sharded on their leading axis (``act_batch``), ``null``
    (the :data:`NULL_KEYS` dict) is replicated.
    ``metrics``: ``loss``, ``grad_norm`` (before clipping), ``lr`` (of this step), ``finite``; plus ``grads`` with
    ``with_grads`` (tests). ``compiler_options`` go to ``jax.jit`` (XLA debug options).
    """
    rules = default_rules(cfg) if rules is None else rules
    tc = cfg.train
    use_lora, tk = tc.lora.enabled, trainable_key(cfg)
    if cfg.dit.param_dtype != "float32" and not use_lora:
        raise ConfigError(f"dit.param_dtype={cfg.dit.param_dtype}: training keeps fp32 master params; set "
                          "dit.param_dtype: float32 and choose the compute dtype with dit.dtype (a LoRA run, "
                          "train.lora.rank > 0, may keep a bf16/fp8 base)")
    _, schedule = make_optimizer(tc)
    ema = tc.ema_decay

    def step_fn(state, batch, null, *frozen):
        step = state["step"]
        key = jax.random.fold_in(jax.random.key(tc.seed), step)
        if tc.microbatch and tc.microbatch < batch.latents.shape[0]:
            (loss, aux), grads = microbatch_value_and_grad(state[tk], batch, null, key, cfg,
                                                           frozen[0] if use_lora else None)
        else:
            if use_lora:
                loss_fn = lambda ad: flow_matching_loss(frozen[0], batch, null, key, cfg, adapters=ad)  # noqa: E731
            else:
                loss_fn = lambda p: flow_matching_loss(p, batch, null, key, cfg)  # noqa: E731
            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state[tk])
        gnorm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state[tk])
        params = optax.apply_updates(state[tk], updates)
        new = {"step": step + 1, tk: params, "opt_state": opt_state}
        if ema > 0:
            new["ema"] = jax.tree.map(lambda e, p: e * ema + (1.0 - ema) * p, state["ema"], params)
        ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
        metrics = {"loss": loss, "grad_norm": gnorm, "lr": schedule(step), "finite": ok, **aux}
        if with_grads:
            metrics["grads"] = grads
        return new, metrics

    s_sh = state_shardings(cfg, mesh, rules, optimizer)
    b_sh, rep = batch_sharding(mesh, rules), NamedSharding(mesh, P())
    m_sh = {"loss": rep, "grad_norm": rep, "lr": rep, "finite": rep, "sigma_mean": rep}
    if with_grads:
        m_sh["grads"] = s_sh[tk]
    base_sh = jax.tree.map(lambda s: s.sharding, abstract_base(cfg, mesh, rules)) if use_lora else None
    jitted = jax.jit(step_fn, in_shardings=(s_sh, b_sh, rep) + ((base_sh,) if use_lora else ()),
                     out_shardings=(s_sh, m_sh), donate_argnums=(0,), compiler_options=compiler_options)

    def train_step(state, batch, null):
        if use_lora and base is None:
            raise ValueError("make_train_step: train.lora is on; pass base=load_base(cfg, mesh, rules)")
        with mesh_context(mesh, rules, cfg):
            return jitted(state, batch, null, *((base,) if use_lora else ()))

    train_step.jitted, train_step.base_shardings = jitted, base_sh
    return train_step


def to_global(batch: TrainBatch, mesh, rules) -> TrainBatch:
    """This host's numpy batch -> global arrays sharded over the batch axes of ``mesh``."""
    sh = batch_sharding(mesh, rules)
    return jax.tree.map(lambda v: jax.make_array_from_process_local_data(sh, np.asarray(v)), batch)


def _text_order(mask: np.ndarray) -> np.ndarray:
    """Per row of ``mask [R, S]``: the positions ``[0, sum)`` in place, then the later valid positions, then the
    rest (stable). The DiT's main attention reads the first ``sum(mask)`` text tokens whatever their mask (the
    LLaVA layout of spec 3.3 marks image features there as padding and as many trailing pads as valid); the token
    refiner reads the valid ones as an unordered set (no positions in its attention or mean). So the text in this
    order, cut after its last needed position, conditions the DiT as the whole text does."""
    m = mask != 0
    pos = np.arange(m.shape[1])[None]
    lead = pos < m.sum(axis=1, keepdims=True)
    return np.argsort(np.where(lead, 0, np.where(m, 1, 2)), axis=1, kind="stable")


def check_ref_columns(cfg: Config, batch: TrainBatch) -> None:
    """``dit.ref_tokens = "column"`` needs every sample of a batch to have the batch's ``K`` subjects (a padded
    sample's lone reference would be cut to the first column); raise ``ValueError`` naming the counts if not."""
    if cfg.dit.ref_tokens == "column" and batch.ref_mask is not None:
        counts = np.sum(np.asarray(batch.ref_mask) != 0, axis=1)
        if np.any(counts != np.shape(batch.ref_mask)[1]):
            raise ValueError(f"dit.ref_tokens=column: a batch mixes clips of {sorted(set(counts.tolist()))} subjects "
                             "(ref_mask); each bucket must hold clips of one subject count (or use ref_tokens=frame)")


def text_cut(batch: TrainBatch, null: dict, bucket: int) -> int:
    """Text tokens to keep (:func:`cut_text`): for each sample of ``batch`` (this host's) and for ``null``, its
    ``sum(mask)`` leading tokens plus its valid tokens after them; the longest, rounded up to a multiple of
    ``bucket``, at most the data's length; the maximum over all processes (one global shape)."""
    mask = np.asarray(batch.text_mask) != 0
    full = mask.shape[1]
    rows = np.concatenate([mask, np.asarray(null["text_mask"]).reshape(1, full) != 0])
    count = rows.sum(axis=1)
    need = count + (rows & (np.arange(full)[None] >= count[:, None])).sum(axis=1)
    n = min(full, -(-max(int(need.max()), 1) // bucket) * bucket)
    if jax.process_count() > 1:
        n = int(np.max(multihost_utils.process_allgather(np.asarray(n, np.int32))))
    return n


def cut_text(text, n: int):
    """A :class:`TrainBatch` (``[B, S, ...]``) or the null dict (``[S, ...]``) with ``n`` text tokens: each
    sample's tokens in :func:`_text_order`, the first ``n`` (``n`` from :func:`text_cut`: nothing needed is cut)."""
    batch = isinstance(text, TrainBatch)
    states, mask = (text.text_states, text.text_mask) if batch else (text["text_states"], text["text_mask"])
    states, mask = np.asarray(states), np.asarray(mask)
    if mask.shape[-1] == n:
        return text
    order = _text_order(mask.reshape(-1, mask.shape[-1]))[:, :n]
    states = np.take_along_axis(states.reshape(order.shape[0], -1, states.shape[-1]), order[..., None], axis=1)
    mask = np.take_along_axis(mask.reshape(order.shape[0], -1), order, axis=1)
    if batch:
        return text.replace(text_states=states, text_mask=mask)
    return {**text, "text_states": states[0], "text_mask": mask[0]}


def device_null(null: dict, mesh) -> dict:
    return jax.device_put({k: np.asarray(null[k]) for k in NULL_KEYS}, NamedSharding(mesh, P()))


def video_tokens(cfg: Config, latents_shape) -> int:
    b, t, h, w, _ = latents_shape
    pt, ph, pw = cfg.dit.patch_size
    return b * (t // pt) * (h // ph) * (w // pw)


# ------------------------------------------------------------------------------------------- the loop


class MetricsLog:
    """``metrics.jsonl`` in the workdir (+ TensorBoard events via tensorboardX when installed), written by process
    0 only (every process computes the same values; a multi-process run has one writer, no duplicated lines)."""

    def __init__(self, workdir: Path, tensorboard: bool = True):
        self.file = self.tb = None
        if jax.process_index() != 0:
            return
        self.file = open(workdir / "metrics.jsonl", "a")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                log.info("tensorboardX not installed; metrics go to metrics.jsonl only")
            else:
                self.tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, values: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _null_conditioning(cfg: Config, loader, encoders) -> dict:
    if encoders is not None:
        return encoders.null_text()
    check_compatible(loader.index, cfg, cfg.train.data.path)
    return load_npz(Path(cfg.train.data.path) / sources.NULL, NULL_KEYS)


def train(cfg: Config, workdir: str | Path, *, resume: bool = False, print_fn: Callable = print,
          progress: bool | None = None, text_encoders=None) -> dict:
    """Run (or resume) training in ``workdir``; returns ``{"step", "loss", "skipped", ...}`` of the last step.

    ``workdir/checkpoints`` (orbax), ``workdir/metrics.jsonl``, ``workdir/config.json`` (this run's config) and
    ``workdir/tensorboard``. Refuses to start over existing checkpoints without ``resume``. ``text_encoders``:
    the loaded text encoders raw mode needs with ``train.data.text_encoder: llava`` (see
    :func:`hcjax.data.encode.text_stage`).
    """
    tc = cfg.train
    encoders = Encoders(cfg, text_encoders) if tc.data.mode == "raw" else None
    mesh, rules = make_mesh(cfg), default_rules(cfg)
    check_batch(cfg, mesh)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpts = TrainCheckpoints(workdir / "checkpoints", keep=tc.keep, async_save=tc.async_save)
    latest = ckpts.latest_step()
    if latest is not None and not resume:
        ckpts.close()
        raise FileExistsError(f"{ckpts.directory} already holds checkpoints (latest step {latest}); pass --resume "
                              "to continue that run, or choose a new --workdir")
    optimizer, _ = make_optimizer(tc)
    data_state: dict = {}
    if latest is not None:
        saved = ckpts.config_dict(latest)
        if errors := lora_resume_errors(saved, cfg):
            ckpts.close()
            raise ConfigError("cannot resume: the config is incompatible with the checkpoint: " + "; ".join(errors))
        for note in resume_differences(saved, cfg):
            log.warning("resuming with a changed setting: %s", note)
        state, data_state = ckpts.restore(latest, abstract_state(cfg, mesh, rules, optimizer))
        print_fn(f"resumed from step {latest} ({ckpts.directory})")
    else:
        if resume:
            print_fn(f"--resume: no checkpoint in {ckpts.directory} yet; starting at step 0")
        params = load_init_params(cfg, mesh, rules) if tc.init_from and not tc.lora.enabled else None
        state = create_state(cfg, mesh, rules, optimizer, params=params)
    start = int(jax.device_get(state["step"]))
    if start >= tc.steps:
        print_fn(f"nothing to do: the checkpoint is at step {start} >= train.steps={tc.steps}")
        ckpts.close()
        return {"step": start}
    (workdir / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))

    loader = Loader(cfg, start_step=start, read_skips=int(data_state.get("read_skips", 0)))
    null_host = _null_conditioning(cfg, loader, encoders)
    text_len = np.shape(null_host["text_mask"])[-1]
    nulls = {text_len: device_null(null_host, mesh)}              # by text length (train.text_bucket)
    base = load_base(cfg, mesh, rules) if tc.lora.enabled else None
    step_fn = make_train_step(cfg, optimizer, mesh, rules, base=base)
    metrics_log = MetricsLog(workdir)
    if loader.report.skipped:
        print_fn(f"data: {loader.report.summary()}")
    progress = sys.stderr.isatty() if progress is None else progress
    bar = None
    if progress and jax.process_index() == 0:
        bar = tqdm(total=tc.steps, initial=start, unit="step", dynamic_ncols=True)
    last: dict[str, Any] = {"step": start}
    t_prev = time.perf_counter()
    try:
        for batch in loader:
            if encoders is not None:
                batch = encoders.encode(batch)
            check_ref_columns(cfg, batch)
            tokens = video_tokens(cfg, np.shape(batch.latents)) * jax.process_count()
            n = text_cut(batch, null_host, tc.text_bucket) if tc.text_bucket else text_len
            if n not in nulls:
                nulls[n] = device_null(cut_text(null_host, n), mesh)
            state, m = step_fn(state, to_global(cut_text(batch, n), mesh, rules), nulls[n])
            m = jax.device_get(m)
            now = time.perf_counter()
            dt, t_prev = now - t_prev, now
            step = loader.next_step
            if not bool(m["finite"]):
                ckpts.wait()
                raise NonFiniteError(
                    f"non-finite training values at step {step} (loss={float(m['loss'])}, grad_norm="
                    f"{float(m['grad_norm'])}); stopped without applying the update. The last good checkpoint is "
                    f"step {ckpts.latest_step()} in {ckpts.directory}; lower train.learning_rate or check the data")
            last = {"step": step, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
                    "lr": float(m["lr"]), "step_time": dt, "tokens_per_s": tokens / dt}
            if step % tc.log_every == 0 or step == tc.steps or step == start + 1:
                metrics_log.write(step, {k: v for k, v in last.items() if k != "step"})
                line = (f"step {step} loss {last['loss']:.6f} grad_norm {last['grad_norm']:.4f} lr {last['lr']:.3e} "
                        f"step_time {dt:.3f}s tokens/s {last['tokens_per_s']:.0f}"
                        + (" (first step: includes compilation)" if step == start + 1 else ""))
                if bar is not None:
                    bar.set_postfix(loss=f"{last['loss']:.4f}", gnorm=f"{last['grad_norm']:.3f}")
                else:
                    print_fn(line)
            if bar is not None:
                bar.update(1)
            if step % tc.save_every == 0 or step == tc.steps:
                ckpts.save(step, state, loader.state(), cfg)
            if tc.lora.enabled and step == tc.steps and jax.process_index() == 0:
                path = lora.save_trained(workdir / lora.ADAPTER_FILE, state, cfg)
                print_fn(f"LoRA adapter: {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    finally:
        if bar is not None:
            bar.close()
        loader.close()
        metrics_log.close()
        ckpts.close()
    last["skipped"] = loader.skipped
    print_fn(f"done: step {last['step']}, loss {last.get('loss', float('nan')):.6f}; skipped clips: "
             f"{loader.skipped or 'none'}")
    return last
