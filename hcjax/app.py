"""The web app: ``python -m hcjax.app [--ckpt-dir DIR] [--config PRESET] [--set A.B=V] [--mesh ...] [--port N]``.

A Gradio page over ONE loaded model (:func:`hcjax.models.load`, the embedded demo model with no flags) whose
compiled denoise loops (cached by :mod:`hcjax.pipeline` per settings and shape) serve every request. Generation
requests go through one queue slot (Gradio queue, concurrency 1 across all tabs) and a lock, so two requests never
run on the device at once. Every upload is checked by the app itself (:func:`hcjax.media.read_image`,
``read_audio``, ``probe``, the editing checks), on upload and again on Generate; a problem is shown in the tab,
naming the file and what is wrong, and the server keeps running.

Page contract (tests and users' scripts rely on it): tabs "Reference image", "Multi-subject", "Audio", "Editing";
in each the mode's inputs, textboxes labelled "Prompt" and "Negative prompt", a "Generate" button, progress through
``gr.Progress`` (phases, then one tick per denoise step), the result as a ``gr.Video`` labelled "Result" (with
the audio track in the Audio tab), the tab's message box (``#<mode>-status``) and a "Download" file list (MP4 +
settings JSON). Below the tabs: "Past outputs" (a gallery of this session's videos) with the selected one's
settings JSON. Settings default from the model's ``sample:`` section; a mode the loaded model does not support
says so in its tab.
"""


import argparse
import dataclasses
import json
import os
import queue
import secrets
import sys
import threading
import time
from pathlib import Path

import jax

from hcjax import models as M
from hcjax import pipeline as P
from hcjax import sharding
from hcjax.cli import exit_process, run_cli
from hcjax.conditioning import pose
from hcjax.conditioning.video import check_editing_files
from hcjax.config import REF_LAYOUTS
from hcjax.media import probe, read_audio, read_image, write_video
from hcjax.runtime import enable_compilation_cache

MODES = {"image": "Reference image", "multi": "Multi-subject", "audio": "Audio", "editing": "Editing"}
IMAGE_TYPES = [".png", ".jpg", ".jpeg", ".webp", ".bmp"]
SUBJECT_SLOTS = 4                     # reference image inputs of the Multi-subject tab
UPLOADS = {"ref_image": "image", **{f"ref_{i}": "image" for i in range(SUBJECT_SLOTS)},     # input key -> kind
           "input_audio": "audio", "input_video": "video", "mask_video": "video"}


class UploadError(ValueError):
    """A user's file cannot be used (message names the file and the problem)."""


def file_problem(label: str, path: str | None, kind: str) -> str | None:
    """Check one upload (``kind``: image | audio | video); a message naming it, or None when it is fine."""
    if not path:
        return None
    name = Path(path).name
    try:
        if kind == "image":
            read_image(path)
        elif kind == "audio":
            if not read_audio(path).size:
                raise ValueError("no audio samples")
        else:
            probe(path)
    except (ValueError, OSError) as e:
        reason = str(e).replace(str(path), name)
        return f"{label} “{name}” cannot be used: {reason}"
    return None


@dataclasses.dataclass
class Output:
    video: Path
    settings: dict


