"""Step caches on the demo model (issue 26): full steps, wall time, fidelity to the dense run, identity / motion.

    python benchmarks/cache_eval.py [--bundle assets/demo/model] [--pairs 24] [--seed 0] [--steps N]
                                    [--teacache 0.1 0.2 0.4] [--magcache 0.12 0.24 0.5] [--magcache-k 3]
                                    [--repeats 2] [--json out.json]

Over the demo's held-out ``(reference, prompt)`` pairs (``demo.eval_pairs``) with the bundle's sampling
defaults, every method runs the same compiled loop (``hcjax.pipeline.make_denoise_fn``, compiled once per method
before timing): ``none`` (dense: every step through the block stacks), ``deepcache`` (only at 30 steps, where its
schedule exists), TeaCache and MagCache at each threshold. Per method: mean full steps, denoise wall time relative
to dense (dense / method, summed over pairs; the methods take turns on each request, best of ``--repeats``), PSNR
and SSIM of the decoded videos against the dense run's (per video over all frames, then the mean), and the demo's
identity / motion accuracies (``demo.evaluate_videos``). MagCache reads the bundle's ``magcache_ratios.json``
(``python -m hcjax.calibrate_cache``; calibrated here on three pairs when missing and ``--calibrate`` is given).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from scipy.ndimage import gaussian_filter

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import demo  # noqa: E402
from hcjax import calibrate_cache  # noqa: E402
from hcjax.cli import run_cli  # noqa: E402
from hcjax.media import read_image  # noqa: E402
from hcjax.pipeline import Request, decode, make_denoise_fn, prepare  # noqa: E402


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of uint8 ``[F, H, W, 3]`` videos: Gaussian window (sigma 1.5) per frame and channel."""
    x, y = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    f = lambda z: gaussian_filter(z, sigma=(0, 1.5, 1.5, 0), truncate=3.5)  # noqa: E731
    mx, my = f(x), f(y)
    sxx, syy, sxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(s.mean())


def methods_from_args(args, steps: int) -> list[tuple[str, str, float | None]]:
    out = [("none", "none", None)]
    if steps == 30:
        out.append(("deepcache", "deepcache", None))
    out += [(f"teacache {t:g}", "teacache", t) for t in args.teacache]
    out += [(f"magcache {t:g}", "magcache", t) for t in args.magcache]
    return out


def requests(models, pairs, seed: int, steps: int | None) -> list[Request]:
    """The requests of ``demo.generate_eval`` (the bundle's sampling defaults, seed + pair index)."""
    sc = models.cfg.sample
    return [Request(ref_image=str(p["ref_image"]), pos_prompt=p["prompt"], item_name="object",
                    video_size=tuple(sc.video_size), frames=sc.frames, steps=steps or sc.steps,
                    flow_shift=sc.flow_shift, cfg_scale=sc.cfg_scale, ip_cfg_scale=sc.ip_cfg_scale,
                    seed=seed + p["index"], fps=sc.fps) for p in pairs]


def run_methods(models, preps, guidances: list, repeats: int = 2) -> list[dict]:
    """Every prepared request through each method's compiled loop (compiled first, not timed) -> per method the
    videos, full steps and denoise seconds. The methods run in turn on each request (the best of ``repeats``
    runs), so a busy machine slows them alike."""
    steps = len(preps[0].sigmas) - 1
    args0 = (models.dit, preps[0].noise, preps[0].conds, jnp.asarray(preps[0].sigmas))
    fns = [make_denoise_fn(models.cfg.dit, steps, g, return_stats=True).lower(*args0).compile() for g in guidances]
    out = [{"videos": [], "full_steps": [], "denoise_s": 0.0} for _ in guidances]
    for p in preps:
        args = (models.dit, p.noise, p.conds, jnp.asarray(p.sigmas))
        for fn, o in zip(fns, out):
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                x, st = jax.block_until_ready(fn(*args))
                best = min(best, time.perf_counter() - t0)
            o["denoise_s"] += best
            o["full_steps"].append(int(np.asarray(st["full"]).sum()))
            o["videos"].append(decode(models, x))
    return out


