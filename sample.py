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
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import secrets  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
from tqdm import tqdm  # noqa: E402

from hcjax import batching, lora, memory  # noqa: E402
from hcjax import models as M  # noqa: E402
from hcjax import sharding  # noqa: E402
from hcjax.calibrate_cache import default_ratios_path, load_ratios  # noqa: E402
from hcjax.scheduler import CACHE_MODES, DEFAULT_THRESHOLDS  # noqa: E402
from hcjax.conditioning import pose  # noqa: E402
from hcjax.conditioning.video import check_editing_files  # noqa: E402
from hcjax.config import REF_LAYOUTS  # noqa: E402
from hcjax.media import read_image, write_video  # noqa: E402
from hcjax.runtime import enable_compilation_cache, initialize_distributed, is_main_process  # noqa: E402
from hcjax.pipeline import (  # noqa: E402
    MAX_SUBJECTS, Request, compile_denoise, decode_batch, denoise, prepare, validate_request,
)

FROM_MODEL = "default: the model's sample.{}"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--ref-image", nargs="+", default=None, metavar="IMAGE", help="reference image of the subject, or 2-4 images "
      "for several subjects (one per subject; " + FROM_MODEL.format("ref_image") + ")")
    a("--pos-prompt", default=None, help=FROM_MODEL.format("pos_prompt"))
    a("--neg-prompt", default=None, help=FROM_MODEL.format("neg_prompt"))
    a("--item-name", nargs="+", default=None, metavar="NAME", help="subject name in '\\nThe {name} looks "
      "like<image>', one per --ref-image image (" + FROM_MODEL.format("item_name") + ")")
    a("--ref-layout", default=None, choices=REF_LAYOUTS, help="2-4 reference images: 'centre' (each padded to the "
      "whole frame, as released) or 'columns' (image k in the k-th of K columns of a white frame, for a model "
      "trained so; " + FROM_MODEL.format("ref_layout") + ")")
    a("--input-audio", default=None, help="audio file (audio checkpoint)")
    a("--audio-strength", type=float, default=None, help=FROM_MODEL.format("audio_strength"))
    a("--input-video", default=None, help="video to edit (editing checkpoint)")
    a("--mask-video", default=None, help="mask video of the region to replace (editing checkpoint)")
    a("--expand-scale", type=int, default=None, help=FROM_MODEL.format("expand_scale"))
    a("--pose-enhance", action="store_true", help="editing: DWPose skeletons of the input video drawn into the "
      "masked region (human videos; needs the ONNX files in --dwpose-dir)")
    a("--dwpose-dir", default=pose.DEFAULT_DIR, help=f"directory with {pose.DETECTOR_FILE} and {pose.POSE_FILE} "
      "(default: %(default)s)")
    a("--video-size", type=int, nargs=2, default=None, metavar=("H", "W"), help=FROM_MODEL.format("video_size"))
    a("--sample-n-frames", type=int, default=None, help="4k+1 frames (" + FROM_MODEL.format("frames") + ")")
    a("--infer-steps", type=int, default=None, help=FROM_MODEL.format("steps"))
    a("--flow-shift-eval-video", type=float, default=None, help=FROM_MODEL.format("flow_shift"))
    a("--cfg-scale", type=float, default=None, help=FROM_MODEL.format("cfg_scale"))
    a("--ip-cfg-scale", type=float, default=None, help="image guidance, image model only; 0 = off (" +
      FROM_MODEL.format("ip_cfg_scale") + ")")
    a("--use-deepcache", type=int, default=None, choices=[0, 1], help=FROM_MODEL.format("use_deepcache") +
      "; 0 = --cache none")
    a("--cache", default=None, choices=CACHE_MODES, help="step cache: deepcache (the original's fixed schedule at "
      "30 steps; default), teacache / magcache (adaptive: skip the block stacks while the estimated change stays "
      "under --cache-threshold), none (every step in full)")
    a("--cache-threshold", type=float, default=None, help="teacache/magcache threshold (default "
      + ", ".join(f"{k} {v}" for k, v in DEFAULT_THRESHOLDS.items()) + "; 0 = dense; larger = fewer full steps)")
    a("--cache-ratios", default=None, help="magcache: calibrated ratios (default: magcache_ratios.json beside the "
      "weights, written by python -m hcjax.calibrate_cache)")
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
    a("--mesh", type=int, nargs=4, default=None, metavar=("DATA", "FSDP", "SEQ", "TENSOR"),
      help="device mesh degrees (one may be -1: fill). Default on GPU/TPU (or several processes): every device, "
      "on the sequence axis as far as the heads allow, the rest fsdp; in one CPU process: no mesh")
    a("--sequence-parallel", choices=("ulysses", "ring", "auto"), default=None,
      help="how attention splits tokens over the sequence axis (= --set dit.sequence_parallel=...)")
    a("--ulysses-degree", type=int, default=None, help="hybrid sequence parallelism: Ulysses all-to-all in groups "
      "of N devices x ring attention across SEQ/N groups (N = SEQ: Ulysses, 1: ring; = --set dit.ulysses_degree=N)")
    a("--input-json", default=None, help="JSON list of requests: objects whose keys are the per-request flags "
      "(pos_prompt, ref_image (a path or a list of 1-4), item_name, video_size [H, W], sample_n_frames, seed, "
      "cache, output_name, num_images, ...); flags given here are defaults. On a mesh with DATA > 1, same-shape "
      "samples run DATA at a time as one batch")
    a("--num-images", type=int, default=1, help="samples per request, seeds seed, seed+1, ... (DATA of them at "
      "once on a mesh with DATA > 1)")
    a("--coordinator", default=None, metavar="HOST:PORT", help="multi-process: process 0's address (with "
      "--num-processes and --process-id); JAX_COORDINATOR_ADDRESS in the environment works too")
    a("--num-processes", type=int, default=None, help="multi-process: number of processes")
    a("--process-id", type=int, default=None, help="multi-process: this process's index (0 writes the files)")
    a("--distributed", choices=("auto",), default=None, help="auto: jax.distributed on TPU pods / SLURM / Open MPI "
      "(the cluster gives coordinator, count and index)")
    a("--lora", nargs="+", default=[], metavar="FILE", help="LoRA adapter file(s) (hcjax format: train.py with "
      "train.lora, or python -m convert_weights lora); several are summed")
    a("--lora-scale", type=float, nargs="+", default=None, metavar="S", help="strength per --lora file (or one for "
      "all; default 1)")
    a("--lora-mode", choices=("merged", "unmerged"), default="merged", help="merged: W + s*a@b computed once in fp32 "
      "and rounded to the params' dtype (default); unmerged: the adapters run beside the kernels (fp8 base)")
    a("--no-compile-cache", action="store_true", help="do not use the persistent XLA compilation cache "
      "($HCJAX_CACHE_DIR, default ~/.cache/hcjax/xla)")
    a("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def subjects(args) -> tuple:
    """``(ref_image, item_name)`` of the request: one value each for one subject, lists for 2-4 (multi-subject);
    ``ValueError`` when there are more than 4 images or the name count differs from the image count."""
    refs, names = args.ref_image, args.item_name
    refs = refs[0] if isinstance(refs, list) and len(refs) == 1 else refs
    names = names[0] if isinstance(names, list) and len(names) == 1 else names
    k = len(refs) if isinstance(refs, list) else 1
    if k > MAX_SUBJECTS:
        raise ValueError(f"--ref-image takes 1 to {MAX_SUBJECTS} images (one per subject); got {k}")
    n = len(names) if isinstance(names, list) else 1
    if names is not None and n != k:
        raise ValueError(f"--item-name: give one name per --ref-image image; got {n} name(s) for {k} image(s)")
    return refs, names


def request_from_args(args, sample_cfg) -> Request:
    ref_image, item_name = subjects(args)
    return Request.from_config(
        sample_cfg, ref_image=ref_image, pos_prompt=args.pos_prompt, neg_prompt=args.neg_prompt,
        item_name=item_name, video_size=args.video_size, frames=args.sample_n_frames, steps=args.infer_steps,
        flow_shift=args.flow_shift_eval_video, cfg_scale=args.cfg_scale, ip_cfg_scale=args.ip_cfg_scale,
        use_deepcache=None if args.use_deepcache is None else bool(args.use_deepcache), seed=args.seed,
        cache=getattr(args, "cache", None), cache_threshold=getattr(args, "cache_threshold", None),
        input_audio=args.input_audio, audio_strength=args.audio_strength, input_video=args.input_video,
        mask_video=args.mask_video, expand_scale=args.expand_scale, fps=args.fps,
        pose_enhance=args.pose_enhance or None, dwpose_dir=args.dwpose_dir, ref_layout=args.ref_layout)


def memory_overrides(args) -> list[str]:
    """The low-memory flags as config overrides (they are DiT config fields)."""
    sets = [f"dit.{k}=true" for k in ("use_fp8", "cpu_offload") if getattr(args, k)]
    sets += [f"dit.{k}={getattr(args, k)}" for k in ("cfg_batch", "ffn_chunk") if getattr(args, k) is not None]
    return sets


# --input-json keys: the request flags' names (dashes or underscores) -> the value each takes: a type, "HW" (two
# integers), "subjects" (a string or a list of 1..MAX_SUBJECTS strings) or a tuple of the allowed values
JSON_FIELDS = {"ref_image": "subjects", "pos_prompt": str, "neg_prompt": str, "item_name": "subjects",
               "ref_layout": REF_LAYOUTS, "input_audio": str, "audio_strength": float, "input_video": str,
               "mask_video": str, "expand_scale": int, "pose_enhance": bool, "dwpose_dir": str, "video_size": "HW",
               "sample_n_frames": int, "infer_steps": int, "flow_shift_eval_video": float, "cfg_scale": float,
               "ip_cfg_scale": float, "use_deepcache": (0, 1), "cache": tuple(CACHE_MODES), "cache_threshold": float,
               "cache_ratios": str, "seed": int, "fps": int, "output_name": str, "num_images": int}
# the flags that apply to the whole run (model, mesh, processes, outputs directory, ...), not to one request
RUN_FLAGS = {"save_path", "config", "set", "ckpt_dir", "use_fp8", "cpu_offload", "cfg_batch", "ffn_chunk", "mesh",
             "sequence_parallel", "ulysses_degree", "input_json", "coordinator", "num_processes", "process_id",
             "distributed", "lora", "lora_scale", "lora_mode", "no_compile_cache", "debug"}
FILE_FLAGS = {"ref_image": "--ref-image", "input_audio": "--input-audio", "input_video": "--input-video",
              "mask_video": "--mask-video", "cache_ratios": "--cache-ratios"}


def _typed(value, kind, where: str):
    if kind == "HW":
        if not (isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value)):
            raise ValueError(f"{where}: expected [height, width] (two integers); got {value!r}")
        return value
    if kind == "subjects":
        ok = isinstance(value, str) or (isinstance(value, list) and 1 <= len(value) <= MAX_SUBJECTS
                                        and all(isinstance(v, str) for v in value))
        if not ok:
            raise ValueError(f"{where}: expected a string or a list of 1 to {MAX_SUBJECTS} strings (one per "
                             f"subject); got {value!r}")
        return value
    if isinstance(kind, tuple):
        if value not in kind or type(value) is not type(kind[0]):
            raise ValueError(f"{where}: expected one of {', '.join(map(json.dumps, kind))}; got {value!r}")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false; got {value!r}")
        return value
    want = {str: "a string", int: "an integer", float: "a number"}[kind]
    ok = isinstance(value, str) if kind is str else type(value) is int if kind is int else type(value) in (int, float)
    if not ok:
        raise ValueError(f"{where}: expected {want}; got {value!r}")
    return kind(value)


