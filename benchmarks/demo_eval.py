"""Evaluate the demo model on the held-out (reference, prompt) pairs: identity, motion, temporal consistency.

    python benchmarks/demo_eval.py [--bundle assets/demo/model] [--seed 0] [--seeds 3] [--json out.json]
                                   [--strip assets/demo]

Every pair's subject (colour x texture x shape) never appears in the demo's training data (``demo.HELD_OUT``).
For each pair one video is generated with the bundle's sampling defaults; the metrics (``demo.evaluate_videos``)
are computed on the generated pixels. Three references calibrate the metrics: the synthetic generator's own clips
for the same pairs (what a perfect model would score), those clips encoded and decoded by the bundle's VAE (what a
perfect DiT would score with this VAE) and the generated videos scored against shuffled prompts (what ignoring the
prompt scores). The same metrics on 24 *training* subjects (new videos; ``demo.seen_pairs``) tell how well
the DiT fits what it saw apart from how it generalises. ``--seeds N`` repeats the held-out generation with N seeds
(``seed``, ``seed + 1000``, ...; 24 pairs alone move a figure by 4.2 points per video) and reports each and their
mean; the calibrations, the training-subject check and the strip use the first. ``--start-sigma S [S ...]`` is a
diagnostic of where the subject's look is lost: each sample starts from the generator's clip of its pair (the
second calibration's clips) noised to sigma S instead of from pure noise, and runs the remaining steps.
Two subjects per video (issue 24; ``demo.two_subject_pairs``: 12 pairs of held-out subjects, prompt naming each
by colour, one reference each): both subjects present (``demo.evaluate_multi``: each nearest to its own reference,
colour and silhouette, texture included; and the looser figure with colour and shape, texture free), each
moving in its own direction, and frames with exactly two pieces; calibrated on the generator's two-subject clips
and those through the VAE; ``--seeds`` repeats it too. ``--strip`` writes ``demo_strip.png`` (and ``demo.gif``):
four single-subject and three two-subject samples.

``--vae DIR`` checks a VAE alone, before any DiT is trained on it (e.g. ``RUN/vae`` of a build whose DiT stages are
still to come, or ``BUNDLE/vae``; ``random``: the bundle's architecture with seeded random weights, the floor): the
generator's clips of the held-out and two-subject pairs and the reference images, encoded and decoded by it, scored
as above; the clips drawn in ``--bundle``'s world (default the committed bundle's, the build's default). About a
minute; no DiT sampling.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
import types
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import demo  # noqa: E402
from hcjax.checkpoint import load_checkpoint_config  # noqa: E402
from hcjax.cli import run_cli  # noqa: E402
from hcjax.data import synthetic  # noqa: E402
from hcjax.export import vae_source  # noqa: E402
from hcjax.media import read_image, to_uint8  # noqa: E402
from hcjax.vae import decode_latents, encode_video  # noqa: E402


def ground_truth_videos(pairs, seed: int = 12345, world: demo.World = demo.World()) -> list[np.ndarray]:
    """The synthetic generator's clips of the eval pairs (the data distribution of ``world``, never trained on)."""
    return [synthetic.make_clip(np.random.default_rng([seed, p["index"]]), demo.FRAMES, demo.SIZE, demo.SIZE,
                                subject=p["subject"], direction=p["direction"], travel=demo.TRAVEL,
                                radius=world.subject_radius)[0] for p in pairs]


def two_subject_videos(pairs, seed: int = 12345, world: demo.World = demo.World()) -> list[np.ndarray]:
    """The generator's two-subject clips of the two-subject pairs (their subjects and directions, half travel) in
    ``world``'s two-subject layout."""
    return [world.two_subject_clip(np.random.default_rng([seed, p["index"]]), picks=list(p["subjects"]),
                                   directions=list(p["directions"]))[0] for p in pairs]


def vae_roundtrip(models, videos) -> list[np.ndarray]:
    """The clips encoded (posterior mean) and decoded by the bundle's VAE: the best the DiT could produce."""
    out = []
    for v in videos:
        z = encode_video(models.vae, models.cfg.vae, jnp.asarray(v[None].astype(np.float32) / 127.5 - 1.0))
        out.append(to_uint8(np.asarray(decode_latents(models.vae, models.cfg.vae, z))[0]))
    return out


