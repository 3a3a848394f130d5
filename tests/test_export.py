"""``python -m hcjax.export`` end to end: a tiny DiT run (train.py) -> export -> ``sample.py --ckpt-dir`` writes
one MP4; a bundle whose pieces do not fit and an occupied ``--out`` are one-line errors that change nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hcjax.config import load_config
from hcjax.data.encode import precompute
from hcjax.data.synthetic import generate
from tests.conftest import ROOT

TINY = ROOT / "configs" / "train_tiny.yaml"


def run(args, tmp, timeout=900):
    env = {**os.environ, "HCJAX_CACHE_DIR": str(tmp / "xla"), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    generate(root / "raw", num_clips=4, frames=9, height=32, width=32, seed=0)
    precompute(load_config(TINY), root / "raw", root / "cache")
    p = run(["train.py", "--config", str(TINY), "--workdir", str(root / "run"), "--no-progress", "--set",
             f"train.data.path={root / 'cache'}", "--set", "train.steps=2", "--set", "train.save_every=2",
             "--set", "train.batch_size=2"], root)
    assert p.returncode == 0, p.stderr[-3000:]
    return root


def test_train_export_sample(tiny_run):
    root = tiny_run
    out = root / "bundle"
    p = run(["-m", "hcjax.export", "--dit-run", str(root / "run"), "--vae", "random", "--text-from", "random",
             "--out", str(out)], root)
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(c.name for c in out.iterdir()) == ["clip", "dit", "export.json", "llava", "vae"]
    cfg = json.loads((out / "dit" / "config.json").read_text())
    assert cfg["sample"]["video_size"] == [32, 32] and cfg["sample"]["frames"] == 9     # the trained shapes
    assert json.loads((out / "export.json").read_text())["step"] == 2
    # the run's data settings without its paths into this machine's files (the run has train.data.path set)
    run_data = json.loads((root / "run" / "config.json").read_text())["train"]["data"]
    assert run_data["path"] == str(root / "cache")
    for c in ("dit", "vae", "llava", "clip"):
        data = json.loads((out / c / "config.json").read_text())["train"]["data"]
        assert data == {**run_data, "path": ""}, (c, data)
        assert str(root) not in json.dumps(data)
    p = run(["sample.py", "--ckpt-dir", str(out), "--save-path", str(root / "samples"), "--infer-steps", "2"], root)
    assert p.returncode == 0, p.stderr[-3000:]
    mp4s = list((root / "samples").glob("*.mp4"))
    assert len(mp4s) == 1 and mp4s[0].stat().st_size > 0 and mp4s[0].with_suffix(".json").is_file()
    # the same --out again: refused, the bundle untouched
    before = sorted(str(f) for f in out.rglob("*"))
    p = run(["-m", "hcjax.export", "--dit-run", str(root / "run"), "--vae", "random", "--text-from", "random",
             "--out", str(out)], root)
    assert p.returncode == 2 and "--overwrite" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert sorted(str(f) for f in out.rglob("*")) == before


def test_export_refuses_pieces_that_do_not_fit(tiny_run):
    root = tiny_run
    # the demo VAE has 8 latent channels and 4x spatial compression; the run's latents have 4 and 8x
    p = run(["-m", "hcjax.export", "--dit-run", str(root / "run"), "--vae", str(ROOT / "assets/demo/model/vae"),
             "--text-from", "random", "--out", str(root / "mixed")], root)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "vae.latent_channels" in err[0] and "do not fit" in err[0], p.stderr[-2000:]
    assert not (root / "mixed").exists() and not list(root.glob(".mixed.partial-*"))