def read_requests(path: str, args) -> list[argparse.Namespace]:
    """``--input-json``: one namespace per entry (the command line's values overridden by the entry's keys); keys
    and value types are checked here, naming the entry's index and field."""
    f = Path(path)
    if not f.is_file():
        raise FileNotFoundError(f"--input-json {f}: file not found")
    try:
        entries = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--input-json {f}: not valid JSON ({e})") from None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"--input-json {f}: expected a non-empty JSON list of request objects")
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"--input-json {f}: request {i}: expected an object of request fields; got {entry!r}")
        ns = argparse.Namespace(**vars(args))
        for key, value in entry.items():
            name = key.replace("-", "_")
            where = f"--input-json {f}: request {i}: field {key!r}"
            if name not in JSON_FIELDS:
                raise ValueError(f"{where} is not a request field (expected one of {sorted(JSON_FIELDS)})")
            setattr(ns, name, None if value is None else _typed(value, JSON_FIELDS[name], where))
        out.append(ns)
    return out


def plan_requests(args, src) -> list[tuple[Request, str | None]]:
    """Every sample of this run as ``(request, output stem or None)``, each request checked as the single-request
    path checks it (files, settings, memory) before any model loads; errors name the JSON entry and field."""
    entries = read_requests(args.input_json, args) if args.input_json else [args]
    jobs = []
    for i, ns in enumerate(entries):
        label = f"--input-json {args.input_json}: request {i}: " if args.input_json else ""
        try:
            if ns.num_images is None or ns.num_images < 1:
                raise ValueError(f"--num-images {ns.num_images} must be >= 1")
            for name, flag in FILE_FLAGS.items():
                for path in (lambda v: v if isinstance(v, list) else [v])(getattr(ns, name)):
                    if path is not None and not Path(path).is_file():
                        raise FileNotFoundError(f"{f'field {name!r}' if label else flag} {path}: file not found")
            if ns.output_name is not None and (not ns.output_name or Path(ns.output_name).name != ns.output_name):
                raise ValueError(f"--output-name {ns.output_name!r}: give a plain file name stem (no directories)")
            req = request_from_args(ns, src.cfg.sample)
            req.guidance()                                  # checks the cache mode / threshold
            if req.cache == "magcache":
                ratios = getattr(ns, "cache_ratios", None) or default_ratios_path(src)
                if ratios is None:
                    raise ValueError("--cache magcache with random weights: pass --cache-ratios FILE")
                req = dataclasses.replace(req, cache_ratios=load_ratios(ratios))
            validate_request(src.cfg, req)
            check_before_load(ns, src, req)
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"{label}{e}") from None
        if req.cfg_scale < 1.0 and req.neg_prompt:
            print(f"warning: {label}--cfg-scale < 1 disables guidance; --neg-prompt is ignored", file=sys.stderr)
        jobs += [(dataclasses.replace(req, seed=req.seed + k), ns.output_name) for k in range(ns.num_images)]
    counts: dict = {}
    for _, stem in jobs:
        counts[stem] = counts.get(stem, 0) + 1
    seen: dict = {}
    named = []
    for req, stem in jobs:
        if stem is not None and counts[stem] > 1:          # one stem for several samples: stem_0, stem_1, ...
            seen[stem] = seen.get(stem, -1) + 1
            stem = f"{stem}_{seen[stem]}"
        named.append((req, stem))
    return named


