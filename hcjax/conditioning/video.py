"""Editing (video-driven) inputs: background and mask videos -> ``bg_latents`` (spec 2.2, 5.11, checklist 15).

Ports the CLI path of HunyuanCustom's ``VideoDataset`` (``hymm_sp/data_kits``) and the latent preparation of
``sample_inference.py``. Shapes: decoded videos ``uint8 [N, h, w, 3]`` RGB; pixel tensors ``float32
[1, N, h, w, 3]`` in [-1, 1] (channels-last); ``bg_latents [1, T, h/8, w/8, 2C]`` = ``[bg (C) ; mask (C)]``
latent channels, both already multiplied by the VAE scaling factor.

Per mask frame (OpenCV, as the original): bilinear resize to the video size; RGB data converted with
``COLOR_BGR2GRAY`` (so R and B weights are swapped, harmless for black/white masks); dilation
(``expand_scale > 0``) or erosion (``< 0``) with an ``|s| x |s|`` elliptical element, 3 iterations; threshold at
127.5 to {0, 255}. Background frame: pixels under the mask set to 0. Both videos are mapped ``x / 255 * 2 - 1``
(masked background = -1; mask video = +1 inside, -1 outside, its single channel replicated 3 times) and
VAE-encoded separately.

Differences from the original, documented: videos are decoded by :func:`hcjax.media.read_video` (ffmpeg through
PyAV) instead of decord (same decoder; the YUV->RGB conversion may differ by a code value); the VAE posterior is
the mean when no ``key`` is given (the original samples with torch's global RNG); the DWPose ``--pose-enhance``
fill is not implemented.

Input checks (errors and warnings name the files): unreadable or empty videos; a frame size that is not a
multiple of 16; a mask of another length or frame size than the video (error; the original silently truncates to
the shorter one and resizes the mask, which gives a truncated or misaligned edit: ``lenient=True`` restores that
with a warning); a mask with no white pixel (error: nothing to edit); a frame count that is not ``4k+1``
(warning; trailing frames dropped, the causal VAE needs ``4k+1``); a mask that is not black/white (error when
more than ``MAX_GRAY_FRACTION`` of its pixels are mid-gray 64..191). :func:`check_editing_files` runs the checks
that need no model (headers, and the mask's content) before any weight is loaded.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..media import probe, read_video
from ..vae import encode_video

DILATE_ITERATIONS = 3
THRESHOLD = 127.5
MAX_GRAY_FRACTION = 0.25
SIZE_MULTIPLE = 16


# ------------------------------------------------------------------------------------------- masks


def ellipse_kernel(size: int) -> np.ndarray:
    """OpenCV's ``MORPH_ELLIPSE`` structuring element of ``size x size``."""
    import cv2

    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))


def to_gray(mask_frame: np.ndarray) -> np.ndarray:
    """A mask frame to one channel; 3-channel RGB data goes through ``COLOR_BGR2GRAY`` as in the original."""
    import cv2

    m = np.asarray(mask_frame, np.uint8)
    if m.ndim == 3 and m.shape[-1] == 3:
        return cv2.cvtColor(m, cv2.COLOR_BGR2GRAY)
    if m.ndim == 3 and m.shape[-1] == 1:
        return m[..., 0]
    return m


def process_mask_frame(mask_frame: np.ndarray, size_hw: tuple[int, int], expand_scale: int = 5) -> np.ndarray:
    """resize -> gray -> dilate/erode (3 iterations) -> threshold: ``uint8 [h, w]`` in {0, 255}."""
    import cv2

    h, w = size_hw
    m = np.asarray(mask_frame, np.uint8)
    if m.shape[:2] != (h, w):
        m = cv2.resize(m, (w, h))
    m = to_gray(m)
    if expand_scale != 0:
        op = cv2.dilate if expand_scale > 0 else cv2.erode
        m = op(m, ellipse_kernel(abs(int(expand_scale))), iterations=DILATE_ITERATIONS)
    return np.where(m > THRESHOLD, 255, 0).astype(np.uint8)