class Engine:
    """The loaded model, the output directory and the history; :meth:`run` is the one generation path."""

    def __init__(self, src: M.Source, models: P.Models, out_dir: Path, dwpose_dir: str = pose.DEFAULT_DIR):
        self.src, self.models, self.cfg = src, models, models.cfg
        self.out_dir, self.dwpose_dir = Path(out_dir), dwpose_dir
        self.lock = threading.Lock()
        self.history: list[Output] = []

    def mode_problem(self, mode: str) -> str | None:
        """Why the loaded model cannot run ``mode`` (shown in its tab), or None."""
        d = self.cfg.dit
        kind = "audio" if d.audio_condition else "editing" if d.video_condition else "image"
        need = {"image": "image", "multi": "image", "audio": "audio", "editing": "editing"}[mode]
        if need != kind:
            return (f"The loaded model is the {kind} model; the {MODES[mode]} tab needs the {need} checkpoint "
                    f"(start the app with --ckpt-dir pointing at it).")
        if mode == "multi" and getattr(P, "MAX_SUBJECTS", 1) < 2:
            return "Multi-subject sampling is not available in this version of the pipeline (one reference only)."
        return None

    def request(self, mode: str, fields: dict) -> P.Request:
        """Check the mode and the uploads, then build and validate the request (defaults: the model's sample:)."""
        problem = self.mode_problem(mode)
        if problem:
            raise UploadError(problem)
        uploads = [(f"Reference image {i + 1}" if mode == "multi" else "Reference image", p, "image")
                   for i, p in enumerate(fields.get("ref_image") or [] if mode == "multi"
                                         else [fields.get("ref_image")])]
        uploads += [("Audio", fields.get("input_audio"), "audio"), ("Input video", fields.get("input_video"), "video"),
                    ("Mask video", fields.get("mask_video"), "video")]
        problems = [m for m in (file_problem(*u) for u in uploads) if m]
        if problems:
            raise UploadError("\n\n".join(problems))
        if mode == "multi":
            names = list(fields.get("item_name") or []) + [""] * SUBJECT_SLOTS
            pairs = [(p, n) for p, n in zip(fields.get("ref_image") or [], names) if p]
            if not pairs:
                raise UploadError("Multi-subject: upload at least one reference image")
            fields = dict(fields, ref_image=[p for p, _ in pairs],
                          item_name=[n.strip() or self.cfg.sample.item_name for _, n in pairs])
        elif not fields.get("ref_image"):
            fields = dict(fields, ref_image=None)              # the model's default reference
        if mode == "audio" and not fields.get("input_audio"):
            raise UploadError("Audio: upload an audio file")
        if mode == "editing":
            if not fields.get("input_video") or not fields.get("mask_video"):
                raise UploadError("Editing: upload the input video and the mask video")
            try:
                check_editing_files(fields["input_video"], fields["mask_video"])
            except (ValueError, OSError) as e:
                msg = str(e)
                for k in ("input_video", "mask_video"):
                    msg = msg.replace(str(fields[k]), Path(fields[k]).name)
                raise UploadError(f"Editing videos: {msg}") from None
            if fields.get("pose_enhance"):
                pose.model_files(self.dwpose_dir)              # FileNotFoundError naming the missing ONNX files
                fields = dict(fields, dwpose_dir=self.dwpose_dir)
        req = P.Request.from_config(self.cfg.sample, **fields)
        P.validate_request(self.cfg, req)
        return req

    def run(self, req: P.Request, mode: str, on_step=None, on_phase=None) -> Output:
        """prepare -> compile -> denoise (``on_step(i)`` per step) -> decode -> MP4 + settings JSON, one at a time."""
        note = on_phase or (lambda name: None)
        with self.lock:
            timings = {}
            note("prepare")
            prep = P.prepare(self.models, req)
            note("compile")
            t = time.perf_counter()
            P.compile_denoise(self.models, prep, report_steps=True)
            timings["compile_s"] = time.perf_counter() - t
            note("denoise")
            latents = P.denoise(self.models, prep, on_step=on_step or (lambda i: None))
            note("decode")
            t = time.perf_counter()
            frames = P.decode(self.models, latents)
            timings.update(prep.timings, vae_decode_s=time.perf_counter() - t)
            note("write")
            return self._write(req, mode, frames, timings)

    def _write(self, req: P.Request, mode: str, frames, timings: dict) -> Output:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{time.strftime('%Y%m%d-%H%M%S')}_{mode}_seed{req.seed}_{secrets.token_hex(3)}"
        video = write_video(self.out_dir / f"{stem}.mp4", frames, fps=req.fps, audio_path=req.input_audio,
                            overwrite=False)
        settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(req).items()}
        settings.update(mode=mode, frames_written=int(frames.shape[0]), height=int(frames.shape[1]),
                        width=int(frames.shape[2]), source=self.src.kind,
                        ckpt_dir=None if self.src.path is None else str(self.src.path),
                        random_weights=self.src.kind == "random", timings=timings)
        tmp = video.with_name(f".{stem}.json.tmp")
        tmp.write_text(json.dumps(settings, indent=2))
        os.replace(tmp, video.with_suffix(".json"))
        out = Output(video, settings)
        self.history.insert(0, out)
        return out


