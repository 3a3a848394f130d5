"""Tiled VAE decode: hcjax vs diffusers ``AutoencoderKLHunyuanVideo`` (tiling set to the original's rules).

Same tiny-width VAE (random weights, converted by ``convert_weights.vae``), same latents, one run. Each side
runs in its own subprocess so peak RSS is its own: after setup the peak counter is reset
(``/proc/self/clear_refs``), then the decode runs; we report wall time of the first call (hcjax: includes
compiling the one tile function), of a second call, and peak RSS (absolute and above the post-setup RSS).
Ratios are hcjax / diffusers (< 1 means hcjax is faster / smaller).

    python benchmarks/vae.py [--latents 9,8,8] [--channels 8,16,16,16] [--groups 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _cfg(args):
    sys.path.insert(0, str(ROOT))
    import dataclasses

    from hcjax.config import preset

    c = preset("tiny").vae
    return dataclasses.replace(c, block_out_channels=tuple(args.channels), norm_num_groups=args.groups)


def worker_jax(args) -> dict:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import numpy as np

    from convert_weights import vae as conv
    from hcjax import vae

    cfg = _cfg(args)
    data = np.load(args.weights)
    params = conv.from_diffusers({k: data[k] for k in data.files if k != "__latents__"}, cfg)
    z = data["__latents__"]
    base = _rss_kb("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    out = np.asarray(vae.decode_latents(params, cfg, z * cfg.scaling_factor, tiled=True, clip=False))
    first = time.perf_counter() - t0
    peak1 = _rss_kb("VmHWM")
    base2 = _rss_kb("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    np.asarray(vae.decode_latents(params, cfg, z * cfg.scaling_factor, tiled=True, clip=False))
    second = time.perf_counter() - t0
    np.save(args.out, out)
    return dict(first=first, second=second, base_kb=base, peak_kb=peak1, base2_kb=base2, peak2_kb=_rss_kb("VmHWM"),
                compiled=vae.tile_fn(cfg, "decode")._cache_size())


def _diffusers_model(args, cfg):
    import torch
    from diffusers import AutoencoderKLHunyuanVideo

    torch.manual_seed(0)
    m = AutoencoderKLHunyuanVideo(latent_channels=cfg.latent_channels, block_out_channels=cfg.block_out_channels,
                                  layers_per_block=cfg.layers_per_block, norm_num_groups=cfg.norm_num_groups).eval()
    s, t = cfg.sample_size, cfg.sample_tsize
    m.enable_tiling(tile_sample_min_height=s, tile_sample_min_width=s, tile_sample_min_num_frames=t,
                    tile_sample_stride_height=int(s * 0.75), tile_sample_stride_width=int(s * 0.75),
                    tile_sample_stride_num_frames=int(t * 0.75))
    return m


def worker_torch(args) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    cfg = _cfg(args)
    m = _diffusers_model(args, cfg)
    data = np.load(args.weights)
    m.load_state_dict({k: torch.from_numpy(data[k]) for k in data.files if k != "__latents__"})
    z = torch.from_numpy(np.ascontiguousarray(np.moveaxis(data["__latents__"], -1, 1)))
    base = _rss_kb("VmRSS")
    _reset_peak()
    with torch.no_grad():
        t0 = time.perf_counter()
        out = m.decode(z).sample
        first = time.perf_counter() - t0
        peak1 = _rss_kb("VmHWM")
        base2 = _rss_kb("VmRSS")
        _reset_peak()
        t0 = time.perf_counter()
        m.decode(z)
        second = time.perf_counter() - t0
    np.save(args.out, np.moveaxis(out.numpy(), 1, -1))
    return dict(first=first, second=second, base_kb=base, peak_kb=peak1, base2_kb=base2, peak2_kb=_rss_kb("VmHWM"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latents", default="9,8,8", help="latent T,H,W (tiny tiles: 4(+1) frames, 4 latent px)")
    p.add_argument("--channels", default="8,16,16,16")
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for both sides (1 = XLA without Eigen multi-threading, torch 1 thread)")
    p.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.channels = [int(c) for c in str(args.channels).split(",")]
    if args.worker:
        res = (worker_jax if args.worker == "jax" else worker_torch)(args)
        print("RESULT " + json.dumps(res))
        return 0

    import numpy as np

    cfg = _cfg(args)
    t, h, w = (int(v) for v in args.latents.split(","))
    m = _diffusers_model(args, cfg)
    tmp = Path(tempfile.mkdtemp(prefix="vae_bench_"))
    z = np.random.default_rng(0).standard_normal((1, t, h, w, cfg.latent_channels)).astype(np.float32)
    np.savez(tmp / "w.npz", __latents__=z, **{k: v.numpy() for k, v in m.state_dict().items()})
    del m
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if args.threads == 1:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    results = {}
    for side in ("torch", "jax"):
        cmd = [sys.executable, __file__, "--worker", side, "--weights", str(tmp / "w.npz"),
               "--out", str(tmp / f"{side}.npy"), "--latents", args.latents,
               "--channels", ",".join(map(str, args.channels)), "--groups", str(args.groups),
               "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            print(proc.stdout, proc.stderr, file=sys.stderr)
            return 1
        results[side] = json.loads(line[0][7:])
    diff = float(np.abs(np.load(tmp / "jax.npy") - np.load(tmp / "torch.npy")).max())
    k = dict(tile_lat=cfg.sample_size // 8, tile_lat_t=cfg.sample_tsize // 4)
    print(f"tiled decode of latents {t}x{h}x{w}x{cfg.latent_channels} -> {4 * (t - 1) + 1}x{8 * h}x{8 * w}x3, "
          f"channels {tuple(args.channels)}, tiles {k['tile_lat_t']}(+1) frames / {k['tile_lat']} latent px, "
          f"{args.threads} threads; max |hcjax - diffusers| = {diff:.2e}")
    print(f"{'':10s}{'first s':>9s}{'second s':>10s}{'peak RSS MB (1st/2nd)':>24s}{'peak-base MB (1st/2nd)':>25s}")
    for side in ("jax", "torch"):
        r = results[side]
        print(f"{'hcjax' if side == 'jax' else 'diffusers':10s}{r['first']:9.2f}{r['second']:10.2f}"
              f"{r['peak_kb'] / 1024:14.1f} /{r['peak2_kb'] / 1024:7.1f}"
              f"{(r['peak_kb'] - r['base_kb']) / 1024:15.1f} /{(r['peak2_kb'] - r['base2_kb']) / 1024:7.1f}")
    j, d = results["jax"], results["torch"]

    def above(r, n):
        return max(r[f"peak{n}_kb"] - r[f"base{n}_kb"], 1)

    print(f"ratios hcjax/diffusers: time first {j['first'] / d['first']:.2f} (hcjax compiles its one tile function), "
          f"time second {j['second'] / d['second']:.2f}; peak RSS {j['peak2_kb'] / d['peak2_kb']:.2f}, "
          f"peak RSS above pre-call RSS: first {above(j, '') / above(d, ''):.2f}, "
          f"second {above(j, 2) / above(d, 2):.2f}; compiled tile functions: {j['compiled']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
