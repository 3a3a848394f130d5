"""Calibrate MagCache's per-step magnitude ratios on the user's own weights (issue 26).

    python -m hcjax.calibrate_cache [--ckpt-dir BUNDLE] [--out FILE] [--runs 3] [--infer-steps N]
                                    [--ref-image IMG ...] [--pos-prompt TEXT ...] [--set a.b=v ...]

Runs dense samplings (every step through the block stacks) with the bundle's sampling defaults (``sample:`` of
its config; several ``--ref-image`` / ``--pos-prompt`` pairs and ``--runs`` seeds each), records the mean token
L2 norm of the conditional branch's residual (block-stack output minus input on the video tokens) at every step
and writes ``ratios[i] = mean over runs of norm[i] / norm[i-1]`` (``ratios[0] = 1``) as JSON, by default
``BUNDLE/magcache_ratios.json`` (the file ``sample.py --cache magcache`` reads). Other step counts are resampled
(:func:`hcjax.scheduler.magcache_ratios`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from hcjax import models as M
from hcjax.cli import exit_process, run_cli
from hcjax.pipeline import Request, make_denoise_fn, prepare

RATIOS_FILE = "magcache_ratios.json"


def ratios_from_norms(norms: list[np.ndarray]) -> np.ndarray:
    """Per-step residual norms ``[N]`` of several dense runs -> mean ratios ``[N]`` (first 1)."""
    n = np.asarray(norms, np.float64)
    if n.ndim != 2 or n.shape[1] < 2 or not np.all(n > 0):
        raise ValueError(f"residual norms must be [runs, steps >= 2] and positive; got shape {n.shape}")
    r = n[:, 1:] / n[:, :-1]
    return np.concatenate([[1.0], r.mean(0)])


def write_ratios(path: str | Path, ratios, meta: dict | None = None) -> Path:
    """JSON ``{"ratios": [...], **meta}``, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps({**(meta or {}), "ratios": [round(float(r), 6) for r in ratios]}, indent=1)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(body + "\n")
    os.replace(tmp, path)
    return path


def load_ratios(path: str | Path) -> tuple[float, ...]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MagCache ratios {path} not found: run `python -m hcjax.calibrate_cache "
                                f"--ckpt-dir BUNDLE` (or pass --cache-ratios FILE)")
    try:
        ratios = json.loads(path.read_text())["ratios"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: expected JSON {{\"ratios\": [numbers]}} ({e})") from None
    return tuple(float(r) for r in ratios)


def default_ratios_path(src: M.Source) -> Path | None:
    """``RATIOS_FILE`` beside the weights (bundle / demo / the converted original); None for random weights."""
    if src.path is None:
        return None
    if src.kind == "original":
        return Path(src.path) / ".hcjax" / src.variant / RATIOS_FILE
    return Path(src.path) / RATIOS_FILE


def residual_norms(models: M.Models, req: Request) -> np.ndarray:
    """The conditional branch's per-step residual norms ``[N]`` of one dense sampling of ``req``."""
    prep = prepare(models, dataclasses.replace(req, cache="teacache", cache_threshold=0.0))   # every step full
    fn = make_denoise_fn(models.cfg.dit, len(prep.sigmas) - 1, prep.guidance, return_stats=True)
    _, stats = fn(models.dit, prep.noise, prep.conds, jnp.asarray(prep.sigmas))
    return np.asarray(stats["residual_norm"])


def calibrate(models: M.Models, requests: list[Request]) -> np.ndarray:
    return ratios_from_norms([residual_norms(models, r) for r in requests])


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--ckpt-dir", default=None, help="hcjax bundle or original models/ directory (default: the demo model)")
    a("--out", default=None, help=f"ratios file (default: {RATIOS_FILE} beside the weights)")
    a("--runs", type=int, default=3, help="seeds per (reference, prompt)")
    a("--infer-steps", type=int, default=None, help="steps of the calibration runs (default: the model's)")
    a("--ref-image", nargs="+", default=None, help="reference images (default: the model's sample.ref_image)")
    a("--pos-prompt", nargs="+", default=None, help="prompts, one per --ref-image (or one for all)")
    a("--set", action="append", default=[], metavar="A.B=V", help="config override")
    a("--debug", action="store_true")
    return p.parse_args(argv)


def requests_from_args(args, sample_cfg) -> list[Request]:
    refs = args.ref_image or [None]
    prompts = args.pos_prompt or [None]
    if len(prompts) not in (1, len(refs)):
        raise ValueError(f"--pos-prompt: give one prompt or one per --ref-image ({len(refs)}); got {len(prompts)}")
    if args.runs < 1:
        raise ValueError(f"--runs must be >= 1; got {args.runs}")
    for r in refs:
        if r is not None and not Path(r).is_file():
            raise FileNotFoundError(f"--ref-image {r}: file not found")
    prompts = prompts * len(refs) if len(prompts) == 1 else prompts
    base = [Request.from_config(sample_cfg, ref_image=r, pos_prompt=p, steps=args.infer_steps)
            for r, p in zip(refs, prompts)]
    return [dataclasses.replace(b, seed=b.seed + 1000 * k) for b in base for k in range(args.runs)]


def run(args) -> Path:
    src = M.resolve(args.ckpt_dir, None, args.set)
    out = Path(args.out) if args.out else default_ratios_path(src)
    if out is None:
        raise ValueError("random weights have no directory to store ratios beside: pass --out FILE")
    reqs = requests_from_args(args, src.cfg.sample)
    models = M.load(src)
    t0 = time.perf_counter()
    ratios = calibrate(models, reqs)
    write_ratios(out, ratios, meta={"steps": len(ratios), "runs": len(reqs), "weights": str(src.path),
                                    "flow_shift": reqs[0].flow_shift})
    print(f"wrote {out}: {len(ratios)} ratios from {len(reqs)} dense runs ({time.perf_counter() - t0:.1f}s); "
          f"min {ratios[1:].min():.4f} max {ratios[1:].max():.4f}")
    return out


def main(argv=None) -> int:
    args = parse(argv)
    return run_cli(lambda: run(args) and 0 or 0, debug=args.debug)


if __name__ == "__main__":
    exit_process(main())
