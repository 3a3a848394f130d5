"""The web app (``python -m hcjax.app``).

In-process (tiny random models): the upload checks and their messages, the mode support messages, the audio tab's
muxed output, the editing tab, one request at a time on the device, the page's structure and queue settings.

In a real browser: headless Debian ``chromium`` driven by Playwright for Python (through its executable path; no
Playwright browser download), against a server started here on a free localhost port with the embedded demo
model: upload a reference, type a prompt, generate, wait for the progress to finish and check the page plays a
video of frames/fps seconds; a corrupt upload gets the app's own message naming the file, and the server lives on.
Screenshots go to the pytest temporary directory (the path is printed). Without chromium or playwright these two
tests skip, unless ``HCJAX_REQUIRE_BROWSER=1`` (CI) makes that a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import wave
from pathlib import Path

import numpy as np
import pytest

from hcjax import app
from hcjax import models as M
from hcjax import pipeline as P
from hcjax.config import load_config
from hcjax.media import read_video, write_video
from tests.conftest import ROOT

REF = str(ROOT / "assets/demo_subject.png")
SMALL = dict(video_size=(32, 32), frames=5, steps=2, pos_prompt="the object moves to the left")


def _corrupt_png(path):
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 40)
    return path


def _wav(path, seconds=1.0, sr=16000):
    t = np.arange(int(seconds * sr)) / sr
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes((np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16).tobytes())
    return path


def _engine(tmp_path, *overrides):
    cfg = load_config(M.DEFAULT_CONFIG, list(overrides))
    src = M.Source("random", cfg)
    return app.Engine(src, M.random_models(cfg, seed=3), tmp_path / "out", dwpose_dir=str(tmp_path / "dw"))


# ------------------------------------------------------------------------------------------- in-process


def test_upload_messages_name_the_file(tmp_path):
    bad = _corrupt_png(tmp_path / "my corrupt.png")
    msg = app.file_problem("Reference image", str(bad), "image")
    assert msg.startswith("Reference image “my corrupt.png”") and "cannot decode" in msg
    assert str(tmp_path) not in msg                               # the server's temp path is not shown
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert "empty.png" in app.file_problem("Reference image", str(empty), "image") and "empty" in \
        app.file_problem("Reference image", str(empty), "image").split("”", 1)[1]
    noise = tmp_path / "noise.wav"
    noise.write_bytes(b"RIFF" + b"\x01" * 100)
    assert "noise.wav" in app.file_problem("Audio", str(noise), "audio")
    assert "clip.mp4" in app.file_problem("Input video", str(_corrupt_png(tmp_path / "clip.mp4")), "video")
    assert app.file_problem("Reference image", REF, "image") is None
    assert app.file_problem("Reference image", None, "image") is None


def test_mode_support_messages(tmp_path):
    image = _engine(tmp_path)
    assert image.mode_problem("image") is None
    multi = image.mode_problem("multi")                        # available once the pipeline takes K > 1 images
    assert multi is None if getattr(P, "MAX_SUBJECTS", 1) > 1 else "not available" in multi
    assert "audio checkpoint" in image.mode_problem("audio") and "editing checkpoint" in image.mode_problem("editing")
    with pytest.raises(app.UploadError, match="audio checkpoint"):
        image.request("audio", {"ref_image": REF, "input_audio": None})
    edit = _engine(tmp_path, "dit.video_condition=true")
    assert edit.mode_problem("editing") is None and "image checkpoint" in edit.mode_problem("image")


def test_request_checks_every_upload_and_uses_model_defaults(tmp_path):
    eng = _engine(tmp_path)
    bad = _corrupt_png(tmp_path / "second.png")
    with pytest.raises(app.UploadError, match="Reference image 2 “second.png”"):
        eng.request("multi", {"ref_image": [REF, str(bad), None, None], "item_name": ["a", "b", "", ""],
                              "pos_prompt": "x"})
    req = eng.request("multi", {"ref_image": [REF, None, REF, None], "item_name": ["cat", "", "", ""],
                                "pos_prompt": "x"})
    assert req.ref_image == [REF, REF] and req.item_name == ["cat", eng.cfg.sample.item_name]
    req = eng.request("image", {"pos_prompt": "x"})                 # nothing uploaded: the model's reference
    sc = eng.cfg.sample
    assert req.ref_image.endswith(sc.ref_image or "demo_subject.png") and req.steps == sc.steps
    with pytest.raises(ValueError, match="4k\\+1"):
        eng.request("image", {"ref_image": REF, "pos_prompt": "x", "frames": 6})


def test_audio_tab_output_has_the_audio_track(tmp_path):
    import av

    eng = _engine(tmp_path, "dit.audio_condition=true")
    req = eng.request("audio", {"ref_image": REF, "input_audio": str(_wav(tmp_path / "voice.wav")), **SMALL,
                                "fps": 8})
    steps = []
    out = eng.run(req, "audio", on_step=steps.append)
    assert steps == [0, 1]
    with av.open(str(out.video)) as c:
        assert len(c.streams.audio) == 1 and len(c.streams.video) == 1
    assert read_video(out.video).shape == (5, 32, 32, 3)
    saved = json.loads(out.video.with_suffix(".json").read_text())
    assert saved["mode"] == "audio" and saved["input_audio"].endswith("voice.wav") and saved["steps"] == 2
    assert eng.history[0] is out


def test_editing_tab_and_missing_pose_files(tmp_path):
    eng = _engine(tmp_path, "dit.video_condition=true")
    rng = np.random.default_rng(0)
    write_video(tmp_path / "v.mp4", rng.integers(0, 255, (5, 32, 48, 3), dtype=np.uint8), lossless=True)
    mask = np.zeros((5, 32, 48, 3), np.uint8)
    mask[:, 8:24, 16:32] = 255
    write_video(tmp_path / "m.mp4", mask, lossless=True)
    write_video(tmp_path / "short.mp4", mask[:3], lossless=True)
    base = {"ref_image": REF, "input_video": str(tmp_path / "v.mp4"), "mask_video": str(tmp_path / "m.mp4"),
            "pos_prompt": "x", "steps": 2}
    with pytest.raises(app.UploadError, match="short.mp4") as e:
        eng.request("editing", dict(base, mask_video=str(tmp_path / "short.mp4")))
    assert str(tmp_path) not in str(e.value)
    with pytest.raises(FileNotFoundError, match="yolox_l.onnx.*dw-ll_ucoco_384.onnx"):
        eng.request("editing", dict(base, pose_enhance=True))
    out = eng.run(eng.request("editing", dict(base, pose_enhance=False)), "editing")
    assert read_video(out.video).shape == (5, 32, 48, 3)


def test_requests_never_interleave(tmp_path):
    eng = _engine(tmp_path)
    req = eng.request("image", {"ref_image": REF, **SMALL})
    log, errors = [], []

    def one(tag):
        try:
            eng.run(req, "image", on_phase=lambda p: log.append((tag, p)))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=one, args=(t,)) for t in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    tags = [t for t, _ in log]
    first = tags[0]
    assert len(log) == 10 and tags == [first] * 5 + [("b" if first == "a" else "a")] * 5, log
    assert len(eng.history) == 2 and eng.history[0].video != eng.history[1].video


def test_page_structure_and_queue(tmp_path):
    pytest.importorskip("gradio")
    eng = _engine(tmp_path)
    page = app.build(eng)
    cfg = page.get_config_file()
    comps = {c["id"]: c for c in cfg["components"]}
    tabs = [c["props"].get("label") for c in comps.values() if c["type"] == "tabitem"]
    assert tabs == list(app.MODES.values())
    labels = [c["props"].get("label") for c in comps.values()]
    assert labels.count("Prompt") == 4 and labels.count("Negative prompt") == 4 and labels.count("Result") == 4
    assert [c["props"].get("value") for c in comps.values() if c["type"] == "button"].count("Generate") == 4
    videos = [c for c in comps.values() if c["type"] == "video"]
    assert len(videos) == 4
    steps = [c for c in comps.values() if c["props"].get("elem_id") == "image-steps"]
    assert steps[0]["props"]["value"] == eng.cfg.sample.steps          # defaults from the model's sample:
    gen = [d for d in cfg["dependencies"] if len(d["outputs"]) == 4]
    assert len(gen) == 4 and all(d.get("show_progress", "full") != "hidden" for d in gen)
    fns = [page.fns[d["id"]] for d in gen]                      # one shared queue slot for every Generate
    assert all(f.concurrency_limit == 1 and f.concurrency_id == "generate" for f in fns)
    # every file a user gives is checked on upload: 1 reference, 4 subject slots, reference + audio, reference +
    # video + mask
    inputs = {c["id"] for c in comps.values() if c["type"] == "file" and c["props"].get("interactive") is not False}
    checked = {t[0] for d in cfg["dependencies"] for t in d["targets"] if t[1] == "upload"}
    assert len(inputs) == 10 and inputs == checked, (len(inputs), inputs ^ checked)


def test_multi_tab_reference_layout_reaches_the_request(tmp_path):
    """The Multi-subject tab's "Reference layout" (sample.py's --ref-layout) defaults to the model's
    sample.ref_layout and the chosen value is the one the request carries."""
    pytest.importorskip("gradio")
    eng = _engine(tmp_path)
    page = app.build(eng)
    cfg = page.get_config_file()
    radio = [c for c in cfg["components"] if c["props"].get("elem_id") == "multi-ref_layout"]
    assert len(radio) == 1 and radio[0]["type"] == "radio"
    assert radio[0]["props"]["value"] == eng.cfg.sample.ref_layout
    assert [c[0] if isinstance(c, (list, tuple)) else c for c in radio[0]["props"]["choices"]] == ["centre", "columns"]
    dep = [d for d in cfg["dependencies"] if radio[0]["id"] in d["inputs"] and len(d["outputs"]) == 4]
    assert len(dep) == 1
    seen = []

    def run(req, mode, on_step=None, on_phase=None):        # the request as the engine would get it
        seen.append((mode, req))
        raise RuntimeError("not generating in this test")

    eng.run = run
    fn = page.fns[dep[0]["id"]].fn
    for layout in ("columns", "centre"):
        data = {page.blocks[i]: page.blocks[i].value for i in dep[0]["inputs"]}
        for block in data:
            elem = getattr(block, "elem_id", None)
            if elem in ("multi-ref-1", "multi-ref-2"):
                data[block] = REF
            elif elem == "multi-ref_layout":
                data[block] = layout
        message = fn(data)[0]
        assert "not generating in this test" in message
        mode, req = seen[-1]
        assert mode == "multi" and req.ref_layout == layout and req.ref_image == [REF, REF]


# ------------------------------------------------------------------------------------------- in a browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _need_browser():
    required = os.environ.get("HCJAX_REQUIRE_BROWSER") == "1"
    problem = None
    try:
        import playwright.sync_api  # noqa: F401
        import gradio  # noqa: F401
    except ImportError as e:
        problem = f"{e.name} is not installed (pip install -e '.[test]')"
    if problem is None and not shutil.which("chromium"):
        problem = "no chromium executable (apt-get install -y chromium)"
    if problem:
        (pytest.fail if required else pytest.skip)(f"browser test: {problem}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    _need_browser()
    work = tmp_path_factory.mktemp("app")
    port = _free_port()
    log = open(work / "server.log", "w")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONUNBUFFERED="1",
               GRADIO_TEMP_DIR=str(work / "gradio_tmp"))          # uploads isolated from other gradio processes
    proc = subprocess.Popen([sys.executable, "-m", "hcjax.app", "--port", str(port), "--save-path",
                             str(work / "out")], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 600
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the app exited with {proc.returncode}: {(work / 'server.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail("the app did not answer within 600 s")
                time.sleep(1)
        print(f"\napp screenshots and log: {work}")
        yield {"url": url, "proc": proc, "dir": work}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture()
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1280, "height": 1000})
        pg.goto(server["url"])
        pg.get_by_role("tab", name="Reference image").wait_for(timeout=300_000)
        yield pg
        browser.close()


def _visible(locator):
    return locator.filter(visible=True).first


def _upload(page, component: str, path, shown: tuple[str, str], shots: Path, tab: str = "Reference image",
            attempts: int = 3, wait_ms: int = 60_000):
    """Upload ``path`` through the file input of ``component`` (in ``tab``) and wait until an element matching
    ``shown[0]`` has ``shown[1]`` in its text; when none does, screenshot the page into ``shots`` and upload again
    on a reloaded page.

    The upload counts as shown once the element's text, with all whitespace removed, holds the name and no
    "Uploading" progress is left. Gradio's finished file row renders the name as two flex items (stem and extension),
    so its ``innerText`` reads "subject_05", line break, ".png" (checked in chromium); only the transient
    "Uploading 1 file..." view has it in one piece. A plain match passed when it caught that view and timed out in
    CI now and then with the finished row on the screenshot."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    selector, text = shown
    for attempt in range(attempts):
        page.get_by_role("tab", name=tab).click()
        page.locator(component).wait_for(state="visible", timeout=300_000)
        page.locator(f"{component} input[type=file]").set_input_files(str(path), timeout=120_000)
        try:
            page.wait_for_function("([sel, text]) => Array.from(document.querySelectorAll(sel))"
                                   ".some((e) => e.innerText.replace(/\\s+/g, '').includes(text)"
                                   " && !e.innerText.includes('Uploading'))",
                                   arg=[selector, re.sub(r"\s+", "", text)], timeout=wait_ms)
            return
        except PlaywrightTimeout:
            page.screenshot(path=str(shots / f"upload_timeout_{attempt}.png"), full_page=True)
            if attempt == attempts - 1:
                raise
            page.reload()
            page.get_by_role("tab", name=tab).wait_for(timeout=300_000)


