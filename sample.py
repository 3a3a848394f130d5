"""hcjax sampling: HunyuanCustom image-, audio- and video-driven (editing) generation to MP4.

With no weight flags it runs the embedded default: the demo model in ``assets/demo/model`` (the full architecture
at toy width, trained on synthetic subject videos by ``python -m hcjax.demo build``). ``--config PRESET`` runs a
preset with random weights instead (e.g. configs/default_tiny.yaml: noise, but the whole pipeline). ``--ckpt-dir``
takes an hcjax bundle or the original ``models/`` download (converted on first use). Flags follow HunyuanCustom's
sample scripts; sizes, steps, shift, guidance, fps and the default prompt/reference come from the model's
``sample:`` config section unless given.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--ref-image", default=None, help="reference image of the subject (default: sample.ref_image of the model)")
    a("--pos-prompt", default=None, help="default: sample.pos_prompt of the model")
    a("--neg-prompt", default="")
    a("--item-name", default=None, help="subject name used in '\\nThe {name} looks like<image>' (default: object)")
    a("--input-audio", default=None, help="audio file (audio checkpoint)")
    a("--audio-strength", type=float, default=0.8)
    a("--input-video", default=None, help="video to edit (editing checkpoint)")
    a("--mask-video", default=None, help="mask video of the region to replace (editing checkpoint)")
    a("--expand-scale", type=int, default=5)
    a("--video-size", type=int, nargs=2, default=None, metavar=("H", "W"), help="default 720 1280 (demo: 64 64)")
    a("--sample-n-frames", type=int, default=None, help="4k+1 frames (default 129; demo: 9)")
    a("--infer-steps", type=int, default=None, help="default 30 (editing: 50; demo: 20)")
    a("--flow-shift-eval-video", type=float, default=None, help="default 13 (editing: 5; demo: 3)")
    a("--cfg-scale", type=float, default=None, help="default 7.5 (demo: 4)")
    a("--ip-cfg-scale", type=float, default=None, help="image guidance, image model only (default 0 = off; demo: 3)")
    a("--use-deepcache", type=int, default=1, choices=[0, 1])
    a("--seed", type=int, default=1024)
    a("--save-path", default="outputs", help="output directory")
    a("--fps", type=int, default=None, help="default 25 (demo: 8)")
    a("--config", default=None, help="YAML preset with RANDOM weights instead of the demo model (no --ckpt-dir)")
    a("--set", action="append", default=[], metavar="A.B=V", help="config override")
    a("--ckpt-dir", default=None, help="hcjax bundle or original models/ directory")
    a("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def run(args) -> Path:
    from tqdm import tqdm

    from hcjax import models as M
    from hcjax.io import save_video
    from hcjax.pipeline import Request, generate, validate_request

    out_dir = Path(args.save_path)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--save-path {out_dir} is a file; give a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    probe = out_dir / f".write-test-{id(args)}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--save-path {out_dir} is not writable: {e}") from None
    for flag, path in (("--ref-image", args.ref_image), ("--input-audio", args.input_audio),
                       ("--input-video", args.input_video), ("--mask-video", args.mask_video)):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path}: file not found")

    cfg = M.resolve_config(args.ckpt_dir, args.config, args.set)
    sc = cfg.sample
    pick = lambda flag, default: default if flag is None else flag  # noqa: E731
    cfg_scale = pick(args.cfg_scale, sc.cfg_scale)
    if cfg_scale < 1.0 and args.neg_prompt:
        print("warning: --cfg-scale < 1 disables guidance; --neg-prompt is ignored", file=sys.stderr)
    req = Request(
        ref_image=args.ref_image or str(M.ROOT / (sc.ref_image or "assets/demo_subject.png")),
        pos_prompt=pick(args.pos_prompt, sc.pos_prompt), neg_prompt=args.neg_prompt,
        item_name=pick(args.item_name, sc.item_name), video_size=tuple(args.video_size or sc.video_size),
        frames=args.sample_n_frames or sc.frames, steps=args.infer_steps or sc.steps,
        flow_shift=args.flow_shift_eval_video or sc.flow_shift, cfg_scale=cfg_scale,
        ip_cfg_scale=pick(args.ip_cfg_scale, sc.ip_cfg_scale), use_deepcache=bool(args.use_deepcache),
        seed=args.seed,
        input_audio=args.input_audio, audio_strength=args.audio_strength, input_video=args.input_video,
        mask_video=args.mask_video, expand_scale=args.expand_scale, fps=pick(args.fps, sc.fps))
    validate_request(cfg, req)                      # fail fast, before any weight is loaded
    t0 = time.perf_counter()
    models = M.load_models(args.ckpt_dir, args.config, args.set)
    load_s = time.perf_counter() - t0

    bar = tqdm(total=req.steps, desc="denoising", unit="step")
    frames, timings = generate(models, req, on_step=lambda i: bar.update(1))
    bar.close()
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}_seed{req.seed}"
    video = out_dir / f"{stem}.mp4"
    save_video(video, frames, fps=req.fps, audio_path=req.input_audio)
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in req.__dict__.items()}
    settings.update(frames_written=int(frames.shape[0]), height=int(frames.shape[1]), width=int(frames.shape[2]),
                    ckpt_dir=args.ckpt_dir, config_overrides=args.set,
                    embedded_default=args.ckpt_dir is None and args.config is None,
                    random_weights=args.ckpt_dir is None and args.config is not None,
                    timings=dict(load_s=load_s, **timings))
    (out_dir / f"{stem}.json").write_text(json.dumps(settings, indent=2))
    print(f"wrote {video} ({frames.shape[0]} frames {frames.shape[2]}x{frames.shape[1]}); load {load_s:.1f}s, "
          f"denoise {timings['denoise_s']:.1f}s ({timings['s_per_step']:.2f} s/step), total "
          f"{timings['total_s'] + load_s:.1f}s")
    return video


def main(argv=None) -> int:
    args = parse(argv)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        run(args)
        return 0
    except KeyboardInterrupt:
        print("interrupted; no output written", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
