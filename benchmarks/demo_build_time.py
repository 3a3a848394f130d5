"""How long ``python -m demo build`` will take on this machine, from a few timed steps (about two minutes).

    python benchmarks/demo_build_time.py [--set A.B=V ...] [--train-vae] [--steps 20] [--two-fraction 0.5]
                                         [--loop-overhead 1.06] [--json out.json]

The build's time is almost all training steps: the VAE stage (``vae_train.steps``; only with ``--train-vae``, as
the build: by default it keeps the committed VAE frozen), the DiT stages (``train.steps``
and ``train.finetune_steps``, single-subject 64x64 batches) and the two-subject stage (``train.two_subject_steps``
x ``train.two_subject_restarts``, batches from the single- and the 64x128 two-subject clips; ``--two-fraction`` of
them two-subject: 0.5 with the default 1200 + 1200 clips). This times each kind of step on random inputs of the
build's shapes with the compiled step the build runs (``hcjax.vae_training.make_step``,
``hcjax.training.make_train_step``, the config's ``microbatch`` slicing), after warm-up, and multiplies by the
config's step counts, times ``--loop-overhead`` (default 1.06: a build at a tenth of the steps, 2026-12-06, ran
its DiT stages at 1.06x the steps timed here right after it, data, logging, checkpoints and compiles included;
the 1.25x measured earlier that day compared a loop whose text was not cut with a step whose text was;
docs/demo.md). The other stages (data, text
towers, latent encoding) are not timed: ``--other-s`` (default 450 s; 426 s in that build). Host speed varies:
the same steps took 1.3-1.6x longer on the machine of 2026-12-06 than on the one before, and neighbours on the
host move a step by 10-20 % from one run to the next (docs/demo.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import demo  # noqa: E402
from hcjax import sharding, training, vae_training  # noqa: E402
from hcjax.config import Config, load_config  # noqa: E402
from hcjax.data import TrainBatch  # noqa: E402

BUDGET_S = 3 * 3600


def project(cfg: Config, seconds: dict, two_fraction: float, other_s: float, overhead: float = 1.0,
            train_vae: bool = False) -> dict:
    """Stage seconds from per-step seconds ``seconds`` (``vae``, ``dit``, ``dit_two_subject``), each step's time
    times ``overhead``; ``other_s`` for the untimed stages. The VAE stages count only with ``train_vae`` (the
    build's ``--train-vae``)."""
    tc = cfg.train
    vae, single = overhead * seconds["vae"] * train_vae, overhead * seconds["dit"]
    two = (1 - two_fraction) * single + two_fraction * overhead * seconds["dit_two_subject"]
    stages = {"vae": cfg.vae_train.steps * vae,
              "vae_finetune": cfg.vae_train.finetune_steps * vae,
              "dit": tc.steps * single,
              "dit_finetune": tc.finetune_steps * single,
              "dit_two": tc.two_subject_steps * tc.two_subject_restarts * two,
              "other": other_s}
    return {"stages": stages, "total_s": sum(stages.values())}


def host(cpuinfo: str | None = None) -> str:
    """The machine the steps are timed on, for comparing projections across machines: CPU model, logical CPUs and
    its widest x86 vector extension, from ``cpuinfo`` (the text of ``/proc/cpuinfo``; read when None, where it
    exists). The same build's steps ran 1.5-2.2x slower on the AVX2-only machine of 2026-12-07 than on the
    one of 2026-12-06 (docs/demo.md)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields = [line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line]
    first = {k.strip(): v.strip() for k, v in reversed(fields)}          # the first CPU's value of each field
    cpus = sum(k.strip() == "processor" for k, _ in fields) or os.cpu_count() or 0
    flags = set(first.get("flags", "").split())
    isa = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"))
                if flag in flags), None)
    model = first.get("model name") or platform.processor() or platform.machine()
    return f"{model}, {cpus} CPU{'s' * (cpus != 1)}" + (f", {isa}" if isa else "")


def _time(fn, steps: int) -> float:
    for _ in range(3):                       # compile + warm up
        fn()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t) / steps


def time_vae_step(cfg: Config, steps: int) -> float:
    vc = cfg.vae_train
    optimizer = vae_training.make_optimizer(cfg)
    state = {"params": vae_training.init_params(cfg, vc.seed)}
    state["opt"] = optimizer.init(state["params"])
    step = vae_training.make_step(cfg, optimizer)
    x = np.random.default_rng(0).uniform(-1, 1, (vc.batch_size, vc.frames, vc.crop, vc.crop, 3)).astype(np.float32)
    key = jax.random.key(0)

    def run():
        state["params"], state["opt"], m = step(state["params"], state["opt"], x, key)
        jax.block_until_ready(m)
    return _time(run, steps)


# A batch's largest text_mask sum (its longest prompt) in the build's DiT stages, over 1500 batches of each
# (2026-12-06): single-subject 20 (15-20); two-subject 50 in 93 % of the batches (44-50), 52 in the rest.
PROMPT_TOKENS = {1: 20, 2: 50}


def text_masks(cfg: Config, subjects: int) -> tuple[np.ndarray, np.ndarray]:
    """``(prompt, null)`` text masks of the data's whole length in the LLaVA layout (spec 3.3: after the prompt's
    text, its ``subjects`` image features masked and as many trailing pad slots valid) with
    ``PROMPT_TOKENS[subjects]`` valid; the null prompt (empty, no image) has 7."""
    c = cfg.clip_vision
    extra = subjects * ((c.image_size // c.patch_size) ** 2 - 1)       # an image's CLIP patches replace one <image>
    full = cfg.llava.text_len + extra
    pos = np.arange(full)
    prompt = ((pos < PROMPT_TOKENS[subjects] - extra) | (pos >= full - extra)).astype(np.int32)
    return prompt, (pos < 7).astype(np.int32)


def time_dit_step(cfg: Config, steps: int, subjects: int) -> float:
    """One DiT train step on a batch of ``subjects``-subject clips (1: the 64x64 bucket, 2: side by side)."""
    mesh, rules = training.make_mesh(cfg, jax.devices()[:1]), sharding.rules_for(name="default")
    optimizer, _ = training.make_optimizer(cfg.train)
    state = {"s": training.create_state(cfg, mesh, rules, optimizer)}
    step = training.make_train_step(cfg, optimizer, mesh, rules)
    d, rng = cfg.dit, np.random.default_rng(0)
    b, (h, w) = cfg.train.batch_size, cfg.sample.video_size
    t = (cfg.train.data.num_frames - 1) // 4 + 1
    lat = (t, h // cfg.vae.spatial_compression_ratio, subjects * w // cfg.vae.spatial_compression_ratio,
           d.in_channels)
    prompt, null_mask = text_masks(cfg, subjects)
    s = prompt.shape[0]

    def f(*shape):
        return rng.standard_normal(shape).astype(np.float32)
    arrays = dict(latents=f(b, *lat), ref_latents=f(b, subjects, *lat[1:]), null_ref_latents=f(b, subjects, *lat[1:]),
                  text_states=f(b, s, d.text_states_dim), text_mask=np.repeat(prompt[None], b, 0),
                  text_states_2=f(b, d.text_states_dim_2))
    if subjects > 1:
        arrays["ref_mask"] = np.ones((b, subjects), np.int32)
    host, null = TrainBatch.from_arrays(arrays), {"text_states": f(s, d.text_states_dim), "text_mask": null_mask,
                                                   "text_states_2": f(d.text_states_dim_2)}
    n = training.text_cut(host, null, cfg.train.text_bucket) if cfg.train.text_bucket else s     # as train() does
    batch = training.to_global(training.cut_text(host, n), mesh, rules)
    null = training.device_null(training.cut_text(null, n), mesh)

    def run():
        state["s"], m = step(state["s"], batch, null)
        jax.block_until_ready(m)
    return _time(run, steps)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(demo.DEMO_CONFIG))
    ap.add_argument("--set", action="append", default=[], metavar="A.B=V", help="config override (as the build)")
    ap.add_argument("--train-vae", action="store_true", help="the build trains its VAE (python -m demo build "
                    "--train-vae) instead of keeping the committed one frozen")
    ap.add_argument("--steps", type=int, default=20, help="timed steps of each kind after 3 warm-up steps")
    ap.add_argument("--two-fraction", type=float, default=0.5,
                    help="share of two-subject batches in the two-subject stage")
    ap.add_argument("--other-s", type=float, default=450.0, help="seconds of the untimed stages")
    ap.add_argument("--loop-overhead", type=float, default=1.06, help="the build's loop time over the step's")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.set)
    seconds = {"vae": time_vae_step(cfg, args.steps) if args.train_vae else 0.0,
               "dit": time_dit_step(cfg, args.steps, 1)}
    seconds["dit_two_subject"] = time_dit_step(cfg, args.steps, 2) if cfg.train.two_subject_steps else 0.0
    out = project(cfg, seconds, args.two_fraction, args.other_s, args.loop_overhead, args.train_vae)
    print(f"host: {host()}")
    print("step time: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in seconds.items() if v))
    for k, v in out["stages"].items():
        if v:
            print(f"  {k:13s} {v:7.0f} s")
    verdict = "inside" if out["total_s"] <= BUDGET_S else "OVER"
    print(f"projected build: {out['total_s']:.0f} s = {out['total_s'] / 3600:.2f} h ({verdict} the 3-hour budget)")
    if args.json:
        Path(args.json).write_text(json.dumps({"host": host(), "step_s": seconds, **out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
