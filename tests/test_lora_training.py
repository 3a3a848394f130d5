"""LoRA training (``train.lora``) and sampling with adapters (``sample.py --lora``).

The step's loss and adapter gradients are checked against ``jax.grad`` of the independent reference objective of
``tests/test_training.py`` on the *merged* params (``lora.merge``, tested against peft in ``test_lora.py``); the
base is bit-identical after several steps and the optimizer state holds the adapters only; a sharded step
(fsdp=2 x sequence=2, with LoRA dropout) equals one device; SIGKILL + ``--resume`` is bitwise; the exported
adapter file is the state's adapters with ``alpha / rank`` folded in; sampling with a zero adapter equals the base.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hcjax import lora, training
from hcjax import models as M
from hcjax.checkpoint import TrainCheckpoints
from hcjax.config import ConfigError, load_config
from hcjax.data.encode import precompute
from hcjax.data.synthetic import generate as make_clips
from hcjax.dit import abstract_params
from hcjax.layers import Dense
from hcjax.pipeline import Request, generate
from tests.test_training import (FAST, RULES, ROOT, TINY, losses, mesh_of, random_batch, reference_loss,
                                 subprocess_env, tiny_cfg)

RANK, ALPHA = 3, 6.0               # scale alpha / rank = 2


def lora_cfg(*extra):
    return tiny_cfg(f"train.lora.rank={RANK}", f"train.lora.alpha={ALPHA}", "train.warmup_steps=0",
                    "train.learning_rate=0.01", "train.adam_eps=1.0", *extra)


@pytest.fixture(scope="module")
def setup():
    """A random fp32 base and adapters with non-zero ``lora_b`` (so every adapter leaf gets a gradient)."""
    cfg = lora_cfg()
    base = jax.device_get(training.load_base(cfg, mesh_of((1, 1, 1, 1)), RULES))
    ad = jax.device_get(lora.init_adapters(abstract_params(cfg.dit), RANK, key=jax.random.key(5)))
    rng = np.random.default_rng(0)
    ad = jax.tree_util.tree_map_with_path(
        lambda p, x: (0.05 * rng.standard_normal(x.shape)).astype(np.float32) if p[-1].key == "lora_b" else x, ad)
    batch, null = random_batch(cfg)
    return cfg, base, ad, batch, null


@functools.lru_cache(maxsize=None)
def step_for(cfg, mesh_shape):
    mesh = mesh_of(mesh_shape)
    opt, _ = training.make_optimizer(cfg.train)
    return training.make_train_step(cfg, opt, mesh, RULES, with_grads=True, compiler_options=FAST), opt, mesh


def run_steps(cfg, base, adapters, batch, null, mesh_shape, n=1):
    fn, opt, mesh = step_for(cfg, mesh_shape)          # one compiled program per (config, mesh)
    placed = training.load_base(cfg, mesh, RULES, params=base)
    state = training.create_state(cfg, mesh, RULES, opt, params=adapters)
    metrics = []
    for _ in range(n):
        with training.mesh_context(mesh, RULES, cfg):
            state, m = fn.jitted(state, training.to_global(batch, mesh, RULES), training.device_null(null, mesh),
                                 placed)
        metrics.append(jax.device_get(m))
    return jax.device_get(state), metrics, jax.device_get(placed)


def test_lora_step_against_merged_reference_base_frozen_adapters_only(setup):
    cfg, base, ad, batch, null = setup
    state, ms, base_after = run_steps(cfg, base, ad, batch, null, (1, 1, 1, 1), n=3)
    m = ms[0]
    # loss and gradients of step 0 = jax.grad of the reference objective on W + (alpha / rank) a @ b
    key = jax.random.fold_in(jax.random.key(cfg.train.seed), 0)
    ref = jax.jit(jax.value_and_grad(lambda a, b, bt, nl, k: reference_loss(lora.merge(b, a, ALPHA / RANK), bt, nl,
                                                                             k, cfg)))
    loss, grads = ref(ad, base, batch, null, key)
    np.testing.assert_allclose(m["loss"], loss, rtol=1e-5)
    assert jax.tree.structure(grads) == jax.tree.structure(m["grads"])
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads))
    assert scale > 0
    for a, b in zip(jax.tree.leaves(m["grads"]), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)
    # the base is bit-identical after 3 steps; the adapters moved
    for a, b in zip(jax.tree.leaves(base_after), jax.tree.leaves(base)):
        np.testing.assert_array_equal(a, b)
    assert all(bool(x["finite"]) for x in ms) and int(state["step"]) == 3
    assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state["adapters"]), jax.tree.leaves(ad)))
    # the state and the optimizer hold the adapters only: Adam's mu and nu = 2 x the adapter count, nothing else
    assert set(state) == {"step", "adapters", "opt_state"}
    r, d, f = RANK, cfg.dit.hidden_size, cfg.dit.mlp_hidden
    per_double = 2 * r * ((d + 3 * d) + (d + d) + (d + f) + (f + d))        # img + txt: qkv, proj, fc1, fc2
    per_single = r * ((d + 3 * d) + (d + f) + (d + d) + (f + d))            # linear1 qkv/mlp, linear2 attn/mlp
    want = cfg.dit.depth_double_blocks * per_double + cfg.dit.depth_single_blocks * per_single
    assert lora.count(state["adapters"]) == lora.count_formula(abstract_params(cfg.dit), RANK) == want
    sizes = [int(np.size(x)) for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) > 0]
    assert sum(sizes) == 2 * want
    mu = optax.tree_utils.tree_get(state["opt_state"], "mu")
    assert jax.tree.structure(mu) == jax.tree.structure(state["adapters"])


def test_lora_microbatch_step_equals_the_merged_whole_batch_objective(setup):
    """train.microbatch=2 (batch 4) with LoRA: the frozen base goes into every slice; loss and adapter gradients are
    the whole-batch reference's."""
    _, base, ad, batch, null = setup
    cfg = lora_cfg("train.microbatch=2")
    _, ms, _ = run_steps(cfg, base, ad, batch, null, (1, 1, 1, 1))
    key = jax.random.fold_in(jax.random.key(cfg.train.seed), 0)
    ref = jax.jit(jax.value_and_grad(lambda a, b, bt, nl, k: reference_loss(lora.merge(b, a, ALPHA / RANK), bt, nl,
                                                                             k, cfg)))
    loss, grads = ref(ad, base, batch, null, key)
    np.testing.assert_allclose(ms[0]["loss"], loss, rtol=1e-5)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads))
    for a, b in zip(jax.tree.leaves(ms[0]["grads"]), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


def test_sharded_lora_step_with_dropout_equals_single_device(setup):
    _, base, ad, batch, null = setup
    cfg = lora_cfg("train.lora.dropout=0.3")
    assert len(set(mesh_of((1, 2, 2, 1)).devices.flat)) == 4                  # fsdp=2 x sequence=2
    s1, m1, _ = run_steps(cfg, base, ad, batch, null, (1, 1, 1, 1))
    s4, m4, _ = run_steps(cfg, base, ad, batch, null, (1, 2, 2, 1))
    m1, m4 = m1[0], m4[0]
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(m4["grads"]), jax.tree.leaves(m1["grads"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.max(np.abs(b)))
    for a, b in zip(jax.tree.leaves(s4), jax.tree.leaves(s1)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
    # dropout is on: the same step without it gives another loss
    _, m0, _ = run_steps(lora_cfg(), base, ad, batch, null, (1, 1, 1, 1))
    assert abs(float(m0[0]["loss"]) - float(m1["loss"])) > 1e-4 * float(m1["loss"])


class OneDense(nn.Module):
    d: int

    @nn.compact
    def __call__(self, x):
        return Dense(self.d, ("embed", "mlp"), name="lin")(x)


def test_lora_dropout_masks_per_key_and_layer():
    """Dropout acts on the LoRA input only, at the configured rate, with inverted scaling; masks come from the
    per-layer keys ``inject`` places beside the adapters (different per layer of a stack)."""
    d, p = 64, 0.25
    x = np.ones((4, 16, d), np.float32)
    params = {"lin": {"kernel": np.zeros((d, d), np.float32), "bias": np.zeros((d,), np.float32)}}
    eye = {"lin": {"lora_a": np.eye(d, dtype=np.float32), "lora_b": np.eye(d, dtype=np.float32)}}
    model = OneDense(d)
    run = lambda k, rate: np.asarray(lora.apply(model, params, eye, 1.0, x, dropout=rate, dropout_key=k))  # noqa
    y = run(jax.random.key(0), p)
    kept = y != 0
    np.testing.assert_allclose(y[kept], 1 / (1 - p), rtol=1e-6)   # the base output is 0: y is the LoRA branch
    assert abs((y == 0).mean() - p) < 0.03
    np.testing.assert_array_equal(y, run(jax.random.key(0), p))
    assert not np.array_equal(y, run(jax.random.key(1), p))
    np.testing.assert_array_equal(run(None, 0.0), x)
    with pytest.raises(ValueError, match="dropout_key"):
        run(None, p)
    cfg = tiny_cfg("dit.depth_double_blocks=3").dit
    abstract = nn.unbox(abstract_params(cfg))
    ad = lora.init_adapters(abstract, 2, key=jax.random.key(0))
    keys = np.asarray(lora.inject(abstract, ad, dropout_key=jax.random.key(3))["double_blocks"]["img_attn_qkv"][
        lora.LORA_KEY])
    assert keys.shape[0] == 3 and keys.dtype == np.int32 and len({tuple(k) for k in keys}) == 3


def test_lora_config_validation_and_resume_rules():
    with pytest.raises(ConfigError, match=r"train\.lora\.dropout=1\.5"):
        tiny_cfg("train.lora.rank=2", "train.lora.dropout=1.5")
    with pytest.raises(ConfigError, match=r"train\.lora\.init='xavier'"):
        tiny_cfg("train.lora.init=xavier")
    assert lora_cfg().train.lora.scale == pytest.approx(2.0) and tiny_cfg("train.lora.rank=4").train.lora.scale == 1
    saved = json.loads(json.dumps({"train": {"lora": {"rank": RANK, "targets": lora.DEFAULT_TARGETS}}}))
    assert training.lora_resume_errors(saved, lora_cfg()) == []
    assert "train.lora.rank: checkpoint 3, config 0" in training.lora_resume_errors(saved, tiny_cfg())[0]
    assert "targets" in training.lora_resume_errors(saved, lora_cfg("train.lora.targets=single_blocks/.*"))[0]


# ------------------------------------------------------------------------------------------- train.py


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_train")
    make_clips(root / "raw", num_clips=8, frames=9, height=32, width=32, seed=1)
    precompute(tiny_cfg(), root / "raw", root / "cache")
    ctx = {"root": root, "cache": root / "cache", "jit_cache": root / "jit_cache"}
    out = cli(ctx, root / "full")
    assert "LoRA adapter:" in out.stdout, out.stdout
    return ctx


LORA_SETS = ("train.lora.rank=4", "train.lora.alpha=8", "train.steps=24", "train.save_every=2", "train.log_every=1",
             "train.lora.dropout=0.1")


def cli_cmd(ctx, workdir, *extra):
    sets = [a for s in (*LORA_SETS, f"train.data.path={ctx['cache']}") for a in ("--set", s)]
    return [sys.executable, str(ROOT / "train.py"), "--config", str(TINY), "--workdir", str(workdir), *sets, *extra]


def cli(ctx, workdir, *extra, check=True):
    out = subprocess.run(cli_cmd(ctx, workdir, *extra), cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env=subprocess_env(1, ctx["jit_cache"]))
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def final_state(workdir, step=24):
    ck = TrainCheckpoints(Path(workdir) / "checkpoints", read_only=True)
    try:
        return ck.restore(step)[0]
    finally:
        ck.close()


def test_cli_lora_sigkill_resume_bitwise_and_adapter_file(runs):
    root = runs["root"]
    work = root / "killed"
    proc = subprocess.Popen(cli_cmd(runs, work), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env(1, runs["jit_cache"]))
    seen = 0
    try:
        for line in proc.stdout:
            if line.startswith("step "):
                seen = int(line.split()[1])
                if seen >= 9:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and 9 <= seen < 24, (seen, proc.stderr.read()[-2000:])
    out = cli(runs, work, "--resume")
    assert "resumed from step" in out.stdout
    full, resumed = losses(root / "full"), losses(work)
    assert sorted(resumed) == list(range(1, 25))
    for s, vals in resumed.items():
        assert all(v == full[s][0] for v in vals), (s, vals, full[s])
    a, b = final_state(root / "full"), final_state(work)
    assert set(a) == {"step", "adapters", "opt_state"} and jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # the exported file: the adapters with alpha / rank = 2 folded into lora_b; MBs, not the model
    file = work / lora.ADAPTER_FILE
    tree, meta = lora.load_adapter(file)
    assert meta["scaled"] and meta["rank"] == 4 and meta["alpha"] == 8 and meta["step"] == 24
    flat, want = lora._flatten(tree), lora._flatten(b["adapters"])
    assert flat.keys() == want.keys()
    for k, v in want.items():
        np.testing.assert_array_equal(flat[k], np.asarray(v) * (2.0 if k.endswith("lora_b") else 1.0))
    again = lora.export_checkpoint(work / "checkpoints", root / "again.safetensors")
    for k, v in lora._flatten(lora.load_adapter(again)[0]).items():
        np.testing.assert_array_equal(v, flat[k])
    assert file.stat().st_size < 200_000
    # resuming with another rank is a one-line error
    bad = cli(runs, work, "--resume", "--set", "train.lora.rank=2", "--set", "train.steps=30", check=False)
    assert bad.returncode == 2 and "train.lora.rank: checkpoint 4, config 2" in bad.stderr, bad.stderr[-2000:]


# ------------------------------------------------------------------------------------------- sampling


@pytest.fixture(scope="module")
def sampling(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora_sample")
    models = M.random_models(load_config(M.DEFAULT_CONFIG), seed=0)
    zero = lora.init_adapters(models.dit, 2, key=jax.random.key(0))
    rng = np.random.default_rng(1)
    nonzero = jax.tree_util.tree_map_with_path(
        lambda p, x: (0.5 * rng.standard_normal(x.shape)).astype(np.float32) if p[-1].key == "lora_b" else x, zero)
    files = {n: lora.save_adapter(tmp / f"{n}.safetensors", t) for n, t in (("zero", zero), ("nonzero", nonzero))}
    req = Request(ref_image=str(ROOT / "assets/demo_subject.png"), pos_prompt="the object moves left",
                  video_size=(32, 48), frames=5, steps=2)
    return models, files, req, tmp


def frames_with(models, params, req, unmerged=False):
    m = dataclasses.replace(models, dit=params)
    with lora.lora_scope() if unmerged else contextlib.nullcontext():
        return generate(m, req)[0].astype(np.int16)


def test_sampling_with_zero_and_nonzero_lora(sampling):
    models, files, req, _ = sampling
    plain = frames_with(models, models.dit, req)
    zero = frames_with(models, lora.for_sampling(models.dit, [files["zero"]], [1.0]), req)
    np.testing.assert_array_equal(zero, plain)                     # merged W + 0 == W exactly
    merged = frames_with(models, lora.for_sampling(models.dit, [files["nonzero"]], [1.0]), req)
    assert np.abs(merged - plain).max() > 20
    # two files at scales 0.5 + 0.5 == one at 1.0; unmerged == merged (up to rounding of uint8 frames)
    halves = frames_with(models, lora.for_sampling(models.dit, [files["nonzero"]] * 2, [0.5, 0.5]), req)
    assert np.abs(halves - merged).mean() < 0.05 * np.abs(merged - plain).mean()
    unmerged = frames_with(models, lora.for_sampling(models.dit, [files["nonzero"]], [1.0], mode="unmerged"), req,
                           unmerged=True)
    assert np.abs(unmerged - merged).mean() < 0.05 * np.abs(merged - plain).mean()
    with pytest.raises(ValueError, match="2 scales for 3 --lora files"):
        lora.for_sampling(models.dit, [files["zero"]] * 3, [1.0, 2.0])


def test_sample_cli_lora_flags(sampling):
    _, files, _, tmp = sampling
    out = subprocess.run([sys.executable, "sample.py", "--config", "configs/default_tiny.yaml", "--save-path",
                          str(tmp / "out"), "--video-size", "32", "48", "--sample-n-frames", "5", "--infer-steps", "2",
                          "--lora", str(files["nonzero"]), str(files["zero"]), "--lora-scale", "0.7", "1.0",
                          "--lora-mode", "unmerged", "--output-name", "x"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    settings = json.loads((tmp / "out" / "x.json").read_text())
    assert settings["lora"] == [str(files["nonzero"]), str(files["zero"])] and settings["lora_scale"] == [0.7, 1.0]
    assert settings["lora_mode"] == "unmerged"
