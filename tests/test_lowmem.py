"""Low-memory execution of the DiT (issue 23): token chunks, sequential guidance passes, fp8 weights, host offload.

Each memory option must leave the numbers unchanged (fp32, <= 1e-5 relative) except ``use_fp8``, whose reference is
an independent torch emulation of the original's fp8 Linear: weights quantised per original layer (max|W| / 448,
fused ``linear1``/``linear2`` with one scale) and de-quantised as ``bf16(W_fp8) * bf16(scale)`` in torch.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

from convert_weights import dit as conv
from hcjax import models as M
from hcjax import pipeline, scheduler
from hcjax.config import preset
from hcjax.dit import HunyuanDiT, init_params, runtime_params
from hcjax.dit.storage import FP8, FP8_SCALE
from tests.dit_reference import diffusers_model, state_dict_numpy, tiny_cfg, to_original_names
from tests.test_fp8 import build_release, fp8_layers, quantise, reference_dequant


def _inputs(cfg, b=2, s=6, thw=(2, 6, 4), seed=0):
    rng = np.random.default_rng(seed)
    t_, h_, w_ = thw
    mask = np.ones((b, s), np.int32)
    mask[0, 4:] = 0
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    args = (f(b, t_, h_, w_, cfg.in_channels), jnp.asarray([900.0, 250.0][:b], jnp.float32),
            f(b, s, cfg.text_states_dim), jnp.asarray(mask), f(b, cfg.text_states_dim_2))
    return args, {"ref_latents": f(b, 1, h_, w_, cfg.in_channels)}


def _forward(cfg, params, args, kw, **extra):
    return jax.jit(lambda p, a, k: HunyuanDiT(cfg).apply({"params": p}, *a, **k, **extra))(params, args, kw)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.fixture(scope="module")
def tiny():
    cfg = dataclasses.replace(preset("tiny").dit, depth_single_blocks=2)
    return cfg, nn.unbox(init_params(cfg, jax.random.key(3)))


@pytest.mark.parametrize("chunk", [5, 7, 16])
def test_ffn_chunk_equals_plain_forward(tiny, chunk):
    cfg, params = tiny
    args, kw = _inputs(cfg)                      # 24 ref + 24 video + 6 text tokens: ragged last chunks
    want, want_cache = _forward(cfg, params, args, kw, return_cache=True)
    ccfg = dataclasses.replace(cfg, ffn_chunk=chunk)
    got, got_cache = _forward(ccfg, params, args, kw, return_cache=True)
    assert _rel(got, want) <= 1e-5 and _rel(got_cache.x, want_cache.x) <= 1e-5
    reuse = _forward(ccfg, params, args, kw, cache=got_cache)
    assert _rel(reuse, _forward(cfg, params, args, kw, cache=want_cache)) <= 1e-5
    assert _rel(got, _forward(cfg, jax.tree.map(lambda a: a * 1.01, params), args, kw)) > 1e-4  # can fail


def test_bf16_block_stacks_held_as_bits_are_the_same_model(tiny):
    cfg, params = tiny
    cfg = dataclasses.replace(cfg, dtype="bfloat16", param_dtype="bfloat16")
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    run = runtime_params(p16, cfg)
    assert run["single_blocks"]["linear1_mlp"]["kernel"].dtype == jnp.uint16
    args, kw = _inputs(cfg)
    np.testing.assert_array_equal(np.asarray(_forward(cfg, run, args, kw)), np.asarray(_forward(cfg, p16, args, kw)))


@pytest.mark.parametrize("ip_cfg,deepcache", [(0.0, False), (0.0, True), (2.0, False)])
def test_cfg_batch_1_equals_one_batch(tiny, ip_cfg, deepcache):
    cfg, params = tiny
    g = pipeline.Guidance(cfg_scale=7.5, ip_cfg_scale=ip_cfg, use_deepcache=deepcache)
    steps = 30 if deepcache else 3            # the step cache starts at step 11 of 30
    if deepcache:
        assert scheduler.deepcache_mask(steps, True).any()
    (x, t, text, mask, pooled), kw = _inputs(cfg, b=g.branches(), thw=(2, 4, 4))
    conds = pipeline.Conditions(text_states=text, text_mask=mask, text_states_2=pooled, ref_latents=kw["ref_latents"])
    noise = pipeline.initial_noise(jax.random.key(0), (1, 2, 4, 4, cfg.in_channels))
    sig = scheduler.sigmas(steps, 13.0)
    want = pipeline.make_denoise_fn(cfg, steps, g)(params, noise, conds, sig)
    got = pipeline.make_denoise_fn(dataclasses.replace(cfg, cfg_batch=1), steps, g)(params, noise, conds, sig)
    assert _rel(got, want) <= 1e-5
    assert np.abs(np.asarray(want) - np.asarray(noise)).max() > 1e-2


def test_cpu_offload_equals_plain_forward(tiny):
    cfg, params = tiny
    ocfg = dataclasses.replace(cfg, cpu_offload=True, ffn_chunk=8)
    run = runtime_params(params, ocfg)
    leaves = jax.tree.leaves(run["double_blocks"]) + jax.tree.leaves(run["single_blocks"])
    host = [a for a in leaves if a.sharding.memory_kind == "pinned_host"]
    # every weight matrix in host memory; vectors and [6, D] biases stay on the device (storage.host_resident)
    assert {a.ndim for a in host} >= {3} and all(a.ndim >= 3 and max(a.shape[1:-1]) >= 8 for a in host)
    assert all(a.sharding.memory_kind == "device" for a in leaves if a.ndim <= 2 or max(a.shape[1:-1]) < 8)
    assert sum(a.nbytes for a in host) >= 0.9 * sum(a.nbytes for a in leaves)
    assert run["img_in"]["proj"]["kernel"].sharding.memory_kind != "pinned_host"
    args, kw = _inputs(cfg)
    want, want_cache = _forward(cfg, params, args, kw, return_cache=True)
    got, got_cache = _forward(ocfg, run, args, kw, return_cache=True)
    assert _rel(got, want) <= 1e-5 and _rel(got_cache.x, want_cache.x) <= 1e-5
    assert _rel(_forward(ocfg, run, args, kw, cache=got_cache), _forward(cfg, params, args, kw, cache=want_cache)) <= 1e-5


# ------------------------------------------------------------------------------------------- fp8


def _bf16_cfg(**kw):
    return tiny_cfg(dtype="bfloat16", param_dtype="bfloat16", **kw)


def test_fp8_from_release_scales_recovers_the_release_weights_and_forward():
    cfg = _bf16_cfg()
    module, scales, ref = build_release(cfg)
    state = {k: (v.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn) if v.dtype == torch.float8_e4m3fn
                 else v.float().numpy()) for k, v in module.items()}
    scales = {k: v.numpy() for k, v in scales.items()}
    deq = conv.from_original(state, cfg, scales, dtype=ml_dtypes.bfloat16)
    run = runtime_params(deq, dataclasses.replace(cfg, use_fp8=True), fp8_scales=scales)
    # the release's fp8 bits come back exactly (linear1 = [qkv ; mlp] rows of the original weight)
    node = run["single_blocks"]["linear1_mlp"]["kernel"]
    q = module["single_blocks.1.linear1.weight"].view(torch.uint8).numpy()
    np.testing.assert_array_equal(node[FP8][1], q[3 * cfg.hidden_size:].T)
    assert node[FP8_SCALE][1] == np.float32(torch.as_tensor(scales["single_blocks.1.linear1"]).bfloat16().float())
    # the fp8 forward (de-quantised inside the scan) equals the forward with the torch-de-quantised weights
    plain = jax.tree.map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16), conv.from_original(ref, cfg))
    args, kw = _inputs(cfg)
    want = _forward(cfg, plain, args, kw)
    got = _forward(dataclasses.replace(cfg, use_fp8=True), run, args, kw)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_fp8_quantised_from_bf16_matches_a_torch_emulation_of_the_original():
    cfg = _bf16_cfg()
    sd = to_original_names(state_dict_numpy(diffusers_model(cfg, seed=9)), cfg)
    sd = {k: torch.from_numpy(np.ascontiguousarray(v)).bfloat16().float().numpy() for k, v in sd.items()}
    p16 = jax.tree.map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16), conv.from_original(sd, cfg))
    fcfg = dataclasses.replace(cfg, use_fp8=True)
    run = runtime_params(p16, fcfg)
    emulated = dict(sd)                     # torch: the original's quantiser, then bf16(W_fp8) * bf16(scale)
    for layer in fp8_layers(cfg):
        q, scale = quantise(torch.from_numpy(sd[f"{layer}.weight"]).bfloat16())
        emulated[f"{layer}.weight"] = reference_dequant(q, scale).float().numpy()
        if layer == "single_blocks.0.linear2":   # linear2 = [attn | mlp] inputs, one scale
            got = run["single_blocks"]["linear2_mlp"]["kernel"][FP8][0]
            np.testing.assert_array_equal(got, q[:, cfg.hidden_size:].view(torch.uint8).numpy().T)
    emulated = jax.tree.map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16), conv.from_original(emulated, cfg))
    args, kw = _inputs(cfg)
    want = np.asarray(_forward(cfg, emulated, args, kw), np.float32)
    got = np.asarray(_forward(fcfg, run, args, kw), np.float32)
    plain = np.asarray(_forward(cfg, p16, args, kw), np.float32)
    assert _rel(got, want) <= 1e-2                                  # bf16 tolerance
    assert _rel(got, want) < 0.5 * _rel(plain, want)                # much closer than the unquantised model


def test_cpu_offload_keeps_towers_in_host_memory_between_stages():
    """``dit.cpu_offload``: LLaVA, CLIP and the VAE live in pinned host memory after load, are on the device only
    while their stage runs (no device copy survives a sample), and the frames equal the plain run's (up to one 8-bit
    level in a few pixels: the rounding of a differently fused graph)."""
    small = dict(video_size=(32, 32), frames=5, steps=2, seed=3)
    req = pipeline.Request(ref_image="assets/demo_subject.png", pos_prompt="the object moves left", **small)
    plain = M.load(config=M.DEFAULT_CONFIG)
    off = M.load(config=M.DEFAULT_CONFIG, overrides=["dit.cpu_offload=true"])
    towers = lambda m: jax.tree.leaves((m.text.llava_params, m.text.clip_params, m.vae))  # noqa: E731
    assert {a.sharding.memory_kind for a in towers(off)} == {"pinned_host"}
    host_ids = {id(a) for a in towers(off)}
    want, _ = pipeline.generate(plain, req)
    got, _ = pipeline.generate(off, req)
    # the offloaded towers compile with their transfers, and XLA may fuse them otherwise: on an AVX2-only CPU 2 of
    # 15360 pixel values landed one 8-bit level apart (a rounding tie), elsewhere none; wrong weights move most
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.max() <= 1 and np.count_nonzero(diff) <= 1e-3 * diff.size, (diff.max(), np.count_nonzero(diff))
    shapes = {(a.shape, a.dtype) for a in towers(off)}
    leftover = [a for a in jax.live_arrays() if id(a) not in host_ids and a.sharding.memory_kind == "device"
                and (a.shape, a.dtype) in shapes and a.size > 64]
    assert not leftover, f"device copies of offloaded tower weights still alive: {[a.shape for a in leftover]}"
    assert {a.sharding.memory_kind for a in towers(off)} == {"pinned_host"}      # the host copies are kept