def gray_fraction(mask_frames: np.ndarray, size_hw: tuple[int, int]) -> float:
    """Fraction of mid-gray (64..191) pixels of the resized grayscale mask frames (the binary-ness check)."""
    import cv2

    h, w = size_hw
    total = gray = 0
    for m in mask_frames:
        m = np.asarray(m, np.uint8)
        g = to_gray(cv2.resize(m, (w, h)) if m.shape[:2] != (h, w) else m)
        gray += int(np.count_nonzero((g >= 64) & (g <= 191)))
        total += g.size
    return gray / max(total, 1)


# ------------------------------------------------------------------------------------------- pixels


def check_mask_agrees(video_shape, mask_shape, video_name: str = "video", mask_name: str = "mask",
                      lenient: bool = False) -> None:
    """A mask of ``[M, h', w', ...]`` frames belongs to a video of ``[N, h, w, ...]``: same frame count and size
    (``lenient``: warnings, and an error only for a different aspect ratio, as the original resizes)."""
    n, h, w = video_shape[:3]
    m, mh, mw = mask_shape[:3]
    if (mh, mw) != (h, w):
        if not lenient or abs(mw / mh - w / h) > 0.01 * (w / h):
            raise ValueError(f"{mask_name} is {mw}x{mh} but {video_name} is {w}x{h}: the mask must have the video's "
                             "frame size" + ("" if lenient else " (resize it to match)"))
        warnings.warn(f"{mask_name} is {mw}x{mh} but {video_name} is {w}x{h}; resizing the mask (bilinear) to the "
                      "video size as the original does", stacklevel=3)
    if m != n:
        if not lenient:
            raise ValueError(f"{video_name} has {n} frames but {mask_name} has {m}: the mask needs one frame per "
                             "video frame")
        warnings.warn(f"{video_name} has {n} frames but {mask_name} has {m}; using the first {min(n, m)} of each "
                      "as the original does", stacklevel=3)


def check_mask_content(mask: np.ndarray, mask_name: str = "mask") -> None:
    """A mask whose every pixel is below the threshold selects nothing: an error."""
    if not np.any(np.asarray(mask) > THRESHOLD):
        raise ValueError(f"{mask_name} is all black: it marks no region to edit (white = the region to replace)")


def check_editing_files(video_path: str | Path, mask_path: str | Path, lenient: bool = False) -> None:
    """Before any model is loaded: both videos readable, the mask's frame count and size equal the video's, and
    the mask marks some region (the mask is decoded; the input video only probed)."""
    info = probe(video_path)
    mask = read_video(mask_path)
    check_mask_agrees((info.frames, info.height, info.width), mask.shape, str(video_path), str(mask_path), lenient)
    check_mask_content(mask, str(mask_path))


