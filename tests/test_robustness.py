"""Bad input never crashes us or loses anything (issue 21): one line naming the problem and the file/flag, exit 2,
no partial output, nothing the user gave changed.

Entry-point cases run as subprocesses (the exit code, the one line and the file system afterwards are the
behaviour); library checks (conversion tables, readers, masks, memory estimate, precompute cleanup, VAE resume)
run in-process. Cheap checks must come before any model load: those tests assert that the ``[hcjax] phase load``
marker never appears.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import save_file

from convert_weights import readers, rules
from hcjax import memory
from hcjax.checkpoint import TrainCheckpoints, cleanup_on_failure, load_params
from hcjax.cli import run_cli
from hcjax.conditioning import video as V
from hcjax.axes import RULE_SETS
from hcjax.config import MeshConfig, load_config
from hcjax.data import encode
from hcjax.data.synthetic import generate
from hcjax.media import read_image, write_video
from hcjax.models import random_models
from hcjax.vae_training import train_vae
from tests.conftest import ROOT
from tests.dit_reference import diffusers_model, state_dict_numpy, tiny_cfg, to_original_names

DEMO = ROOT / "assets" / "demo" / "model"
TINY = ["--config", "configs/default_tiny.yaml", "--video-size", "32", "32", "--sample-n-frames", "5",
        "--infer-steps", "1"]


def run(args, tmp_path, timeout=600, env=None):
    e = {**os.environ, "HCJAX_CACHE_DIR": str(tmp_path / "xla"), "XLA_FLAGS": "", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=e)


def one_line_error(p, *needles, code=2):
    """Exit ``code``, no traceback, exactly one ``error:`` line containing every needle."""
    errs = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert p.returncode == code, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and len(errs) == 1, p.stderr[-3000:]
    for n in needles:
        assert n in errs[0], errs[0]
    return errs[0]


def snapshot(d: Path) -> dict:
    return {str(f.relative_to(d)): f.read_bytes() for f in sorted(d.rglob("*")) if f.is_file()}


# ------------------------------------------------------------------------------------------- sample.py


@pytest.mark.parametrize("kind", ["zero", "truncated", "garbage"])
def test_bad_reference_image_fails_before_load(tmp_path, kind):
    png = tmp_path / "ref.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(png)
    data = png.read_bytes()
    png.write_bytes({"zero": b"", "truncated": data[: len(data) // 2], "garbage": b"not an image" * 10}[kind])
    before = png.read_bytes()
    p = run(["sample.py", "--save-path", str(tmp_path / "out"), "--ref-image", str(png), *TINY], tmp_path)
    one_line_error(p, str(png))
    assert "phase load" not in p.stderr and png.read_bytes() == before
    assert not any((tmp_path / "out").glob("*"))


def test_rgba_reference_is_composited_on_white(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[2:6, 2:6] = (200, 10, 10, 255)                      # an opaque red square on a transparent background
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    assert img.shape == (8, 8, 3)
    assert (img[0, 0] == 255).all() and tuple(img[3, 3]) == (200, 10, 10)


def test_config_errors_and_memory_refusals(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dit:\n  hidden_size: [1\n")
    one_line_error(run(["sample.py", "--config", str(bad), "--save-path", str(tmp_path / "o")], tmp_path),
                   str(bad), "not valid YAML", "line 3")
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    line = one_line_error(run(["sample.py", "--config", str(empty), "--save-path", str(tmp_path / "o")], tmp_path),
                          str(empty), "the file is empty", "GB")
    assert "needs about" in line
    p = run(["sample.py", "--config", "configs/hunyuancustom_720p.yaml", "--save-path", str(tmp_path / "o")],
            tmp_path, timeout=120)
    one_line_error(p, "hunyuancustom_720p.yaml", "needs about", "dit ")
    p = run(["sample.py", "--video-size", "2048", "2048", "--save-path", str(tmp_path / "o")], tmp_path, timeout=120)
    one_line_error(p, "the demo model", "2048x2048", "needs about")
    assert "phase load" not in p.stderr and not any((tmp_path / "o").glob("*"))
    # the limit is the machine's: a tiny preset against a 1 MB limit is refused, naming the limit's source
    p = run(["sample.py", "--save-path", str(tmp_path / "o"), *TINY], tmp_path, env={memory.LIMIT_ENV: "1M"})
    one_line_error(p, "default_tiny.yaml", "HCJAX_MEMORY_LIMIT=1M")


def test_save_path_under_a_file_or_read_only(tmp_path):
    f = tmp_path / "file"
    f.write_text("keep")
    one_line_error(run(["sample.py", "--save-path", str(f / "sub"), *TINY], tmp_path), "--save-path", str(f))
    one_line_error(run(["sample.py", "--save-path", str(f), *TINY], tmp_path), "--save-path", "is a file")
    assert f.read_text() == "keep"
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(ro, os.W_OK):
            # root ignores the mode bits; sysfs refuses new files even to root, so it stands in for a read-only place
            ro = Path("/sys")
            assert ro.is_dir(), "needs Linux sysfs when running as root"
        before = sorted(ro.iterdir())
        one_line_error(run(["sample.py", "--save-path", str(ro), *TINY], tmp_path), "--save-path", "not writable")
        assert sorted(ro.iterdir()) == before
    finally:
        (tmp_path / "ro").chmod(stat.S_IRWXU)


def _damage(params_dir: Path, how: str) -> Path:
    """Truncate to half / overwrite with random bytes (same size) the largest tensor file under ``params_dir``."""
    big = max((f for f in params_dir.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    data = big.read_bytes()
    big.write_bytes(data[: len(data) // 2] if how == "truncated" else np.random.default_rng(0).bytes(len(data)))
    return big


def test_bundle_with_truncated_tensor_file_or_mixed_configs(tmp_path):
    b = tmp_path / "bundle"
    shutil.copytree(DEMO, b)
    big = _damage(b / "dit" / "params", "truncated")
    p = run(["sample.py", "--ckpt-dir", str(b), "--save-path", str(tmp_path / "o")], tmp_path)
    # found from the index before orbax reads a tensor: no tracebacks of its abandoned background reads either
    one_line_error(p, str(b / "dit"), "cannot restore", big.name, "truncated")
    assert not any((tmp_path / "o").glob("*.mp4"))
    c = tmp_path / "corrupt"
    shutil.copytree(DEMO, c)
    _damage(c / "dit" / "params", "random")                 # the same size: found only when a read fails
    p = run(["sample.py", "--ckpt-dir", str(c), "--save-path", str(tmp_path / "o")], tmp_path)
    one_line_error(p, str(c / "dit"), "cannot restore")
    assert not any((tmp_path / "o").glob("*.mp4"))
    m = tmp_path / "mixed"
    shutil.copytree(DEMO, m)
    cfg = json.loads((m / "vae" / "config.json").read_text())
    cfg["vae"]["latent_channels"] = 4                          # a VAE of another config
    (m / "vae" / "config.json").write_text(json.dumps(cfg))
    p = run(["sample.py", "--ckpt-dir", str(m), "--save-path", str(tmp_path / "o")], tmp_path)
    one_line_error(p, "vae/", "vae.latent_channels")
    assert "phase prepare" not in p.stderr


def test_damaged_checkpoints_in_process(tmp_path, capfd):
    """The library calls: truncated files named from the index; corrupt ones after the read, without the abandoned
    reads' tracebacks (printed by tensorstore threads after the failure)."""
    for how in ("truncated", "random"):
        d = tmp_path / how
        shutil.copytree(DEMO / "vae", d)
        _damage(d / "params", how)
        with pytest.raises(ValueError, match="truncated" if how == "truncated" else "cannot restore"):
            load_params(d)
        time.sleep(0.5)
        err = capfd.readouterr().err
        assert "Traceback" not in err and "never retrieved" not in err, err[-3000:]
    ck = TrainCheckpoints(tmp_path / "run" / "checkpoints", async_save=False)
    state = {"step": np.int32(1), "params": {"w": np.random.default_rng(0).standard_normal((128, 128), np.float32)}}
    ck.save(1, state, {}, load_config(ROOT / "configs" / "train_tiny.yaml"))
    ck.close()
    assert np.array_equal(TrainCheckpoints(ck.directory, read_only=True).restore(1)[0]["params"]["w"],
                          state["params"]["w"])
    _damage(ck.directory / "1" / "state", "truncated")
    with pytest.raises(ValueError, match=r"1: cannot restore the hcjax checkpoint: .* is truncated"):
        TrainCheckpoints(ck.directory, read_only=True).restore(1)


