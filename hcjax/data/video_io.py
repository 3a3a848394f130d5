"""Video/image reading for the data pipeline: probe, partial decode, resize-and-crop to a bucket, mp4 writing.

Frames are ``uint8 [N, H, W, 3]`` RGB (channels-last). Decoding uses ffmpeg through PyAV; resizing uses OpenCV
(``INTER_AREA`` when shrinking, ``INTER_LINEAR`` when enlarging) followed by a centre crop, so the whole bucket is
covered without padding. Reference images are padding-resized with white borders as HunyuanCustom does for its
VAE copy (spec 2.1, :func:`hcjax.conditioning.llava.pad_resize`).

Every failure is a ``ValueError`` naming the file and what was wrong, so the pipeline can skip and count it.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    frames: int
    height: int
    width: int
    fps: float


def _av():
    try:
        import av
    except ImportError as e:  # pragma: no cover - dependency
        raise ImportError("reading and writing mp4 needs PyAV: pip install av") from e
    return av


def probe(path: str | Path) -> VideoInfo:
    """Frame count and size of a video without decoding it (the frame count is counted from packets when the
    container does not record it). Raises ``ValueError`` for unreadable files or files without video."""
    av = _av()
    path = Path(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            stream = container.streams.video[0]
            n = int(stream.frames or 0)
            if n == 0:
                n = sum(1 for p in container.demux(stream) if p.size)
            fps = float(stream.average_rate or 25)
            h, w = stream.codec_context.height, stream.codec_context.width
    except ValueError as e:
        raise ValueError(f"{path}: unreadable video ({e})") from None
    except (av.error.FFmpegError, OSError) as e:
        raise ValueError(f"{path}: unreadable video ({type(e).__name__}: {e})") from None
    if n < 1 or h < 1 or w < 1:
        raise ValueError(f"{path}: empty video ({n} frames of {w}x{h})")
    return VideoInfo(n, h, w, fps)


def decode_frames(path: str | Path, indices) -> np.ndarray:
    """Decode the frames at ``indices`` (sorted, 0-based) -> ``uint8 [len(indices), H, W, 3]``."""
    av = _av()
    path = Path(path)
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("decode_frames: no frame indices")
    wanted = set(indices)
    last = max(indices)
    got: dict[int, np.ndarray] = {}
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    got[i] = frame.to_ndarray(format="rgb24")
                if i >= last:
                    break
    except ValueError as e:
        raise ValueError(f"{path}: cannot decode ({e})") from None
    except (av.error.FFmpegError, OSError) as e:
        raise ValueError(f"{path}: cannot decode ({type(e).__name__}: {e})") from None
    if len(got) != len(wanted):
        raise ValueError(f"{path}: decoded only {len(got)} of the {len(wanted)} frames needed (up to index "
                         f"{last}); the file is truncated or corrupt")
    return np.stack([got[i] for i in indices])


def cover_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize ``[N, h, w, 3]`` so that it covers ``height x width``, then centre-crop to it."""
    import cv2

    n, h, w, _ = frames.shape
    scale = max(height / h, width / w)
    nh, nw = max(height, math.ceil(h * scale - 1e-6)), max(width, math.ceil(w * scale - 1e-6))
    if (nh, nw) != (h, w):
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        frames = np.stack([cv2.resize(f, (nw, nh), interpolation=interp) for f in frames])
    top, left = (nh - height) // 2, (nw - width) // 2
    return np.ascontiguousarray(frames[:, top:top + height, left:left + width])


def read_image(path: str | Path) -> np.ndarray:
    """An image file -> ``uint8 [H, W, 3]`` RGB."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"{path}: unreadable image ({e})") from None


def pad_resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Spec 2.1 padding-resize (white borders) to ``height x width``."""
    from ..conditioning.llava import pad_resize as _pad_resize

    return _pad_resize(img, width, height)


def write_mp4(path: str | Path, frames: np.ndarray, fps: int = 25, crf: int = 12) -> Path:
    """Write ``uint8 [N, H, W, 3]`` RGB frames as H.264 (yuv420p; even H and W) to ``path``."""
    av = _av()
    path = Path(path)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"write_mp4: expected uint8 [N, H, W, 3], got {frames.dtype} {frames.shape}")
    n, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"write_mp4: H.264 yuv420p needs even height and width, got {h}x{w}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf)}
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())
    return path
