"""hcjax sampling: HunyuanCustom image-, audio- and video-driven (editing) generation to MP4.

With no weight flags it runs the embedded default: the demo model in ``assets/demo/model`` (the full architecture
at toy width, trained on synthetic subject videos by ``python -m demo build``). ``--config PRESET`` runs a preset
with random weights instead (e.g. configs/default_tiny.yaml: noise, but the whole pipeline). ``--ckpt-dir`` takes
an hcjax bundle or the original ``models/`` download (converted on first use). Flags follow HunyuanCustom's
sample scripts; every sampling default comes from the model's ``sample:`` config section unless the flag is given.

Progress goes to stderr as ``[hcjax] phase <name>`` lines (import, load, prepare, compile, denoise, decode, write):
Ctrl-C or SIGTERM in any phase exits 130/143 with one line and leaves no partial file.
"""

from __future__ import annotations

import os
import sys
import time

from hcjax.cli import exit_process, guard_imports, run_cli


def phase(name: str) -> None:
    """Announce a phase; ``HCJAX_PHASE_DELAY=<name>:<seconds>`` holds the program there (interrupt tests)."""
    print(f"[hcjax] phase {name}", file=sys.stderr, flush=True)
    hold, _, seconds = os.environ.get("HCJAX_PHASE_DELAY", "").partition(":")
    if hold == name:
        time.sleep(float(seconds))


if __name__ == "__main__":
    guard_imports()                 # an interrupt while the heavy modules import: one line, exit 130/143
    phase("import")

import argparse  # noqa: E402
import json  # noqa: E402
import secrets  # noqa: E402
from pathlib import Path  # noqa: E402

from tqdm import tqdm  # noqa: E402

from hcjax import models as M  # noqa: E402
from hcjax.media import write_video  # noqa: E402
from hcjax.runtime import enable_compilation_cache  # noqa: E402
from hcjax.pipeline import Request, decode, denoise, compile_denoise, prepare, validate_request  # noqa: E402

FROM_MODEL = "default: the model's sample.{}"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--ref-image", default=None, help="reference image of the subject (" + FROM_MODEL.format("ref_image") + ")")
    a("--pos-prompt", default=None, help=FROM_MODEL.format("pos_prompt"))
    a("--neg-prompt", default=None, help=FROM_MODEL.format("neg_prompt"))
    a("--item-name", default=None, help="subject name in '\\nThe {name} looks like<image>' (" +
      FROM_MODEL.format("item_name") + ")")
    a("--input-audio", default=None, help="audio file (audio checkpoint)")
    a("--audio-strength", type=float, default=None, help=FROM_MODEL.format("audio_strength"))
    a("--input-video", default=None, help="video to edit (editing checkpoint)")
    a("--mask-video", default=None, help="mask video of the region to replace (editing checkpoint)")
    a("--expand-scale", type=int, default=None, help=FROM_MODEL.format("expand_scale"))
    a("--video-size", type=int, nargs=2, default=None, metavar=("H", "W"), help=FROM_MODEL.format("video_size"))
    a("--sample-n-frames", type=int, default=None, help="4k+1 frames (" + FROM_MODEL.format("frames") + ")")
    a("--infer-steps", type=int, default=None, help=FROM_MODEL.format("steps"))
    a("--flow-shift-eval-video", type=float, default=None, help=FROM_MODEL.format("flow_shift"))
    a("--cfg-scale", type=float, default=None, help=FROM_MODEL.format("cfg_scale"))
    a("--ip-cfg-scale", type=float, default=None, help="image guidance, image model only; 0 = off (" +
      FROM_MODEL.format("ip_cfg_scale") + ")")
    a("--use-deepcache", type=int, default=None, choices=[0, 1], help=FROM_MODEL.format("use_deepcache"))
    a("--seed", type=int, default=None, help=FROM_MODEL.format("seed"))
    a("--save-path", default="outputs", help="output directory")
    a("--output-name", default=None, help="file name stem (default: <time>_seed<seed>_<random>); never overwrites")
    a("--fps", type=int, default=None, help=FROM_MODEL.format("fps"))
    a("--config", default=None, help="YAML preset with RANDOM weights instead of the demo model (no --ckpt-dir)")
    a("--set", action="append", default=[], metavar="A.B=V", help="config override")
    a("--ckpt-dir", default=None, help="hcjax bundle or original models/ directory")
    a("--use-fp8", action="store_true", help="DiT block linears stored as fp8 (e4m3) + scale, de-quantised per block "
      "inside the scan (= --set dit.use_fp8=true)")
    a("--cpu-offload", action="store_true", help="DiT block weights in host memory, brought to the device one block "
      "at a time (= --set dit.cpu_offload=true)")
    a("--cfg-batch", type=int, default=None, help="guidance branches per DiT pass (1 = one at a time, less memory; "
      "= --set dit.cfg_batch=N)")
    a("--ffn-chunk", type=int, default=None, help="tokens per chunk in the blocks' MLP/modulation (0 = off; "
      "= --set dit.ffn_chunk=N)")
    a("--no-compile-cache", action="store_true", help="do not use the persistent XLA compilation cache "
      "($HCJAX_CACHE_DIR, default ~/.cache/hcjax/xla)")
    a("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def request_from_args(args, sample_cfg) -> Request:
    return Request.from_config(
        sample_cfg, ref_image=args.ref_image, pos_prompt=args.pos_prompt, neg_prompt=args.neg_prompt,
        item_name=args.item_name, video_size=args.video_size, frames=args.sample_n_frames, steps=args.infer_steps,
        flow_shift=args.flow_shift_eval_video, cfg_scale=args.cfg_scale, ip_cfg_scale=args.ip_cfg_scale,
        use_deepcache=None if args.use_deepcache is None else bool(args.use_deepcache), seed=args.seed,
        input_audio=args.input_audio, audio_strength=args.audio_strength, input_video=args.input_video,
        mask_video=args.mask_video, expand_scale=args.expand_scale, fps=args.fps)


def memory_overrides(args) -> list[str]:
    """The low-memory flags as config overrides (they are DiT config fields)."""
    sets = [f"dit.{k}=true" for k in ("use_fp8", "cpu_offload") if getattr(args, k)]
    sets += [f"dit.{k}={getattr(args, k)}" for k in ("cfg_batch", "ffn_chunk") if getattr(args, k) is not None]
    return sets


def output_dir(path: str) -> Path:
    out_dir = Path(path)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--save-path {out_dir} is a file; give a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}-{secrets.token_hex(4)}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--save-path {out_dir} is not writable: {e.strerror or e}") from None
    return out_dir