def test_precompute_and_export_with_truncated_checkpoints(tmp_path):
    """The other readers of checkpoints: precompute (``train.data.vae_weights``) and export (``--dit-run``)."""
    generate(tmp_path / "raw", num_clips=1, frames=5, height=16, width=16, seed=0)
    vae = tmp_path / "vae"
    shutil.copytree(DEMO / "vae", vae)
    big = _damage(vae / "params", "truncated")
    p = run(["-m", "hcjax.precompute", "--config", "configs/train_tiny.yaml", "--data", str(tmp_path / "raw"),
             "--out", str(tmp_path / "cache"), "--set", f"train.data.vae_weights={vae}"], tmp_path)
    one_line_error(p, str(vae), big.name, "truncated")
    assert not (tmp_path / "cache").exists()
    ck = TrainCheckpoints(tmp_path / "run" / "checkpoints", async_save=False)
    w = np.random.default_rng(0).standard_normal((128, 128), np.float32)     # incompressible: the largest file
    ck.save(1, {"step": np.int32(1), "params": {"w": w}, "opt_state": {}}, {},
            load_config(ROOT / "configs" / "train_tiny.yaml"))
    ck.close()
    big = _damage(ck.directory / "1" / "state", "truncated")
    p = run(["-m", "hcjax.export", "--dit-run", str(tmp_path / "run"), "--vae", "random", "--text-from", "random",
             "--out", str(tmp_path / "bundle")], tmp_path)
    one_line_error(p, str(ck.directory / "1"), big.name, "truncated")
    assert not (tmp_path / "bundle").exists() and not list(tmp_path.glob(".bundle*"))


