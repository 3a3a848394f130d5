"""Interrupt robustness of every entry point: SIGINT / SIGTERM at random times, exit codes, leftovers, crashes.

    python benchmarks/interrupts.py                       # 20 interrupts per entry point (sample, train,
                                                          # precompute, convert), alternating SIGINT / SIGTERM
    python benchmarks/interrupts.py --trials 3 --only sample train

Per entry point, two uninterrupted runs (cold, then with a warm compilation cache) measure its duration ``D``; each trial then starts a fresh run and sends
the signal after a delay drawn uniformly from ``[0, D]`` (seeded; the delay covers imports, loading, compiling,
the work and writing). A trial passes when the process ends with 130 (SIGINT) / 143 (SIGTERM) and one
``interrupted|terminated`` line without a traceback, or, when the signal came after the work was done, with 0
and a complete output (within 1 s of the signal: the teardown ignores signals; later, the interrupt was
"lost"; a finished program ignores signals only while its ``atexit`` handlers run, :func:`hcjax.cli.exit_process`).
Leftovers: any file in the output location other than a complete result (sample: an
``.mp4`` with its ``.json``; train: nothing, or a resumable run with a complete checkpoint; precompute: nothing or a
complete dataset with ``index.json``; convert: nothing or a checkpoint with ``config.json``). A negative exit
code (e.g. -11, a segfault) is reported as a crash. The last line is the summary per entry point.

Inputs are tiny (configs/default_tiny.yaml, configs/train_tiny.yaml, a 4-clip synthetic dataset, the tiny DiT
preset converted from original names); everything lives in a temporary directory, with its own compilation
cache (warm after the measuring run, as a user's second run would be).
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hcjax.config import load_config  # noqa: E402
from hcjax.data.encode import precompute  # noqa: E402
from hcjax.data.synthetic import generate  # noqa: E402
from tests.dit_reference import diffusers_model, state_dict_numpy, tiny_cfg, to_original_names  # noqa: E402

ENTRY_POINTS = ("sample", "train", "precompute", "convert")
LOST_AFTER = 1.0        # s: a run that goes on this long after the signal and exits 0 lost the interrupt


def original_checkpoint(path: Path) -> Path:
    """A random tiny DiT (configs/tiny.yaml) saved under the original release's names (the tests' reference)."""
    cfg = tiny_cfg()
    sd = to_original_names(state_dict_numpy(diffusers_model(cfg, seed=0)), cfg)
    torch.save({"module": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}}, path)
    return path


def commands(work: Path) -> dict:
    """Per entry point: ``(argv builder(out), output location(out))``."""
    data, cache, src = work / "raw", work / "cache", work / "mp_rank_00_model_states.pt"
    return {
        "sample": lambda out: [sys.executable, "sample.py", "--config", "configs/default_tiny.yaml", "--video-size",
                               "32", "32", "--sample-n-frames", "5", "--infer-steps", "8", "--save-path", str(out)],
        "train": lambda out: [sys.executable, "train.py", "--config", "configs/train_tiny.yaml", "--workdir", str(out),
                              "--no-progress", "--set", f"train.data.path={cache}", "--set", "train.steps=6",
                              "--set", "train.save_every=3", "--set", "train.batch_size=2"],
        "precompute": lambda out: [sys.executable, "-m", "hcjax.precompute", "--config", "configs/train_tiny.yaml",
                                   "--data", str(data), "--out", str(out)],
        "convert": lambda out: [sys.executable, "-m", "convert_weights", "dit", "--src", str(src), "--out", str(out),
                                "--config", "configs/tiny.yaml"],
    }


def leftovers(kind: str, out: Path, rc: int) -> list[str]:
    """Files that are neither nothing nor a complete result (module docstring)."""
    if not out.exists():
        return []
    files = sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file())
    hidden = [f for f in out.parent.iterdir() if f.name.startswith(f".{out.name}.")]
    bad = [str(h) for h in hidden]
    if kind == "sample":
        mp4 = [f for f in files if f.endswith(".mp4")]
        ok = all(f[:-4] + ".json" in files for f in mp4) and len(files) == 2 * len(mp4)
        return bad + ([] if ok else files)
    if kind == "train":
        steps = [d for d in (out / "checkpoints").glob("*") if d.name.isdigit()] if (out / "checkpoints").is_dir() \
            else []
        return bad + ([] if steps or not files else files)
    if kind == "precompute":
        return bad + ([] if (out / "index.json").is_file() or not files else files)
    return bad + ([] if (out / "config.json").is_file() or not files else files)


def trial(cmd, out: Path, delay: float, sig: int, env: dict) -> dict:
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    t0 = time.monotonic()
    try:
        p.wait(timeout=delay)
        sent = False
    except subprocess.TimeoutExpired:
        p.send_signal(sig)
        sent = True
    _, err = p.communicate(timeout=600)
    return {"rc": p.returncode, "sent": sent, "t": time.monotonic() - t0, "err": err, "delay": delay}


def judge(kind: str, r: dict, sig: int, out: Path) -> str:
    want = 143 if sig == signal.SIGTERM else 130
    word = "terminated" if sig == signal.SIGTERM else "interrupted"
    if r["rc"] < 0:
        return f"crash rc={r['rc']}"
    if "Traceback" in r["err"]:
        return "traceback"
    left = leftovers(kind, out, r["rc"])
    if left:
        return f"leftovers {left[:3]}"
    if r["rc"] == want and f"{word}; no output written" in r["err"]:
        return "ok"
    if r["rc"] == 0 and r["sent"] and r["t"] - r["delay"] > LOST_AFTER:
        return f"lost (ran {r['t'] - r['delay']:.1f}s after the signal and finished)"
    if r["rc"] == 0:
        return "ok (finished first)"
    return f"rc={r['rc']}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--only", nargs="*", default=list(ENTRY_POINTS), choices=ENTRY_POINTS)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rnd = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="hcjax-interrupts-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "HCJAX_CACHE_DIR": str(work / "xla"), "JAX_PLATFORMS": "cpu"}
        generate(work / "raw", num_clips=4, frames=9, height=32, width=32, seed=0)
        precompute(load_config(ROOT / "configs" / "train_tiny.yaml"), work / "raw", work / "cache")
        original_checkpoint(work / "mp_rank_00_model_states.pt")
        cmds = commands(work)
        summary = {}
        for kind in args.only:
            times = []
            for rep in range(2):                # cold (fills the compilation cache), then warm: D
                out = work / f"{kind}-measure{rep}"
                t0 = time.monotonic()
                r = subprocess.run(cmds[kind](out), cwd=ROOT, capture_output=True, text=True, env=env)
                times.append(time.monotonic() - t0)
                if r.returncode != 0:
                    print(f"{kind}: the uninterrupted run failed (rc {r.returncode}):\n{r.stderr[-2000:]}")
                    return 1
                shutil.rmtree(out, ignore_errors=True)
            duration = times[-1]
            print(f"{kind}: uninterrupted runs {times[0]:.1f}s (cold), {duration:.1f}s (warm)", flush=True)
            results, codes = collections.Counter(), collections.Counter()
            for i in range(args.trials):
                sig = signal.SIGINT if i % 2 == 0 else signal.SIGTERM
                delay = rnd.uniform(0.0, duration)
                out = work / f"{kind}-{i}"
                r = trial(cmds[kind](out), out, delay, sig, env)
                verdict = judge(kind, r, sig, out)
                codes[r["rc"]] += 1
                results[verdict.split(" [")[0] if verdict.startswith("leftovers") else verdict] += 1
                print(f"  {kind} #{i:2d} {signal.Signals(sig).name:7s} at {delay:5.1f}s -> rc {r['rc']:4d} "
                      f"({r['t']:.1f}s): {verdict}", flush=True)
                if not verdict.startswith("ok"):
                    print("    | " + "\n    | ".join(r["err"].strip().splitlines()[-12:]), flush=True)
                shutil.rmtree(out, ignore_errors=True)
            summary[kind] = dict(results)
            print(f"{kind}: {args.trials} trials, exit codes {dict(sorted(codes.items()))}, verdicts {dict(results)}",
                  flush=True)
        print("summary: " + "; ".join(f"{k}: {dict(v)}" for k, v in summary.items()))
        bad = sum(n for v in summary.values() for k, n in v.items() if not k.startswith("ok"))
        return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
