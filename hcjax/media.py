"""Media files in and out: images, videos and audio (floor 1: imports no model code).

Layouts: an image is ``uint8 [H, W, 3]`` RGB; a video ``uint8 [N, H, W, 3]`` RGB (channels-last, N frames);
decoded model pixels are float in [-1, 1] (:func:`to_uint8`); audio a mono ``float32 [n]`` waveform.

* **Images** (:func:`read_image`): a path, a PIL image or an array. Files are decoded with OpenCV as HunyuanCustom
  does (BGR -> RGB; PIL when OpenCV is missing). An image with transparency (RGBA, LA, or a palette/grey/RGB image
  with a transparent colour) is composited onto WHITE, as the original does, instead of dropping the alpha:
  ``out = round(rgb * a + 255 * (1 - a))`` with ``a = alpha / 255``. A missing file is ``FileNotFoundError``; an
  empty, truncated or undecodable one ``ValueError`` naming the file.
* :func:`pad_resize` ``(img, height, width)``: spec 2.1 padding-resize (keep aspect, OpenCV bilinear, white
  borders centred).
* **Videos**: :func:`probe` (frame count, size, fps without decoding), :func:`read_video` (all or the first
  frames), :func:`decode_frames` (selected frames), :func:`cover_crop` (resize to cover a size, centre-crop).
  Decoding is ffmpeg through PyAV; every failure is a ``ValueError`` naming the file.
* **The MP4 writer** (:func:`write_video`): H.264 ``yuv420p`` by default (what every common player opens; needs an
  even width and height), ``lossless=True`` for exact frames (``libx264rgb``, ``qp 0``: RGB stored as is, the
  decoded frames equal the input bit for bit; fewer players open it), optional audio track muxed in (AAC). The
  file is written under a temporary name in the destination directory and renamed into place only when complete:
  an exception or Ctrl-C at any point (including from the frame iterator) leaves nothing behind.
* **Audio** (:func:`read_audio`): mono float32 at a given rate as ``librosa.load`` gives it (libsndfile, else
  ffmpeg through PyAV; channel mean; soxr "HQ" resampling to ``ceil(n * sr / rate)`` samples).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import uuid
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import REF_LAYOUTS

WHITE = 255


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Decoded pixels in [-1, 1] -> uint8 as the original saves them: ``uint8(clamp(x/2+0.5, 0, 1) * 255)``
    (truncation, not rounding; spec 4.6)."""
    x = np.clip(np.asarray(pixels, np.float32) / 2.0 + 0.5, 0.0, 1.0)
    return (x * 255.0).astype(np.uint8)


def _av():
    try:
        import av
    except ImportError as e:  # pragma: no cover - dependency
        raise ImportError("reading and writing videos needs PyAV: pip install av") from e
    return av


# ------------------------------------------------------------------------------------------- images


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """``uint8 [H, W, 4]`` RGBA -> ``uint8 [H, W, 3]`` over a white background (round to nearest)."""
    rgba = np.asarray(rgba)
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    out = rgba[..., :3].astype(np.float32) * a + float(WHITE) * (1.0 - a)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _cv2():
    try:
        import cv2
    except ImportError:  # pragma: no cover - OpenCV is the reference decoder and resizer (spec 2.1)
        return None
    return cv2


def _transparent(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or bool(im.has_transparency_data)


def _from_pil(im: Image.Image) -> np.ndarray:
    if _transparent(im):
        return composite_on_white(np.asarray(im.convert("RGBA")))
    return np.asarray(im.convert("RGB"))


def _decode_file(path: Path) -> np.ndarray:
    if path.stat().st_size == 0:
        raise ValueError(f"image file {path} is empty (0 bytes)")
    try:
        with Image.open(path) as im:
            im.load()                                  # decodes everything: a truncated file fails here
            if _transparent(im) or _cv2() is None:
                return _from_pil(ImageOps.exif_transpose(im))
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot decode image file {path} (corrupt, truncated or not an image): {e}") from None
    except Image.DecompressionBombError as e:
        raise ValueError(f"image file {path} is too large to decode safely: {e}") from None
    cv2 = _cv2()
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)      # the original's reader (spec 2.1); applies EXIF rotation
    if bgr is None:
        raise ValueError(f"cannot decode image file {path} with OpenCV (corrupt or unsupported format)")
    return np.ascontiguousarray(bgr[:, :, ::-1])


