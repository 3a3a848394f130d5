"""End-to-end sampling: the CLI (subprocess) on the embedded demo model and on tiny random weights
(``--config configs/default_tiny.yaml``), and generate() for image, audio, editing modes."""

from __future__ import annotations

import json
import subprocess
import sys
import wave

import numpy as np
import pytest

from hcjax import models as M
from hcjax.config import load_config
from hcjax.media import read_video, write_video
from hcjax.pipeline import Request, generate
from tests.conftest import ROOT

SMALL = dict(video_size=(32, 48), frames=5, steps=2)
TINY = "configs/default_tiny.yaml"


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_cli_image_mode_writes_mp4_and_settings(tmp_path):
    r = _cli("--save-path", str(tmp_path), "--video-size", "32", "48", "--sample-n-frames", "5",
             "--infer-steps", "2", "--seed", "7")
    assert r.returncode == 0, r.stderr
    mp4s = list(tmp_path.glob("*.mp4"))
    assert len(mp4s) == 1
    frames = read_video(mp4s[0])
    assert frames.shape == (5, 32, 48, 3)
    settings = json.loads(mp4s[0].with_suffix(".json").read_text())
    assert settings["seed"] == 7 and settings["frames_written"] == 5 and settings["embedded_default"] is True
    demo_sample = load_config(ROOT / "configs/demo.yaml").sample               # the demo model's defaults
    assert settings["random_weights"] is False and settings["cfg_scale"] == demo_sample.cfg_scale
    assert settings["ip_cfg_scale"] == demo_sample.ip_cfg_scale > 0
    assert "s/step" in r.stderr or "s/step" in r.stdout
    assert not list(tmp_path.glob(".*partial*"))


@pytest.mark.parametrize("args,message", [
    (["--sample-n-frames", "6"], "4k+1"),
    (["--video-size", "30", "48"], "multiples of 16"),
    (["--ref-image", "/nonexistent/ref.png"], "ref.png"),
    (["--input-audio", "/nonexistent/a.wav"], "a.wav"),
    (["--input-video", "__V__"], "mask-video"),
    (["--set", "dit.nope=1"], "dit.nope"),
])
def test_cli_bad_input_exit_2_and_no_output(tmp_path, args, message):
    if "__V__" in args:
        write_video(tmp_path / "v.mp4", np.zeros((5, 32, 32, 3), np.uint8))
        args = [str(tmp_path / "v.mp4") if a == "__V__" else a for a in args]
    out = tmp_path / "out"
    r = _cli("--save-path", str(out), *args, timeout=300)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not list(out.glob("*.mp4")) if out.exists() else True


def test_missing_demo_model_says_how_to_recreate_it(tmp_path, monkeypatch):
    (tmp_path / "dit").mkdir()
    monkeypatch.setattr(M, "DEMO_BUNDLE", tmp_path)
    for fn in (M.resolve, M.load):
        with pytest.raises(FileNotFoundError, match=r"missing or incomplete .*python -m demo build"):
            fn(None)
    assert M.resolve(None, TINY).cfg.dit.hidden_size == 64            # --config: random weights, no demo needed


def test_cli_audio_flag_with_image_checkpoint(tmp_path):
    wav = tmp_path / "a.wav"
    _write_wav(wav, 0.5)
    r = _cli("--save-path", str(tmp_path / "o"), "--input-audio", str(wav), timeout=300)
    assert r.returncode == 2 and "audio checkpoint" in r.stderr


def test_cli_unwritable_save_path(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = _cli("--save-path", str(f), timeout=300)
    assert r.returncode == 2 and "is a file" in r.stderr


def _write_wav(path, seconds, sr=16000):
    t = np.arange(int(seconds * sr)) / sr
    data = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(data.tobytes())


@pytest.fixture(scope="module")
def image_models():
    return M.random_models(load_config(M.DEFAULT_CONFIG), seed=0)


def test_generate_is_deterministic_per_seed(image_models):
    req = Request(ref_image=str(ROOT / "assets/demo_subject.png"), pos_prompt="the object moves left", **SMALL)
    a, _ = generate(image_models, req)
    b, _ = generate(image_models, req)
    c, _ = generate(image_models, Request(**{**req.__dict__, "seed": req.seed + 1}))
    assert a.shape == (5, 32, 48, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).max() > 0


def test_generate_audio_mode(tmp_path):
    cfg = load_config(M.DEFAULT_CONFIG, ["dit.audio_condition=true"])
    models = M.random_models(cfg, seed=1)
    wav = tmp_path / "a.wav"
    _write_wav(wav, 1.0)
    req = Request(ref_image=str(ROOT / "assets/demo_subject.png"), pos_prompt="a person talks",
                  input_audio=str(wav), **SMALL)
    frames, _ = generate(models, req)
    assert frames.shape == (5, 32, 48, 3)
    out = write_video(tmp_path / "o.mp4", frames, audio_path=wav)
    import av

    with av.open(str(out)) as c:
        assert len(c.streams.audio) == 1 and len(c.streams.video) == 1
    with pytest.raises(ValueError, match="needs --input-audio"):
        generate(models, Request(ref_image=req.ref_image, pos_prompt="x", **SMALL))


def test_generate_editing_mode(tmp_path):
    cfg = load_config(M.DEFAULT_CONFIG, ["dit.video_condition=true"])
    models = M.random_models(cfg, seed=2)
    rng = np.random.default_rng(0)
    video = rng.integers(0, 255, (5, 32, 48, 3), dtype=np.uint8)
    mask = np.zeros((5, 32, 48, 3), np.uint8)
    mask[:, 8:24, 16:32] = 255
    write_video(tmp_path / "v.mp4", video, lossless=True)
    write_video(tmp_path / "m.mp4", mask, lossless=True)
    req = Request(ref_image=str(ROOT / "assets/demo_subject.png"), pos_prompt="replace the object",
                  input_video=str(tmp_path / "v.mp4"), mask_video=str(tmp_path / "m.mp4"), steps=2)
    frames, _ = generate(models, req)
    assert frames.shape == (5, 32, 48, 3)   # size and length come from the input video


def test_cli_audio_and_editing_modes(tmp_path):
    wav = tmp_path / "a.wav"
    _write_wav(wav, 1.0)
    r = _cli("--save-path", str(tmp_path / "audio"), "--config", TINY, "--set", "dit.audio_condition=true",
             "--input-audio", str(wav),
             "--video-size", "32", "32", "--sample-n-frames", "5", "--infer-steps", "2")
    assert r.returncode == 0, r.stderr
    mp4 = next((tmp_path / "audio").glob("*.mp4"))
    import av

    with av.open(str(mp4)) as c:
        assert len(c.streams.audio) == 1
    assert read_video(mp4).shape == (5, 32, 32, 3)
    rng = np.random.default_rng(0)
    write_video(tmp_path / "v.mp4", rng.integers(0, 255, (5, 32, 48, 3), dtype=np.uint8), lossless=True)
    mask = np.zeros((5, 32, 48, 3), np.uint8)
    mask[:, 8:24, 16:32] = 255
    write_video(tmp_path / "m.mp4", mask, lossless=True)
    r = _cli("--save-path", str(tmp_path / "edit"), "--config", TINY, "--set", "dit.video_condition=true",
             "--input-video", str(tmp_path / "v.mp4"), "--mask-video", str(tmp_path / "m.mp4"), "--infer-steps", "2")
    assert r.returncode == 0, r.stderr
    assert read_video(next((tmp_path / "edit").glob("*.mp4"))).shape == (5, 32, 48, 3)
