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

Deterministic for a ``--seed`` (with or without masks: the clips are the same). Used by the tests and the demo.
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
              *, return_mask: bool = False):
    """Frames ``uint8 [F, H, W, 3]``, reference image ``uint8 [H, W, 3]`` and metadata of one random clip (and with
    ``return_mask`` the subject's region ``uint8 [F, H, W, 3]``, 255 inside, 0 outside, as a 4th value).
    ``subject`` = ``(color, texture, shape)`` and ``direction`` fix those choices (the random draws are made either
    way, so other choices do not change). ``travel``: the fraction of the frame the subject crosses (1: edge to
    edge; less: from a random start)."""
    if not 0.0 < travel <= 1.0:
        raise ValueError(f"travel must be in (0, 1], got {travel}")
    shape = SHAPES[rng.integers(len(SHAPES))]
    texture = TEXTURES[rng.integers(len(TEXTURES))]
    color = list(COLORS)[rng.integers(len(COLORS))]
    drawn = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    if subject is not None:
        color, texture, shape = subject
    direction = direction or drawn
    r = min(height, width) * rng.uniform(0.18, 0.26)
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
    video = np.stack([render(shape, texture, COLORS[color], x, y, r, height, width, background)
                      for x, y in zip(xs, ys)])
    white = np.full((height, width, 3), 255, np.float32)
    ref = render(shape, texture, COLORS[color], width / 2, height / 2, r, height, width, white)
    name = f"{color} {texture} {shape}"
    meta = {
        "caption": f"the object moves {direction}",       # short: fits demo.yaml's text_len with the item name
        "item_name": name, "shape": shape, "texture": texture, "color": color, "motion": direction,
    }
    if not return_mask:
        return video, ref, meta
    mask = np.stack([subject_mask(shape, x, y, r, height, width) for x, y in zip(xs, ys)])
    return video, ref, meta, np.repeat(mask[..., None], 3, axis=-1).astype(np.uint8) * 255


def generate(out: str | Path, num_clips: int = 16, frames: int = 33, height: int = 64, width: int = 64,
             seed: int = 0, fps: int = 25, overwrite: bool = False, masks: bool = False) -> list[Path]:
    """Write ``num_clips`` clips into ``out`` (with ``masks`` also each clip's mask video); returns the clips' mp4
    paths."""
    out = Path(out)
    if num_clips < 1 or frames < 1:
        raise ValueError(f"need num_clips >= 1 and frames >= 1, got {num_clips} and {frames}")
    if height < 16 or width < 16 or height % 2 or width % 2:
        raise ValueError(f"height and width must be even and >= 16, got {height}x{width}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(num_clips):
        rng = np.random.default_rng([seed, i])
        video, ref, meta, mask = make_clip(rng, frames, height, width, return_mask=True)
        stem = f"clip_{i:04d}"
        Image.fromarray(ref).save(out / f"{stem}_ref.png")
        paths.append(write_video(out / f"{stem}.mp4", video, fps=fps, crf=12))
        meta["ref_image"] = f"{stem}_ref.png"
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
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)

    def run():
        paths = generate(args.out, args.num_clips, args.frames, args.height, args.width, args.seed, args.fps,
                         args.overwrite, args.masks)
        print(f"wrote {len(paths)} clips to {args.out}")

    return run_cli(run, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
