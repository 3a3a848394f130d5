"""DWPose for ``--pose-enhance`` editing: whole-body keypoints through onnxruntime and OpenPose-style skeletons
drawn into the masked region of the background video.

Ports HunyuanCustom's ``hymm_sp/data_kits/dwpose`` (YOLOX person detector + DWPose-LL SimCC keypoints, the
OpenPose drawing of ``util.draw_pose``) and its use in ``VideoDataset`` (``--pose-enhance``): every input frame
gets a pose image (``ref_w=576``), and the background video takes the pose image inside the mask instead of black.

User-supplied ONNX files (the original's layout, default directory ``models/dwpose``):

* ``yolox_l.onnx``: input ``[1, 3, 640, 640]`` float pixels 0..255 (the frame resized by one factor to fit, put
  top-left on a 114-grey canvas); output ``[1, A, 85]`` anchors over strides 8/16/32 (A = 8400 at 640):
  ``dx, dy, log w, log h`` in stride units, objectness, 80 class scores (class 0 = person).
* ``dw-ll_ucoco_384.onnx``: input ``[1, 3, 384, 288]`` (H x W) crop, mean/std-normalised; outputs SimCC
  ``simcc_x [1, 133, 2 * 288]`` and ``simcc_y [1, 133, 2 * 384]`` (COCO-WholeBody order; split ratio 2).

Shapes: frames ``uint8 [h, w, 3]`` (passed to the models in the channel order given, RGB here as the original
passes decord's RGB frames); keypoints ``[N, 134, 2]`` image pixels (N persons, COCO-WholeBody with the neck
inserted at 17 and the body in OpenPose order: 0-17 body, 18-23 feet, 24-91 face, 92-112 left hand, 113-133
right hand), scores ``[N, 134]``. Drawing happens on a canvas whose short side is 576 px, then resized to the frame
(bilinear); colours are written BGR and swapped to RGB at the end, as the original does.
"""

from __future__ import annotations

import colorsys
import functools
import math
from pathlib import Path

import numpy as np

from ..media import read_video
from .video import encode_editing_latents, load_editing_pixels

DEFAULT_DIR = "models/dwpose"
DETECTOR_FILE = "yolox_l.onnx"
POSE_FILE = "dw-ll_ucoco_384.onnx"
DET_SIZE = (640, 640)                 # detector input (h, w)
STRIDES = (8, 16, 32)
PAD_VALUE = 114
NMS_IOU, SCORE_MIN, BOX_MIN = 0.45, 0.1, 0.3
BOX_PADDING = 1.25                    # crop = box x 1.25, widened/heightened to the model's aspect
MEAN = np.array([123.675, 116.28, 103.53], np.float32)
STD = np.array([58.395, 57.12, 57.375], np.float32)
SIMCC_SPLIT = 2.0
KEYPOINT_MIN = 0.3                    # drawn above this score
REF_W = 576                           # canvas short side (the editing path's ref_w)

# OpenPose body: 17 limbs drawn (pairs of body indices) and one colour per limb / keypoint (BGR order on the canvas)
LIMBS = ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
         (1, 0), (0, 14), (14, 16), (0, 15), (15, 17))
COLORS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
          (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
          (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))
HAND_EDGES = ((0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11), (11, 12),
              (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20))    # wrist 0, 4 per finger
# COCO-WholeBody body (with the neck appended at 17) -> OpenPose body order
OPENPOSE_FROM_COCO = (0, 17, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)


def model_files(dwpose_dir: str | Path | None = None) -> tuple[Path, Path]:
    """The two ONNX files of ``dwpose_dir``; FileNotFoundError naming every missing one (one line)."""
    d = Path(dwpose_dir or DEFAULT_DIR)
    files = (d / DETECTOR_FILE, d / POSE_FILE)
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"--pose-enhance needs the DWPose ONNX files (YOLOX-L detector and DWPose-LL, see "
                                f"--dwpose-dir); missing: {', '.join(missing)}")
    return files


# ------------------------------------------------------------------------------------------- detection


def letterbox(img: np.ndarray, size=DET_SIZE) -> tuple[np.ndarray, float]:
    """``[h, w, 3]`` -> (``float32 [3, H, W]`` on a 114-grey canvas, top-left aligned; the resize factor)."""
    import cv2

    r = min(size[0] / img.shape[0], size[1] / img.shape[1])
    nh, nw = int(img.shape[0] * r), int(img.shape[1] * r)
    canvas = np.full((*size, 3), PAD_VALUE, np.uint8)
    canvas[:nh, :nw] = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(canvas.transpose(2, 0, 1), np.float32), r