def mesh_overrides(args) -> list[str]:
    """--sequence-parallel / --ulysses-degree as DiT config overrides."""
    sets = [] if args.sequence_parallel is None else [f"dit.sequence_parallel={args.sequence_parallel}"]
    return sets + ([] if args.ulysses_degree is None else [f"dit.ulysses_degree={args.ulysses_degree}"])


def sampling_mesh(args, cfg):
    """``(mesh, mesh config)`` of this run, ``(None, None)`` for one device: ``--mesh``, else every device on
    GPU/TPU or across processes (one CPU process: its fake host devices share the same cores, so no mesh)."""
    n = jax.device_count()
    if args.mesh is None and (n == 1 or (jax.default_backend() == "cpu" and jax.process_count() == 1)):
        if args.ulysses_degree not in (None, 0, 1):
            raise ValueError(f"--ulysses-degree {args.ulysses_degree} needs a sequence axis: give --mesh")
        return None, None
    mesh_cfg = sharding.mesh_config(args.mesh, cfg.dit, n, rules=cfg.mesh.rules)
    return sharding.make_mesh(mesh_cfg, cfg.dit), mesh_cfg


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


def check_before_load(args, src, req) -> None:
    """Cheap checks before any weight is read: the reference image decodes, the editing videos agree, and the
    memory estimate fits the machine (:mod:`hcjax.memory`)."""
    for image in req.ref_images():
        read_image(image)                              # ValueError naming the file: corrupt, truncated, empty
    if req.input_video is not None:
        check_editing_files(req.input_video, req.mask_video)
    if req.pose_enhance:
        pose.model_files(req.dwpose_dir)               # FileNotFoundError naming the missing ONNX files
    if src.kind == "random":
        text = Path(args.config).read_text(errors="replace")
        empty = not any(ln.strip() and not ln.lstrip().startswith("#") for ln in text.splitlines())
        what = f"--config {args.config} with random weights" + (
            " (the file is empty: the built-in defaults, the full-size model)" if empty else "")
    else:
        what = "the demo model" if src.kind == "demo" else f"--ckpt-dir {args.ckpt_dir}"
    h, w = req.video_size
    _, mesh_cfg = sampling_mesh(args, src.cfg)         # on a mesh: per-device shares (None: one device)
    memory.check(memory.request_estimate(src.cfg, req, random_weights=src.kind == "random", mesh=mesh_cfg),
                 f"{what} at {req.frames} frames {w}x{h}",
                 "try a smaller --video-size / --sample-n-frames, --cfg-batch 1, --ffn-chunk N, or a smaller model")


