"""Step caches of the compiled loop (issue 26): deepcache unchanged (frozen outputs), none = dense, TeaCache /
MagCache at threshold 0 = dense bit for bit, fewer full steps at a large threshold with the schedule the rules
give (re-derived here in numpy from the recorded statistics / the ratios), residual reuse in the DiT, one compile
per settings, guidance passes and a device mesh."""

from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hcjax import calibrate_cache, pipeline, scheduler
from hcjax import sharding as S
from hcjax.config import MeshConfig
from hcjax.dit import HunyuanDiT, StepCache, abstract_params
from tests.data import k1_baseline

STEPS = 12
SIG = scheduler.sigmas(STEPS, 7.0)
POLY = [7.33226126e+02, -4.01131952e+02, 6.75869174e+01, -3.14987800e+00, 9.61237896e-02]


@pytest.fixture(scope="module")
def case():
    cfg, params, args, ref = k1_baseline._dit_case()
    conds = pipeline.Conditions(text_states=args[2], text_mask=args[3], text_states_2=args[4], ref_latents=ref)
    noise = pipeline.initial_noise(jax.random.key(0), (1, 2, 4, 4, cfg.in_channels))
    return cfg, params, conds, noise


def run(case, steps=STEPS, sig=SIG, **g):
    cfg, params, conds, noise = case
    fn = pipeline.make_denoise_fn(cfg, steps, pipeline.Guidance(cfg_scale=7.5, **g), return_stats=True)
    x, st = fn(params, noise, conds, sig)
    return np.asarray(x), {k: np.asarray(v) for k, v in st.items()}


def loop_before_issue_26(cfg, num_steps, g, params, noise, conds, sig):
    """The compiled deepcache loop as it was before the cache modes (carry ``(x, cache)``, one ``lax.cond``)."""
    dit = HunyuanDiT(cfg)
    flags = jnp.asarray(scheduler.deepcache_mask(num_steps, True))

    def model(x, t, **kw):
        xb = jnp.broadcast_to(x, (conds.batch, *x.shape[1:]))
        return dit.apply({"params": params}, xb, jnp.full((conds.batch,), t, jnp.float32), conds.text_states,
                         conds.text_mask, conds.text_states_2, ref_latents=conds.ref_latents, **kw)

    @jax.jit
    def run(noise, sig):
        def body(i, carry):
            x, cache = carry
            t = sig[i] * 1000.0
            full = lambda _: (lambda v, c: (v, c.x))(*model(x, t, return_cache=True))  # noqa: E731
            v, cache = jax.lax.cond(flags[i], lambda _: (model(x, t, cache=StepCache(cache)), cache), full, None)
            v = pipeline.combine(v, i, num_steps, g, jnp.float32)
            return scheduler.euler_step(x, v, sig[i], sig[i + 1]), cache

        cache0 = jnp.zeros(pipeline._cache_shape(cfg, noise.shape, conds), jnp.float32)
        x0 = noise.astype(jnp.float16).astype(jnp.float32)
        return jax.lax.fori_loop(0, num_steps, body, (x0, cache0))[0]

    return run(noise, jnp.asarray(sig, jnp.float32))


def test_deepcache_is_bit_identical_to_the_loop_before(case):
    cfg, params, conds, noise = case
    assert cfg.dtype == "float32"
    sig = scheduler.sigmas(30, 13.0)
    g = pipeline.Guidance(cfg_scale=7.5, use_deepcache=True)
    before = np.asarray(loop_before_issue_26(cfg, 30, g, params, noise, conds, sig))
    for g2 in (g, pipeline.Guidance(cfg_scale=7.5, cache="deepcache")):
        np.testing.assert_array_equal(np.asarray(pipeline.make_denoise_fn(cfg, 30, g2)(params, noise, conds, sig)),
                                      before)
    x, st = run(case, 30, sig, cache="deepcache")
    np.testing.assert_array_equal(x, before)
    assert np.flatnonzero(~st["full"]).tolist() == list(scheduler.DEEPCACHE_STEPS)


def test_none_is_dense(case):
    cfg, params, conds, noise = case
    x, st = run(case, cache="none")
    assert st["full"].all()
    ref = pipeline.python_loop_reference(cfg, STEPS, pipeline.Guidance(cfg_scale=7.5, use_deepcache=False), params,
                                         noise, conds, SIG)
    np.testing.assert_allclose(x, np.asarray(ref), atol=1e-4, rtol=1e-4)
    # --use-deepcache 0 is the same loop
    off, _ = run(case, use_deepcache=False)
    np.testing.assert_array_equal(off, x)