def decode_anchors(raw: np.ndarray, size=DET_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """``[A, 5 + classes]`` raw YOLOX outputs -> (boxes ``[A, 4]`` x0 y0 x1 y1 in input pixels, scores ``[A, C]``)."""
    cells = []
    for s in STRIDES:
        gy, gx = np.mgrid[0:size[0] // s, 0:size[1] // s]
        cells.append(np.stack([gx.ravel(), gy.ravel(), np.full(gx.size, s)], axis=1))
    cells = np.concatenate(cells).astype(np.float32)
    if cells.shape[0] != raw.shape[0]:
        raise ValueError(f"{DETECTOR_FILE}: expected {cells.shape[0]} anchors for a {size[1]}x{size[0]} input "
                         f"(strides {STRIDES}); the model gave {raw.shape[0]}")
    centre = (raw[:, :2] + cells[:, :2]) * cells[:, 2:]
    half = np.exp(raw[:, 2:4]) * cells[:, 2:] / 2
    return np.concatenate([centre - half, centre + half], axis=1), raw[:, 4:5] * raw[:, 5:]


def nms(boxes: np.ndarray, scores: np.ndarray, iou_max: float = NMS_IOU) -> list[int]:
    """Greedy non-maximum suppression (pixel-inclusive areas, +1 as the detector's reference code)."""
    area = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    order, keep = list(np.argsort(scores)[::-1]), []
    while order:
        i, rest = order[0], np.array(order[1:], int)
        keep.append(int(i))
        if not rest.size:
            break
        lo, hi = np.maximum(boxes[i, :2], boxes[rest, :2]), np.minimum(boxes[i, 2:], boxes[rest, 2:])
        inter = np.prod(np.maximum(0.0, hi - lo + 1), axis=1)
        order = list(rest[inter / (area[i] + area[rest] - inter) <= iou_max])
    return keep


def detect_people(session, img: np.ndarray) -> np.ndarray:
    """Person boxes ``[n, 4]`` (x0 y0 x1 y1, image pixels) of one frame; per-class NMS, then person and > 0.3."""
    x, r = letterbox(img)
    raw = session.run(None, {session.get_inputs()[0].name: x[None]})[0][0]
    boxes, scores = decode_anchors(np.asarray(raw, np.float32))
    boxes = boxes / r
    people = []
    for c in range(scores.shape[1]):
        ok = scores[:, c] > SCORE_MIN
        if not ok.any():
            continue
        b, s = boxes[ok], scores[ok, c]
        keep = nms(b, s)
        if c == 0:
            people += [b[i] for i in keep if s[i] > BOX_MIN]
    return np.array(people, np.float32).reshape(-1, 4)


# ------------------------------------------------------------------------------------------- keypoints


def crop_box(box, aspect: float) -> tuple[np.ndarray, np.ndarray]:
    """Box x0 y0 x1 y1 -> (centre, size) of the crop: padded by 1.25 and grown to width/height = ``aspect``."""
    box = np.asarray(box, np.float32)
    centre = (box[:2] + box[2:]) / 2
    w, h = (box[2:] - box[:2]) * BOX_PADDING
    size = np.array([w, w / aspect] if w > h * aspect else [h * aspect, h], np.float32)
    return centre, size


def crop(img: np.ndarray, centre, size, out_wh: tuple[int, int]) -> np.ndarray:
    """The ``size`` (w, h) region around ``centre`` warped to ``out_wh`` (bilinear, zeros outside), float32."""
    import cv2

    s = out_wh[0] / size[0]
    m = np.array([[s, 0.0, out_wh[0] / 2 - s * centre[0]], [0.0, s, out_wh[1] / 2 - s * centre[1]]], np.float32)
    return cv2.warpAffine(img, m, out_wh, flags=cv2.INTER_LINEAR).astype(np.float32)


def simcc_argmax(sx: np.ndarray, sy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SimCC ``[K, Wx]``, ``[K, Wy]`` -> (bin locations ``[K, 2]``, -1 where the score is <= 0; scores ``[K]`` =
    the smaller of the two peaks)."""
    locs = np.stack([np.argmax(sx, axis=1), np.argmax(sy, axis=1)], axis=1).astype(np.float32)
    score = np.minimum(sx.max(axis=1), sy.max(axis=1))
    locs[score <= 0] = -1
    return locs, score


def estimate(session, img: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """COCO-WholeBody keypoints ``[n, 133, 2]`` (image pixels) and scores ``[n, 133]``, one per box (the whole
    frame when no box was found)."""
    inp = session.get_inputs()[0]
    in_h, in_w = (int(v) for v in inp.shape[2:])
    if not len(boxes):
        boxes = np.array([[0, 0, img.shape[1], img.shape[0]]], np.float32)
    kps, scores = [], []
    for box in boxes:
        centre, size = crop_box(box, in_w / in_h)
        x = (crop(img, centre, size, (in_w, in_h)) - MEAN) / STD
        sx, sy = session.run(None, {inp.name: np.ascontiguousarray(x.transpose(2, 0, 1)[None], np.float32)})[:2]
        locs, score = simcc_argmax(np.asarray(sx)[0], np.asarray(sy)[0])
        kps.append(locs / SIMCC_SPLIT / np.array([in_w, in_h], np.float32) * size + centre - size / 2)
        scores.append(score)
    return np.array(kps, np.float32), np.array(scores, np.float32)


def to_openpose(kps: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Insert the neck (mean of the shoulders; score 1 when both shoulders > 0.3, else 0) at index 17 and put the
    18 body points in OpenPose order -> ``[n, 134, 2]``, ``[n, 134]``."""
    neck = kps[:, [5, 6]].mean(axis=1, keepdims=True)
    neck_s = np.all(scores[:, [5, 6]] > KEYPOINT_MIN, axis=1, keepdims=True).astype(np.float32)
    k = np.concatenate([kps[:, :17], neck, kps[:, 17:]], axis=1)
    s = np.concatenate([scores[:, :17], neck_s, scores[:, 17:]], axis=1)
    order = np.r_[np.array(OPENPOSE_FROM_COCO), np.arange(18, k.shape[1])]
    return k[:, order], s[:, order]


class DWPose:
    """Frame -> (keypoints ``[n, 134, 2]`` pixels, scores ``[n, 134]``) with the two ONNX sessions (CPU)."""

    def __init__(self, detector_path: str | Path, pose_path: str | Path):
        import onnxruntime as ort

        opts = dict(providers=["CPUExecutionProvider"])
        try:
            self.detector = ort.InferenceSession(str(detector_path), **opts)
            self.pose = ort.InferenceSession(str(pose_path), **opts)
        except Exception as e:          # onnxruntime's own exception types (InvalidGraph, NoSuchFile, ...)
            raise ValueError(f"cannot load the DWPose ONNX files {detector_path}, {pose_path}: {e}") from None

    def __call__(self, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        img = np.ascontiguousarray(img, np.uint8)
        return to_openpose(*estimate(self.pose, img, detect_people(self.detector, img)))


@functools.lru_cache(maxsize=2)
def detector(dwpose_dir: str | Path | None = None) -> DWPose:
    """One :class:`DWPose` per directory (sessions load once per process)."""
    return DWPose(*model_files(dwpose_dir))


# ------------------------------------------------------------------------------------------- drawing


def _ints(color) -> tuple:
    return tuple(int(c) for c in color)


def draw_pose(kps: np.ndarray, scores: np.ndarray, height: int, width: int, ref_w: int = REF_W) -> np.ndarray:
    """Keypoints ``[n, 134, 2]`` (pixels of a ``height x width`` frame) -> RGB ``uint8 [height, width, 3]``: body
    limbs as thin ellipses (colour x both scores), dimmed to 60%, body points (colour x score), hand edges (hue
    by edge x both scores, 2 px) and points (red by score), face points (grey by score); drawn with the short side
    at ``ref_w`` px and resized (bilinear)."""
    import cv2

    sr = ref_w / min(height, width)
    ch, cw = int(height * sr), int(width * sr)
    canvas = np.zeros((ch, cw, 3), np.uint8)
    norm = kps / np.array([width, height], np.float32)            # the original draws from [0, 1] coordinates
    px = lambda p: (int(p[0] * cw), int(p[1] * ch))               # noqa: E731
    body, body_s = norm[:, :18], scores[:, :18]
    for i, (a, b) in enumerate(LIMBS):
        for p, s in zip(body, body_s):
            if s[a] < KEYPOINT_MIN or s[b] < KEYPOINT_MIN:
                continue
            (xa, ya), (xb, yb) = p[a] * (cw, ch), p[b] * (cw, ch)
            half = int(math.hypot(xa - xb, ya - yb) / 2)
            angle = int(math.degrees(math.atan2(ya - yb, xa - xb)))
            poly = cv2.ellipse2Poly((int((xa + xb) / 2), int((ya + yb) / 2)), (half, 1), angle, 0, 360, 1)
            cv2.fillConvexPoly(canvas, poly, _ints(c * s[a] * s[b] for c in COLORS[i]))
    canvas = (canvas * 0.6).astype(np.uint8)
    for i in range(18):
        for p, s in zip(body, body_s):
            if s[i] > KEYPOINT_MIN:
                cv2.circle(canvas, px(p[i]), 1, _ints(c * s[i] for c in COLORS[i]), thickness=-1)
    hands = np.concatenate([norm[:, 92:113], norm[:, 113:134]])
    hand_s = np.concatenate([scores[:, 92:113], scores[:, 113:134]])
    for p, s in zip(hands, hand_s):
        for e, (a, b) in enumerate(HAND_EDGES):
            (x1, y1), (x2, y2) = px(p[a]), px(p[b])
            if min(x1, y1, x2, y2) > 0:
                level = int(s[a] * s[b] * 255)
                rgb = colorsys.hsv_to_rgb(e / len(HAND_EDGES), 1.0, 1.0)
                cv2.line(canvas, (x1, y1), (x2, y2), tuple(float(v) * level for v in rgb), thickness=2)
        for q, sq in zip(p, s):
            x, y = px(q)
            if x > 0 and y > 0:
                cv2.circle(canvas, (x, y), 1, (0, 0, int(sq * 255)), thickness=-1)
    for p, s in zip(norm[:, 24:92], scores[:, 24:92]):
        for q, sq in zip(p, s):
            x, y = px(q)
            if x > 0 and y > 0:
                cv2.circle(canvas, (x, y), 1, (int(sq * 255),) * 3, thickness=-1)
    return np.ascontiguousarray(cv2.resize(canvas, (width, height))[..., ::-1])


def pose_frames(frames: np.ndarray, dwpose) -> np.ndarray:
    """``uint8 [F, h, w, 3]`` frames -> their pose images ``[F, h, w, 3]`` (``dwpose``: frame -> (kps, scores))."""
    return np.stack([draw_pose(*dwpose(f), f.shape[0], f.shape[1]) for f in frames])


# ------------------------------------------------------------------------------------------- editing inputs


def fill_mask_with_pose(bg_pixels: np.ndarray, mask_pixels: np.ndarray, poses: np.ndarray) -> np.ndarray:
    """Background pixels ``[1, F, h, w, 3]`` in [-1, 1] with the pose images ``uint8 [F, h, w, 3]`` inside the
    mask (mask pixels > 0) instead of black, as the original's ``np.where(inverse_mask, frame, pose_img)``."""
    inside = mask_pixels[..., :1] > 0
    return np.where(inside, poses[None].astype(np.float32) / 255.0 * 2.0 - 1.0, bg_pixels).astype(np.float32)


def pose_editing_pixels(video_path, mask_path, expand_scale: int, dwpose) -> tuple[np.ndarray, np.ndarray]:
    """:func:`hcjax.conditioning.video.load_editing_pixels` with the skeletons of ``dwpose`` in the mask."""
    bg, mask = load_editing_pixels(video_path, mask_path, expand_scale)
    frames = read_video(video_path, max_frames=bg.shape[1])
    return fill_mask_with_pose(bg, mask, pose_frames(frames, dwpose)), mask


def bg_latents_from_files(video_path, mask_path, vae_params, vae_cfg, expand_scale: int = 5, key=None,
                          dwpose_dir: str | Path | None = None, tiled: bool = True):
    """:func:`hcjax.conditioning.video.bg_latents_from_files` with ``--pose-enhance``: the DWPose skeletons of
    each frame drawn into the masked region before the VAE encode."""
    bg, mask = pose_editing_pixels(video_path, mask_path, expand_scale, detector(dwpose_dir))
    z = encode_editing_latents(vae_params, vae_cfg, bg, mask, key, tiled)
    c = getattr(vae_cfg, "vae", vae_cfg)
    t, hh, ww = z.shape[1:4]
    frames = c.time_compression_ratio * (t - 1) + 1
    return z, (frames, c.spatial_compression_ratio * hh, c.spatial_compression_ratio * ww)


__all__ = ["DWPose", "detector", "draw_pose", "model_files", "pose_frames", "fill_mask_with_pose",
           "pose_editing_pixels", "bg_latents_from_files", "DEFAULT_DIR"]