# ------------------------------------------------------------------------------------------- the page


def _settings_inputs(gr, sc, mode: str) -> dict:
    """The sampling settings of one tab (defaults: the model's sample: section)."""
    c = {}
    with gr.Row():
        if mode != "editing":                       # editing takes size and length from the input video
            c["height"] = gr.Number(sc.video_size[0], label="Height", precision=0, step=16, minimum=16)
            c["width"] = gr.Number(sc.video_size[1], label="Width", precision=0, step=16, minimum=16)
            c["frames"] = gr.Number(sc.frames, label="Frames (4k+1)", precision=0, step=4, minimum=1)
        c["steps"] = gr.Number(sc.steps, label="Steps", precision=0, minimum=1)
        c["seed"] = gr.Number(sc.seed, label="Seed", precision=0)
        c["fps"] = gr.Number(sc.fps, label="FPS", precision=0, minimum=1)
    with gr.Row():
        c["cfg_scale"] = gr.Number(sc.cfg_scale, label="Guidance scale")
        if mode in ("image", "multi"):
            c["ip_cfg_scale"] = gr.Number(sc.ip_cfg_scale, label="Image guidance scale (0 = off)")
        c["flow_shift"] = gr.Number(sc.flow_shift, label="Flow shift")
        c["use_deepcache"] = gr.Checkbox(sc.use_deepcache, label="Step cache (DeepCache)")
        if mode == "multi":                         # as sample.py --ref-layout; the model's own layout by default
            c["ref_layout"] = gr.Radio(list(REF_LAYOUTS), value=sc.ref_layout, label="Reference layout",
                                       info="centre: each reference padded to the frame (the release); columns: "
                                            "reference k in the k-th column (models trained so, e.g. the demo)")
        if mode == "audio":
            c["audio_strength"] = gr.Number(sc.audio_strength, label="Audio strength")
        if mode == "editing":
            c["expand_scale"] = gr.Number(sc.expand_scale, label="Mask expand (px)", precision=0)
            c["pose_enhance"] = gr.Checkbox(False, label="Pose enhance (DWPose skeletons in the mask)")
    for key, comp in c.items():
        comp.elem_id = f"{mode}-{key}"
    return c


def _fields(mode: str, data: dict, comps: dict) -> dict:
    """Component values -> request fields."""
    v = {k: data[c] for k, c in comps.items()}
    f = dict(pos_prompt=v.pop("prompt"), neg_prompt=v.pop("negative"), steps=v.pop("steps"), seed=v.pop("seed"),
             fps=v.pop("fps"), cfg_scale=v.pop("cfg_scale"), flow_shift=v.pop("flow_shift"),
             use_deepcache=bool(v.pop("use_deepcache")))
    if "height" in v:
        f.update(video_size=(int(v.pop("height")), int(v.pop("width"))), frames=v.pop("frames"))
    if mode == "multi":
        f.update(ref_image=[v.pop(f"ref_{i}") for i in range(SUBJECT_SLOTS)],
                 item_name=[v.pop(f"name_{i}") or "" for i in range(SUBJECT_SLOTS)])
    for k, x in v.items():
        f[k] = x
    for k in ("steps", "seed", "fps", "frames", "expand_scale"):
        if f.get(k) is not None:
            f[k] = int(f[k])
    return {k: x for k, x in f.items() if x is not None and x != ""}