def write_outputs(out_dir: Path, stem: str | None, req: Request, frames, timings: dict, args, src,
                  extra: dict) -> Path:
    """The MP4 and its settings JSON (atomically; nothing partial is left on an error or interrupt)."""
    video = reserve_name(out_dir, stem, req.seed)
    settings_file = video.with_suffix(".json")
    try:
        phase("write")
        write_video(video, frames, fps=req.fps, audio_path=req.input_audio, overwrite=False)
        settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in req.__dict__.items()}
        settings.update(frames_written=int(frames.shape[0]), height=int(frames.shape[1]),
                        width=int(frames.shape[2]), ckpt_dir=args.ckpt_dir, config=args.config,
                        config_overrides=args.set, source=src.kind, embedded_default=src.kind == "demo",
                        random_weights=src.kind == "random", **extra, timings=timings)
        tmp = settings_file.with_name(f".{settings_file.name}.tmp")
        tmp.write_text(json.dumps(settings, indent=2))
        os.replace(tmp, settings_file)
    except BaseException:
        for f in (video, settings_file, settings_file.with_name(f".{settings_file.name}.tmp")):
            f.unlink(missing_ok=True)
        raise
    return video


def run(args) -> list[Path]:
    initialize_distributed(args.coordinator, args.num_processes, args.process_id, auto=args.distributed == "auto")
    main = is_main_process()                            # only process 0 writes files
    enable_compilation_cache(not args.no_compile_cache)
    src = M.resolve(args.ckpt_dir, args.config, args.set + memory_overrides(args) + mesh_overrides(args))
    jobs = plan_requests(args, src)                     # every request checked before any weight is loaded
    out_dir = output_dir(args.save_path) if main else Path(args.save_path)
    for stem in {s for _, s in jobs if s is not None}:
        taken = [f"{stem}{x}" for x in (".mp4", ".json") if (out_dir / f"{stem}{x}").exists()]
        if taken:
            raise FileExistsError(f"--output-name {stem}: {', '.join(taken)} already exists in {out_dir}; "
                                  "choose another name")
    mesh, mesh_cfg = sampling_mesh(args, src.cfg)
    placement = {} if mesh is None else {"mesh": dict(mesh.shape), "processes": jax.process_count(),
                                         "sequence_parallel": src.cfg.dit.sequence_parallel,
                                         "ulysses_degree": src.cfg.dit.ulysses_degree}

    phase("load")
    t0 = time.perf_counter()
    models = M.load(src, mesh=mesh, mesh_cfg=mesh_cfg)
    if args.lora:
        models.dit = lora.for_sampling(models.dit, args.lora, args.lora_scale, args.lora_mode)
        placement = dict(placement, lora=list(args.lora), lora_scale=args.lora_scale, lora_mode=args.lora_mode)
    load_s = time.perf_counter() - t0
    written = []
    unmerged = args.lora and args.lora_mode == "unmerged"

    def prepared():
        for req, stem in jobs:
            phase("prepare")
            yield prepare(models, req), (req, stem)

    # on a mesh with data > 1, same-shape samples run D at a time as one batch (hcjax.batching)
    for n, group in enumerate(batching.groups(models, prepared())):
        timings = {"load_s": load_s if n == 0 else 0.0}
        prep = batching.stack(models, [p for p, _ in group])
        phase("compile")
        t1 = time.perf_counter()
        with lora.lora_scope() if unmerged else contextlib.nullcontext():
            compile_denoise(models, prep, report_steps=True)      # unmerged: traced with the LoRA interceptor
        timings["compile_s"] = time.perf_counter() - t1
        phase("denoise")
        with tqdm(total=len(prep.sigmas) - 1, desc="denoising", unit="step", disable=not main) as bar:
            latents = denoise(models, prep, on_step=lambda i: bar.update(1))
        phase("decode")
        t2 = time.perf_counter()
        videos = decode_batch(models, latents[:len(group)])
        timings.update(prep.timings, vae_decode_s=time.perf_counter() - t2)
        if not main:
            continue
        for (own, (req, stem)), frames in zip(group, videos):
            sample_timings = dict(timings, prepare_s=own.timings.get("prepare_s", timings.get("prepare_s")))
            video = write_outputs(out_dir, stem, req, frames, sample_timings, args, src, placement)
            written.append(video)
            total = sum(v for k, v in sample_timings.items()
                        if k in ("load_s", "prepare_s", "compile_s", "denoise_s", "vae_decode_s"))
            print(f"wrote {video} ({frames.shape[0]} frames {frames.shape[2]}x{frames.shape[1]}); load "
                  f"{timings['load_s']:.1f}s, compile {timings['compile_s']:.1f}s, denoise "
                  f"{timings['denoise_s']:.1f}s ({timings['s_per_step']:.2f} s/step"
                  f"{f', {len(group)} samples at once' if len(group) > 1 else ''}), total {total:.1f}s")
    return written


def main(argv=None) -> int:
    args = parse(argv)
    return run_cli(lambda: run(args) and 0 or 0, debug=args.debug)



if __name__ == "__main__":
    exit_process(main())