def read_image(image) -> np.ndarray:
    """A path, PIL image or array -> ``uint8 [H, W, 3]`` RGB; transparency composited onto white.

    Arrays: ``uint8 [H, W, 3]`` (returned as is), ``[H, W, 4]`` RGBA (composited) or ``[H, W]`` grey.
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        return _decode_file(path)
    if isinstance(image, Image.Image):
        return _from_pil(image)
    arr = np.asarray(image)
    if arr.dtype == np.uint8 and arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=-1)
    if arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[-1] == 4:
        return composite_on_white(arr)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an image path, a PIL image or a uint8 array [H, W, 3] (RGB) / [H, W, 4] (RGBA); "
                         f"got an array {arr.dtype} {arr.shape}")
    return arr


def pad_resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Spec 2.1 padding-resize of ``uint8 [h, w, 3]`` to ``[height, width, 3]``: keep the aspect ratio (Python
    ``int`` truncation of the scaled side), bilinear resize, centre on white (remainder right/bottom)."""
    img = np.asarray(img)
    ih, iw = img.shape[:2]
    th, tw = int(height), int(width)
    if th < 1 or tw < 1:
        raise ValueError(f"pad_resize: target size must be positive; got height={th}, width={tw}")
    if th / ih < tw / iw:
        nh, nw = th, int(iw / ih * th)
    else:
        nw, nh = tw, int(ih / iw * tw)
    nh, nw = max(nh, 1), max(nw, 1)
    cv2 = _cv2()
    if cv2 is not None:
        resized = cv2.resize(img, (nw, nh))
    else:  # pragma: no cover - OpenCV is the reference; PIL's bilinear differs slightly
        resized = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))
    out = np.full((th, tw, 3), WHITE, np.uint8)
    top, left = (th - nh) // 2, (tw - nw) // 2
    out[top:top + nh, left:left + nw] = resized
    return out


def layout_references(images, height: int, width: int, layout: str = "centre") -> list[np.ndarray]:
    """The reference images of one sample as the encoders get them (before :func:`pad_resize` to the frame).

    ``"centre"`` returns them unchanged (each is padding-resized to the whole frame, as released). ``"columns"``,
    for K >= 2 images: image k padding-resized into the k-th of K equal columns of a white ``height x width``
    frame (column k spans ``k * width // K`` to ``(k + 1) * width // K``), so its subject sits where a model trained
    on such clips draws subject k. One image is returned unchanged by either layout."""
    if layout not in REF_LAYOUTS:
        raise ValueError(f"reference layout must be one of {REF_LAYOUTS}; got {layout!r}")
    images = [np.asarray(im) for im in images]
    k = len(images)
    if layout == "centre" or k == 1:
        return images
    if width < k:
        raise ValueError(f"reference layout 'columns': {k} columns do not fit a frame {width} pixels wide")
    out = []
    for i, im in enumerate(images):
        lo, hi = i * width // k, (i + 1) * width // k
        frame = np.full((int(height), int(width), 3), WHITE, np.uint8)
        frame[:, lo:hi] = pad_resize(im, height, hi - lo)
        out.append(frame)
    return out


# ------------------------------------------------------------------------------------------- video in


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    frames: int
    height: int
    width: int
    fps: float


def probe(path: str | Path) -> VideoInfo:
    """Frame count and size of a video without decoding it (counted from packets when the container does not
    record it). ``ValueError`` for unreadable files or files without video."""
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


def _frames(path: Path, stop: int | None):
    """Yield ``(index, uint8 [H, W, 3])`` of the first ``stop`` frames (all when None); errors name the file."""
    av = _av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            for i, frame in enumerate(container.decode(video=0)):
                if stop is not None and i >= stop:
                    return
                yield i, frame.to_ndarray(format="rgb24")
    except ValueError as e:
        raise ValueError(f"cannot decode video file {path}: {e}") from None
    except (av.error.FFmpegError, OSError) as e:
        raise ValueError(f"cannot decode video file {path}: {type(e).__name__}: {e}") from None


