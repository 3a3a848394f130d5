"""hcjax.media: the one image reader (alpha onto white, bad files), pad_resize(img, height, width), the MP4 writer
(yuv420p by default, exact lossless mode, audio muxing, atomic on errors and interrupts) and the video readers.

Expected pixels are computed by hand in the comments (or are the written input itself); stream properties are read
back with PyAV, independently of the code under test."""

from __future__ import annotations

import wave

import av
import numpy as np
import pytest
from PIL import Image

from hcjax.conditioning.text import ImagePreprocessor
from hcjax.media import decode_frames, pad_resize, probe, read_image, read_video, write_video

# ------------------------------------------------------------------------------------------- images


def _rgba_png(path):
    """One row: (200, 40, 0) at alpha 128, (10, 20, 30) fully transparent, (1, 2, 3) opaque, (0, 0, 0) at 64."""
    im = Image.new("RGBA", (4, 1))
    im.putdata([(200, 40, 0, 128), (10, 20, 30, 0), (1, 2, 3, 255), (0, 0, 0, 64)])
    im.save(path)
    return path


# out = round(c * a/255 + 255 * (1 - a/255)):
#   a=128: 200 -> 100.39 + 127 = 227.39 -> 227;  40 -> 20.08 + 127 = 147.08 -> 147;  0 -> 127
#   a=0 -> white;  a=255 -> the colour;  a=64, black: 255 * 191/255 = 191
WANT_RGBA = np.array([[[227, 147, 127], [255, 255, 255], [1, 2, 3], [191, 191, 191]]], np.uint8)


def test_rgba_with_transparency_is_composited_onto_white(tmp_path):
    path = _rgba_png(tmp_path / "ref.png")
    np.testing.assert_array_equal(read_image(path), WANT_RGBA)
    np.testing.assert_array_equal(read_image(str(path)), WANT_RGBA)
    with Image.open(path) as im:
        np.testing.assert_array_equal(read_image(im), WANT_RGBA)                 # a PIL image
    np.testing.assert_array_equal(read_image(np.asarray(Image.open(path))), WANT_RGBA)   # an RGBA array


def test_other_transparent_modes_are_composited_onto_white(tmp_path):
    la = Image.new("LA", (2, 1))
    la.putdata([(0, 0), (100, 255)])                      # grey 0 fully transparent -> white; opaque 100
    la.save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image(tmp_path / "la.png"), [[[255] * 3, [100] * 3]])
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.putdata([0, 1])
    pal.save(tmp_path / "p.png", transparency=0)          # palette entry 0 transparent
    np.testing.assert_array_equal(read_image(tmp_path / "p.png"), [[[255, 255, 255], [10, 200, 30]]])


