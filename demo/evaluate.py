"""Evaluating the demo model: identity, motion and temporal consistency of generated videos.

``benchmarks/demo_eval.py`` generates one video per held-out ``(reference, prompt)`` pair
(:func:`generate_eval`) and scores it (:func:`evaluate_videos`): identity (the subject's colour and silhouette
match its own reference better than every other held-out reference), motion (the subject's centroid moves in the
prompted direction), temporal consistency, and whether each frame shows the subject in one piece (connected
components: ghosting and split copies show as extra components, a vanished subject as none). Videos are
``uint8 [F, H, W, 3]``.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import jax.numpy as jnp
import numpy as np
from PIL import Image

from hcjax import models as loading
from hcjax.data import synthetic
from hcjax.pipeline import Request, generate
from hcjax.vae import encode_video

from .subjects import eval_pairs, subject_name


def foreground(frames: np.ndarray, threshold: float = 45.0) -> np.ndarray:
    """Subject pixels of ``uint8 [..., H, W, 3]`` frames: saturated colour (backgrounds are gray or white)."""
    f = frames.astype(np.float32)
    return (f.max(-1) - f.min(-1)) > threshold


def silhouette(mask: np.ndarray, size: int = 16) -> np.ndarray | None:
    """The mask cropped to its bounding box and resized to ``size x size`` (scale/position invariant)."""
    ys, xs = np.nonzero(mask)
    if len(ys) < 4:
        return None
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    img = Image.fromarray(crop.astype(np.uint8) * 255).resize((size, size), Image.BILINEAR)
    return np.asarray(img, np.float32) / 255.0


def descriptor(image: np.ndarray, mask: np.ndarray | None = None) -> dict | None:
    """Colour (mean RGB of the subject pixels) and silhouette of one ``uint8 [H, W, 3]`` image (of the pixels in
    ``mask``, default: its :func:`foreground`)."""
    mask = foreground(image) if mask is None else mask
    sil = silhouette(mask)
    if sil is None:
        return None
    return {"color": image[mask].astype(np.float32).mean(0) / 255.0, "silhouette": sil}


def distance(a: dict, b: dict) -> float:
    return float(np.abs(a["color"] - b["color"]).sum() + np.abs(a["silhouette"] - b["silhouette"]).mean())


def pieces(mask: np.ndarray, min_area: float = 0.004, close: int = 1) -> list[np.ndarray]:
    """The connected pieces of one frame's subject mask ``bool [H, W]`` (8-connected, OpenCV) of at least
    ``min_area`` of the frame (specks of noise are not a copy), each a ``bool [H, W]`` mask of the original pixels.
    A ``close`` (pixels) morphological closing first rejoins a subject that its own texture cuts into stripes or
    dots: two copies further apart stay two."""
    m = mask.astype(np.uint8)
    if close:
        m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, np.ones((2 * close + 1,) * 2, np.uint8))
    _, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    keep = np.nonzero(stats[1:, cv2.CC_STAT_AREA] >= max(4.0, min_area * m.size))[0] + 1
    return [(labels == k) & mask.astype(bool) for k in keep]


def components(mask: np.ndarray, min_area: float = 0.004, close: int = 1) -> int:
    """The number of :func:`pieces` of one frame's subject mask."""
    return len(pieces(mask, min_area, close))


def centroid(mask: np.ndarray) -> np.ndarray | None:
    ys, xs = np.nonzero(mask)
    return None if len(ys) == 0 else np.array([xs.mean(), ys.mean()])


def evaluate_videos(videos: list[np.ndarray], refs: list[np.ndarray], directions: list[str],
                    colors: list[str] | None = None, subjects: int = 1) -> dict:
    """Identity, motion and temporal-consistency figures of generated ``uint8 [F, H, W, 3]`` videos.

    identity: the video's subject (per frame descriptor, median distance over frames) is nearest to its own
    reference among all ``refs``; motion: the centroid displacement first -> last frame points in the
    prompted direction (the largest dot product of the four); consistency: mean IoU of consecutive frames'
    silhouettes and the coefficient of variation of the subject's area over frames; intact frames: the share of
    frames whose subject mask is exactly ``subjects`` connected pieces (:func:`components`; more = ghosting or
    split copies, fewer = a subject lost), with the mean number of pieces per frame."""
    ref_desc = [descriptor(r) for r in refs]
    ident, same_color, motion, ious, area_cv, per, pieces = [], [], [], [], [], [], []
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
        pieces.append([components(m) for m in masks])
        per.append({"components": pieces[-1], "identity": ident[-1], "motion": motion[-1],
                    "nearest_ref": int(np.argmin(med)),
                    "displacement": None if moved is None else [round(float(v), 2) for v in moved],
                    "silhouette_iou": round(ious[-1], 3), "area_cv": round(area_cv[-1], 3)})
    n = len(videos)
    return {"n": n, "identity_accuracy": sum(ident) / n, "color_accuracy": sum(same_color) / n,
            "motion_accuracy": sum(motion) / n,
            "identity_chance": 1.0 / len(refs), "motion_chance": 0.25,
            "silhouette_iou": float(np.mean(ious)), "area_cv": float(np.mean(area_cv)),
            "intact_frames": float(np.mean([c == subjects for v in pieces for c in v])),
            "components_per_frame": float(np.mean([c for v in pieces for c in v])), "per_video": per}


