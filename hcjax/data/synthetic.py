"""A small synthetic subject-video dataset: ``python -m hcjax.data.synthetic --out DIR``.

Each clip shows one subject (a coloured, textured shape: circle/square/triangle/diamond; striped, checkered,
dotted or plain) moving in the direction its caption says (left, right, up, down) over a grey background.
Captions (``the object moves <direction>``) leave the subject to the item name, so that prompt + item name fit
the text length of ``configs/demo.yaml`` (128 LLaVA tokens with its tokenizer). For
each clip ``clip_NNNN`` the generator writes the layout :mod:`hcjax.data` reads::

    clip_NNNN.mp4        H.264 video, ``--frames`` frames of ``--height x --width``
    clip_NNNN.json       {"caption": "...", "item_name": "...", "ref_image": "clip_NNNN_ref.png", ...}
    clip_NNNN_ref.png    the subject alone, centred on white (the reference image)
    clip_NNNN_mask.mp4   with ``--masks``: the subject's region per frame, white on black (``"mask"`` in the
                         JSON): the editing DiT trains on the clip with that region masked out (:mod:`.sources`)

``--subjects K`` (2..4; multi-subject, issue 24) makes clips of K subjects instead: the clip has one motion axis
(horizontal or vertical, random) and the frame is cut into K lanes along it; each subject crosses its own lane
edge to edge in its own direction on that axis (so the subjects never overlap and all travel the whole frame),
with one motion phrase each in the caption (``the red object moves left and the blue object moves right``:
colours differ between the subjects, so the caption names each one) and one reference image each::

    clip_NNNN.json       {"caption": "...", "item_names": [K names], "ref_images": ["clip_NNNN_ref0.png", ...],
                          "subjects": [{"item_name", "shape", "texture", "color", "motion"}, ...]}
    clip_NNNN_refK.png   subject k alone, centred on white (the size it has in the clip)

Deterministic for a ``--seed`` (with or without masks: the clips are the same; ``--subjects 1``, the default,
writes exactly what it always did). Used by the tests and the demo. A dataset mixing one- and two-subject clips:
two runs into sub-directories of one root (the dataset scan is recursive).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from ..cli import run_cli
from ..media import write_video

SHAPES = ("circle", "square", "triangle", "diamond")
TEXTURES = ("striped", "checkered", "dotted", "plain")
COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
    "magenta": (200, 50, 200), "cyan": (40, 200, 210), "orange": (240, 140, 30),
}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def _mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "triangle":
        return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    raise ValueError(f"unknown shape {shape!r}")


def _texture(texture: str, dx: np.ndarray, dy: np.ndarray, period: float) -> np.ndarray:
    if texture == "striped":
        return np.floor(dx / period) % 2 == 0
    if texture == "checkered":
        return (np.floor(dx / period) + np.floor(dy / period)) % 2 == 0
    if texture == "dotted":
        fx, fy = (dx / period) % 2 - 1, (dy / period) % 2 - 1
        return fx * fx + fy * fy > 0.35
    return np.ones_like(dx, bool)


def _offsets(cx: float, cy: float, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    return xx + 0.5 - cx, yy + 0.5 - cy


def subject_mask(shape: str, cx: float, cy: float, r: float, height: int, width: int) -> np.ndarray:
    """``bool [H, W]``: the pixels :func:`render` paints with the subject centred at ``(cx, cy)``."""
    return _mask(shape, *_offsets(cx, cy, height, width), r)


def render(shape: str, texture: str, color, cx: float, cy: float, r: float, height: int, width: int,
           background: np.ndarray) -> np.ndarray:
    """One ``uint8 [H, W, 3]`` frame: the subject centred at ``(cx, cy)`` over ``background``."""
    dx, dy = _offsets(cx, cy, height, width)
    inside = _mask(shape, dx, dy, r)
    on = _texture(texture, dx, dy, max(r / 3.0, 1.5))
    col = np.asarray(color, np.float32)
    subject = np.where(on[..., None], col, col * 0.45)
    out = np.where(inside[..., None], subject, background.astype(np.float32))
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def make_clip(rng: np.random.Generator, frames: int, height: int, width: int,
              subject: tuple[str, str, str] | None = None, direction: str | None = None, travel: float = 1.0,
              *, return_mask: bool = False, radius: tuple[float, float] = (0.18, 0.26), rgb=None):
    """Frames ``uint8 [F, H, W, 3]``, reference image ``uint8 [H, W, 3]`` and metadata of one random clip (and with
    ``return_mask`` the subject's region ``uint8 [F, H, W, 3]``, 255 inside, 0 outside, as a 4th value).
    ``subject`` = ``(color, texture, shape)`` and ``direction`` fix those choices (the random draws are made either
    way, so other choices do not change). ``travel``: the fraction of the frame the subject crosses (1: edge to
    edge; less: from a random start). ``radius``: the range the subject's radius is drawn from, as a fraction of
    the frame's shorter side. ``rgb``: paint the subject (video and reference) in this colour instead of its colour
    name's (the name is still drawn and recorded; ``meta["rgb"]`` records the override). The defaults give the
    clips this function always made."""
    if not 0.0 < travel <= 1.0:
        raise ValueError(f"travel must be in (0, 1], got {travel}")
    lo, hi = radius
    if not 0.0 < lo <= hi < 0.5:
        raise ValueError(f"radius must be a range (lo, hi) with 0 < lo <= hi < 0.5 of the frame, got {radius}")
    if rgb is not None and (len(rgb) != 3 or not all(0 <= int(c) <= 255 for c in rgb)):
        raise ValueError(f"rgb must be three values in 0..255, got {rgb}")
    shape = SHAPES[rng.integers(len(SHAPES))]
    texture = TEXTURES[rng.integers(len(TEXTURES))]
    color = list(COLORS)[rng.integers(len(COLORS))]
    drawn = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    if subject is not None:
        color, texture, shape = subject
    direction = direction or drawn
    r = min(height, width) * rng.uniform(lo, hi)
    ux, uy = DIRECTIONS[direction]
    margin = r * 1.05
    cross = rng.uniform(0.35, 0.65)                     # random cross-axis offset
    gray = rng.uniform(110, 150)
    # along the axis: from the side the subject comes from (travel 1) or a random start (travel < 1)
    path = np.linspace(0.0, travel, frames)
    if travel < 1:
        path = path + rng.uniform(0.0, 1.0 - travel)
    if ux:
        xs = margin + (width - 2 * margin) * (path if ux > 0 else 1 - path)
        ys = np.full(frames, height * cross)
    else:
        ys = margin + (height - 2 * margin) * (path if uy > 0 else 1 - path)
        xs = np.full(frames, width * cross)
    yy = np.mgrid[0:height, 0:width][0].astype(np.float32)
    background = np.repeat((gray + 20 * (yy / height - 0.5))[..., None], 3, axis=-1)
    paint = COLORS[color] if rgb is None else tuple(int(c) for c in rgb)
    video = np.stack([render(shape, texture, paint, x, y, r, height, width, background) for x, y in zip(xs, ys)])
    white = np.full((height, width, 3), 255, np.float32)
    ref = render(shape, texture, paint, width / 2, height / 2, r, height, width, white)
    name = f"{color} {texture} {shape}"
    meta = {
        "caption": f"the object moves {direction}",       # short: fits demo.yaml's text_len with the item name
        "item_name": name, "shape": shape, "texture": texture, "color": color, "motion": direction,
    }
    if rgb is not None:
        meta["rgb"] = list(paint)
    if not return_mask:
        return video, ref, meta
    mask = np.stack([subject_mask(shape, x, y, r, height, width) for x, y in zip(xs, ys)])
    return video, ref, meta, np.repeat(mask[..., None], 3, axis=-1).astype(np.uint8) * 255


MAX_SUBJECTS = 4


def make_multi_clip(rng: np.random.Generator, frames: int, height: int, width: int, subjects: int = 2, *,
                    picks=None, directions=None, travel: float = 1.0, cells: bool = False,
                    radius: tuple[float, float] | None = None):
    """A clip of ``subjects`` (K >= 2) subjects: frames ``uint8 [F, H, W, 3]``, K reference images ``uint8 [K, H,
    W, 3]`` (each subject centred on white), metadata, and the subjects' region ``uint8 [F, H, W, 3]`` (255 inside).

    One motion axis per clip (random); the frame is cut into K equal lanes along it (rows for horizontal motion,
    columns for vertical); subject k crosses lane k edge to edge in its own random direction on that axis, so the
    subjects never overlap. Colours and shapes differ between the subjects. ``picks`` (K ``(color, texture,
    shape)``, distinct colours) and ``directions`` (K motions on one axis) fix those choices; the random draws are
    made either way, so the other choices do not change. ``travel`` < 1: each subject crosses that fraction of its
    lane from a random start (as :func:`make_clip`; 1 keeps the clips exactly as before).

    ``cells``: the lanes are always the K columns of the frame (cells of ``height x width / K``; e.g. a frame K times
    as wide as it is high holds K square cells) and each subject moves in its own cell in any of the four
    directions (``directions``: any K), with radius ``radius`` (fraction of the cell's shorter side, default
    ``(0.3, 0.4)``) as :func:`make_clip` draws it in a whole frame; the default layout's draws come first, so
    ``picks`` choose the same subjects in both layouts."""
    if not 2 <= subjects <= MAX_SUBJECTS:
        raise ValueError(f"subjects must be 2..{MAX_SUBJECTS} for a multi-subject clip, got {subjects}")
    if not 0.0 < travel <= 1.0:
        raise ValueError(f"travel must be in (0, 1], got {travel}")
    colors = [list(COLORS)[j] for j in rng.permutation(len(COLORS))[:subjects]]
    shapes = [SHAPES[j] for j in rng.permutation(len(SHAPES))[:subjects]]
    textures = [TEXTURES[j] for j in rng.integers(len(TEXTURES), size=subjects)]
    rows = bool(rng.integers(2))             # horizontal motion in horizontal lanes (else vertical in columns)
    motions = [(("left", "right") if rows else ("up", "down"))[j] for j in rng.integers(2, size=subjects)]
    if picks is not None:
        if len(picks) != subjects or len({c for c, _, _ in picks}) != subjects:
            raise ValueError(f"picks: need {subjects} (color, texture, shape) of distinct colours, got {picks}")
        colors, textures, shapes = (list(x) for x in zip(*picks))
    if cells:
        rows = False
        motions = [list(DIRECTIONS)[j] for j in rng.integers(len(DIRECTIONS), size=subjects)]
    if directions is not None:
        axes = {d in ("left", "right") for d in directions}
        if len(directions) != subjects or (len(axes) != 1 and not cells) or not set(directions) <= set(DIRECTIONS):
            raise ValueError(f"directions: need {subjects} motions{'' if cells else ' on one axis'}, got {directions}")
        motions, rows = list(directions), (False if cells else axes.pop())
    lane = (height if rows else width) / subjects
    if cells:
        lo, hi = (0.3, 0.4) if radius is None else radius
        r = min(lane, height) * rng.uniform(lo, hi)
    else:
        r = min(lane * rng.uniform(0.3, 0.4), min(height, width) * 0.26)
    gray = rng.uniform(110, 150)
    yy = np.mgrid[0:height, 0:width][0].astype(np.float32)
    background = np.repeat((gray + 20 * (yy / height - 0.5))[..., None], 3, axis=-1)
    white = np.full((height, width, 3), 255, np.float32)
    video = np.broadcast_to(background, (frames, height, width, 3)).astype(np.float32)
    region = np.zeros((frames, height, width), bool)
    refs, subs = [], []
    starts = rng.uniform(0.0, 1.0 - travel, size=subjects) if travel < 1 else np.zeros(subjects)
    for k in range(subjects):
        path = np.linspace(0.0, travel, frames) + starts[k]
        x0, x1 = (0.0, float(width)) if rows else (k * lane, (k + 1) * lane)
        y0, y1 = (k * lane, (k + 1) * lane) if rows else (0.0, float(height))
        ux, uy = DIRECTIONS[motions[k]]
        margin = r * 1.05
        if ux:
            xs = x0 + margin + (x1 - x0 - 2 * margin) * (path if ux > 0 else 1 - path)
            ys = np.full(frames, (y0 + y1) / 2)
        else:
            ys = y0 + margin + (y1 - y0 - 2 * margin) * (path if uy > 0 else 1 - path)
            xs = np.full(frames, (x0 + x1) / 2)
        col = COLORS[colors[k]]
        for f in range(frames):
            video[f] = render(shapes[k], textures[k], col, xs[f], ys[f], r, height, width, video[f])
            region[f] |= subject_mask(shapes[k], xs[f], ys[f], r, height, width)
        refs.append(render(shapes[k], textures[k], col, width / 2, height / 2, r, height, width, white))
        subs.append({"item_name": f"{colors[k]} {textures[k]} {shapes[k]}", "shape": shapes[k],
                     "texture": textures[k], "color": colors[k], "motion": motions[k]})
    meta = {
        "caption": " and ".join(f"the {sb['color']} object moves {sb['motion']}" for sb in subs),
        "item_names": [sb["item_name"] for sb in subs], "subjects": subs,
    }
    mask = np.repeat(region[..., None], 3, axis=-1).astype(np.uint8) * 255
    return np.clip(video, 0, 255).astype(np.uint8), np.stack(refs), meta, mask


def generate(out: str | Path, num_clips: int = 16, frames: int = 33, height: int = 64, width: int = 64,
             seed: int = 0, fps: int = 25, overwrite: bool = False, masks: bool = False,
             subjects: int = 1) -> list[Path]:
    """Write ``num_clips`` clips into ``out`` (with ``masks`` also each clip's mask video; ``subjects`` K > 1:
    clips of K subjects, module docstring); returns the clips' mp4 paths."""
    out = Path(out)
    if num_clips < 1 or frames < 1:
        raise ValueError(f"need num_clips >= 1 and frames >= 1, got {num_clips} and {frames}")
    if not 1 <= subjects <= MAX_SUBJECTS:
        raise ValueError(f"--subjects must be 1..{MAX_SUBJECTS}, got {subjects}")
    if height < 16 or width < 16 or height % 2 or width % 2:
        raise ValueError(f"height and width must be even and >= 16, got {height}x{width}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(num_clips):
        stem = f"clip_{i:04d}"
        if subjects == 1:
            video, ref, meta, mask = make_clip(np.random.default_rng([seed, i]), frames, height, width,
                                               return_mask=True)
            Image.fromarray(ref).save(out / f"{stem}_ref.png")
            meta["ref_image"] = f"{stem}_ref.png"
        else:
            video, refs, meta, mask = make_multi_clip(np.random.default_rng([seed, i, subjects]), frames, height,
                                                      width, subjects)
            meta["ref_images"] = [f"{stem}_ref{k}.png" for k in range(subjects)]
            for name, im in zip(meta["ref_images"], refs):
                Image.fromarray(im).save(out / name)
        paths.append(write_video(out / f"{stem}.mp4", video, fps=fps, crf=12))
        if masks:
            write_video(out / f"{stem}_mask.mp4", mask, fps=fps, crf=12)
            meta["mask"] = f"{stem}_mask.mp4"
        (out / f"{stem}.json").write_text(json.dumps(meta, indent=1))
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Write a synthetic subject-video dataset (mp4 + JSON + reference).")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num-clips", type=int, default=16)
    p.add_argument("--frames", type=int, default=33)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--fps", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--masks", action="store_true", help="also write each clip's subject mask video (editing)")
    p.add_argument("--subjects", type=int, default=1, help="subjects per clip, 1..4 (2+: multi-subject clips, "
                   "one motion phrase and one reference image per subject)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)

    def run():
        paths = generate(args.out, args.num_clips, args.frames, args.height, args.width, args.seed, args.fps,
                         args.overwrite, args.masks, args.subjects)
        print(f"wrote {len(paths)} clips to {args.out}")

    return run_cli(run, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