# ------------------------------------------------------------------------------------------- train.py


def test_train_workdir_file_and_failed_run_cleanup(tmp_path):
    f = tmp_path / "wd"
    f.write_text("keep")
    p = run(["train.py", "--config", "configs/train_tiny.yaml", "--workdir", str(f)], tmp_path)
    one_line_error(p, "--workdir", "is a file")
    assert f.read_text() == "keep"
    wd = tmp_path / "run"
    p = run(["train.py", "--config", "configs/train_tiny.yaml", "--workdir", str(wd), "--set",
             f"train.data.path={tmp_path / 'nonexistent'}"], tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert not wd.exists()                                     # the failed run created it and leaves nothing
    wd.mkdir()
    (wd / "notes.txt").write_text("mine")
    p = run(["train.py", "--config", "configs/train_tiny.yaml", "--workdir", str(wd), "--set",
             f"train.data.path={tmp_path / 'nonexistent'}"], tmp_path)
    assert p.returncode == 2 and sorted(os.listdir(wd)) == ["notes.txt"], (p.stderr[-2000:], os.listdir(wd))


def test_cleanup_on_failure_keeps_a_resumable_run(tmp_path):
    with pytest.raises(RuntimeError), cleanup_on_failure(tmp_path / "a") as wd:
        (wd / "checkpoints" / "7").mkdir(parents=True)         # a complete step
        (wd / "config.json").write_text("{}")
        raise RuntimeError("later failure")
    assert (tmp_path / "a" / "checkpoints" / "7").is_dir() and (tmp_path / "a" / "config.json").is_file()
    with pytest.raises(KeyboardInterrupt), cleanup_on_failure(tmp_path / "b") as wd:
        (wd / "checkpoints" / "3.orbax-checkpoint-tmp").mkdir(parents=True)    # an unfinished save only
        raise KeyboardInterrupt
    assert not (tmp_path / "b").exists()


def test_vae_stage_resume_is_bitwise(tmp_path):
    generate(tmp_path / "raw", num_clips=2, frames=5, height=16, width=16, seed=0)
    cfg = load_config(ROOT / "configs" / "train_tiny.yaml", [
        "vae_train.steps=2", "vae_train.save_every=1", "vae_train.batch_size=1", "vae_train.crop=16",
        "vae_train.frames=1",
        "vae_train.log_every=1", f"train.data.path={tmp_path / 'raw'}"])
    a = train_vae(cfg, tmp_path / "a", progress=False, print_fn=lambda s: None)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "1", tmp_path / "b" / "checkpoints" / "1")
    with pytest.raises(FileExistsError, match="--resume"):
        train_vae(cfg, tmp_path / "b", progress=False, print_fn=lambda s: None)
    b = train_vae(cfg, tmp_path / "b", resume=True, progress=False, print_fn=lambda s: None)
    la, lb = jax.tree.leaves(load_params(a)), jax.tree.leaves(load_params(b))
    assert len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))
    other = load_config(ROOT / "configs" / "train_tiny.yaml", [
        "vae_train.steps=2", "vae_train.save_every=1", "vae.latent_channels=8", f"train.data.path={tmp_path / 'raw'}"])
    shutil.copytree(tmp_path / "a" / "checkpoints" / "1", tmp_path / "c" / "checkpoints" / "1")
    with pytest.raises(ValueError, match="vae.latent_channels"):
        train_vae(other, tmp_path / "c", resume=True, progress=False, print_fn=lambda s: None)


