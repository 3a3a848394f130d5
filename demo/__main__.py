"""``python -m demo build --workdir RUN`` (the demo model, :mod:`demo.build`) and ``python -m demo references``
(the held-out reference images). Bad input: one line and exit code 2 (``--debug``: the traceback); Ctrl-C: 130."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from hcjax.cli import run_cli

from .build import build
from .subjects import DEMO_BUNDLE, DEMO_CONFIG, DEMO_DIR, DEMO_VAE, DEMO_WORLD, World, write_eval_references


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m demo", description="Build the hcjax demo model (see demo/build.py).")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="data -> text towers -> VAE -> latents -> DiT -> bundle")
    b.add_argument("--workdir", required=True, help="run directory (stages already done there are skipped)")
    b.add_argument("--out", default=str(DEMO_BUNDLE), help="bundle output dir (default: assets/demo/model)")
    b.add_argument("--config", default=str(DEMO_CONFIG))
    b.add_argument("--num-clips", type=int, default=1200)
    b.add_argument("--two-subject", type=float, default=0.0, metavar="F",
                   help="share of two-subject training clips (default 0: single-subject only)")
    v = b.add_mutually_exclusive_group()
    v.add_argument("--vae", default=str(DEMO_VAE), metavar="DIR",
                   help="the trained demo VAE the build keeps frozen (default: the committed one, "
                        "assets/demo/model/vae)")
    v.add_argument("--train-vae", action="store_true",
                   help="train the VAE from nothing in the build (vae_train: section) instead")
    d = DEMO_WORLD
    b.add_argument("--subject-radius", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help=f"single-subject clips: subject radius range, fraction of the frame (default "
                        f"{' '.join(map(str, d.subject_radius))}, the committed bundle's); the evaluation references "
                        "are drawn at the middle of the range")
    b.add_argument("--random-colors", action=argparse.BooleanOptionalAction, default=None,
                   help="single-subject clips paint their subject in a random saturated colour (video and reference; "
                        f"default {'on' if d.random_colors else 'off'})")
    b.add_argument("--dit", default=None, metavar="DIR",
                   help="a trained demo DiT taken as the DiT stages' result (e.g. assets/demo/model/dit); with "
                        "train.two_subject_steps the two-subject stage continues from it")
    b.add_argument("--two-subject-layout", choices=World.LAYOUTS, default=None,
                   help="two-subject clips: 'lanes' (one square frame, half-size subjects) or 'cells' (twice as wide, "
                        f"one square cell per subject at the single-subject size; default {d.two_subject_layout})")
    b.add_argument("--two-subject-clips", type=int, default=None, metavar="N",
                   help=f"two-subject clips of the dit_two stage (default {d.two_subject_clips}; its steps: "
                        "train.two_subject_steps, 0 with --set train.two_subject_steps=0)")
    b.add_argument("--set", action="append", default=[], metavar="A.B=V")
    b.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    r = sub.add_parser("references", help="write the held-out reference images to assets/demo")
    r.add_argument("--out", default=str(DEMO_DIR))
    args = p.parse_args(argv)

    def run():
        if args.cmd == "build":
            world = DEMO_WORLD          # the committed bundle's; each flag given replaces its part
            if args.subject_radius:
                world = World.with_radius(*args.subject_radius, world.random_colors,
                                          two_subject_layout=world.two_subject_layout,
                                          two_subject_clips=world.two_subject_clips)
            given = {"random_colors": args.random_colors, "two_subject_layout": args.two_subject_layout,
                     "two_subject_clips": args.two_subject_clips}
            world = dataclasses.replace(world, **{k: v for k, v in given.items() if v is not None})
            build(args.workdir, args.out, config=args.config, num_clips=args.num_clips,
                  two_subject=args.two_subject,
                  vae=None if args.train_vae else args.vae, dit=args.dit, world=world, overrides=args.set,
                  overwrite=args.overwrite, print_fn=lambda s: print(s, flush=True))
        else:
            print("\n".join(str(x) for x in write_eval_references(Path(args.out))))

    return run_cli(run, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
