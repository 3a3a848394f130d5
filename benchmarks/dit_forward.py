"""DiT forward: hcjax (jit, after warm-up) vs diffusers eager, same small config and weights, this CPU.

    python benchmarks/dit_forward.py [--tokens-hw 64 64] [--frames 4] [--repeats 3] [--impl xla]

Prints both median times and the ratio torch_time / hcjax_time (> 1 means hcjax is faster).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from convert_weights.dit import from_diffusers  # noqa: E402
from hcjax.dit import HunyuanDiT  # noqa: E402
from tests.dit_reference import diffusers_model, state_dict_numpy, tiny_cfg, to_torch_video  # noqa: E402  (torch)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=4, help="latent frames")
    ap.add_argument("--tokens-hw", type=int, nargs=2, default=(64, 64), help="latent H W")
    ap.add_argument("--text-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--impl", default="xla", choices=["xla", "chunked"])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    cfg = tiny_cfg(hidden_size=512, num_heads=8, depth_double_blocks=2, depth_single_blocks=4, refiner_depth=1,
                   rope_dim_list=(16, 24, 24), in_channels=16, out_channels=16, text_states_dim=256,
                   text_states_dim_2=64, attention=args.impl, attention_block_q=1024, attention_block_kv=1024)
    model = diffusers_model(cfg)
    params = jax.device_put(from_diffusers(state_dict_numpy(model), cfg))
    h, w = args.tokens_hw
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, args.frames, h, w, 16)).astype(np.float32)
    t = np.array([500.0], np.float32)
    text = rng.standard_normal((1, args.text_len, cfg.text_states_dim)).astype(np.float32)
    mask = np.ones((1, args.text_len), np.int64)
    mask[:, args.text_len // 2:] = 0
    pooled = rng.standard_normal((1, cfg.text_states_dim_2)).astype(np.float32)
    tokens = args.frames * (h // 2) * (w // 2) + args.text_len
    print(f"config: hidden {cfg.hidden_size}, heads {cfg.num_heads}, blocks {cfg.depth_double_blocks}+"
          f"{cfg.depth_single_blocks}, tokens {tokens}, attention {args.impl}, threads {args.threads}")

    fn = jax.jit(lambda p, *a: HunyuanDiT(cfg).apply({"params": p}, *a))
    jargs = [jax.device_put(a) for a in (x, t, text, mask.astype(np.int32), pooled)]
    t0 = time.perf_counter()
    jax.block_until_ready(fn(params, *jargs))
    print(f"hcjax compile + first run: {time.perf_counter() - t0:.2f}s")
    jt = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out_j = jax.block_until_ready(fn(params, *jargs))
        jt.append(time.perf_counter() - t0)

    tt = []
    targs = (to_torch_video(x), torch.from_numpy(t), torch.from_numpy(text), torch.from_numpy(mask),
             torch.from_numpy(pooled))
    with torch.inference_mode():
        model(*targs, return_dict=False)  # warm-up
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out_t = model(*targs, return_dict=False)[0]
            tt.append(time.perf_counter() - t0)
    err = float(np.abs(np.asarray(out_j) - out_t.numpy().transpose(0, 2, 3, 4, 1)).max())
    mj, mt = statistics.median(jt), statistics.median(tt)
    print(f"hcjax   median {mj * 1000:.0f} ms  (runs: {', '.join(f'{v * 1000:.0f}' for v in jt)})")
    print(f"torch   median {mt * 1000:.0f} ms  (runs: {', '.join(f'{v * 1000:.0f}' for v in tt)})")
    print(f"max abs diff {err:.2e}")
    print(f"ratio torch_time / hcjax_time = {mt / mj:.2f}")


if __name__ == "__main__":
    main()