# ------------------------------------------------------------------------------------------- precompute


def test_precompute_failing_midway_leaves_nothing(tmp_path, monkeypatch):
    generate(tmp_path / "raw", num_clips=3, frames=9, height=32, width=32, seed=0)
    cfg = load_config(ROOT / "configs" / "train_tiny.yaml")
    calls = {"n": 0}
    real = encode.Encoders.encode

    def flaky(self, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise ValueError("disk full (simulated)")
        return real(self, batch)

    monkeypatch.setattr(encode.Encoders, "encode", flaky)
    with pytest.raises(ValueError, match="simulated"):
        encode.precompute(cfg, tmp_path / "raw", tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["raw"]             # no out/, no out/clips, no partial directory
    monkeypatch.setattr(encode.Encoders, "encode", real)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old dataset")
    calls["n"] = 0
    monkeypatch.setattr(encode.Encoders, "encode", flaky)
    with pytest.raises(ValueError, match="simulated"):
        encode.precompute(cfg, tmp_path / "raw", tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "old.txt").read_text() == "old dataset"     # replaced only when complete


# ------------------------------------------------------------------------------------------- conversion


def _rules():
    return [rules.Rule("a/kernel", "a.weight", rules.linear), rules.Rule("b/bias", "b.bias")]


EXPECTED = {"a/kernel": (3, 2), "b/bias": (2,)}


def test_conversion_rejects_integer_and_non_finite_tensors():
    good = {"a.weight": np.ones((2, 3), np.float32), "b.bias": np.zeros(2, ml_dtypes.bfloat16)}
    out = rules.apply_rules(_rules(), good, EXPECTED)
    assert out["a"]["kernel"].dtype == np.float32 and out["b"]["bias"].dtype == ml_dtypes.bfloat16
    with pytest.raises(rules.ConversionError, match=r"not floating point.*a\.weight \(int32\)"):
        rules.apply_rules(_rules(), {**good, "a.weight": np.ones((2, 3), np.int32)}, EXPECTED)
    nan = good["a.weight"].copy()
    nan[1, 2] = np.nan
    with pytest.raises(rules.ConversionError, match=r"NaN/Inf.*a/kernel <- a\.weight"):
        rules.apply_rules(_rules(), {**good, "a.weight": nan}, EXPECTED)
    big = np.full((2, 3), 1e6, np.float32)                     # finite in fp32, inf in fp16
    with pytest.raises(rules.ConversionError, match="after the cast to float16"):
        rules.apply_rules(_rules(), {**good, "a.weight": big}, EXPECTED, dtype=np.float16)


def test_broken_checkpoint_files(tmp_path):
    st = tmp_path / "m.safetensors"
    save_file({"x": np.ones((64, 64), np.float32), "y": np.ones(8, np.float32)}, str(st))
    data = st.read_bytes()
    half = tmp_path / "half.safetensors"
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="half.safetensors: truncated"):
        readers.read_state_dict(half)
    pt = tmp_path / "m.pt"
    torch.save({"module": {"x": torch.ones(4)}}, pt)
    for name, content in (("zero.pt", b""), ("trunc.pt", pt.read_bytes()[:300])):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=name):
            readers.read_state_dict(tmp_path / name)
    p = run(["-m", "convert_weights", "inspect", str(half)], tmp_path)
    one_line_error(p, "broken checkpoint", "truncated")
    p = run(["-m", "convert_weights", "dit", "--src", str(tmp_path / "zero.pt"), "--out", str(tmp_path / "o")],
            tmp_path)
    one_line_error(p, "zero.pt", "empty file")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------- editing masks


