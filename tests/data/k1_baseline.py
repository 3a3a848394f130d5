"""Single-reference (K = 1) outputs of the tiny models, frozen before multi-subject support (issue 24).

``python -m tests.data.k1_baseline`` wrote ``k1_baseline.npz`` from the code as it was BEFORE the K-reference change
(a copy of the work tree with the issue-24 edits reverted, on top of the other wave-2 edits of that day);
``tests/test_multisubject.py`` recomputes :func:`compute` with the current code and asserts bit equality (up to
the rounding of another CPU's kernels, where they differ from the machine that wrote the file). Do not
regenerate the file unless a deliberate numerical change to the single-reference path is made (say so in the
commit). Shapes: DiT output ``[B, T, H, W, C]``, latents ``[1, T', H', W', C]``, text states ``[1, S, D]``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import tests.conftest  # noqa: F401  (CPU, 8 host devices, fp32 matmuls: the test settings)

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hcjax import models as M
from hcjax import pipeline, scheduler
from hcjax.config import load_config, preset
from hcjax.conditioning.text import encode_prompts
from hcjax.dit import HunyuanDiT, init_params

PATH = Path(__file__).with_name("k1_baseline.npz")
ROOT = Path(__file__).resolve().parents[2]


def _dit_case():
    cfg = dataclasses.replace(preset("tiny").dit, depth_single_blocks=2)
    params = nn.unbox(init_params(cfg, jax.random.key(1)))
    rng = np.random.default_rng(0)
    b, s = 2, 6
    mask = np.ones((b, s), np.int32)
    mask[0, 3:] = 0
    x = jnp.asarray(rng.standard_normal((b, 2, 4, 4, cfg.in_channels)), jnp.float32)
    t = jnp.asarray([300.0, 800.0], jnp.float32)
    text = jnp.asarray(rng.standard_normal((b, s, cfg.text_states_dim)), jnp.float32)
    text2 = jnp.asarray(rng.standard_normal((b, cfg.text_states_dim_2)), jnp.float32)
    ref = jnp.asarray(rng.standard_normal((b, 1, 4, 4, cfg.in_channels)), jnp.float32)
    return cfg, params, (x, t, text, jnp.asarray(mask), text2), ref


def compute() -> dict[str, np.ndarray]:
    out = {}
    cfg, params, args, ref = _dit_case()
    dit = HunyuanDiT(cfg)
    out["dit_out"] = dit.apply({"params": params}, *args, ref_latents=ref)
    v, cache = dit.apply({"params": params}, *args, ref_latents=ref, return_cache=True)
    out["dit_cache_x"] = cache.x
    out["dit_cached_out"] = dit.apply({"params": params}, *[a * 0.5 if a.ndim == 5 else a for a in args],
                                      ref_latents=ref, cache=cache)
    # the compiled loop with the step cache (30 steps, deepcache on) on DiT-only conditions
    conds = pipeline.Conditions(text_states=args[2], text_mask=args[3], text_states_2=args[4], ref_latents=ref)
    noise = pipeline.initial_noise(jax.random.key(0), (1, 2, 4, 4, cfg.in_channels))
    g = pipeline.Guidance(cfg_scale=7.5, use_deepcache=True)
    out["loop30_latents"] = pipeline.make_denoise_fn(cfg, 30, g)(params, noise, conds, scheduler.sigmas(30, 13.0))
    # end to end on the random tiny models: text towers, VAE-encoded reference, ip-CFG's white reference
    models = M.random_models(load_config(M.DEFAULT_CONFIG), seed=0)
    ref_image = str(ROOT / "assets/demo_subject.png")
    pos, neg = encode_prompts(models.text, "a red object moves left", ref_image, negative_prompts="blurry",
                              item_names="ball")
    out["text_pos_states"], out["text_pos_mask"], out["text_pos_pooled"] = pos
    out["text_neg_states"], out["text_neg_mask"], out["text_neg_pooled"] = neg
    for name, ip in (("gen_cfg", 0.0), ("gen_ipcfg", 2.0)):
        req = pipeline.Request(ref_image=ref_image, pos_prompt="a red object moves left", item_name="ball",
                               video_size=(32, 48), frames=5, steps=2, ip_cfg_scale=ip, seed=3)
        prep = pipeline.prepare(models, req)
        out[name + "_ref_latents"] = prep.conds.ref_latents
        out[name + "_latents"] = pipeline.denoise(models, prep)
    return {k: np.asarray(a) for k, a in out.items()}


if __name__ == "__main__":
    np.savez_compressed(PATH, **compute())
    print(f"wrote {PATH}")