@pytest.mark.parametrize("mode", ["teacache", "magcache"])
def test_threshold_zero_is_dense_exactly(case, mode):
    dense, _ = run(case, cache="none")
    x, st = run(case, cache=mode, cache_threshold=0.0, cache_ratios=(1.0,) * STEPS)
    assert st["full"].all()
    np.testing.assert_array_equal(x, dense)


def test_teacache_skips_by_the_accumulated_rescaled_distance(case):
    dense, _ = run(case, cache="none")
    _, st0 = run(case, cache="teacache", cache_threshold=0.0)
    d = st0["distance"]
    assert d[0] == 0 and (d[1:] > 0).all()
    thr = float(np.quantile(np.polyval(POLY, d[1:]), 0.7)) * 2.5     # a threshold that skips some steps
    x, st = run(case, cache="teacache", cache_threshold=thr)
    # the schedule, re-derived from the recorded distances (identical to the dense run's up to the first skip)
    want, acc = [], 0.0
    for i, di in enumerate(st["distance"]):
        acc += max(np.polyval(POLY, float(di)), 0.0)
        full = i in (0, STEPS - 1) or acc >= thr
        acc = 0.0 if full else acc
        want.append(full)
    assert st["full"].tolist() == want
    assert 2 <= st["full"].sum() < STEPS
    assert np.isfinite(x).all() and np.abs(x - dense).max() > 0
    # a huge threshold: only the forced first and last steps run in full
    x, st = run(case, cache="teacache", cache_threshold=1e6)
    assert np.flatnonzero(st["full"]).tolist() == [0, STEPS - 1] and np.isfinite(x).all()


def test_magcache_schedule_from_the_ratios(case):
    rng = np.random.default_rng(0)
    ratios = tuple(float(r) for r in 1.0 - rng.uniform(0.0, 0.08, 7))   # calibrated on 7 steps, resampled to 12
    thr, k_max = 0.2, 2
    x, st = run(case, cache="magcache", cache_threshold=thr, cache_ratios=ratios, cache_max_skip=k_max)
    r = np.interp(np.linspace(0, 1, STEPS), np.linspace(0, 1, 7), ratios)
    retain = round(0.2 * STEPS)
    want, prod, err, k = [], 1.0, 0.0, 0
    for i in range(STEPS):
        prod, err, k = prod * r[i], err + abs(1 - prod * r[i]), k + 1
        skip = retain <= i < STEPS - 1 and err < thr and k <= k_max
        want.append(not skip)
        if not skip:
            prod, err, k = 1.0, 0.0, 0
    assert st["full"].tolist() == want
    assert st["full"].sum() <= STEPS - 3 and np.isfinite(x).all()
    assert (st["residual_norm"][st["full"]] > 0).all() and (st["residual_norm"][~st["full"]] == 0).all()
    with pytest.raises(ValueError, match="calibrate_cache"):
        run(case, cache="magcache")