def test_editing_mask_mismatches_are_errors(tmp_path):
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (9, 32, 48, 3), dtype=np.uint8)
    mask = np.zeros((9, 32, 48, 3), np.uint8)
    mask[:, 8:24, 16:32] = 255
    with pytest.raises(ValueError, match="in.mp4 has 9 frames but m.mp4 has 5"):
        V.prepare_editing_pixels(video, mask[:5], video_name="in.mp4", mask_name="m.mp4")
    with pytest.raises(ValueError, match="in.mp4 has 9 frames but m.mp4 has 1"):
        V.prepare_editing_pixels(video, mask[:1], video_name="in.mp4", mask_name="m.mp4")
    with pytest.raises(ValueError, match="m.mp4 is 24x16 but in.mp4 is 48x32"):
        V.prepare_editing_pixels(video, mask[:, ::2, ::2], video_name="in.mp4", mask_name="m.mp4")
    with pytest.raises(ValueError, match="m.mp4 is all black"):
        V.prepare_editing_pixels(video, np.zeros_like(mask), video_name="in.mp4", mask_name="m.mp4")
    vp = write_video(tmp_path / "in.mp4", video, lossless=True)
    short = write_video(tmp_path / "short.mp4", mask[:5], lossless=True)
    black = write_video(tmp_path / "black.mp4", np.zeros_like(mask), lossless=True)
    with pytest.raises(ValueError, match="short.mp4 has 5"):
        V.check_editing_files(vp, short)
    with pytest.raises(ValueError, match="black.mp4 is all black"):
        V.check_editing_files(vp, black)


# ------------------------------------------------------------------------------------------- memory


def test_memory_estimate_counts_real_parameter_bytes():
    cfg = load_config(ROOT / "configs" / "default_tiny.yaml")
    m = random_models(cfg)
    real = sum(np.asarray(x).nbytes for x in jax.tree.leaves((m.dit, m.vae, m.text.llava_params, m.text.clip_params)))
    est = memory.param_bytes(cfg)
    assert sum(est.values()) == real
    e = memory.sampling_estimate(cfg, 9, 64, 64, branches=2)
    bigger = memory.sampling_estimate(cfg, 9, 256, 256, branches=2)
    # 160 -> 1376 tokens (8.6x): the dense activations grow with them (chunked attention's block scores do not)
    assert bigger.parts["activations/dit"] > 4 * e.parts["activations/dit"]
    assert memory.dit_tokens(cfg, 9, 256, 256) == 3 * 16 * 16 + 16 * 16 + cfg.llava.text_len
    assert memory._parse_bytes("1.5G") == int(1.5 * 2**30) and memory._parse_bytes("100") == 100


