"""hcjax sampling entry point.

Current scope (foundation): a flow-matching Euler denoising run of the DiT with classifier-free guidance on
random text/reference conditioning, using either converted weights (``--ckpt-dir``, written by
``python -m convert_weights dit``) or random weights of the chosen config. It saves the final latents as
``.npy``. The full pipeline (text encoders, VAE decode, MP4) replaces this as those components land.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/tiny.yaml", help="hcjax YAML preset")
    p.add_argument("--set", action="append", default=[], metavar="A.B=V", help="config override")
    p.add_argument("--ckpt-dir", default=None, help="hcjax checkpoint dir (random weights if omitted)")
    p.add_argument("--latent-size", type=int, nargs=3, default=(2, 8, 8), metavar=("T", "H", "W"))
    p.add_argument("--text-len", type=int, default=16)
    p.add_argument("--infer-steps", type=int, default=4)
    p.add_argument("--flow-shift-eval-video", type=float, default=13.0)
    p.add_argument("--cfg-scale", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=1024)
    p.add_argument("--save-path", default="outputs/latents.npy")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--debug", action="store_true")
    return p.parse_args(argv)


def run(args) -> Path:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from tqdm import tqdm

    from hcjax import dit
    from hcjax.checkpoint import load_checkpoint_config, load_params
    from hcjax.config import load_config

    out = Path(args.save_path)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"--save-path {out} exists; pass --overwrite to replace it")
    if args.infer_steps < 1:
        raise ValueError(f"--infer-steps must be >= 1, got {args.infer_steps}")
    if args.ckpt_dir:
        cfg = load_checkpoint_config(args.ckpt_dir)
        params = load_params(args.ckpt_dir)
    else:
        cfg = load_config(args.config, args.set)
        params = jax.tree.map(lambda a: a, dit.init_params(cfg.dit, jax.random.key(args.seed)))
    c = cfg.dit
    import flax.linen as nn

    params = nn.unbox(params)
    key = jax.random.key(args.seed)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    t_, h_, w_ = args.latent_size
    x = jax.random.normal(k1, (1, t_, h_, w_, c.in_channels), jnp.float32)
    text = jax.random.normal(k2, (2, args.text_len, c.text_states_dim), jnp.float32)
    mask = jnp.ones((2, args.text_len), jnp.int32).at[0, args.text_len // 2:].set(0)
    pooled = jax.random.normal(k3, (2, c.text_states_dim_2), jnp.float32)
    ref = jax.random.normal(k4, (2, 1, h_, w_, c.in_channels), jnp.float32)
    n = args.infer_steps
    s = args.flow_shift_eval_video
    sig = np.linspace(1.0, 0.0, n + 1)
    sig = s * sig / (1 + (s - 1) * sig)
    model = dit.HunyuanDiT(c)

    @jax.jit
    def step(x, t, dt):
        xx = jnp.concatenate([x, x], axis=0)
        v = model.apply({"params": params}, xx, jnp.full((2,), t, jnp.float32), text, mask, pooled,
                        ref_latents=ref)
        v = v[:1] + args.cfg_scale * (v[1:] - v[:1])
        return x + v * dt

    start = time.perf_counter()
    for i in tqdm(range(n), desc="denoise", unit="step"):
        x = step(x, float(1000.0 * sig[i]), float(sig[i + 1] - sig[i]))
    x = np.asarray(jax.block_until_ready(x))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial.npy")
    np.save(tmp, x)
    tmp.replace(out)
    print(f"{n} steps in {time.perf_counter() - start:.1f}s; latents {x.shape} -> {out}")
    return out


def main(argv=None) -> int:
    args = parse(argv)
    try:
        run(args)
        return 0
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
