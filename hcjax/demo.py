"""The demo model: ``python -m hcjax.demo build --workdir RUN`` recreates ``assets/demo/model`` from nothing.

Stages (each skipped when its output in ``RUN`` exists, so an interrupted build continues):

1. ``data``   synthetic subject clips (:mod:`hcjax.data.synthetic`) of the training subjects only; the
              :data:`HELD_OUT` subjects never appear in training (they are the evaluation set);
2. ``text``   the text towers: a LLaVA BPE tokenizer trained on the prompt template and the synthetic captions,
              the bundled char-level CLIP tokenizer, and seeded random (frozen) LLaVA / CLIP text weights;
3. ``vae``    the 3D causal VAE trained from scratch (``train.py --stage vae``), then ``vae_finetune``: a second
              run from those weights (``vae_train.finetune_steps``, a warm restart with a fresh optimizer);
4. ``latents`` ``python -m hcjax.precompute`` with that VAE and those text towers;
5. ``dit``    ``train.py`` (flow matching) on the cached latents;
6. ``bundle`` an hcjax bundle (``dit/ vae/ llava/ clip/``) written to ``--out`` (default ``assets/demo/model``).

The evaluation (``benchmarks/demo_eval.py``) generates one video per held-out ``(reference, prompt)`` pair and
measures identity (the subject's colour and silhouette match its own reference better than every other held-out
reference), motion (the subject's centroid moves in the prompted direction) and temporal consistency.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from .config import Config, load_config
from .data import synthetic

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
DEMO_DIR = ROOT / "assets" / "demo"
DEMO_BUNDLE = DEMO_DIR / "model"

SUBJECTS = [(c, t, s) for c in synthetic.COLORS for t in synthetic.TEXTURES for s in synthetic.SHAPES]
HELD_OUT = [SUBJECTS[i] for i in sorted(np.random.default_rng(2026).choice(len(SUBJECTS), 24, replace=False))]
TRAIN_SUBJECTS = [s for s in SUBJECTS if s not in HELD_OUT]
PHRASES = {"left": ("left", "to the left"), "right": ("right", "to the right"),
           "up": ("up", "upward"), "down": ("down", "downward")}
# no template names the subject: the text carries the motion only, the DiT must take the subject's look from the
# reference image (as at evaluation, where the prompt is EVAL_PROMPT and the subject was never seen)
TEMPLATES = ("the object moves {p}", "an object moves {p} across a gray background", "the object is moving {p}",
             "an object, moving {p}")
EVAL_PROMPT = "the object moves {p}"
FRAMES, SIZE, REF_RADIUS = 9, 64, 14.0
TRAVEL = 0.5       # the subject crosses half the frame in a clip (less motion per 4-frame latent for the VAE)


def subject_name(subject) -> str:
    return " ".join(subject)


def caption(rng: np.random.Generator, direction: str) -> tuple[str, str]:
    """A random caption (one of :data:`TEMPLATES`) and the item name for a subject moving in ``direction``."""
    p = PHRASES[direction][rng.integers(2)]
    return TEMPLATES[rng.integers(len(TEMPLATES))].format(p=p), "object"


def reference_image(subject, size: int = SIZE) -> np.ndarray:
    """The subject centred on white, as the dataset's reference images."""
    color, texture, shape = subject
    white = np.full((size, size, 3), 255, np.float32)
    return synthetic.render(shape, texture, synthetic.COLORS[color], size / 2, size / 2, REF_RADIUS * size / 64,
                            size, size, white)


def _pair(i: int, subject, ref_image: Path) -> dict:
    """Evaluation pair ``i``: the subject, a direction (cycling over the four) and the eval prompt."""
    d = list(synthetic.DIRECTIONS)[i % 4]
    return {"index": i, "subject": subject, "direction": d, "prompt": EVAL_PROMPT.format(p=PHRASES[d][1]),
            "ref_image": ref_image}


def eval_pairs() -> list[dict]:
    """The held-out evaluation set: each held-out subject with one direction (cycling) and the eval prompt."""
    return [_pair(i, s, DEMO_DIR / f"subject_{i:02d}.png") for i, s in enumerate(HELD_OUT)]