def test_memory_estimate_per_device_on_a_mesh(monkeypatch):
    """Per-device shares (hand-computed): a tensor is divided by the degrees of the mesh axes its logical names map
    to (those that divide it), the DiT activations by the sequence degree; the host holds its local devices'."""
    sds = jax.ShapeDtypeStruct
    tree = {"w": nn.Partitioned(sds((64, 96), jnp.bfloat16), names=("embed", "mlp")),    # embed -> fsdp x seq
            "odd": nn.Partitioned(sds((12, 96), jnp.bfloat16), names=("embed", "mlp")),  # 12: fsdp 2 only
            "b": nn.Partitioned(sds((96,), jnp.float32), names=("mlp",)),                # mlp -> tensor (1)
            "s": sds((10,), jnp.float32)}                                                # unboxed: replicated
    deg = {"data": 1, "fsdp": 2, "sequence": 4, "tensor": 1}
    assert memory.sharded_bytes(tree, deg, RULE_SETS["default"]) == 64 * 96 * 2 // 8 + 12 * 96 * 2 // 2 + 384 + 40
    assert memory.sharded_bytes(tree, deg, RULE_SETS["fsdp_only"]) == 64 * 96 + 12 * 96 + 384 + 40
    assert memory.sharded_bytes(tree, None, RULE_SETS["default"]) == 64 * 96 * 2 + 12 * 96 * 2 + 384 + 40
    assert memory.sharded_bytes(tree, {**deg, "tensor": 2}, RULE_SETS["default"]) == \
        64 * 96 * 2 // 16 + 12 * 96 * 2 // 4 + 384 // 2 + 40
    est = memory.Estimate({"params/dit": 10, "params/vae": 3, "runtime/xla": 5}, {"params/dit"}, 8, 8)
    assert est.total == 18 and est.host_total == 10 * 8 + 3 + 5
    # the 720p preset: 75.6 GB on one device; on 8 devices (fsdp 2 x sequence 4) the DiT is split 8 ways, the
    # text towers 2 ways (embed over fsdp only), the DiT activations 4 ways (sequence), the VAE stays whole
    cfg = load_config(ROOT / "configs" / "hunyuancustom_720p.yaml")
    one = memory.sampling_estimate(cfg, 129, 720, 1280)
    eight = memory.sampling_estimate(cfg, 129, 720, 1280, mesh=MeshConfig(1, 2, 4, 1))
    p1, p8 = one.parts, eight.parts
    assert p1["params/dit"] / 8 <= p8["params/dit"] <= 1.01 * p1["params/dit"] / 8
    assert p1["params/llava"] / 2 <= p8["params/llava"] <= 1.01 * p1["params/llava"] / 2
    assert p8["activations/dit"] == -(-p1["activations/dit"] // 4) and p8["params/vae"] == p1["params/vae"]
    monkeypatch.setattr(memory, "available_memory", lambda: (int(40e9), "free on device GPU 0"))
    with pytest.raises(memory.MemoryEstimateError, match="720p"):
        memory.check(one, "the 720p preset")
    assert memory.check(eight, "the 720p preset") is eight          # 28.7 GB per device fits 40 GB
    monkeypatch.setattr(memory, "available_memory", lambda: (int(20e9), "free on device GPU 0"))
    with pytest.raises(memory.MemoryEstimateError, match="per device of 8"):
        memory.check(eight, "the 720p preset")


# ------------------------------------------------------------------------------------------- interrupts


def _interrupt_after(cmd, marker: str, tmp_path, sig=signal.SIGINT):
    """Start ``cmd``, send ``sig`` once a stderr/stdout line contains ``marker``; ``(rc, output)``."""
    env = {**os.environ, "HCJAX_CACHE_DIR": str(tmp_path / "xla"), "PYTHONUNBUFFERED": "1", "XLA_FLAGS": ""}
    p = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env=env)
    seen = []
    for line in p.stdout:
        seen.append(line)
        if marker in line:
            p.send_signal(sig)
            break
    else:
        p.wait()
        pytest.fail(f"no {marker!r} line; rc={p.returncode}:\n{''.join(seen)[-3000:]}")
    rest = p.stdout.read()
    p.wait(timeout=300)
    return p.returncode, "".join(seen) + rest


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("intr")
    generate(root / "raw", num_clips=3, frames=9, height=32, width=32, seed=0)
    precompute_cfg = load_config(ROOT / "configs" / "train_tiny.yaml")
    encode.precompute(precompute_cfg, root / "raw", root / "cache")
    return root