def reference_roundtrip(models, refs, dirs, colors) -> dict:
    """The reference images (subject on white) as the DiT gets them: encoded and decoded as one-frame videos."""
    ref_rt = vae_roundtrip(models, [r[None] for r in refs])
    got = demo.evaluate_videos(ref_rt, refs, dirs, colors)
    error = np.mean([np.abs(a[0].astype(np.float32) - r).mean() for a, r in zip(ref_rt, refs)])
    return {"identity_accuracy": got["identity_accuracy"], "color_accuracy": got["color_accuracy"],
            "mean_abs_error": float(error)}


def vae_check(vae: str, bundle=None) -> dict:
    """``--vae``: the VAE ``vae`` alone on the generator's clips of ``bundle``'s world (module docstring)."""
    world = demo.World.load(bundle)
    models = types.SimpleNamespace()
    models.vae, models.cfg = vae_source(vae, load_checkpoint_config(Path(bundle or demo.DEMO_BUNDLE) / "vae"))
    with tempfile.TemporaryDirectory() as tmp:
        ref_dir = demo.world_references(world, tmp)
        pairs = demo.eval_pairs(ref_dir)
        refs = [read_image(p["ref_image"]) for p in pairs]
        dirs, colors = [p["direction"] for p in pairs], [p["subject"][0] for p in pairs]
        two = demo.two_subject_pairs(ref_dir=ref_dir, world=world)
    keys = tuple(k for k in HEADLINE if k != "motion_accuracy_vs_wrong_prompt")
    rt = demo.evaluate_videos(vae_roundtrip(models, ground_truth_videos(pairs, world=world)), refs, dirs, colors)
    two_rt = demo.evaluate_multi(vae_roundtrip(models, two_subject_videos(two, world=world)), refs, two,
                                 attributes=[p["subject"] for p in pairs])
    return {"vae": vae, "n": len(pairs), "vae_roundtrip": {k: rt[k] for k in keys},
            "reference_roundtrip": reference_roundtrip(models, refs, dirs, colors),
            "two_subject_vae_roundtrip": _two_figures(two_rt)}