def seen_pairs(ref_dir: Path, n: int = 24, seed: int = 5) -> list[dict]:
    """``n`` training subjects in the layout of :func:`eval_pairs` (eval prompt, cycling directions), references
    written to ``ref_dir``. The model saw these subjects (never these videos): scoring them separates what the DiT
    fits from what it generalises to the held-out subjects."""
    from PIL import Image

    ref_dir.mkdir(parents=True, exist_ok=True)
    picks = sorted(np.random.default_rng(seed).choice(len(TRAIN_SUBJECTS), n, replace=False))
    pairs = [_pair(i, TRAIN_SUBJECTS[k], ref_dir / f"seen_{i:02d}.png") for i, k in enumerate(picks)]
    for p in pairs:
        Image.fromarray(reference_image(p["subject"])).save(p["ref_image"])
    return pairs


def write_eval_references(out: Path = DEMO_DIR) -> list[Path]:
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for p in eval_pairs():
        path = out / p["ref_image"].name
        Image.fromarray(reference_image(p["subject"])).save(path)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------- build stages


def make_dataset(out: Path, num_clips: int, seed: int = 0) -> Path:
    """Training clips of :data:`TRAIN_SUBJECTS` only, with varied captions (layout of :mod:`hcjax.data.synthetic`)."""
    from PIL import Image

    from .data.video_io import write_mp4

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for i in range(num_clips):
        rng = np.random.default_rng([seed, i])
        subject = TRAIN_SUBJECTS[rng.integers(len(TRAIN_SUBJECTS))]
        video, ref, meta = synthetic.make_clip(rng, FRAMES, SIZE, SIZE, subject=subject, travel=TRAVEL)
        meta["caption"], meta["item_name"] = caption(rng, meta["motion"])
        stem = f"clip_{i:04d}"
        Image.fromarray(ref).save(tmp / f"{stem}_ref.png")
        write_mp4(tmp / f"{stem}.mp4", video, fps=8)
        meta["ref_image"] = f"{stem}_ref.png"
        (tmp / f"{stem}.json").write_text(json.dumps(meta, indent=1))
    tmp.replace(out)
    return out


def tokenizer_corpus() -> list[str]:
    """The captions (many times, so that their words become single tokens) + the template head and tail once."""
    from .conditioning.llava import PROMPT_TEMPLATE

    caps = [t.format(p=p) + f"\nThe {n} looks like"
            for _ in SUBJECTS for t in TEMPLATES for d in PHRASES for p in PHRASES[d] for n in ("object", "person")]
    return caps + [PROMPT_TEMPLATE.format("") + "\nThe person looks like"]