@pytest.mark.parametrize("sig,code,word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_train_interrupted_before_first_checkpoint_leaves_nothing(tiny_data, tmp_path, sig, code, word):
    wd = tmp_path / "run"
    rc, out = _interrupt_after(["train.py", "--config", "configs/train_tiny.yaml", "--workdir", str(wd),
                                "--no-progress", "--set", f"train.data.path={tiny_data / 'cache'}", "--set",
                                "train.batch_size=2", "--set", "train.save_every=1000"], "step 1 ", tmp_path, sig)
    assert rc == code and f"{word}; no output written" in out and "Traceback" not in out, out[-3000:]
    assert not wd.exists(), sorted(os.listdir(wd))


def test_precompute_interrupted_leaves_nothing(tiny_data, tmp_path):
    out_dir = tmp_path / "cache"
    rc, out = _interrupt_after(["-m", "hcjax.precompute", "--config", "configs/train_tiny.yaml", "--data",
                                str(tiny_data / "raw"), "--out", str(out_dir)], "vae_weights=random", tmp_path)
    assert rc == 130 and "interrupted; no output written" in out and "Traceback" not in out, out[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["xla"] or sorted(os.listdir(tmp_path)) == [], os.listdir(tmp_path)


@pytest.mark.parametrize("delay", [1.0, 4.0, 8.0])
def test_convert_interrupted_leaves_nothing(tmp_path, delay):
    cfg = tiny_cfg()
    sd = to_original_names(state_dict_numpy(diffusers_model(cfg, seed=0)), cfg)
    src = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}}, src)
    out = tmp_path / "o"
    env = {**os.environ, "HCJAX_CACHE_DIR": str(tmp_path / "xla")}
    p = subprocess.Popen([sys.executable, "-m", "convert_weights", "dit", "--src", str(src), "--out", str(out),
                          "--config", "configs/tiny.yaml"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)
    try:
        p.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert "Traceback" not in err, err[-3000:]
    if p.returncode == 0:                                  # finished before the signal: a complete checkpoint
        assert (out / "config.json").is_file() and (out / "params").is_dir()
    else:
        assert p.returncode == 130 and "interrupted; no output written" in err, (p.returncode, err[-3000:])
        assert sorted(os.listdir(tmp_path)) in (["mp_rank_00_model_states.pt"], ["mp_rank_00_model_states.pt", "xla"])


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_inside_a_gc_callback_is_not_lost(sig, code):
    """A signal handled inside a garbage-collector callback (JAX registers one) raises where Python ignores the
    exception ("Exception ignored in ..."); run_cli must still end with the interrupt, not finish the work."""
    finished = []

    def main():
        def cb(phase, info):
            if phase == "start" and not cb.done:
                cb.done = True
                os.kill(os.getpid(), sig)
                time.sleep(0.01)                                # the handler runs here, inside the callback
        cb.done = False
        gc.callbacks.append(cb)
        try:
            gc.collect()
        finally:
            gc.callbacks.remove(cb)
        for _ in range(100):
            time.sleep(0.01)
        finished.append(True)

    previous = signal.getsignal(signal.SIGINT)
    try:
        assert run_cli(main) == code and not finished
    finally:
        signal.signal(signal.SIGINT, previous)