def write_strip(videos, refs, pairs, out_dir: Path, n: int = 6) -> list[Path]:
    """``demo_strip.png``: per row the reference(s) (one image, or a list for a multi-subject pair), then every
    other frame, the prompt above; ``demo.gif``: the first ``n`` side by side."""
    out_dir.mkdir(parents=True, exist_ok=True)
    n = min(n, len(videos))
    refs = [r if isinstance(r, (list, tuple)) else [r] for r in refs[:n]]
    k = max(len(r) for r in refs)
    rows = []
    for v, rr in zip(videos[:n], refs):
        gap = np.full((v.shape[1], 4, 3), 255, np.uint8)
        rr = list(rr) + [np.full_like(rr[0], 255)] * (k - len(rr))
        rows.append(np.concatenate([x for r in rr for x in (r, gap)] + [gap] + [x for f in v[::2] for x in (f, gap)],
                                   axis=1))
    width = max(r.shape[1] for r in rows)         # wider two-subject videos: the other rows padded with white
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    strip = np.concatenate([np.concatenate([row, np.full((4, row.shape[1], 3), 255, np.uint8)]) for row in rows])
    img = Image.fromarray(strip).resize((strip.shape[1] * 2, strip.shape[0] * 2), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    for i, p in enumerate(pairs[:n]):
        draw.text((2 * (k * (demo.SIZE + 4) + 4) + 4, i * 2 * (demo.SIZE + 4) + 2), p["prompt"], fill=(0, 0, 0))
    paths = [out_dir / "demo_strip.png"]
    img.save(paths[0])
    frames = [Image.fromarray(np.concatenate([v[t] for v in videos[:n]], axis=1)) for t in range(videos[0].shape[0])]
    frames = [f.resize((f.width * 2, f.height * 2), Image.NEAREST) for f in frames]
    paths.append(out_dir / "demo.gif")
    frames[0].save(paths[1], save_all=True, append_images=frames[1:], duration=125, loop=0)
    return paths


SEED_STRIDE = 1000       # seed k of --seeds: seed + 1000 k (the pairs use seed + index, 0..23)
TWO_HEADLINE = ("all_present", "all_colour_shape", "subject_present", "motion_accuracy", "intact_frames",
                "components_per_frame")


def _two_figures(report: dict) -> dict:
    return {k: report[k] for k in TWO_HEADLINE + ("missed", "missed_colour_shape")}


HEADLINE = ("identity_accuracy", "color_accuracy", "motion_accuracy", "motion_accuracy_vs_wrong_prompt",
            "silhouette_iou", "area_cv", "intact_frames", "components_per_frame")


def two_subject_report(models, two, refs, seed: int, seeds: int, steps, world: demo.World = demo.World(),
                       attributes=demo.HELD_OUT) -> tuple[dict, list[np.ndarray]]:
    """The two-subject figures (per seed, their mean, and the generator / VAE calibrations in ``world``'s layout)
    and the first seed's videos. ``attributes``: each of ``refs``' (colour, texture, shape)."""
    score = lambda v: _two_figures(demo.evaluate_multi(v, refs, two, attributes=attributes))  # noqa: E731
    videos = demo.generate_eval(models, two, seed=seed, steps=steps)
    per_seed = [{"seed": seed, **score(videos)}]
    for i in range(1, seeds):
        got = score(demo.generate_eval(models, two, seed=seed + SEED_STRIDE * i, steps=steps))
        per_seed.append({"seed": seed + SEED_STRIDE * i, **got})
    clips = two_subject_videos(two, world=world)
    mean = {k: float(np.mean([p[k] for p in per_seed])) for k in TWO_HEADLINE}
    for key, name in (("missed", "seeds_missed_per_pair"), ("missed_colour_shape", "seeds_missed_colour_shape")):
        misses = collections.Counter(i for p in per_seed for i in p[key])
        mean[name] = {i: misses[i] for i in sorted(misses)}                      # which pairs fail, how often
    return {"per_seed": per_seed, "mean_over_seeds": mean,
            "ground_truth": score(clips), "vae_roundtrip": score(vae_roundtrip(models, clips))}, videos


def run(bundle=None, seed: int = 0, steps: int | None = None, overrides=(), print_fn=print, seeds: int = 1,
        start_sigmas=()) -> dict:
    """The report (see :func:`main`). The bundle's demo world (``demo.World.load``) sets the size of the reference
    images it gets (the committed ``subject_NN.png`` when they have its ``ref_radius``, else drawn at that radius
    into a temporary directory) and of the generator's calibration clips."""
    world = demo.World.load(bundle)
    with tempfile.TemporaryDirectory() as tmp:
        return _run(bundle, seed, steps, overrides, seeds, start_sigmas, world, demo.world_references(world, tmp))


def _run(bundle, seed, steps, overrides, seeds, start_sigmas, world, ref_dir):
    pairs = demo.eval_pairs(ref_dir)
    refs = [read_image(p["ref_image"]) for p in pairs]
    dirs = [p["direction"] for p in pairs]
    t0 = time.perf_counter()
    models = demo.load_demo(bundle, overrides)
    videos = demo.generate_eval(models, pairs, seed=seed, steps=steps)
    gen_s = time.perf_counter() - t0
    colors = [p["subject"][0] for p in pairs]
    report = demo.evaluate_videos(videos, refs, dirs, colors)
    rng = np.random.default_rng(seed)
    shuffled = [list(synthetic.DIRECTIONS)[(list(synthetic.DIRECTIONS).index(d) + rng.integers(1, 4)) % 4]
                for d in dirs]
    report["motion_accuracy_vs_wrong_prompt"] = demo.evaluate_videos(videos, refs, shuffled)["motion_accuracy"]
    if seeds > 1:
        per_seed = [{"seed": seed, **{k: report[k] for k in HEADLINE}}]
        for i in range(1, seeds):
            s = seed + SEED_STRIDE * i
            more = demo.generate_eval(models, pairs, seed=s, steps=steps)
            got = demo.evaluate_videos(more, refs, dirs, colors)
            got["motion_accuracy_vs_wrong_prompt"] = demo.evaluate_videos(more, refs, shuffled)["motion_accuracy"]
            per_seed.append({"seed": s, **{k: got[k] for k in HEADLINE}})
        report["per_seed"] = per_seed
        report["mean_over_seeds"] = {k: float(np.mean([p[k] for p in per_seed])) for k in HEADLINE}
    keys = tuple(k for k in HEADLINE if k != "motion_accuracy_vs_wrong_prompt")
    clips = ground_truth_videos(pairs, world=world)
    truth = demo.evaluate_videos(clips, refs, dirs, colors)
    report["ground_truth"] = {k: truth[k] for k in keys}
    rt = demo.evaluate_videos(vae_roundtrip(models, clips), refs, dirs, colors)
    report["vae_roundtrip"] = {k: rt[k] for k in keys}
    report["reference_roundtrip"] = reference_roundtrip(models, refs, dirs, colors)
    report["from_clips"] = []
    for sigma in start_sigmas:
        got = demo.evaluate_videos(demo.generate_eval(models, pairs, seed=seed, steps=steps, start_videos=clips,
                                                      start_sigma=sigma), refs, dirs, colors)
        report["from_clips"].append({"start_sigma": sigma, **{k: got[k] for k in keys}})
    report["generate_s"] = gen_s
    report["seed"] = seed
    # two held-out subjects per video (issue 24): both present (and with colour and shape), each moving as told
    two = demo.two_subject_pairs(ref_dir=ref_dir, world=world)
    try:
        report["two_subject"], two_videos = two_subject_report(models, two, refs, seed, seeds, steps, world,
                                                               attributes=[p["subject"] for p in pairs])
    except ValueError as e:        # a bundle whose tokenizer / text length cannot take the two-subject prompts
        if "LLaVA tokens exceed" not in str(e):
            raise
        report["two_subject"], two_videos = {"error": str(e)}, []
    with tempfile.TemporaryDirectory() as tmp:      # training subjects, new videos: fit vs generalisation
        seen = demo.seen_pairs(Path(tmp), radius=world.ref_radius)
        seen_refs = [read_image(p["ref_image"]) for p in seen]
        got = demo.evaluate_videos(demo.generate_eval(models, seen, seed=seed, steps=steps), seen_refs,
                                   [p["direction"] for p in seen], [p["subject"][0] for p in seen])
    report["seen_subjects"] = {k: got[k] for k in keys}
    return report, videos, refs, pairs, two_videos, two


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=None, help="hcjax bundle (default: the committed demo model)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=1, help="held-out generations with this many seeds (default 1)")
    ap.add_argument("--start-sigma", type=float, nargs="+", default=[], metavar="S",
                    help="diagnostic: also sample from the generator's clips noised to each sigma S")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the bundle's sample.steps)")
    ap.add_argument("--set", action="append", default=[], metavar="A.B=V",
                    help="config override, e.g. sample.cfg_scale=6 (sampling settings)")
    ap.add_argument("--json", default=None, help="write the full report here")
    ap.add_argument("--strip", default=None, help="directory for demo_strip.png and demo.gif")
    ap.add_argument("--vae", default=None, metavar="DIR",
                    help="check this VAE alone (a checkpoint or VAE run dir, or 'random'): round trips, no DiT")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    args = ap.parse_args(argv)
    return run_cli(lambda: evaluate_vae(args) if args.vae else evaluate(args), debug=args.debug)


def evaluate_vae(args) -> None:
    """``--vae``: the report of :func:`vae_check`, printed (``--json``: written)."""
    given = [f for f, on in (("--seeds", args.seeds != 1), ("--seed", args.seed != 0), ("--steps", args.steps),
                             ("--start-sigma", args.start_sigma), ("--set", args.set), ("--strip", args.strip)) if on]
    if given:
        raise ValueError(f"--vae checks the VAE alone (no DiT sampling): {', '.join(given)} do not apply")
    r = vae_check(args.vae, args.bundle)
    rt, rr, two = r["vae_roundtrip"], r["reference_roundtrip"], r["two_subject_vae_roundtrip"]
    print(f"VAE {args.vae}: the generator's clips of the {r['n']} held-out pairs through it: identity "
          f"{rt['identity_accuracy']:.1%}, colour {rt['color_accuracy']:.1%}, motion {rt['motion_accuracy']:.1%}, "
          f"intact frames {rt['intact_frames']:.1%} ({rt['components_per_frame']:.2f} pieces per frame)")
    print(f"reference images through it: identity {rr['identity_accuracy']:.1%}, colour {rr['color_accuracy']:.1%}, "
          f"mean abs error {rr['mean_abs_error']:.1f}/255")
    print(f"two-subject clips through it: both present {two['all_present']:.1%} (colour and shape "
          f"{two['all_colour_shape']:.1%}), motion {two['motion_accuracy']:.1%}, intact frames "
          f"{two['intact_frames']:.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))


def evaluate(args) -> None:
    """The report of ``args`` (see :func:`main`), printed; ``--json`` / ``--strip`` outputs written."""
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    if any(not 0.0 < x <= 1.0 for x in args.start_sigma):
        raise ValueError(f"--start-sigma values must be in (0, 1], got {args.start_sigma}")
    report, videos, refs, pairs, two_videos, two = run(args.bundle, args.seed, args.steps, args.set, seeds=args.seeds,
                                      start_sigmas=args.start_sigma)
    n = report["n"]
    print(f"{n} held-out pairs, generated in {report['generate_s']:.0f}s")
    gt, rt = report["ground_truth"], report["vae_roundtrip"]
    print(f"identity accuracy   {report['identity_accuracy']:.1%}  (chance {report['identity_chance']:.1%}, "
          f"generator's own clips {gt['identity_accuracy']:.1%}, those through the VAE {rt['identity_accuracy']:.1%})")
    print(f"colour accuracy     {report['color_accuracy']:.1%}  (the reference nearest by colour alone has the "
          f"right colour; generator's own clips {gt['color_accuracy']:.1%}, through the VAE "
          f"{rt['color_accuracy']:.1%})")
    print(f"motion accuracy     {report['motion_accuracy']:.1%}  (chance 25%, vs a wrong prompt "
          f"{report['motion_accuracy_vs_wrong_prompt']:.1%}, generator's own clips "
          f"{report['ground_truth']['motion_accuracy']:.1%})")
    rr = report["reference_roundtrip"]
    print(f"reference images through the VAE: identity {rr['identity_accuracy']:.1%}, colour "
          f"{rr['color_accuracy']:.1%}, mean abs error {rr['mean_abs_error']:.1f}/255")
    seen = report["seen_subjects"]
    print(f"training subjects (seen in training, new videos): identity {seen['identity_accuracy']:.1%}, colour "
          f"{seen['color_accuracy']:.1%}, motion {seen['motion_accuracy']:.1%}")
    print(f"temporal: consecutive-frame silhouette IoU {report['silhouette_iou']:.3f} (generator "
          f"{report['ground_truth']['silhouette_iou']:.3f}), area CV {report['area_cv']:.3f} (generator "
          f"{report['ground_truth']['area_cv']:.3f})")
    print(f"intact frames       {report['intact_frames']:.1%}  (the subject in exactly one piece; "
          f"{report['components_per_frame']:.2f} pieces per frame; generator {gt['intact_frames']:.1%}, through the "
          f"VAE {rt['intact_frames']:.1%}; ghosting and split copies add pieces, a lost subject has none)")
    if "per_seed" in report:
        for p in report["per_seed"] + [{"seed": "mean", **report["mean_over_seeds"]}]:
            print(f"seed {p['seed']!s:>5}: identity {p['identity_accuracy']:.1%}, colour {p['color_accuracy']:.1%}, "
                  f"motion {p['motion_accuracy']:.1%} (vs a wrong prompt {p['motion_accuracy_vs_wrong_prompt']:.1%}), "
                  f"IoU {p['silhouette_iou']:.3f}, area CV {p['area_cv']:.3f}, intact frames {p['intact_frames']:.1%}")
    ts = report["two_subject"]
    if "error" in ts:
        print(f"two subjects: not measured, this bundle cannot encode the two-subject prompts ({ts['error']})")
    for p in ts.get("per_seed", []) + ([{"seed": "mean", **ts["mean_over_seeds"]}] if len(ts.get("per_seed", [])) > 1
                                       else []):
        print(f"two subjects, seed {p['seed']!s:>5}: both present {p['all_present']:.1%} (with colour and shape, "
              f"texture free: {p['all_colour_shape']:.1%}; each subject "
              f"{p['subject_present']:.1%}), motion {p['motion_accuracy']:.1%}, intact frames {p['intact_frames']:.1%}"
              f" ({p['components_per_frame']:.2f} pieces per frame)"
              + (f"; pairs missed {p['missed']} (colour and shape: {p['missed_colour_shape']})" if "missed" in p
                 else "")
              + (f"; seeds missed per pair {p['seeds_missed_per_pair']} (colour and shape: "
                 f"{p['seeds_missed_colour_shape']})" if "seeds_missed_per_pair" in p else ""))
    for name in ("ground_truth", "vae_roundtrip") if "error" not in ts else ():
        p = ts[name]
        print(f"two subjects, {name.replace('_', ' ')}: both present {p['all_present']:.1%} (colour and shape "
              f"{p['all_colour_shape']:.1%}), motion "
              f"{p['motion_accuracy']:.1%}, intact frames {p['intact_frames']:.1%}")
    for f in report["from_clips"]:
        print(f"from the generator's clips noised to sigma {f['start_sigma']}: identity {f['identity_accuracy']:.1%}, "
              f"colour {f['color_accuracy']:.1%}, motion {f['motion_accuracy']:.1%}, IoU {f['silhouette_iou']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if args.strip:
        two_refs = [[refs[i] for i in p["refs"]] for p in two]
        for p in write_strip(videos[:4] + two_videos[:3], refs[:4] + two_refs[:3], pairs[:4] + two[:3],
                             Path(args.strip), n=7):
            print(f"wrote {p}")


if __name__ == "__main__":
    sys.exit(main())