def make_llava_tokenizer(out: Path, base_vocab: int = 500, corpus=None) -> Path:
    """Llama-3-style byte-level BPE (BOS via the post-processor) trained on ``corpus`` (default: the template and
    the demo captions), ``<image>`` = ``base_vocab`` and ``<pad>`` = ``base_vocab + 1``; saved as a transformers
    fast tokenizer. The tests' tiny tokenizers are built with it too."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=base_vocab, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(tokenizer_corpus() if corpus is None else corpus, trainer)
    if tok.get_vocab_size() < base_vocab:
        tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(base_vocab - tok.get_vocab_size())])
    tok.add_special_tokens(["<image>", "<pad>"])
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                   eos_token="<|end_of_text|>", pad_token="<pad>")
    fast.save_pretrained(str(out))
    return out


def crop_start(tokenizer) -> int:
    """Tokens before the user text: BOS + system part + user header of the template."""
    from .conditioning.llava import PROMPT_TEMPLATE

    head = PROMPT_TEMPLATE.split("{}")[0]
    marker = "Zq"     # any text: the head must tokenise identically with and without it
    ids = tokenizer(head + marker)["input_ids"]
    n = len(tokenizer(head)["input_ids"])
    if ids[:n] != tokenizer(head)["input_ids"]:
        raise ValueError("the demo tokenizer merges the template head with the user text")
    return n


def make_text_towers(cfg: Config, out: Path, seed: int = 7) -> tuple[Path, Path]:
    """``out/llava`` and ``out/clip``: tokenizers + seeded random weights as hcjax checkpoints."""
    from transformers import AutoTokenizer

    from .checkpoint import save_params
    from .conditioning import clip, llava
    from .models import TINY_TOKENIZERS
    from .precompute import random_params

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    make_llava_tokenizer(tmp / "llava.tok")
    tok = AutoTokenizer.from_pretrained(str(tmp / "llava.tok"), local_files_only=True)
    n = crop_start(tok)
    if n != cfg.llava.crop_start:
        raise ValueError(f"the demo tokenizer has crop_start {n} but the config says llava.crop_start="
                         f"{cfg.llava.crop_start}; set it to {n} in configs/demo.yaml")
    save_params(tmp / "llava", random_params(llava.abstract_params(cfg), seed), cfg)
    save_params(tmp / "clip", random_params(clip.abstract_text_params(cfg.clip_text), seed + 1), cfg)
    for f in (tmp / "llava.tok").iterdir():
        shutil.copy2(f, tmp / "llava" / f.name)
    for f in (TINY_TOKENIZERS / "clip").iterdir():
        shutil.copy2(f, tmp / "clip" / f.name)
    shutil.rmtree(tmp / "llava.tok")
    tmp.replace(out)
    return out / "llava", out / "clip"


def _stage(name: str, done: Path, fn, print_fn) -> None:
    if done.exists():
        print_fn(f"[{name}] exists: {done}")
        return
    t0 = time.perf_counter()
    print_fn(f"[{name}] ...")
    fn()
    print_fn(f"[{name}] done in {time.perf_counter() - t0:.0f}s")


def build(workdir: str | Path, out: str | Path = DEMO_BUNDLE, *, config: str | Path = DEMO_CONFIG,
          num_clips: int = 1200, overrides=(), overwrite: bool = False, print_fn=print) -> Path:
    """Run every stage (module docstring) in ``workdir``; write the bundle to ``out``."""
    from . import precompute, training, vae_training
    from .checkpoint import export_training_params, load_checkpoint_config

    workdir, out = Path(workdir).absolute(), Path(out).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    cfg = load_config(config, overrides)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data, text, vae_run, cache, dit_run = (workdir / n for n in ("data", "text", "vae", "latents", "dit"))
    _stage("data", data, lambda: make_dataset(data, num_clips), print_fn)
    _stage("text", text, lambda: make_text_towers(cfg, text), print_fn)
    vcfg = dataclasses.replace(cfg, vae_train=dataclasses.replace(cfg.vae_train, data=str(data)))
    _stage("vae", vae_run / "params", lambda: vae_training.train_vae(vcfg, vae_run, print_fn=print_fn,
                                                                     progress=False), print_fn)
    vc = cfg.vae_train
    if vc.finetune_steps:      # a second run from the first one's weights (warm restart of the schedule)
        first, vae_run = vae_run, workdir / "vae_finetune"
        fcfg = dataclasses.replace(vcfg, vae_train=dataclasses.replace(
            vcfg.vae_train, init_from=str(first / "params"), steps=vc.finetune_steps,
            learning_rate=vc.finetune_learning_rate, seed=vc.seed + 1))
        _stage("vae_finetune", vae_run / "params", lambda: vae_training.train_vae(
            fcfg, vae_run, print_fn=print_fn, progress=False), print_fn)
    scale = load_checkpoint_config(vae_run / "params").vae.scaling_factor
    dc = dataclasses.replace(cfg.train.data, vae_weights=str(vae_run / "params"), llava_dir=str(text / "llava"),
                             clip_dir=str(text / "clip"), path=str(cache))
    cfg = dataclasses.replace(cfg, vae=dataclasses.replace(cfg.vae, scaling_factor=scale),
                              train=dataclasses.replace(cfg.train, data=dc)).validate()
    _stage("latents", cache, lambda: precompute.precompute(cfg, data, cache), print_fn)
    _stage("dit", dit_run / "done", lambda: (training.train(cfg, dit_run, resume=True, print_fn=print_fn,
                                                             progress=False), (dit_run / "done").touch()), print_fn)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    export_training_params(dit_run / "checkpoints", tmp / "dit")
    shutil.copytree(vae_run / "params", tmp / "vae")
    shutil.copytree(text / "llava", tmp / "llava")
    shutil.copytree(text / "clip", tmp / "clip")
    # the bundle's configs are the training config (with the measured VAE scaling), not the text tower defaults
    for c in ("dit", "vae", "llava", "clip"):
        (tmp / c / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    print_fn(f"demo bundle written to {out} in {time.perf_counter() - t0:.0f}s total "
             f"({sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 1e6:.1f} MB)")
    return out


# ------------------------------------------------------------------------------------------- evaluation


def foreground(frames: np.ndarray, threshold: float = 45.0) -> np.ndarray:
    """Subject pixels of ``uint8 [..., H, W, 3]`` frames: saturated colour (backgrounds are gray or white)."""
    f = frames.astype(np.float32)
    return (f.max(-1) - f.min(-1)) > threshold


def silhouette(mask: np.ndarray, size: int = 16) -> np.ndarray | None:
    """The mask cropped to its bounding box and resized to ``size x size`` (scale/position invariant)."""
    from PIL import Image

    ys, xs = np.nonzero(mask)
    if len(ys) < 4:
        return None
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    img = Image.fromarray(crop.astype(np.uint8) * 255).resize((size, size), Image.BILINEAR)
    return np.asarray(img, np.float32) / 255.0


def descriptor(image: np.ndarray) -> dict | None:
    """Colour (mean RGB of the subject pixels) and silhouette of one ``uint8 [H, W, 3]`` image."""
    mask = foreground(image)
    sil = silhouette(mask)
    if sil is None:
        return None
    return {"color": image[mask].astype(np.float32).mean(0) / 255.0, "silhouette": sil}


def distance(a: dict, b: dict) -> float:
    return float(np.abs(a["color"] - b["color"]).sum() + np.abs(a["silhouette"] - b["silhouette"]).mean())


def centroid(mask: np.ndarray) -> np.ndarray | None:
    ys, xs = np.nonzero(mask)
    return None if len(ys) == 0 else np.array([xs.mean(), ys.mean()])


def evaluate_videos(videos: list[np.ndarray], refs: list[np.ndarray], directions: list[str],
                    colors: list[str] | None = None) -> dict:
    """Identity, motion and temporal-consistency figures of generated ``uint8 [F, H, W, 3]`` videos.

    identity: the video's subject (per frame descriptor, median distance over frames) is nearest to its own
    reference among all ``refs``; motion: the centroid displacement first -> last frame points in the
    prompted direction (the largest dot product of the four); consistency: mean IoU of consecutive frames'
    silhouettes and the coefficient of variation of the subject's area over frames."""
    ref_desc = [descriptor(r) for r in refs]
    ident, same_color, motion, ious, area_cv, per = [], [], [], [], [], []
    for i, (video, d) in enumerate(zip(videos, directions)):
        masks = foreground(video)
        descs = [descriptor(f) for f in video]
        dists = np.array([[distance(fd, rd) if fd is not None else np.inf for rd in ref_desc] for fd in descs])
        med = np.median(dists, axis=0)
        ident.append(bool(np.isfinite(med[i]) and int(np.argmin(med)) == i))
        # the looser figure: the nearest reference by colour alone has the reference's colour
        cols = [fd["color"] for fd in descs if fd is not None]
        near = int(np.argmin([np.abs(np.median(cols, axis=0) - rd["color"]).sum() for rd in ref_desc])) if cols else -1
        same_color.append(near >= 0 and (colors[near] == colors[i] if colors else near == i))
        c0, c1 = centroid(masks[0]), centroid(masks[-1])
        if c0 is None or c1 is None:
            moved = None
            motion.append(False)
        else:
            moved = c1 - c0
            scores = {k: float(np.dot(moved, v)) for k, v in synthetic.DIRECTIONS.items()}
            motion.append(max(scores, key=scores.get) == d and float(np.linalg.norm(moved)) > 2.0)
        sils = [silhouette(m) for m in masks]
        pair = [float((np.minimum(a, b).sum()) / max(np.maximum(a, b).sum(), 1e-6))
                for a, b in zip(sils[:-1], sils[1:]) if a is not None and b is not None]
        ious.append(float(np.mean(pair)) if pair else 0.0)
        areas = masks.reshape(len(masks), -1).sum(1).astype(np.float64)
        area_cv.append(float(areas.std() / max(areas.mean(), 1.0)))
        per.append({"identity": ident[-1], "motion": motion[-1], "nearest_ref": int(np.argmin(med)),
                    "displacement": None if moved is None else [round(float(v), 2) for v in moved],
                    "silhouette_iou": round(ious[-1], 3), "area_cv": round(area_cv[-1], 3)})
    n = len(videos)
    return {"n": n, "identity_accuracy": sum(ident) / n, "color_accuracy": sum(same_color) / n,
            "motion_accuracy": sum(motion) / n,
            "identity_chance": 1.0 / len(refs), "motion_chance": 0.25,
            "silhouette_iou": float(np.mean(ious)), "area_cv": float(np.mean(area_cv)), "per_video": per}