def evaluate_multi(videos: list[np.ndarray], refs: list[np.ndarray], pairs: list[dict],
                   attributes: list[tuple] | None = None) -> dict:
    """Figures of generated multi-subject videos: ``pairs[i]["refs"]`` are the indices (into ``refs``, the pool
    of candidate references) of video i's subjects, ``pairs[i]["directions"]`` their prompted motions.

    In every frame each subject is the connected piece (:func:`pieces`) nearest to its own reference
    (:func:`descriptor` of the piece: its colour and silhouette); the subject is *present* when the median over
    frames of that piece's distances to all ``refs`` is smallest at its own reference (as the single-subject
    identity); *both/all present* when every subject of the video is (``missed``: the indices of the videos where
    one is not); motion: the subject's piece moves in its prompted direction (first -> last frame, as
    :func:`evaluate_videos`); intact frames: exactly K pieces.

    ``attributes`` (each reference's ``(colour, texture, shape)``, e.g. :data:`~demo.subjects.HELD_OUT`) adds the
    looser figure of the issue's words, *with colour and shape*: the reference nearest to the subject has the
    subject's colour and shape (its texture may be another's; ``all_colour_shape``, ``missed_colour_shape``)."""
    ref_desc = [descriptor(r) for r in refs]
    present, all_present, motion, per, counts = [], [], [], [], []
    for video, p in zip(videos, pairs):
        frame_pieces = [pieces(m) for m in foreground(video)]
        counts.append([len(fp) for fp in frame_pieces])
        described = [[(d, m) for m in fp if (d := descriptor(frame, m)) is not None]
                     for frame, fp in zip(video, frame_pieces)]
        found = []
        for ri, d in zip(p["refs"], p["directions"]):
            rows, cents = [], []
            for cands in described:
                best = min(cands, key=lambda c: distance(c[0], ref_desc[ri]), default=None)
                rows.append([distance(best[0], rd) for rd in ref_desc] if best else [np.inf] * len(refs))
                cents.append(None if best is None else centroid(best[1]))
            med = np.median(np.array(rows), axis=0)
            ok = bool(np.isfinite(med[ri]) and int(np.argmin(med)) == ri)
            moved = None if cents[0] is None or cents[-1] is None else cents[-1] - cents[0]
            mv = moved is not None and float(np.linalg.norm(moved)) > 2.0 and max(
                synthetic.DIRECTIONS, key=lambda v: float(np.dot(moved, synthetic.DIRECTIONS[v]))) == d
            present.append(ok)
            motion.append(mv)
            found.append({"present": ok, "nearest_ref": int(np.argmin(med)), "motion": mv})
            if attributes is not None:
                near, own = attributes[int(np.argmin(med))], attributes[ri]
                found[-1]["colour_shape"] = bool(np.isfinite(med[ri]) and (near[0], near[2]) == (own[0], own[2]))
        all_present.append(all(f["present"] for f in found))
        per.append({"subjects": found, "components": counts[-1]})
    k = len(pairs[0]["refs"]) if pairs else 0
    return {"n": len(videos), "all_present": float(np.mean(all_present)), "subject_present": float(np.mean(present)),
            "motion_accuracy": float(np.mean(motion)), "identity_chance": 1.0 / len(refs),
            "intact_frames": float(np.mean([c == k for v in counts for c in v])),
            "components_per_frame": float(np.mean([c for v in counts for c in v])),
            "missed": [i for i, ok in enumerate(all_present) if not ok], "per_video": per,
            **({} if attributes is None else _colour_shape(per))}


def _colour_shape(per: list[dict]) -> dict:
    each = [f["colour_shape"] for v in per for f in v["subjects"]]
    every = [all(f["colour_shape"] for f in v["subjects"]) for v in per]
    return {"all_colour_shape": float(np.mean(every)), "subject_colour_shape": float(np.mean(each)),
            "missed_colour_shape": [i for i, ok in enumerate(every) if not ok]}


def generate_eval(models, pairs=None, *, seed: int = 0, steps: int | None = None, print_fn=None,
                  start_videos=None, start_sigma: float = 1.0) -> list[np.ndarray]:
    """One video per evaluation pair with the bundle's sampling defaults (``cfg.sample``) and ``seed + index``.
    A pair with ``"ref_images"`` / ``"item_names"`` (:func:`demo.subjects.two_subject_pairs`) is sampled with all
    its references; a pair's ``"video_size"`` (height, width) replaces the bundle's.

    ``start_videos`` (uint8 ``[F, H, W, 3]`` per pair; a diagnostic): each sample starts from that video's latents
    (VAE posterior mean) noised to ``start_sigma`` instead of from pure noise (:func:`hcjax.pipeline.generate`)."""
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
        multi = "ref_images" in p
        req = Request(ref_image=[str(r) for r in p["ref_images"]] if multi else str(p["ref_image"]),
                      pos_prompt=p["prompt"], item_name=list(p["item_names"]) if multi else "object",
                      video_size=tuple(p.get("video_size", sc.video_size)), frames=sc.frames, steps=steps or sc.steps,
                      flow_shift=sc.flow_shift, cfg_scale=sc.cfg_scale,
                      ip_cfg_scale=sc.ip_cfg_scale, seed=seed + p["index"], fps=sc.fps, ref_layout=sc.ref_layout)
        frames, _ = generate(models, req, init=init)
        out.append(np.asarray(frames))
        if print_fn:
            names = [subject_name(x) for x in p["subjects"]] if multi else subject_name(p["subject"])
            print_fn(f"  {p['index']:2d} {names!r} {p.get('directions', p.get('direction'))}")
    return out


def load_demo(bundle: str | Path | None = None, overrides=()):
    """The demo bundle's models (default: the committed ``assets/demo/model``); ``overrides`` as ``--set``."""
    return loading.load(None if bundle is None else Path(bundle), overrides=overrides)
