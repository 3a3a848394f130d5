"""DiT forward: hcjax (jit, after warm-up) vs diffusers eager, same small config and weights, this CPU.

    python benchmarks/dit_forward.py [--frames 4] [--tokens-hw 64 64] [--text-len 256] [--repeats 7]
                                     [--impl xla|chunked] [--profile]

Latent ``[1, frames, H, W, 16]``, patch 1x2x2: ``frames * H/2 * W/2`` video tokens + ``text-len`` text tokens (half
of them padding). The two frameworks run interleaved in one process (alternating which goes first), so machine
load hits both alike; the line printed at the end holds both medians and the ratio ``torch_time / hcjax_time``
(> 1: hcjax is faster), plus the median of the per-pair ratios. ``--threads`` sets torch's intra-op threads (XLA
uses one thread per core; the default matches that). ``--profile`` adds, also interleaved, where hcjax's time
goes: the compiled attention alone (every DiT block's call, same shapes and kernel), torch's SDPA alone, and the
rest of the forward.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from convert_weights.dit import from_diffusers  # noqa: E402
from hcjax import attention as attn_lib  # noqa: E402
from hcjax.dit import HunyuanDiT  # noqa: E402
from tests.dit_reference import diffusers_model, state_dict_numpy, tiny_cfg, to_torch_video  # noqa: E402  (torch)


def interleaved(fns: dict, repeats: int) -> dict:
    """Run every callable ``repeats`` times, rotating the order each round; ``{name: [seconds, ...]}``."""
    names = list(fns)
    times = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def fmt(ts) -> str:
    return f"{statistics.median(ts) * 1000:.0f} ms"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=4, help="latent frames")
    ap.add_argument("--tokens-hw", type=int, nargs=2, default=(64, 64), help="latent H W (tokens: H/2 x W/2)")
    ap.add_argument("--text-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7, help="timed calls of each framework (interleaved)")
    ap.add_argument("--impl", default="xla", choices=["xla", "chunked"])
    ap.add_argument("--block", type=int, default=1024, help="attention_block_q = attention_block_kv (chunked)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    ap.add_argument("--profile", action="store_true", help="also time hcjax's and torch's attention alone")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    cfg = tiny_cfg(hidden_size=512, num_heads=8, depth_double_blocks=2, depth_single_blocks=4, refiner_depth=1,
                   rope_dim_list=(16, 24, 24), in_channels=16, out_channels=16, text_states_dim=256,
                   text_states_dim_2=64, attention=args.impl, attention_block_q=args.block,
                   attention_block_kv=args.block)
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
    video = args.frames * (h // 2) * (w // 2)
    tokens = video + args.text_len
    print(f"config: hidden {cfg.hidden_size}, heads {cfg.num_heads}, blocks {cfg.depth_double_blocks}+"
          f"{cfg.depth_single_blocks}, tokens {tokens} ({video} video + {args.text_len} text), attention "
          f"{args.impl}, jax backend {jax.default_backend()}, cores {os.cpu_count()}, torch threads {args.threads}",
          flush=True)

    fn = jax.jit(lambda p, *a: HunyuanDiT(cfg).apply({"params": p}, *a))
    jargs = [jax.device_put(a) for a in (x, t, text, mask.astype(np.int32), pooled)]
    t0 = time.perf_counter()
    out_j = jax.block_until_ready(fn(params, *jargs))
    print(f"hcjax compile + first run: {time.perf_counter() - t0:.2f}s", flush=True)
    targs = (to_torch_video(x), torch.from_numpy(t), torch.from_numpy(text), torch.from_numpy(mask),
             torch.from_numpy(pooled))
    with torch.inference_mode():
        out_t = model(*targs, return_dict=False)[0]
    err = float(np.abs(np.asarray(out_j) - out_t.numpy().transpose(0, 2, 3, 4, 1)).max())

    def run_torch():
        with torch.inference_mode():
            model(*targs, return_dict=False)

    fns = {"hcjax": lambda: jax.block_until_ready(fn(params, *jargs)), "torch": run_torch}
    n_calls = cfg.depth_double_blocks + cfg.depth_single_blocks
    if args.profile:
        n, d = cfg.num_heads, cfg.head_dim
        q, k, v = (jnp.asarray(rng.standard_normal((1, tokens, n, d)), jnp.float32) for _ in range(3))
        lens = jnp.asarray([video + int(mask.sum())], jnp.int32)
        att = jax.jit(lambda q, k, v, lens: attn_lib.dot_product_attention(
            q, k, v, kv_lengths=lens, impl=args.impl, block_q=args.block, block_kv=args.block))
        jax.block_until_ready(att(q, k, v, lens))
        tq, tk, tv = (torch.from_numpy(np.asarray(a).transpose(0, 2, 1, 3).copy()) for a in (q, k, v))
        tmask = torch.arange(tokens)[None, None, None, :] < int(lens[0])

        def run_att_j():
            for _ in range(n_calls):
                jax.block_until_ready(att(q, k, v, lens))

        def run_att_t():
            with torch.inference_mode():
                for _ in range(n_calls):
                    F.scaled_dot_product_attention(tq, tk, tv, attn_mask=tmask)

        fns.update({"hcjax_attention": run_att_j, "torch_attention": run_att_t})
        run_att_j(), run_att_t()
    times = interleaved(fns, args.repeats)
    mj, mt = statistics.median(times["hcjax"]), statistics.median(times["torch"])
    pair = statistics.median(b / a for a, b in zip(times["hcjax"], times["torch"]))
    print("runs (ms): " + "; ".join(f"{k} " + ", ".join(f"{s * 1000:.0f}" for s in v) for k, v in times.items()))
    print(f"max abs diff {err:.2e}")
    if args.profile:
        aj, at = statistics.median(times["hcjax_attention"]), statistics.median(times["torch_attention"])
        print(f"profile ({n_calls} attention calls of [1, {tokens}, {cfg.num_heads}, {cfg.head_dim}]): hcjax "
              f"attention {aj * 1000:.0f} ms = {aj / mj:.0%} of its forward, rest {(mj - aj) * 1000:.0f} ms | torch "
              f"SDPA {at * 1000:.0f} ms = {at / mt:.0%}, rest {(mt - at) * 1000:.0f} ms | attention torch/hcjax "
              f"{at / aj:.2f}, rest torch/hcjax {(mt - at) / max(mj - aj, 1e-9):.2f}")
    print(f"tokens {tokens} ({video} video + {args.text_len} text), {args.impl}: hcjax {mj * 1000:.0f} ms, torch "
          f"{mt * 1000:.0f} ms, ratio torch/hcjax {mt / mj:.2f} (median of per-pair ratios {pair:.2f}, "
          f"{args.repeats} interleaved pairs)")


if __name__ == "__main__":
    main()
