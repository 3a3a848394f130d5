"""``python -m demo build --workdir RUN`` (the demo model, :mod:`demo.build`) and ``python -m demo references``
(the held-out reference images). Bad input: one line and exit code 2 (``--debug``: the traceback); Ctrl-C: 130."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hcjax.cli import run_cli

from .build import build
from .subjects import DEMO_BUNDLE, DEMO_CONFIG, DEMO_DIR, World, write_eval_references


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
    b.add_argument("--vae", default=None, metavar="DIR",
                   help="a trained demo VAE used frozen instead of training one (e.g. assets/demo/model/vae)")
    b.add_argument("--subject-radius", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="single-subject clips: subject radius range, fraction of the frame (default 0.18 0.26); the "
                        "evaluation references are drawn at the middle of the range")
    b.add_argument("--random-colors", action="store_true",
                   help="single-subject clips paint their subject in a random saturated colour (video and reference)")
    b.add_argument("--dit", default=None, metavar="DIR",
                   help="a trained demo DiT taken as the DiT stages' result (e.g. assets/demo/model/dit); with "
                        "train.two_subject_steps the two-subject stage continues from it")
    b.add_argument("--two-subject-layout", choices=World.LAYOUTS, default="lanes",
                   help="two-subject clips: 'lanes' (one square frame, half-size subjects; default) or 'cells' "
                        "(twice as wide, one square cell per subject at the single-subject size)")
    b.add_argument("--two-subject-clips", type=int, default=0, metavar="N",
                   help="two-subject clips of the dit_two stage (run with --set train.two_subject_steps=STEPS)")
    b.add_argument("--set", action="append", default=[], metavar="A.B=V")
    b.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    r = sub.add_parser("references", help="write the held-out reference images to assets/demo")
    r.add_argument("--out", default=str(DEMO_DIR))
    args = p.parse_args(argv)

    def run():
        if args.cmd == "build":
            two = {"two_subject_layout": args.two_subject_layout, "two_subject_clips": args.two_subject_clips}
            world = (World.with_radius(*args.subject_radius, args.random_colors, **two) if args.subject_radius
                     else World(random_colors=args.random_colors, **two))
            build(args.workdir, args.out, config=args.config, num_clips=args.num_clips,
                  two_subject=args.two_subject, vae=args.vae, dit=args.dit, world=world, overrides=args.set,
                  overwrite=args.overwrite, print_fn=lambda s: print(s, flush=True))
        else:
            print("\n".join(str(x) for x in write_eval_references(Path(args.out))))

    return run_cli(run, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