def read_video(path: str | Path, max_frames: int | None = None) -> np.ndarray:
    """Decode all frames (or the first ``max_frames``) of ``path`` to ``uint8 [N, H, W, 3]`` RGB."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    frames = [f for _, f in _frames(path, max_frames)]
    if not frames:
        raise ValueError(f"video file {path} contains no frames")
    return np.stack(frames)


def decode_frames(path: str | Path, indices) -> np.ndarray:
    """Decode the frames at ``indices`` (0-based, any order) -> ``uint8 [len(indices), H, W, 3]``."""
    path = Path(path)
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError(f"decode_frames({path}): no frame indices")
    wanted = set(indices)
    got = {i: f for i, f in _frames(path, max(indices) + 1) if i in wanted}
    if len(got) != len(wanted):
        raise ValueError(f"{path}: decoded only {len(got)} of the {len(wanted)} frames needed (up to index "
                         f"{max(indices)}); cannot decode the rest: the file is truncated or corrupt")
    return np.stack([got[i] for i in indices])


def cover_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize ``[N, h, w, 3]`` so that it covers ``height x width`` (OpenCV ``INTER_AREA`` when shrinking,
    ``INTER_LINEAR`` when enlarging), then centre-crop to it: the whole size is covered without padding."""
    import cv2

    n, h, w, _ = frames.shape
    scale = max(height / h, width / w)
    nh, nw = max(height, math.ceil(h * scale - 1e-6)), max(width, math.ceil(w * scale - 1e-6))
    if (nh, nw) != (h, w):
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        frames = np.stack([cv2.resize(f, (nw, nh), interpolation=interp) for f in frames])
    top, left = (nh - height) // 2, (nw - width) // 2
    return np.ascontiguousarray(frames[:, top:top + height, left:left + width])


# ------------------------------------------------------------------------------------------- video out


def _encode(tmp: Path, frames: Iterable, fps, crf: int, lossless: bool, name: Path) -> int:
    av = _av()
    fps = Fraction(fps).limit_denominator(1001)
    if fps <= 0:
        raise ValueError(f"{name}: fps must be positive; got {float(fps)}")
    n = 0
    with av.open(str(tmp), mode="w", format="mp4") as container:
        stream = None
        for f in frames:
            f = np.asarray(f)
            if stream is None:
                if f.dtype != np.uint8 or f.ndim != 3 or f.shape[-1] != 3:
                    raise ValueError(f"{name}: frames must be uint8 [H, W, 3] RGB; got {f.dtype} {f.shape}")
                h, w = f.shape[:2]
                if not lossless and (h % 2 or w % 2):
                    raise ValueError(f"{name}: H.264 yuv420p needs an even height and width, got {h}x{w} (HxW); "
                                     "pad or crop the frames, or write with lossless=True")
                if lossless:
                    stream = container.add_stream("libx264rgb", rate=fps)
                    stream.pix_fmt, stream.options = "rgb24", {"qp": "0"}
                else:
                    stream = container.add_stream("libx264", rate=fps)
                    stream.pix_fmt, stream.options = "yuv420p", {"crf": str(int(crf))}
                stream.width, stream.height = w, h
                shape = f.shape
            elif f.shape != shape or f.dtype != np.uint8:
                raise ValueError(f"{name}: frame {n} is {f.dtype} {f.shape}, the first was uint8 {shape}")
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
            n += 1
        if stream is None:
            raise ValueError(f"{name}: no frames to write")
        container.mux(stream.encode())
    return n


def mux_audio(video_path: str | Path, audio_path: str | Path, out_path: str | Path) -> None:
    """Copy the video stream and encode the audio track to AAC, stopping at the shorter one (ffmpeg -shortest)."""
    av = _av()
    with contextlib.ExitStack() as stack:
        try:
            ain = stack.enter_context(av.open(str(audio_path)))
        except (av.error.FFmpegError, OSError) as e:
            raise ValueError(f"cannot read audio file {audio_path}: {type(e).__name__}: {e}") from None
        vin = stack.enter_context(av.open(str(video_path)))
        out = stack.enter_context(av.open(str(out_path), "w", format="mp4"))
        vs_in = vin.streams.video[0]
        if not ain.streams.audio:
            raise ValueError(f"audio file {audio_path} has no audio stream")
        as_in = ain.streams.audio[0]
        vs = out.add_stream_from_template(vs_in)
        aus = out.add_stream("aac", rate=as_in.rate or 44100)
        duration = float(vs_in.frames) / float(vs_in.average_rate)
        for packet in vin.demux(vs_in):
            if packet.dts is None:
                continue
            packet.stream = vs
            out.mux(packet)
        resampler = av.AudioResampler(format="fltp", layout="stereo", rate=aus.rate)
        done = False
        for frame in ain.decode(as_in):
            if frame.time is not None and frame.time >= duration:
                done = True
            for f in resampler.resample(frame):
                f.pts = None
                out.mux(aus.encode(f))
            if done:
                break
        out.mux(aus.encode(None))