def generate_eval(models, pairs=None, *, seed: int = 0, steps: int | None = None, print_fn=None,
                  start_videos=None, start_sigma: float = 1.0) -> list[np.ndarray]:
    """One video per evaluation pair with the bundle's sampling defaults (``cfg.sample``) and ``seed + index``.

    ``start_videos`` (uint8 ``[F, H, W, 3]`` per pair; a diagnostic): each sample starts from that video's latents
    (VAE posterior mean) noised to ``start_sigma`` instead of from pure noise (:func:`hcjax.pipeline.generate`)."""
    import jax.numpy as jnp

    from .pipeline import Request, generate
    from .vae import encode_video

    sc = models.cfg.sample
    out = []
    pairs = pairs or eval_pairs()
    if start_videos is not None and len(start_videos) != len(pairs):
        raise ValueError(f"start_videos: {len(start_videos)} videos for {len(pairs)} pairs")
    for k, p in enumerate(pairs):
        init = None
        if start_videos is not None:
            pix = jnp.asarray(np.asarray(start_videos[k])[None].astype(np.float32) / 127.5 - 1.0)
            init = (encode_video(models.vae, models.cfg.vae, pix), start_sigma)
        req = Request(ref_image=str(p["ref_image"]), pos_prompt=p["prompt"], item_name="object",
                      video_size=tuple(sc.video_size), frames=sc.frames, steps=steps or sc.steps,
                      flow_shift=sc.flow_shift, cfg_scale=sc.cfg_scale,
                      ip_cfg_scale=sc.ip_cfg_scale, seed=seed + p["index"], fps=sc.fps)
        frames, _ = generate(models, req, init=init)
        out.append(np.asarray(frames))
        if print_fn:
            print_fn(f"  {p['index']:2d} {subject_name(p['subject'])!r} {p['direction']}")
    return out