def reserve_name(out_dir: Path, stem: str | None, seed: int) -> Path:
    """A new ``<stem>.mp4`` path nobody else holds: its ``.json`` is created exclusively here (an existing name is
    an error with --output-name, otherwise a fresh random suffix)."""
    for _ in range(100):
        name = stem or f"{time.strftime('%Y%m%d-%H%M%S')}_seed{seed}_{secrets.token_hex(3)}"
        video = out_dir / f"{name}.mp4"
        try:
            if video.exists():
                raise FileExistsError
            with open(video.with_suffix(".json"), "x"):
                return video
        except FileExistsError:
            if stem:
                raise FileExistsError(f"--output-name {stem}: {video} or its .json already exists in "
                                      f"{out_dir}; choose another name") from None
    raise FileExistsError(f"could not find a free output name in {out_dir}")


def run(args) -> Path:
    for flag, path in (("--ref-image", args.ref_image), ("--input-audio", args.input_audio),
                       ("--input-video", args.input_video), ("--mask-video", args.mask_video)):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path}: file not found")
    out_dir = output_dir(args.save_path)
    enable_compilation_cache(not args.no_compile_cache)
    if args.output_name is not None:
        if not args.output_name or Path(args.output_name).name != args.output_name:
            raise ValueError(f"--output-name {args.output_name!r}: give a plain file name stem (no directories)")
        taken = [f"{args.output_name}{x}" for x in (".mp4", ".json") if (out_dir / f"{args.output_name}{x}").exists()]
        if taken:
            raise FileExistsError(f"--output-name {args.output_name}: {', '.join(taken)} already exists in {out_dir}; "
                                  "choose another name")
    src = M.resolve(args.ckpt_dir, args.config, args.set + memory_overrides(args))
    req = request_from_args(args, src.cfg.sample)
    if req.cfg_scale < 1.0 and req.neg_prompt:
        print("warning: --cfg-scale < 1 disables guidance; --neg-prompt is ignored", file=sys.stderr)
    validate_request(src.cfg, req)                      # fail fast, before any weight is loaded

    phase("load")
    t0 = time.perf_counter()
    models = M.load(src)
    timings = {"load_s": time.perf_counter() - t0}
    phase("prepare")
    prep = prepare(models, req)
    phase("compile")
    t1 = time.perf_counter()
    compile_denoise(models, prep, report_steps=True)
    timings["compile_s"] = time.perf_counter() - t1
    phase("denoise")
    with tqdm(total=len(prep.sigmas) - 1, desc="denoising", unit="step") as bar:
        latents = denoise(models, prep, on_step=lambda i: bar.update(1))
    phase("decode")
    t2 = time.perf_counter()
    frames = decode(models, latents)
    timings.update(prep.timings, vae_decode_s=time.perf_counter() - t2)

    video = reserve_name(out_dir, args.output_name, req.seed)
    settings_file = video.with_suffix(".json")
    try:
        phase("write")
        write_video(video, frames, fps=req.fps, audio_path=req.input_audio, overwrite=False)
        settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in req.__dict__.items()}
        settings.update(frames_written=int(frames.shape[0]), height=int(frames.shape[1]),
                        width=int(frames.shape[2]), ckpt_dir=args.ckpt_dir, config=args.config,
                        config_overrides=args.set, source=src.kind, embedded_default=src.kind == "demo",
                        random_weights=src.kind == "random", timings=timings)
        tmp = settings_file.with_name(f".{settings_file.name}.tmp")
        tmp.write_text(json.dumps(settings, indent=2))
        os.replace(tmp, settings_file)
    except BaseException:
        for f in (video, settings_file, settings_file.with_name(f".{settings_file.name}.tmp")):
            f.unlink(missing_ok=True)
        raise
    total = sum(v for k, v in timings.items() if k in ("load_s", "prepare_s", "compile_s", "denoise_s",
                                                         "vae_decode_s"))
    print(f"wrote {video} ({frames.shape[0]} frames {frames.shape[2]}x{frames.shape[1]}); load "
          f"{timings['load_s']:.1f}s, compile {timings['compile_s']:.1f}s, denoise {timings['denoise_s']:.1f}s "
          f"({timings['s_per_step']:.2f} s/step), total {total:.1f}s")
    return video


def main(argv=None) -> int:
    args = parse(argv)
    return run_cli(lambda: run(args) and 0, debug=args.debug)


if __name__ == "__main__":
    exit_process(main())