def test_opaque_image_round_trips_and_the_llava_copy_sees_white(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.png"), rgb)       # PNG: lossless, channel order kept
    np.testing.assert_array_equal(read_image(rgb), rgb)
    # the text stage gets the composited image: a fully transparent image is the unconditional (white) one
    Image.new("RGBA", (5, 5), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    pre = ImagePreprocessor(8)
    np.testing.assert_array_equal(pre(tmp_path / "clear.png"), pre.white())


@pytest.mark.parametrize("kind", ["zero_bytes", "garbage", "truncated_png", "truncated_jpg"])
def test_bad_image_file_is_a_value_error_naming_it(tmp_path, kind):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    name = f"bad_{kind}.{'jpg' if kind.endswith('jpg') else 'png'}"
    path = tmp_path / name
    if kind == "zero_bytes":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(rng.bytes(3000))
    else:
        full = tmp_path / ("full." + name.rsplit(".", 1)[1])
        Image.fromarray(img).save(full)
        data = full.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=name):
        read_image(path)


def test_missing_image_and_bad_arrays(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(ValueError, match="float32"):
        read_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(4, 4, 2\)"):
        read_image(np.zeros((4, 4, 2), np.uint8))


# ------------------------------------------------------------------------------------------- pad_resize


def test_pad_resize_takes_height_then_width():
    black = np.zeros((10, 40, 3), np.uint8)                   # h 10, w 40
    # height 20, width 60: 20/10 = 2 >= 60/40 = 1.5, so width -> 60 and height int(10/40 * 60) = 15;
    # top (20-15)//2 = 2, the remaining 3 rows at the bottom
    out = pad_resize(black, 20, 60)
    assert out.shape == (20, 60, 3)
    assert np.all(out[:2] == 255) and np.all(out[2:17] == 0) and np.all(out[17:] == 255)
    tall = np.zeros((40, 10, 3), np.uint8)
    # height 30, width 50: 30/40 = 0.75 < 50/10, so height -> 30 and width int(10/40 * 30) = 7; left (50-7)//2 = 21
    out = pad_resize(tall, 30, 50)
    assert out.shape == (30, 50, 3)
    assert np.all(out[:, :21] == 255) and np.all(out[:, 21:28] == 0) and np.all(out[:, 28:] == 255)
    # square target (spec 2.1 example): width -> 20, height int(10/40*20) = 5, top (20-5)//2 = 7
    out = pad_resize(black, 20, 20)
    assert out.shape == (20, 20, 3)
    assert np.all(out[:7] == 255) and np.all(out[7:12] == 0) and np.all(out[12:] == 255)


# ------------------------------------------------------------------------------------------- MP4 writer


def _stream(path):
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        return v.codec_context.pix_fmt, v.codec_context.name, len(c.streams.audio)


def _smooth(n=5, h=32, w=48):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([np.stack([(x * 4 + t * 8) % 256, (y * 6) % 256, np.full_like(x, 90 + 10 * t)], -1)
                     for t in range(n)]).astype(np.uint8)


def test_default_mp4_is_yuv420p_h264(tmp_path):
    frames = _smooth()
    out = write_video(tmp_path / "v.mp4", frames, fps=8)
    assert _stream(out) == ("yuv420p", "h264", 0)
    back = read_video(out)
    assert back.shape == frames.shape
    err = np.abs(back.astype(int) - frames).mean()
    print(f"yuv420p crf 18 round trip: mean abs error {err:.2f}")
    assert err < 4.0                                            # lossy, but the picture is kept
    info = probe(out)
    assert (info.frames, info.height, info.width, info.fps) == (5, 32, 48, 8.0)
    np.testing.assert_array_equal(decode_frames(out, [3, 1]), back[[3, 1]])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]


def test_odd_size_needs_lossless(tmp_path):
    with pytest.raises(ValueError, match=r"odd\.mp4.*even height and width.*lossless=True"):
        write_video(tmp_path / "odd.mp4", np.zeros((2, 33, 48, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_lossless_round_trip_is_exact(tmp_path):
    frames = np.random.default_rng(2).integers(0, 256, (4, 33, 47, 3), dtype=np.uint8)   # noise, odd size
    out = write_video(tmp_path / "exact.mp4", frames, lossless=True)
    np.testing.assert_array_equal(read_video(out), frames)
    assert _stream(out)[1] == "h264"


def test_frames_may_come_from_an_iterator(tmp_path):
    frames = _smooth(3)
    out = write_video(tmp_path / "it.mp4", iter(list(frames)), lossless=True)
    np.testing.assert_array_equal(read_video(out), frames)


def _failing_source(exc, after=60):       # enough frames that the encoder has written packets
    frames = _smooth(after)
    for f in frames:
        yield f
    raise exc


@pytest.mark.parametrize("exc", [RuntimeError("source broke"), KeyboardInterrupt()])
def test_interrupted_source_leaves_no_file(tmp_path, exc):
    with pytest.raises(type(exc)):
        write_video(tmp_path / "out.mp4", _failing_source(exc))
    assert list(tmp_path.iterdir()) == []


def test_failing_encode_leaves_no_file_and_keeps_an_existing_one(tmp_path):
    frames = list(_smooth(3))
    frames.append(np.zeros((16, 16, 3), np.uint8))               # a frame of another size: the encode fails
    with pytest.raises(ValueError, match=r"out\.mp4: frame 3"):
        write_video(tmp_path / "out.mp4", frames)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "keep.mp4").write_bytes(b"previous")
    with pytest.raises(ValueError, match="no frames"):
        write_video(tmp_path / "keep.mp4", iter([]))
    assert (tmp_path / "keep.mp4").read_bytes() == b"previous"
    with pytest.raises(FileExistsError, match="keep.mp4"):
        write_video(tmp_path / "keep.mp4", _smooth(1), overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.mp4"]
    assert (tmp_path / "keep.mp4").read_bytes() == b"previous"


def _wav(path, seconds=1.0, rate=16000):
    t = np.arange(int(rate * seconds)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def test_audio_is_muxed_and_a_bad_audio_file_leaves_nothing(tmp_path):
    out = write_video(tmp_path / "av.mp4", _smooth(), fps=8, audio_path=_wav(tmp_path / "a.wav"))
    assert _stream(out) == ("yuv420p", "h264", 1)
    (tmp_path / "noise.wav").write_bytes(np.random.default_rng(3).bytes(500))
    with pytest.raises(ValueError, match="noise.wav"):
        write_video(tmp_path / "bad.mp4", _smooth(), audio_path=tmp_path / "noise.wav")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav", "av.mp4", "noise.wav"]


def test_bad_video_files(tmp_path):
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 100)
    for fn in (read_video, probe, lambda p: decode_frames(p, [0])):
        with pytest.raises(ValueError, match="broken.mp4"):
            fn(tmp_path / "broken.mp4")
    with pytest.raises(FileNotFoundError, match="gone.mp4"):
        read_video(tmp_path / "gone.mp4")
    out = write_video(tmp_path / "short.mp4", _smooth(3), lossless=True)
    with pytest.raises(ValueError, match="short.mp4: decoded only 1 of the 2 frames"):
        decode_frames(out, [2, 5])