def build(engine: Engine):
    """The Gradio Blocks of the page contract (module docstring)."""
    import gradio as gr

    sc = engine.cfg.sample
    with gr.Blocks(title="hcjax — HunyuanCustom") as page:
        gr.Markdown(f"## HunyuanCustom (hcjax) — model: {engine.src.kind}"
                    + ("" if engine.src.path is None else f" `{engine.src.path}`"))
        tab_parts = {}
        with gr.Tabs():
            for mode, title in MODES.items():
                with gr.Tab(title, id=mode):
                    problem = engine.mode_problem(mode)
                    gr.Markdown(f"**Not available with this model.** {problem}" if problem else "",
                                elem_id=f"{mode}-support", visible=bool(problem))
                    comps = {}
                    with gr.Row():
                        with gr.Column():
                            if mode == "multi":
                                for i in range(SUBJECT_SLOTS):
                                    with gr.Row():
                                        comps[f"ref_{i}"] = gr.File(label=f"Reference image {i + 1}",
                                                                    file_types=IMAGE_TYPES, type="filepath",
                                                                    elem_id=f"{mode}-ref-{i + 1}")
                                        comps[f"name_{i}"] = gr.Textbox(label=f"Name {i + 1}",
                                                                        placeholder=sc.item_name)
                            else:
                                comps["ref_image"] = gr.File(label="Reference image", file_types=IMAGE_TYPES,
                                                             type="filepath", elem_id=f"{mode}-ref")
                                comps["item_name"] = gr.Textbox(sc.item_name, label="Item name")
                            if mode == "audio":
                                comps["input_audio"] = gr.File(label="Audio", type="filepath", elem_id="audio-file",
                                                               file_types=["audio", ".wav", ".mp3", ".flac"])
                            if mode == "editing":
                                comps["input_video"] = gr.File(label="Input video", type="filepath",
                                                               file_types=["video", ".mp4"], elem_id="editing-video")
                                comps["mask_video"] = gr.File(label="Mask video", type="filepath",
                                                              file_types=["video", ".mp4"], elem_id="editing-mask")
                            comps["prompt"] = gr.Textbox(sc.pos_prompt, label="Prompt", lines=2,
                                                         elem_id=f"{mode}-prompt")
                            comps["negative"] = gr.Textbox(sc.neg_prompt, label="Negative prompt", lines=1,
                                                           elem_id=f"{mode}-negative")
                            comps.update(_settings_inputs(gr, sc, mode))
                            button = gr.Button("Generate", variant="primary", elem_id=f"{mode}-generate")
                        with gr.Column():
                            status = gr.Markdown("", elem_id=f"{mode}-status")
                            video = gr.Video(label="Result", elem_id=f"{mode}-video", interactive=False,
                                             autoplay=False)
                            download = gr.File(label="Download", file_count="multiple", interactive=False,
                                               elem_id=f"{mode}-download")
                    tab_parts[mode] = (comps, button, status, video, download)
        gr.Markdown("### Past outputs")
        with gr.Row():
            gallery = gr.Gallery(label="Past outputs", columns=5, height=240, elem_id="history", allow_preview=True,
                                 fit_columns=False)
            with gr.Column():
                chosen_json = gr.JSON(label="Settings", elem_id="history-settings")
                chosen_files = gr.File(label="Download selected", file_count="multiple", interactive=False)

        def gallery_items():
            return [(str(o.video), f"{o.settings['mode']} · seed {o.settings['seed']}") for o in engine.history]

        def on_select(evt: gr.SelectData):
            o = engine.history[evt.index] if 0 <= evt.index < len(engine.history) else None
            return (None, None) if o is None else (o.settings, [str(o.video), str(o.video.with_suffix(".json"))])

        gallery.select(on_select, None, [chosen_json, chosen_files], concurrency_limit=None)

        for mode, (comps, button, status, video, download) in tab_parts.items():
            for key, comp in comps.items():
                if key in UPLOADS:
                    comp.upload(_checker(comp.label, UPLOADS[key]), comp, status, concurrency_limit=None)
            button.click(_handler(gr, engine, mode, comps, gallery_items), set(comps.values()),
                         [status, video, download, gallery], concurrency_limit=1, concurrency_id="generate")
        page.load(gallery_items, None, gallery)
    return page


def _checker(label: str, kind: str):
    def check(path):
        return file_problem(label, path, kind) or ""
    return check


def _handler(gr, engine: Engine, mode: str, comps: dict, gallery_items):
    def handler(data, progress=gr.Progress()):
        return _generate(engine, mode, data, comps, progress) + (gallery_items(),)
    return handler


PHASES = {"prepare": "encoding the reference, text and inputs", "compile": "compiling (first run of these settings)",
          "denoise": "denoising", "decode": "decoding", "write": "writing the video"}