def test_residual_reuse_at_the_same_input_reproduces_the_output(case):
    cfg, params, conds, noise = case
    dit = HunyuanDiT(cfg)
    args = k1_baseline._dit_case()[2]
    kw = dict(ref_latents=conds.ref_latents)

    @jax.jit
    def outputs(params, args):
        ap = lambda **k: dit.apply({"params": params}, *args, **kw, **k)  # noqa: E731
        out, res = ap(return_residual=True)
        vid = dit.apply({"params": params}, args[0], method=lambda m, x: m.img_in(x))
        vec = dit.apply({"params": params}, args[1], args[4], method=lambda m, t, c: m.conditioning_vector(t, c))
        return ap(), out, res, ap(residual=res), ap(probe=True), vid, vec

    dense, out, res, again, p, vid, vec = outputs(params, args)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(dense))
    assert res.shape == (2, 2 * 4 * 4 // 4, cfg.hidden_size)        # video tokens only (patch 1x2x2)
    np.testing.assert_allclose(np.asarray(again), np.asarray(dense), atol=1e-4, rtol=1e-4)
    # the probe: modulate(LN(img_in(x)), shift, scale of double block 0's img_mod), computed by hand here
    lin = jax.tree.map(lambda a: np.asarray(a[0], np.float64), params["double_blocks"]["img_mod"]["linear"])
    vec, vid = np.asarray(vec, np.float64), np.asarray(vid, np.float64)
    mod = np.einsum("bd,dfe->bfe", vec / (1 + np.exp(-vec)), lin["kernel"]) + lin["bias"]
    mu, var = vid.mean(-1, keepdims=True), vid.var(-1, keepdims=True)
    want = (vid - mu) / np.sqrt(var + cfg.norm_eps) * (1 + mod[:, None, 1]) + mod[:, None, 0]
    np.testing.assert_allclose(np.asarray(p), want, atol=1e-4, rtol=1e-4)


def test_one_compile_per_settings(case):
    cfg, params, conds, noise = case
    g = pipeline.Guidance(cfg_scale=7.5, cache="teacache", cache_threshold=0.3)
    fn = pipeline.make_denoise_fn(cfg, STEPS, g)
    assert pipeline.make_denoise_fn(cfg, STEPS, dataclasses.replace(g)) is fn
    a = fn(params, noise, conds, SIG)
    b = fn(params, noise * 0.5, conds, SIG)
    assert fn._cache_size() == 1 and np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
    with pytest.raises(ValueError, match="--cache"):
        pipeline.Guidance(cache="fastcache")


@pytest.mark.parametrize("mode", ["teacache", "magcache"])
def test_guidance_passes_and_ip_cfg(case, mode):
    cfg, params, conds, noise = case
    conds3 = jax.tree.map(lambda a: jnp.concatenate([a, a[1:]], 0), conds)
    g = pipeline.Guidance(cfg_scale=7.5, ip_cfg_scale=2.0, cache=mode, cache_threshold=0.5,
                          cache_ratios=(0.97,) * STEPS)
    one = pipeline.make_denoise_fn(cfg, STEPS, g, return_stats=True)(params, noise, conds3, SIG)
    passes = pipeline.make_denoise_fn(dataclasses.replace(cfg, cfg_batch=1), STEPS, g, return_stats=True)(
        params, noise, conds3, SIG)
    assert not one[1]["full"].all()
    np.testing.assert_array_equal(np.asarray(one[1]["full"]), np.asarray(passes[1]["full"]))
    np.testing.assert_allclose(np.asarray(passes[0]), np.asarray(one[0]), atol=1e-4, rtol=1e-4)


def test_request_fields_map_to_guidance():
    req = pipeline.Request(ref_image="x.png", pos_prompt="p", cache="magcache", cache_threshold=0.5,
                           cache_ratios=[0.95] * 6)
    g = req.guidance()
    assert (g.cache, g.threshold(), g.cache_ratios) == ("magcache", 0.5, (0.95,) * 6)
    assert pipeline.Guidance(use_deepcache=False).cache_mode() == "none"
    assert pipeline.Guidance(cache="teacache").threshold() == scheduler.DEFAULT_THRESHOLDS["teacache"]


def test_on_a_mesh_the_same_schedule_and_latents(case):
    cfg, params, conds, noise = case
    g = pipeline.Guidance(cfg_scale=7.5, cache="teacache", cache_threshold=1e6)
    fn = pipeline.make_denoise_fn(cfg, 6, g, return_stats=True)
    sig = scheduler.sigmas(6, 7.0)
    want, st = fn(params, noise, conds, sig)
    mesh = S.make_mesh(MeshConfig(1, 2, 4, 1))
    rules = S.rules_for(None)
    placed = S.shard_params(params, mesh, like=abstract_params(cfg), rules=rules)
    conds_m, noise_m = S.replicate((conds, noise), mesh)
    with S.use_mesh(mesh, rules=rules):
        got, st_m = fn(placed, noise_m, conds_m, sig)
    full = [np.flatnonzero(np.asarray(x["full"])).tolist() for x in (st_m, st)]
    assert full == [[0, 5], [0, 5]]
    want = np.asarray(want)
    assert np.abs(np.asarray(got) - want).max() / np.abs(want).max() <= 1e-5


def test_calibration_ratios_file(tmp_path):
    f = tmp_path / "r.json"
    norms = np.array([4.0, 3.0, 2.7, 2.6, 2.5])
    calibrate_cache.write_ratios(f, calibrate_cache.ratios_from_norms([norms, norms * 2]), meta={"steps": 5})
    r = calibrate_cache.load_ratios(f)
    np.testing.assert_allclose(r[:4], [1.0, 0.75, 0.9, 2.6 / 2.7], rtol=1e-6)
    assert json.loads(f.read_text())["steps"] == 5
    with pytest.raises(FileNotFoundError, match="calibrate_cache"):
        calibrate_cache.load_ratios(tmp_path / "missing.json")