@pytest.mark.slow
def test_browser_generate_shows_a_playable_video_of_the_right_length(server, page, tmp_path):
    shots = server["dir"]
    for name in app.MODES.values():                                  # all four tabs fit at 1280 px
        tab = page.get_by_role("tab", name=name)
        assert tab.is_visible(), name
        tab.click()
        assert _visible(page.get_by_label("Prompt", exact=True)).is_visible()
        assert _visible(page.get_by_label("Negative prompt", exact=True)).is_visible()
        assert _visible(page.get_by_role("button", name="Generate")).is_visible()
    assert "audio checkpoint" in page.locator("#audio-support").inner_text()       # demo = the image model
    assert "editing checkpoint" in page.locator("#editing-support").inner_text()
    page.get_by_role("tab", name="Reference image").click()

    frames, fps, steps = 5, 8, 3
    _upload(page, "#image-ref", ROOT / "assets/demo/subject_05.png", ("#image-ref", "subject_05.png"), shots)
    _visible(page.get_by_label("Prompt", exact=True)).fill("the object moves to the right")
    for key, value in (("frames", frames), ("steps", steps), ("fps", fps)):
        page.locator(f"#image-{key} input").fill(str(value))
    # record every progress text the page shows while generating
    page.evaluate("""() => { window.__progress = new Set();
        new MutationObserver(() => { for (const m of document.body.innerText.matchAll(/denoising[^\\n]*/g))
            window.__progress.add(m[0]); }).observe(document.body, {subtree: true, childList: true,
            characterData: true}); }""")
    _visible(page.get_by_role("button", name="Generate")).click()
    page.wait_for_selector("#image-status :text('Done')", timeout=900_000)
    page.screenshot(path=str(shots / "generated.png"), full_page=True)
    video = page.locator("#image-video video")
    video.wait_for(timeout=300_000)
    state = page.evaluate("""async () => { const v = document.querySelector('#image-video video');
        if (v.readyState < 1) await new Promise(r => v.addEventListener('loadedmetadata', r, {once: true}));
        v.muted = true; await v.play(); await new Promise(r => setTimeout(r, 300));
        return {ready: v.readyState, duration: v.duration, t: v.currentTime, w: v.videoWidth, h: v.videoHeight,
                error: v.error && v.error.code}; }""")
    assert state["error"] is None and state["ready"] >= 2, state                    # decodable, playing
    assert abs(state["duration"] - frames / fps) < 0.5 / fps, state                 # frames / fps seconds
    assert (state["w"], state["h"]) == (64, 64) and state["t"] > 0, state
    seen = page.evaluate("() => [...window.__progress]")
    # gr.Progress over the denoise steps was shown (the page samples it, so not necessarily every step) and is gone
    # (Gradio renders a (step, total) progress as "denoising: i / n steps" or as "denoising - p%")
    ticks = {f"denoising: {i} / {steps} steps" for i in range(1, steps + 1)} | \
        {f"denoising - {100 * i / steps:.1f}%" for i in range(1, steps + 1)}
    assert ticks & set(seen), seen
    assert "denoising" not in page.locator("#image-video").inner_text()
    status = page.locator("#image-status").inner_text()
    assert f"{frames} frames 64x64" in status and f"{steps} steps" in status
    # the gallery holds it; its settings JSON is shown on selection
    page.get_by_role("button", name=re.compile("^Thumbnail 1 of")).click(timeout=120_000)
    page.wait_for_selector("#history-settings :text('moves to the right')", timeout=120_000)
    assert re.search(r'"steps"\s*:\s*3\b', page.locator("#history-settings").inner_text())
    page.screenshot(path=str(shots / "history.png"), full_page=True)
    mp4s = list((server["dir"] / "out").glob("*.mp4"))
    assert len(mp4s) == 1 and read_video(mp4s[0]).shape == (frames, 64, 64, 3)


@pytest.mark.slow
def test_browser_corrupt_upload_gets_the_apps_message(server, page):
    bad = _corrupt_png(server["dir"] / "broken_subject.png")
    _upload(page, "#image-ref", bad, ("#image-status", "broken_subject.png"), server["dir"])
    status = page.locator("#image-status")
    text = status.inner_text()
    assert "Reference image" in text and "cannot decode" in text and "Could not preprocess" not in text
    _visible(page.get_by_role("button", name="Generate")).click()                 # generate checks it again
    page.wait_for_timeout(1500)
    assert "broken_subject.png" in status.inner_text()
    page.screenshot(path=str(server["dir"] / "corrupt_upload.png"), full_page=True)
    assert server["proc"].poll() is None                                            # the server lives on
    assert urllib.request.urlopen(server["url"], timeout=10).status == 200
