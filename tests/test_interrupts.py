"""Ctrl-C / SIGTERM in every phase of ``sample.py``: exit 130 / 143, one line, no partial or reserved file left.

The test waits for the ``[hcjax] phase <name>`` marker the program prints (never a fixed sleep). Phases that
are over in milliseconds on the tiny preset are held open with ``HCJAX_PHASE_DELAY``; compile and denoise are
interrupted for real (compile three times: an interrupt during XLA compilation must not be lost). In-process:
an interrupt inside code that swallows every exception (orbax's wait for a checkpoint save) is held and delivered
after it (``hold_interrupts``), and ``exit_process`` ends a finished program quickly but with its ``atexit``
handlers and threads done.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from hcjax.checkpoint import TrainCheckpoints
from hcjax.cli import hold_interrupts, run_cli
from hcjax.config import load_config
from tests.conftest import ROOT

ARGS = ["--config", "configs/default_tiny.yaml", "--video-size", "32", "32", "--sample-n-frames", "5"]
HELD = ("import", "load", "prepare", "decode", "write")


def _run_until(tmp_path, phase: str, sig=signal.SIGINT, steps: int = 2, hold: bool = True):
    env = {**os.environ, "HCJAX_PHASE_DELAY": f"{phase}:30" if hold else ""}
    p = subprocess.Popen([sys.executable, "sample.py", "--save-path", str(tmp_path), *ARGS, "--infer-steps",
                          str(steps)], cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                         env=env)
    seen, deadline = [], time.monotonic() + 300
    for line in p.stderr:
        seen.append(line)
        if line.strip() == f"[hcjax] phase {phase}":
            p.send_signal(sig)
            break
        assert time.monotonic() < deadline, "".join(seen)
    else:
        p.wait()
        pytest.fail(f"no '{phase}' marker; rc={p.returncode}; stderr:\n{''.join(seen)}")
    rest = p.stderr.read()
    p.wait(timeout=120)
    return p.returncode, "".join(seen) + rest


@pytest.mark.parametrize("phase", HELD + ("compile", "compile", "compile", "denoise"))
def test_sigint_in_every_phase(tmp_path, phase):
    rc, err = _run_until(tmp_path, phase, steps=40 if phase == "denoise" else 2, hold=phase in HELD)
    assert rc == 130, err
    assert "interrupted; no output written" in err and "Traceback" not in err, err
    assert sorted(os.listdir(tmp_path)) == [], os.listdir(tmp_path)


@pytest.mark.parametrize("phase", ["load", "write"])
def test_sigterm(tmp_path, phase):
    rc, err = _run_until(tmp_path, phase, sig=signal.SIGTERM)
    assert rc == 143, err
    assert "terminated; no output written" in err and "Traceback" not in err, err
    assert sorted(os.listdir(tmp_path)) == [], os.listdir(tmp_path)


def _sample(tmp_path, *extra):
    return subprocess.Popen([sys.executable, "sample.py", "--save-path", str(tmp_path), *ARGS, "--infer-steps", "1",
                             "--seed", "5", *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_concurrent_runs_into_one_directory_each_keep_their_file(tmp_path):
    runs = [_sample(tmp_path) for _ in range(3)]          # same seed, same directory, same second
    outs = [p.communicate(timeout=600) for p in runs]
    assert [p.returncode for p in runs] == [0, 0, 0], [e for _, e in outs]
    mp4s = sorted(tmp_path.glob("*.mp4"))
    assert len(mp4s) == 3 and all(m.with_suffix(".json").stat().st_size > 0 for m in mp4s)
    assert all(m.stat().st_size > 0 for m in mp4s)


def test_output_name_never_overwrites(tmp_path):
    keep = tmp_path / "mine.mp4"
    keep.write_bytes(b"user data")
    p = _sample(tmp_path, "--output-name", "mine")
    _, err = p.communicate(timeout=600)
    assert p.returncode == 2 and "--output-name mine" in err and "Traceback" not in err, err
    assert keep.read_bytes() == b"user data" and sorted(os.listdir(tmp_path)) == ["mine.mp4"]
    p = _sample(tmp_path, "--output-name", "fresh")
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    assert (tmp_path / "fresh.mp4").stat().st_size > 0 and (tmp_path / "fresh.json").is_file()


def _swallow_everything(sig):
    """Library code like orbax's ``wait_until_finished``: catches every exception raised while it waits."""
    try:
        os.kill(os.getpid(), sig)
        time.sleep(0.3)                                # the handler runs here and raises
    except BaseException:                              # noqa: BLE001 - what the library does
        pass


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_inside_code_that_swallows_it_is_held(sig, code):
    finished = []

    def unprotected():
        _swallow_everything(sig)
        finished.append("unprotected")

    def protected():
        with hold_interrupts():
            _swallow_everything(sig)
            finished.append("block")                   # the block completes; the interrupt comes after it
        finished.append("after")

    previous = signal.getsignal(signal.SIGINT)
    try:
        assert run_cli(unprotected) == 0 and finished == ["unprotected"]     # the loss hold_interrupts prevents
        finished.clear()
        assert run_cli(protected) == code and finished == ["block"]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_sigterm_while_waiting_for_a_checkpoint_save(tmp_path, caplog):
    """SIGTERM while orbax writes a step in the background: not raised inside orbax's wait (which would log it as a
    failed save with a traceback and forget the step), but right after the save completed: exit 143, a complete
    step, no temporary directory."""
    rng = np.random.default_rng(0)
    state = {"params": {f"w{i}": rng.standard_normal((512, 1024), np.float32) for i in range(24)}}   # 48 MB
    cfg = load_config(ROOT / "configs" / "train_tiny.yaml")
    finished = []

    def main():
        ck = TrainCheckpoints(tmp_path / "checkpoints")
        ck.save(1, state, {}, cfg)
        timer = threading.Timer(0.02, os.kill, (os.getpid(), signal.SIGTERM))
        timer.start()
        try:
            ck.wait()
            finished.append("wait")
        finally:
            timer.join()
            ck.close()

    previous = signal.getsignal(signal.SIGINT)
    try:
        assert run_cli(main) == 143 and finished == []
    finally:
        signal.signal(signal.SIGINT, previous)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]
    restored, _ = TrainCheckpoints(tmp_path / "checkpoints", read_only=True).restore(1)
    assert np.array_equal(restored["params"]["w3"], state["params"]["w3"])


def test_exit_process_runs_atexit_and_joins_threads():
    code = ("from hcjax.cli import exit_process\n"
            "import atexit, threading, time\n"
            "atexit.register(lambda: print('atexit ran', flush=True))\n"
            "threading.Thread(target=lambda: (time.sleep(0.3), print('thread done', flush=True))).start()\n"
            "print('main', flush=True)\n"
            "exit_process(2)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout.split() == ["main", "thread", "done", "atexit", "ran"], p