def prepare_editing_pixels(video: np.ndarray, mask: np.ndarray, expand_scale: int = 5, *,
                           video_name: str = "video", mask_name: str = "mask",
                           max_gray_fraction: float | None = MAX_GRAY_FRACTION,
                           lenient: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``uint8`` RGB video ``[N, h, w, 3]`` and mask video ``[N, h, w, 3 or 1]`` -> (background, mask) pixel
    tensors ``float32 [1, F, h, w, 3]`` in [-1, 1] with ``F`` = the largest ``4k+1 <= N`` (``lenient``: masks of
    another length or size as the original takes them, see the module docstring)."""
    video, mask = np.asarray(video), np.asarray(mask)
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
        raise ValueError(f"{video_name}: expected uint8 RGB frames [N, h, w, 3]; got {video.dtype} {video.shape}")
    if mask.ndim == 3:
        mask = mask[..., None]
    if mask.ndim != 4 or mask.shape[-1] not in (1, 3) or mask.dtype != np.uint8:
        raise ValueError(f"{mask_name}: expected uint8 mask frames [N, h, w, 1 or 3]; got {mask.dtype} {mask.shape}")
    n, h, w = video.shape[:3]
    if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
        raise ValueError(f"{video_name}: frame size {w}x{h} must be a multiple of {SIZE_MULTIPLE} in both "
                         "directions (the editing path neither resizes nor crops the video); resize it first")
    check_mask_agrees(video.shape, mask.shape, video_name, mask_name, lenient)
    check_mask_content(mask, mask_name)
    count = min(n, mask.shape[0])
    frames = (count - 1) // 4 * 4 + 1
    if frames != count:
        warnings.warn(f"{video_name}: {count} frames is not 4k+1; using the first {frames} (the causal VAE needs "
                      "4k+1 frames)", stacklevel=2)
    video, mask = video[:frames], mask[:frames]
    if max_gray_fraction is not None:
        frac = gray_fraction(mask, (h, w))
        if frac > max_gray_fraction:
            raise ValueError(f"{mask_name} does not look like a binary mask: {100 * frac:.0f}% of its pixels are "
                             f"mid-gray (64..191), more than {100 * max_gray_fraction:.0f}%; expected black (keep) "
                             "and white (edit) frames")
    bin_mask = np.stack([process_mask_frame(m, (h, w), expand_scale) for m in mask])          # [F, h, w]
    inside = bin_mask == 255
    bg = np.where(inside[..., None], 0, video).astype(np.float32)
    m3 = np.repeat(bin_mask[..., None], 3, axis=-1).astype(np.float32)
    return (bg / 255.0 * 2.0 - 1.0)[None], (m3 / 255.0 * 2.0 - 1.0)[None]


def load_editing_pixels(video_path: str | Path, mask_path: str | Path, expand_scale: int = 5,
                        max_gray_fraction: float | None = MAX_GRAY_FRACTION,
                        lenient: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Read the input and mask mp4 files and run :func:`prepare_editing_pixels` (errors name the files)."""
    video = read_video(video_path)
    mask = read_video(mask_path)
    return prepare_editing_pixels(video, mask, expand_scale, video_name=str(video_path), mask_name=str(mask_path),
                                  max_gray_fraction=max_gray_fraction, lenient=lenient)


# ------------------------------------------------------------------------------------------- latents


def encode_editing_latents(vae_params, vae_cfg, bg_pixels, mask_pixels, key=None, tiled: bool = True):
    """VAE-encode both pixel tensors separately and concatenate channels ``[bg ; mask]`` -> ``bg_latents``.

    ``hcjax.vae.encode_video`` already applies the scaling factor. ``key`` None: posterior means; else two
    independent posterior samples (the original samples, spec 4.6).
    """
    if bg_pixels.shape != mask_pixels.shape:
        raise ValueError(f"background {bg_pixels.shape} and mask {mask_pixels.shape} pixel tensors differ in shape")
    kb, km = (None, None) if key is None else tuple(jax.random.split(key))
    zb = encode_video(vae_params, vae_cfg, jnp.asarray(bg_pixels), kb, tiled)
    zm = encode_video(vae_params, vae_cfg, jnp.asarray(mask_pixels), km, tiled)
    return jnp.concatenate([zb, zm], axis=-1)


def bg_latents_from_files(video_path, mask_path, vae_params, vae_cfg, expand_scale: int = 5, key=None,
                          tiled: bool = True):
    """Files -> ``(bg_latents [1, T, H, W, 2C], (frames, height, width))``; the video size and frame count used
    for the noise are re-derived from the latents as in the original (``4(T-1)+1, 8H, 8W``)."""
    bg, mask = load_editing_pixels(video_path, mask_path, expand_scale)
    z = encode_editing_latents(vae_params, vae_cfg, bg, mask, key, tiled)
    c = getattr(vae_cfg, "vae", vae_cfg)
    rt, rs = c.time_compression_ratio, c.spatial_compression_ratio
    t, hh, ww = z.shape[1:4]
    return z, (rt * (t - 1) + 1, rs * hh, rs * ww)
