"""Media I/O for sampling: images in, MP4 out (H.264 via PyAV) with optional audio muxed in, written atomically.

Video decoding/encoding helpers live in ``hcjax.conditioning.video`` (``read_video``, ``write_video``); this
module adds the output contract of ``sample.py``: frames are written to a temporary file in the destination
directory and renamed into place only when complete, so an interrupted run never leaves a partial MP4.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Decoded pixels in [-1, 1] -> uint8 as the original saves them: ``uint8(clamp(x/2+0.5, 0, 1) * 255)``
    (truncation, not rounding; spec 4.6)."""
    x = np.clip(np.asarray(pixels, np.float32) / 2.0 + 0.5, 0.0, 1.0)
    return (x * 255.0).astype(np.uint8)


def mux_audio(video_path: Path, audio_path: Path, out_path: Path) -> None:
    """Copy the video stream and encode the audio track to AAC, stopping at the shorter one (ffmpeg -shortest)."""
    import av

    with av.open(str(video_path)) as vin, av.open(str(audio_path)) as ain, av.open(str(out_path), "w") as out:
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


def save_video(path: str | Path, frames: np.ndarray, fps: int = 25, audio_path: str | Path | None = None) -> Path:
    """Write ``uint8 [F, h, w, 3]`` frames to ``path`` (MP4, H.264, ``fps``), muxing ``audio_path`` if given."""
    from .conditioning.video import write_video

    path = Path(path)
    tmp = path.with_name(f".{path.stem}.partial-{os.getpid()}.mp4")
    tmp2 = path.with_name(f".{path.stem}.partial-{os.getpid()}-av.mp4")
    try:
        write_video(tmp, frames, fps=fps, crf="18")
        if audio_path is not None:
            mux_audio(tmp, Path(audio_path), tmp2)
            tmp2.replace(path)
        else:
            tmp.replace(path)
    finally:
        for t in (tmp, tmp2):
            with contextlib.suppress(FileNotFoundError):
                t.unlink()
    return path
