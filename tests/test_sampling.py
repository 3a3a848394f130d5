"""Scheduler vectors (spec 6.1), guidance combination, deepcache schedule, compiled loop == Python loop."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hcjax import pipeline, scheduler
from hcjax.config import preset
from hcjax.dit import init_params


def test_scheduler_matches_spec_vectors():
    s = scheduler.sigmas(30, 13.0)
    np.testing.assert_allclose(s[:6], [1.0, 0.997355, 0.994536, 0.991525, 0.988304, 0.984848], atol=2e-6)
    ts = scheduler.timesteps(s)
    assert ts[0] == 1000.0 and ts.dtype == np.float32 and len(ts) == 30
    np.testing.assert_allclose(ts[-3:], [590.9091, 481.4815, 309.5238], atol=2e-3)
    ts = scheduler.timesteps(scheduler.sigmas(50, 5.0))
    np.testing.assert_allclose(ts[:3], [1000.0, 995.9349, 991.7355], atol=2e-3)
    np.testing.assert_allclose(ts[-3:], [241.9355, 172.4138, 92.5926], atol=2e-3)
    assert scheduler.sigmas(30, 13.0)[-1] == 0.0
    with pytest.raises(ValueError, match="inference steps"):
        scheduler.sigmas(0, 13.0)


def test_euler_step_fp32():
    x = jnp.ones((2,), jnp.bfloat16)
    out = scheduler.euler_step(x, jnp.full((2,), 2.0, jnp.bfloat16), jnp.float32(0.75), jnp.float32(0.5))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, [0.5, 0.5])


def test_deepcache_schedule():
    m = scheduler.deepcache_mask(30)
    assert np.flatnonzero(m).tolist() == [11, 12, 14, 15, 17, 18, 20, 21]
    assert not scheduler.deepcache_mask(50).any()
    assert not scheduler.deepcache_mask(30, enabled=False).any()


def test_guidance_combination_on_fixed_arrays():
    v = jnp.array([[1.0], [3.0], [4.0]], jnp.float32)
    g = pipeline.Guidance(cfg_scale=7.5)
    np.testing.assert_allclose(pipeline.combine(v[:2], jnp.asarray(0), 30, g, jnp.float32), [[1 + 7.5 * 2]])
    gi = pipeline.Guidance(cfg_scale=7.5, ip_cfg_scale=3.0)
    # step 0: s = 3.0 ; v = 1 + 7.5*(3-1) + 3*(4-3) = 19
    np.testing.assert_allclose(pipeline.combine(v, jnp.asarray(0), 30, gi, jnp.float32), [[19.0]])
    # step 10 of 30: s = 3 - 10 * 2 / (29.001)
    s = 3.0 - 10 * 2.0 / (29 + 1e-3)
    np.testing.assert_allclose(pipeline.combine(v, jnp.asarray(10), 30, gi, jnp.float32), [[16.0 + s]], rtol=1e-6)
    g1 = pipeline.Guidance(cfg_scale=1.0)
    np.testing.assert_allclose(pipeline.combine(v[1:2], jnp.asarray(0), 30, g1, jnp.float32), [[3.0]])


@pytest.fixture(scope="module")
def tiny_setup():
    cfg = dataclasses.replace(preset("tiny").dit, depth_single_blocks=2)
    params = nn.unbox(init_params(cfg, jax.random.key(1)))
    rng = np.random.default_rng(0)
    b, s = 2, 6
    mask = np.ones((b, s), np.int32)
    mask[0, 3:] = 0
    conds = pipeline.Conditions(
        text_states=jnp.asarray(rng.standard_normal((b, s, cfg.text_states_dim)), jnp.float32),
        text_mask=jnp.asarray(mask),
        text_states_2=jnp.asarray(rng.standard_normal((b, cfg.text_states_dim_2)), jnp.float32),
        ref_latents=jnp.asarray(rng.standard_normal((b, 1, 4, 4, cfg.in_channels)), jnp.float32),
    )
    noise = pipeline.initial_noise(jax.random.key(0), (1, 2, 4, 4, cfg.in_channels))
    return cfg, params, conds, noise


@pytest.mark.parametrize("steps,deepcache", [(30, True), (3, False)])
def test_compiled_loop_equals_python_loop_and_compiles_once(tiny_setup, steps, deepcache):
    cfg, params, conds, noise = tiny_setup
    g = pipeline.Guidance(cfg_scale=7.5, use_deepcache=deepcache)
    sig = scheduler.sigmas(steps, 13.0)
    fn = pipeline.make_denoise_fn(cfg, steps, g)
    out = fn(params, noise, conds, sig)
    ref = pipeline.python_loop_reference(cfg, steps, g, params, noise, conds, sig)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-4, rtol=1e-4)
    assert np.isfinite(np.asarray(out)).all()
    # same shapes again (new values): no new compilation
    out2 = fn(params, noise * 0.5, conds, sig)
    assert fn._cache_size() == 1
    assert np.abs(np.asarray(out2) - np.asarray(out)).max() > 1e-3


def test_deepcache_changes_the_result_only_through_cached_steps(tiny_setup):
    cfg, params, conds, noise = tiny_setup
    sig = scheduler.sigmas(30, 13.0)
    with_cache = pipeline.make_denoise_fn(cfg, 30, pipeline.Guidance(use_deepcache=True))(params, noise, conds, sig)
    without = pipeline.make_denoise_fn(cfg, 30, pipeline.Guidance(use_deepcache=False))(params, noise, conds, sig)
    assert np.abs(np.asarray(with_cache) - np.asarray(without)).max() > 1e-4