def evaluate(args) -> dict:
    models = demo.load_demo(args.bundle)
    pairs = demo.eval_pairs()[:args.pairs]
    refs = [read_image(p["ref_image"]) for p in pairs]
    dirs = [p["direction"] for p in pairs]
    colors = [p["subject"][0] for p in pairs]
    reqs = requests(models, pairs, args.seed, args.steps)
    steps = reqs[0].steps
    ratios = None
    if args.magcache:
        bundle = Path(args.bundle) if args.bundle else demo.DEMO_BUNDLE
        path = Path(args.ratios) if args.ratios else bundle / calibrate_cache.RATIOS_FILE
        if not path.is_file() and args.calibrate:
            calibrate_cache.write_ratios(path, calibrate_cache.calibrate(models, reqs[:3]), meta={"steps": steps})
        ratios = calibrate_cache.load_ratios(path)
    preps = [prepare(models, r) for r in reqs]
    methods = methods_from_args(args, steps)
    guidances = [dataclasses.replace(preps[0].guidance, cache=mode, cache_threshold=thr, cache_ratios=ratios,
                                     cache_max_skip=args.magcache_k) for _, mode, thr in methods]
    results = run_methods(models, preps, guidances, args.repeats)
    dense, rows = results[0], []
    for (name, _, _), got in zip(methods, results):
        scores = demo.evaluate_videos(got["videos"], refs, dirs, colors)
        row = {"method": name, "full_steps": float(np.mean(got["full_steps"])), "steps": steps,
               "speedup": dense["denoise_s"] / got["denoise_s"], "denoise_s": got["denoise_s"],
               "psnr": float(np.mean([min(psnr(a, b), 99.0) for a, b in zip(got["videos"], dense["videos"])])),
               "ssim": float(np.mean([ssim(a, b) for a, b in zip(got["videos"], dense["videos"])])),
               "identity": scores["identity_accuracy"], "color": scores["color_accuracy"],
               "motion": scores["motion_accuracy"]}
        rows.append(row)
        print(f"{name:16s} full {row['full_steps']:5.1f}/{steps}  speed x{row['speedup']:.2f}  PSNR "
              f"{row['psnr']:5.1f}  SSIM {row['ssim']:.3f}  identity {row['identity']:.1%}  colour "
              f"{row['color']:.1%}  motion {row['motion']:.1%}", flush=True)
    return {"pairs": len(pairs), "seed": args.seed, "rows": rows}


def table(report: dict) -> str:
    lines = ["| method | full steps | denoise speed-up | PSNR vs dense (dB) | SSIM | identity | colour | motion |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        p = "=" if r["psnr"] >= 99 else f"{r['psnr']:.1f}"
        lines.append(f"| {r['method']} | {r['full_steps']:.1f} / {r['steps']} | {r['speedup']:.2f}x | {p} | "
                     f"{r['ssim']:.3f} | {r['identity']:.1%} | {r['color']:.1%} | {r['motion']:.1%} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=None, help="hcjax bundle (default: the demo model)")
    ap.add_argument("--pairs", type=int, default=24, help="held-out pairs to use (the first N)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the bundle's)")
    ap.add_argument("--teacache", type=float, nargs="*", default=[0.1, 0.2, 0.4], help="TeaCache thresholds")
    ap.add_argument("--magcache", type=float, nargs="*", default=[0.12, 0.24, 0.5], help="MagCache thresholds")
    ap.add_argument("--magcache-k", type=int, default=3, help="MagCache: most steps reused in a row")
    ap.add_argument("--ratios", default=None, help="MagCache ratios file (default: BUNDLE/magcache_ratios.json)")
    ap.add_argument("--calibrate", action="store_true", help="calibrate the ratios first when the file is missing")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per request and method (the best counts)")
    ap.add_argument("--json", default=None, help="write the report here")
    ap.add_argument("--debug", action="store_true")
    args = ap.parse_args(argv)

    def go():
        report = evaluate(args)
        print(table(report))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))

    return run_cli(go, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