def write_video(path: str | Path, frames, fps: int = 25, *, crf: int = 18, lossless: bool = False,
                audio_path: str | Path | None = None, overwrite: bool = True) -> Path:
    """Write ``frames`` (``uint8 [N, H, W, 3]`` RGB, or an iterable of ``[H, W, 3]``) to the MP4 ``path``.

    H.264 ``yuv420p`` at quality ``crf`` (even H and W needed), or ``lossless=True``: exact RGB (``libx264rgb``).
    ``audio_path``: a file whose first audio track is muxed in (AAC, cut to the video's length). Atomic: written to a
    temporary name beside ``path`` and renamed when complete; on any error or interrupt nothing is left.
    ``overwrite=False`` refuses (``FileExistsError``) when ``path`` exists, atomically (hard link, no race).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = f".{path.stem}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp, tmp_av = path.with_name(tag + ".mp4"), path.with_name(tag + "-av.mp4")
    try:
        _encode(tmp, frames, fps, crf, lossless, path)
        final = tmp
        if audio_path is not None:
            mux_audio(tmp, audio_path, tmp_av)
            final = tmp_av
        if overwrite:
            os.replace(final, path)
        else:
            try:
                os.link(final, path)
            except FileExistsError:
                raise FileExistsError(f"{path} exists; refusing to overwrite it") from None
    finally:
        for t in (tmp, tmp_av):
            with contextlib.suppress(FileNotFoundError):
                t.unlink()
    return path


# ------------------------------------------------------------------------------------------- audio


def _resample(y: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """``librosa.resample(y, res_type='soxr_hq')`` (librosa 0.11): soxr HQ, then fix the length to ceil(n*ratio)."""
    if orig_sr == target_sr:
        return y
    import soxr

    n_out = int(math.ceil(y.shape[-1] * float(target_sr) / orig_sr))
    out = np.asarray(soxr.resample(y, orig_sr, target_sr, quality="soxr_hq"), dtype=y.dtype)
    if out.shape[-1] >= n_out:
        return out[:n_out]
    return np.pad(out, (0, n_out - out.shape[-1]))


def _read_soundfile(path: Path) -> tuple[np.ndarray, int]:
    import soundfile as sf

    data, sr = sf.read(str(path), dtype="float32", always_2d=True)          # [n, channels]
    return data.T, int(sr)


def _read_pyav(path: Path) -> tuple[np.ndarray, int]:
    av = _av()
    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise ValueError("no audio stream")
        stream = container.streams.audio[0]
        sr = int(stream.rate or stream.codec_context.sample_rate)
        resampler = av.AudioResampler(format="fltp", rate=sr)
        chunks = []
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray())
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray())
    if not chunks:
        return np.zeros((1, 0), np.float32), sr
    return np.concatenate(chunks, axis=1).astype(np.float32), sr


def read_audio(path: str | Path, sr: int = 16000) -> np.ndarray:
    """Decode ``path`` to a mono float32 waveform at ``sr`` Hz (default 16 kHz, Whisper's rate), as
    ``librosa.load(path, sr=sr)`` does.

    wav/flac/ogg/mp3 are read with libsndfile (soundfile); anything else ffmpeg can decode (m4a, aac, the audio
    track of an mp4, ...) through PyAV. Channels are averaged, then resampled with soxr (``soxr_hq``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {path}")
    errors = []
    data = None
    try:
        data, rate = _read_soundfile(path)
    except Exception as e:  # libsndfile cannot read this container/codec: try ffmpeg
        errors.append(f"libsndfile: {e}")
        try:
            data, rate = _read_pyav(path)
        except ImportError:
            errors.append("PyAV is not installed (pip install av) for non-libsndfile formats")
        except Exception as e2:
            errors.append(f"ffmpeg/PyAV: {e2}")
    if data is None:
        raise ValueError(f"cannot decode audio file {path} (expected wav, flac, ogg, mp3, m4a or another format "
                         f"ffmpeg reads): {'; '.join(errors)}")
    y = data.mean(axis=0) if data.shape[0] > 1 else data[0]
    y = _resample(np.ascontiguousarray(y, dtype=np.float32), rate, sr)
    if y.size == 0:
        raise ValueError(f"audio file {path} contains no samples")
    return y
