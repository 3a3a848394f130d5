"""Real multi-process runs (issue 22): 2 processes x 2 CPU devices on this machine, started by the test with a
localhost ``jax.distributed`` coordinator and gloo collectives (``hcjax.runtime.initialize_distributed``).

* ``sample.py --coordinator ... --mesh 1 2 2 1``: exactly one MP4 (process 0 writes), and the pipeline API on the
  same 4-device mesh gives every process the one-device latents (1e-5 relative) and frames (1/255);
* ``train.py`` for 4 steps across the 2 processes: the losses of a one-process run within 1e-6 relative, and a
  checkpoint written by the 2 processes restored by 2 processes (``--resume``) continues with the same losses;
  the two-process runs cut each batch's text to one length agreed by both (``train.text_bucket``), the
  one-process run keeps the whole text.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hcjax import models as M
from hcjax import pipeline
from hcjax.config import load_config
from hcjax.data.encode import precompute
from hcjax.data.synthetic import generate
from tests.conftest import ROOT

TINY = ROOT / "configs" / "default_tiny.yaml"
TRAIN_TINY = ROOT / "configs" / "train_tiny.yaml"
REQ = dict(video_size=(32, 48), frames=5, steps=3, seed=11)
TIMEOUT = 900

SAMPLE_WORKER = r"""
import sys
import jax
jax.config.update("jax_default_matmul_precision", "highest")
import numpy as np
import sample
from hcjax import models as M, pipeline, sharding

out, pid, addr, tiny = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
rc = sample.main(["--config", tiny, "--video-size", "32", "48", "--sample-n-frames", "5", "--infer-steps", "3",
                  "--seed", "11", "--no-compile-cache", "--save-path", out + "/videos", "--output-name", "mp",
                  "--coordinator", addr, "--num-processes", "2", "--process-id", pid, "--mesh", "1", "2", "2", "1"])
assert rc == 0, rc
assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
src = M.resolve(None, tiny)
mesh_cfg = sharding.mesh_config((1, 2, 2, 1), src.cfg.dit, jax.device_count())
models = M.load(src, mesh=sharding.make_mesh(mesh_cfg, src.cfg.dit), mesh_cfg=mesh_cfg)
req = pipeline.Request.from_config(src.cfg.sample, video_size=(32, 48), frames=5, steps=3, seed=11)
latents = np.asarray(pipeline.denoise(models, pipeline.prepare(models, req)))
np.savez(f"{out}/proc{pid}.npz", latents=latents, frames=pipeline.decode(models, latents))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(devices: int) -> dict:
    e = dict(os.environ)
    e.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0 "
                       "--xla_cpu_use_fusion_emitters=false")   # tiny models: backend optimisation only costs time
    for k in ("JAX_COORDINATOR_ADDRESS", "HCJAX_DISTRIBUTED"):
        e.pop(k, None)
    return e


def launch(commands: list[list[str]], devices: int, logs: Path) -> list[subprocess.CompletedProcess]:
    """Start every command at once (one per process) with its output in ``logs`` (files, not pipes: a full pipe
    would stall one process inside a collective and with it the others), wait for all; a hung group is killed."""
    logs.mkdir(parents=True, exist_ok=True)
    files = [(open(logs / f"{i}.out", "w"), open(logs / f"{i}.err", "w")) for i in range(len(commands))]
    procs = [subprocess.Popen(c, cwd=ROOT, env=env(devices), stdout=o, stderr=e) for c, (o, e) in zip(commands, files)]
    try:
        for p in procs:
            p.wait(timeout=TIMEOUT)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for o, e in files:
            o.close()
            e.close()
    return [subprocess.CompletedProcess(p.args, p.returncode, (logs / f"{i}.out").read_text(),
                                        (logs / f"{i}.err").read_text()) for i, p in enumerate(procs)]


def check(results):
    for i, r in enumerate(results):
        assert r.returncode == 0, f"process {i}:\n{r.stderr[-3000:]}"


def test_two_processes_sample_like_one_device(tmp_path):
    addr = f"127.0.0.1:{free_port()}"
    check(launch([[sys.executable, "-c", SAMPLE_WORKER, str(tmp_path), str(i), addr, str(TINY)] for i in range(2)],
                 devices=2, logs=tmp_path / "logs"))
    assert sorted(p.name for p in (tmp_path / "videos").iterdir()) == ["mp.json", "mp.mp4"]    # process 0 only
    assert json.loads((tmp_path / "videos" / "mp.json").read_text())["processes"] == 2

    models = M.random_models(load_config(TINY), seed=0)                                        # one device
    req = pipeline.Request.from_config(models.cfg.sample, **REQ)
    want = np.asarray(pipeline.denoise(models, pipeline.prepare(models, req)))
    want_frames = pipeline.decode(models, want)
    for i in range(2):
        got = np.load(tmp_path / f"proc{i}.npz")
        assert np.abs(got["latents"] - want).max() / np.abs(want).max() <= 1e-5
        assert np.abs(got["frames"].astype(int) - want_frames.astype(int)).max() <= 1


# ------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp_train")
    generate(root / "raw", num_clips=8, frames=13, height=32, width=32, seed=0)
    precompute(load_config(TRAIN_TINY), root / "raw", root / "cache")
    return root / "cache"


def train_cmd(workdir, cache, steps, *extra):
    return [sys.executable, str(ROOT / "train.py"), "--config", str(TRAIN_TINY), "--workdir", str(workdir),
            "--set", f"train.data.path={cache}", "--set", f"train.steps={steps}", "--set", "train.log_every=1",
            "--set", "train.save_every=2", "--set", "train.async_save=false", "--no-progress", *extra]


def losses(workdir) -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step"] for m in rows]
    assert len(steps) == len(set(steps)), steps                # one writer (process 0): each step logged once
    return {m["step"]: m["loss"] for m in rows}


def test_two_processes_train_and_resume_like_one_process(tmp_path, train_data):
    check(launch([train_cmd(tmp_path / "one", train_data, 6)], devices=1, logs=tmp_path / "logs_one"))
    want = losses(tmp_path / "one")
    assert sorted(want) == [1, 2, 3, 4, 5, 6]

    def two(steps, *extra):                   # 9 of 16 text tokens valid: each batch's text cut to 10 (bucket 2)
        addr = f"127.0.0.1:{free_port()}"
        check(launch([train_cmd(tmp_path / "two", train_data, steps, "--coordinator", addr, "--num-processes", "2",
                                "--process-id", str(i), "--set", "train.text_bucket=2", *extra) for i in range(2)],
                     devices=2, logs=tmp_path / f"logs_two_{steps}"))

    two(4)                                               # 2 processes x 2 devices: fsdp 4 over both processes
    two(6, "--resume")                                   # restores step 4 (written by both) on both processes
    got = losses(tmp_path / "two")
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    # fp32 rounding only: fsdp 4 over two processes reduces in another order than one device, and the difference
    # grows with the steps (one CI run on 2026-12-06: 1.25e-6 relative at step 6); a wrong resume (step, data
    # position, optimizer state) moves the loss by orders of magnitude more. Bitwise resume: test_training.
    for step in want:
        assert abs(got[step] - want[step]) <= 5e-6 * abs(want[step]), (step, got[step], want[step])
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir() if p.name.isdigit()) == ["4", "6"]