def _generate(engine: Engine, mode: str, data: dict, comps: dict, progress) -> tuple:
    """One Generate click: checks, then :meth:`Engine.run` in a worker thread while this thread reports its
    progress (phases, then one tick per denoise step). Returns (message, video, files)."""
    try:
        req = engine.request(mode, _fields(mode, data, comps))
    except (ValueError, FileNotFoundError) as e:
        return f"⚠️ {e}", None, None
    events: queue.Queue = queue.Queue()
    box: dict = {}

    def work():
        try:
            box["out"] = engine.run(req, mode, on_step=lambda i: events.put(("step", i)),
                                    on_phase=lambda p: events.put(("phase", p)))
        except BaseException as e:          # reported in the page; the server keeps running
            box["error"] = e
        finally:
            events.put(("done", None))

    worker = threading.Thread(target=work, name=f"hcjax-{mode}", daemon=True)
    worker.start()
    steps = req.steps
    progress(0.0, desc="waiting")
    while True:
        kind, value = events.get()
        if kind == "done":
            break
        if kind == "phase":
            progress(None if value != "denoise" else (0, steps), desc=PHASES[value],
                     unit="steps" if value == "denoise" else "")
        else:
            progress((value + 1, steps), desc="denoising", unit="steps")
    worker.join()
    if "error" in box:
        e = box["error"]
        print(f"hcjax.app: {mode} request failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return f"⚠️ {e}", None, None
    out = box["out"]
    s = out.settings
    msg = (f"Done: {s['frames_written']} frames {s['width']}x{s['height']} at {req.fps} fps, seed {req.seed}, "
           f"{req.steps} steps (denoise {s['timings'].get('denoise_s', 0):.1f}s). Saved `{out.video.name}`.")
    return msg, str(out.video), [str(out.video), str(out.video.with_suffix(".json"))]


# ------------------------------------------------------------------------------------------- command line


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m hcjax.app", description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--ckpt-dir", default=None, help="hcjax bundle or original models/ directory (default: the embedded demo model)")
    a("--config", default=None, help="YAML preset with RANDOM weights instead of the demo model (no --ckpt-dir)")
    a("--set", action="append", default=[], metavar="A.B=V", help="config override")
    a("--mesh", type=int, nargs=4, default=None, metavar=("DATA", "FSDP", "SEQ", "TENSOR"),
      help="device mesh degrees (one may be -1: fill); default: one device")
    a("--port", type=int, default=7860, help="HTTP port (default %(default)s)")
    a("--host", default="127.0.0.1", help="address to listen on (default %(default)s; 0.0.0.0 for all)")
    a("--save-path", default="outputs/app", help="directory of the generated videos and settings JSON")
    a("--dwpose-dir", default=pose.DEFAULT_DIR, help="Editing tab's pose enhance: directory with "
      f"{pose.DETECTOR_FILE} and {pose.POSE_FILE} (default %(default)s)")
    a("--no-compile-cache", action="store_true", help="do not use the persistent XLA compilation cache")
    a("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def serve(args) -> None:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ValueError("the web app needs gradio: pip install -e '.[app]'") from None
    enable_compilation_cache(not args.no_compile_cache)
    src = M.resolve(args.ckpt_dir, args.config, args.set)
    mesh = mesh_cfg = None
    if args.mesh is not None:
        mesh_cfg = sharding.mesh_config(args.mesh, src.cfg.dit, jax.device_count(), rules=src.cfg.mesh.rules)
        mesh = sharding.make_mesh(mesh_cfg, src.cfg.dit)
    out_dir = Path(args.save_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"hcjax.app: loading the {src.kind} model ...", file=sys.stderr, flush=True)
    models = M.load(src, mesh=mesh, mesh_cfg=mesh_cfg)
    engine = Engine(src, models, out_dir, args.dwpose_dir)
    page = build(engine)
    page.queue(default_concurrency_limit=1)
    print(f"hcjax.app: serving on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    page.launch(server_name=args.host, server_port=args.port, allowed_paths=[str(out_dir.resolve())],
                show_error=True, quiet=True, footer_links=[], prevent_thread_lock=True)
    try:
        while True:                  # Ctrl-C / SIGTERM end here: run_cli's one line and exit 130 / 143
            time.sleep(0.5)
    finally:
        page.close()


def main(argv=None) -> int:
    args = parse(argv)
    return run_cli(lambda: serve(args), debug=args.debug, name="hcjax.app")


if __name__ == "__main__":
    exit_process(main())
