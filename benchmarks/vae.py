"""VAE decode, tiled and untiled: hcjax vs diffusers ``AutoencoderKLHunyuanVideo`` (the original's tiling rules).

Same tiny-width VAE (random weights, converted by ``convert_weights.vae``), same latents, one run. Each side
runs in its own subprocess so peak RSS is its own: after setup the peak counter is reset
(``/proc/self/clear_refs``), then the decode runs; we report wall time of the first call (hcjax: includes
compiling the one tile function; a second hcjax process then loads it from the persistent compilation cache
the first one wrote, as ``sample.py`` does on a repeated run), of a second call, and peak RSS (absolute and
above the pre-call RSS), for the tiled decode and the one-pass (untiled) decode. Time ratios are
diffusers / hcjax (> 1 means hcjax is faster); memory ratios are hcjax / diffusers (< 1 means hcjax is
smaller). Absolute peaks include what each worker imported (jax + hcjax in both, torch + diffusers only in the
torch worker); the peaks above the pre-call RSS compare the decodes themselves.

    python benchmarks/vae.py [--latents 9,8,8] [--channels 8,16,16,16] [--groups 4] [--mode tiled,untiled]
                             [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from convert_weights import vae as conv  # noqa: E402
from hcjax import vae  # noqa: E402
from hcjax.config import preset  # noqa: E402
from hcjax.runtime import enable_compilation_cache  # noqa: E402


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
    c = preset("tiny").vae
    return dataclasses.replace(c, block_out_channels=tuple(args.channels), norm_num_groups=args.groups)


def _measure(decode) -> dict:
    """Wall time and peak RSS (absolute and above the pre-call RSS) of a first and a second call."""
    res = {}
    for n in ("first", "second"):
        base = _rss_kb("VmRSS")
        _reset_peak()
        t0 = time.perf_counter()
        out = decode()
        res[n] = time.perf_counter() - t0
        res[f"{n}_peak_kb"], res[f"{n}_base_kb"] = _rss_kb("VmHWM"), base
    return res, out


def worker_jax(args) -> dict:
    enable_compilation_cache()        # HCJAX_CACHE_DIR: a fresh directory (cold run), then the same one (warm run)
    cfg = _cfg(args)
    data = np.load(args.weights)
    params = vae.unwrap_params(conv.from_diffusers({k: data[k] for k in data.files if k != "__latents__"}, cfg))
    z = data["__latents__"] * cfg.scaling_factor
    results = {}
    for mode in args.modes:
        res, out = _measure(lambda: np.asarray(vae.decode_latents(params, cfg, z, tiled=mode == "tiled", clip=False)))
        np.save(f"{args.out}.{mode}.npy", out)
        if mode == "tiled":
            res["compiled"] = vae.tile_fn(cfg, "decode")._cache_size()
        results[mode] = res
    return results


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
    import torch

    torch.set_num_threads(args.threads)
    cfg = _cfg(args)
    m = _diffusers_model(args, cfg)
    data = np.load(args.weights)
    m.load_state_dict({k: torch.from_numpy(data[k]) for k in data.files if k != "__latents__"})
    z = torch.from_numpy(np.ascontiguousarray(np.moveaxis(data["__latents__"], -1, 1)))
    results = {}
    for mode in args.modes:
        m.use_tiling = m.use_framewise_decoding = mode == "tiled"
        with torch.no_grad():
            res, out = _measure(lambda: m.decode(z).sample.numpy())
        np.save(f"{args.out}.{mode}.npy", np.moveaxis(out, 1, -1))
        results[mode] = res
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latents", default="9,8,8", help="latent T,H,W (tiny tiles: 4(+1) frames, 4 latent px)")
    p.add_argument("--channels", default="8,16,16,16")
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--mode", default="tiled,untiled",
                   help="comma-separated decodes to time, in this order: tiled (the original's tiling rules, "
                        "diffusers with tiling + framewise decoding), untiled (one pass)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for both sides (1 = XLA without Eigen multi-threading, torch 1 thread)")
    p.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.channels = [int(c) for c in str(args.channels).split(",")]
    args.modes = [m for m in args.mode.split(",") if m]
    if not args.modes or any(m not in ("tiled", "untiled") for m in args.modes):
        p.error(f"--mode must list tiled and/or untiled, got {args.mode!r}")
    if args.worker:
        res = (worker_jax if args.worker == "jax" else worker_torch)(args)
        print("RESULT " + json.dumps(res))
        return 0

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
    runs = (("torch", "diffusers"), ("jax", "hcjax"), ("jax", "hcjax warm"))   # warm: the cold run's XLA cache
    for side, label in runs:
        cmd = [sys.executable, __file__, "--worker", side, "--weights", str(tmp / "w.npz"),
               "--out", str(tmp / side), "--latents", args.latents, "--mode", args.mode,
               "--channels", ",".join(map(str, args.channels)), "--groups", str(args.groups),
               "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(env, HCJAX_CACHE_DIR=str(tmp / "xla")))
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            print(proc.stdout, proc.stderr, file=sys.stderr)
            return 1
        results[label] = json.loads(line[0][7:])
    k = dict(tile_lat=cfg.sample_size // 8, tile_lat_t=cfg.sample_tsize // 4)
    print(f"decode of latents {t}x{h}x{w}x{cfg.latent_channels} -> {4 * (t - 1) + 1}x{8 * h}x{8 * w}x3, "
          f"channels {tuple(args.channels)}, tiles {k['tile_lat_t']}(+1) frames / {k['tile_lat']} latent px, "
          f"{args.threads} threads (hcjax: first call compiles; 'hcjax warm': a new process whose first call "
          f"loads the programs from the persistent compilation cache the previous one wrote, as sample.py does)")
    print(f"{'':20s}{'first s':>9s}{'second s':>10s}{'peak RSS MB (1st/2nd)':>24s}{'peak-base MB (1st/2nd)':>25s}")
    for mode in args.modes:
        for _, label in runs:
            r = results[label][mode]
            print(f"{mode:8s}{label:12s}{r['first']:9.2f}{r['second']:10.2f}"
                  f"{r['first_peak_kb'] / 1024:14.1f} /{r['second_peak_kb'] / 1024:7.1f}"
                  f"{(r['first_peak_kb'] - r['first_base_kb']) / 1024:15.1f} /"
                  f"{(r['second_peak_kb'] - r['second_base_kb']) / 1024:7.1f}")

    def above(r, n):
        return max(r[f"{n}_peak_kb"] - r[f"{n}_base_kb"], 1)

    for mode in args.modes:
        j, jw, d = results["hcjax"][mode], results["hcjax warm"][mode], results["diffusers"][mode]
        diff = float(np.abs(np.load(tmp / f"jax.{mode}.npy") - np.load(tmp / f"torch.{mode}.npy")).max())
        extra = f"; compiled tile functions: {j['compiled']}" if mode == "tiled" else ""
        print(f"{mode}: diffusers/hcjax time: first {d['first'] / j['first']:.2f} (cold compile), "
              f"{d['first'] / jw['first']:.2f} (warm cache), second {d['second'] / j['second']:.2f} / "
              f"{d['second'] / jw['second']:.2f}; hcjax/diffusers peak RSS "
              f"{j['second_peak_kb'] / d['second_peak_kb']:.2f}, "
              f"above pre-call RSS first {above(j, 'first') / above(d, 'first'):.2f}, "
              f"second {above(j, 'second') / above(d, 'second'):.2f}; max |hcjax - diffusers| = {diff:.2e}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