def load_demo(bundle: str | Path | None = None, overrides=()):
    """The demo bundle's models (default: the committed ``assets/demo/model``); ``overrides`` as ``--set``."""
    from .models import demo_bundle, load_bundle

    return load_bundle(demo_bundle() if bundle is None else Path(bundle), overrides)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Build the hcjax demo model (see module docstring).")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="data -> text towers -> VAE -> latents -> DiT -> bundle")
    b.add_argument("--workdir", required=True, help="run directory (stages already done there are skipped)")
    b.add_argument("--out", default=str(DEMO_BUNDLE), help="bundle output dir (default: assets/demo/model)")
    b.add_argument("--config", default=str(DEMO_CONFIG))
    b.add_argument("--num-clips", type=int, default=1200)
    b.add_argument("--set", action="append", default=[], metavar="A.B=V")
    b.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    r = sub.add_parser("references", help="write the held-out reference images to assets/demo")
    r.add_argument("--out", default=str(DEMO_DIR))
    args = p.parse_args(argv)
    try:
        if args.cmd == "build":
            build(args.workdir, args.out, config=args.config, num_clips=args.num_clips, overrides=args.set,
                  overwrite=args.overwrite, print_fn=lambda s: print(s, flush=True))
        else:
            print("\n".join(str(x) for x in write_eval_references(Path(args.out))))
        return 0
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
