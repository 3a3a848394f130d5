"""The fp8 DiT release: float8_e4m3fn Linear weights + per-layer scales (``X.pt`` + ``X_map.pt``).

A tiny DiT is quantised the way the original's quantiser does it (per-tensor scale = max|W| / 448, W / scale cast
to float8_e4m3fn; layers = every Linear of the double/single blocks, the list in the manifest), saved as the
release's two files, and converted by ``convert_weights``. The expected kernels are an independent torch
computation of the spec's de-quantisation, ``bf16(W_fp8) * bf16(scale)`` in bf16 arithmetic, converted through the
ordinary (already tested) bf16 path.
"""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
import torch

from convert_weights import dit as conv
from convert_weights.__main__ import main
from convert_weights.inspect_ckpt import inspect_file
from convert_weights.readers import read_state_dict
from hcjax.checkpoint import load_params
from tests.conftest import MANIFESTS, ROOT
from tests.dit_reference import diffusers_model, state_dict_numpy, tiny_cfg, to_original_names

E4M3_MAX = 448.0  # largest finite float8_e4m3fn (1.75 * 2**8)
FP8_FILE = "mp_rank_00_model_states_fp8.pt"
MAP_FILE = "mp_rank_00_model_states_fp8_map.pt"


def _manifest_layers() -> list[str]:
    return json.loads((MANIFESTS / "hunyuancustom_fp8_linear_layers.json").read_text())["layers"]


def fp8_layers(cfg) -> list[str]:
    """The manifest's block-0 layer names, repeated for the tiny model's depths."""
    names = []
    for kind, depth in (("double_blocks", cfg.depth_double_blocks), ("single_blocks", cfg.depth_single_blocks)):
        suffixes = [n[len(f"{kind}.0."):] for n in _manifest_layers() if n.startswith(f"{kind}.0.")]
        names += [f"{kind}.{i}.{s}" for i in range(depth) for s in suffixes]
    return names


def quantise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor fp8 quantisation (the original's scheme): scale = max|W| / 448, W / scale -> float8_e4m3fn."""
    w32 = w.float()
    scale = w32.abs().max() / E4M3_MAX
    return (w32 / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def reference_dequant(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Spec: ``W = bf16(W_fp8) * bf16(scale)``, a bf16 multiply (product rounded to bf16)."""
    return q.to(torch.bfloat16) * scale.to(torch.bfloat16)


def build_release(cfg, scale_dtype=torch.float32, seed=5, peak=None):
    """-> (fp8 module dict, map module dict, reference de-quantised state as fp32 numpy) of a tiny model."""
    sd = to_original_names(state_dict_numpy(diffusers_model(cfg, seed=seed)), cfg)
    bf16 = {k: torch.from_numpy(np.ascontiguousarray(v)).to(torch.bfloat16) for k, v in sd.items()}
    if peak is not None:  # give one layer a known true max |W|
        name, value = peak
        w = bf16[f"{name}.weight"].float()
        bf16[f"{name}.weight"] = (w / w.abs().max() * value).to(torch.bfloat16)
    module, scales, ref = dict(bf16), {}, {k: v.float().numpy() for k, v in bf16.items()}
    for layer in fp8_layers(cfg):
        q, scale = quantise(bf16[f"{layer}.weight"])
        scale = scale.to(scale_dtype)
        module[f"{layer}.weight"], scales[layer] = q, scale
        ref[f"{layer}.weight"] = reference_dequant(q, scale).float().numpy()
    return module, scales, ref


def write_release(tmp_path, module, scales, with_map=True):
    src = tmp_path / FP8_FILE
    torch.save({"module": module}, src)
    if with_map:
        torch.save({"module": scales}, tmp_path / MAP_FILE)
    return src


def assert_trees_equal(got, want):
    g, w = jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves_with_path(want)
    assert [p for p, _ in g] == [p for p, _ in w]
    for (path, a), (_, b) in zip(g, w):
        np.testing.assert_array_equal(np.asarray(a).astype(np.float32), b, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def cfg():
    return tiny_cfg()


# ------------------------------------------------------------------------------------------- reading


def test_torch_float8_reads_bit_exact(tmp_path):
    bits = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    t = bits.view(torch.float8_e4m3fn)
    torch.save({"module": {"w": t, "s": torch.tensor(0.0123, dtype=torch.bfloat16)}}, tmp_path / "a.pt")
    sd = read_state_dict(tmp_path / "a.pt", "module")
    got = sd["w"]
    assert got.dtype == ml_dtypes.float8_e4m3fn
    np.testing.assert_array_equal(got.view(np.uint8), bits.numpy())
    finite = ~torch.isnan(t.float())
    np.testing.assert_array_equal(got.astype(np.float32)[finite.numpy()], t.float()[finite].numpy())
    assert sd.dtypes()["w"] == "float8_e4m3fn" and sd["s"].shape == ()
    assert sd["s"].dtype == ml_dtypes.bfloat16 and float(sd["s"]) == float(torch.tensor(0.0123).bfloat16())


def test_manifest_layer_list_is_every_block_linear(manifests_dir):
    layers = set(_manifest_layers())
    assert len(layers) == 320
    for name in ("hunyuancustom_720P.json", "hunyuancustom_audio_720P.json", "hunyuancustom_editing_720P.json"):
        params = json.loads((manifests_dir / name).read_text())["params"]
        linears = {k[: -len(".weight")] for k, s in params.items()
                   if k.split(".")[0] in ("double_blocks", "single_blocks") and k.endswith(".weight") and len(s) == 2}
        assert linears == layers, name


# ------------------------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_fp8_release_converts_to_the_dequantised_reference(tmp_path, cfg, scale_dtype):
    module, scales, ref = build_release(cfg, scale_dtype)
    src = write_release(tmp_path, module, scales)
    state, fp8_scales = conv.read_original(src)
    assert fp8_scales is not None and set(fp8_scales) == set(fp8_layers(cfg))
    got = conv.from_original(state, cfg, fp8_scales)
    want = conv.from_original(ref, cfg)
    assert_trees_equal(got, want)
    # dequantised kernels are bf16 values; a direct look at one layout too
    k = got["double_blocks"]["img_mlp"]["fc1"]["kernel"]
    assert k.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(k[1].astype(np.float32), ref["double_blocks.1.img_mlp.fc1.weight"].T)
    # the requested output dtype is a cast of the bf16 product
    as32 = conv.from_original(state, cfg, fp8_scales, dtype=np.float32)
    assert as32["single_blocks"]["linear1_mlp"]["kernel"].dtype == np.float32
    assert_trees_equal(as32, want)
    if scale_dtype == torch.float32:  # the test tells bf16 arithmetic from fp32 arithmetic
        q, s = module["double_blocks.0.img_mlp.fc1.weight"], scales["double_blocks.0.img_mlp.fc1"]
        fp32_math = (q.float() * s).to(torch.bfloat16).float().numpy()
        assert np.any(fp32_math != ref["double_blocks.0.img_mlp.fc1.weight"])


def test_scale_is_not_ignored(tmp_path, cfg):
    layer = "double_blocks.0.img_mlp.fc1"
    module, scales, _ = build_release(cfg, peak=(layer, 0.525))
    true_max = float(torch.from_numpy(np.asarray(0.525, np.float32)).bfloat16())
    state, fp8_scales = conv.read_original(write_release(tmp_path, module, scales))
    assert np.abs(state[f"{layer}.weight"].astype(np.float32)).max() == E4M3_MAX  # raw fp8 values are huge
    got = conv.from_original(state, cfg, fp8_scales)
    kmax = float(np.abs(got["double_blocks"]["img_mlp"]["fc1"]["kernel"][0].astype(np.float32)).max())
    assert abs(kmax - true_max) <= 0.01 * true_max, kmax


def test_fp8_without_scales_is_an_error_naming_layer_and_map(tmp_path, cfg):
    module, scales, _ = build_release(cfg)
    src = write_release(tmp_path, module, scales, with_map=False)
    state = read_state_dict(src, "module")
    with pytest.raises(ValueError) as e:
        conv.from_original(state, cfg)
    msg = str(e.value)
    assert "double_blocks.0.img_mod.linear.weight" in msg and str(tmp_path / MAP_FILE) in msg and str(src) in msg
    with pytest.raises(FileNotFoundError, match=MAP_FILE):
        conv.read_original(src)


def test_map_missing_a_layer_or_with_extra_scales_is_an_error(tmp_path, cfg):
    module, scales, _ = build_release(cfg)
    src = write_release(tmp_path, module, scales)
    state, fp8_scales = conv.read_original(src)
    partial = {k: fp8_scales[k] for k in fp8_scales if k != "single_blocks.1.linear2"}
    with pytest.raises(ValueError, match=r"no scale in the fp8 map.*single_blocks\.1\.linear2") as e:
        conv.from_original(state, cfg, partial)
    assert str(src) in str(e.value) and "single_blocks.1.linear1" not in str(e.value)
    extra = dict(fp8_scales) | {"double_blocks.0.img_attn_q_norm": np.float32(0.5), "final_layer.linear": 1.0}
    with pytest.raises(ValueError, match=r"no float8 weight.*double_blocks\.0\.img_attn_q_norm, final_layer\.linear"):
        conv.from_original(state, cfg, extra)
    bad = dict(fp8_scales) | {"double_blocks.0.img_attn_qkv": np.ones(3, np.float32)}
    with pytest.raises(ValueError, match=r"double_blocks\.0\.img_attn_qkv.*shape \(3,\)"):
        conv.from_original(state, cfg, bad)
    # scales for a checkpoint that has no float8 tensors
    plain = {k: v.float().numpy() for k, v in module.items() if v.dtype != torch.float8_e4m3fn}
    plain |= {f"{layer}.weight": np.zeros(module[f"{layer}.weight"].shape, np.float32) for layer in fp8_scales}
    with pytest.raises(ValueError, match="holds no float8 tensors"):
        conv.from_original(plain, cfg, fp8_scales)


def test_float8_tensor_that_is_not_a_weight_is_an_error(cfg):
    module, scales, _ = build_release(cfg)
    state = {k: (v.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn) if v.dtype == torch.float8_e4m3fn
                 else v.float().numpy()) for k, v in module.items()}
    state["final_layer.linear.bias"] = state["final_layer.linear.bias"].astype(ml_dtypes.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"not Linear weights.*final_layer\.linear\.bias"):
        conv.from_original(state, cfg, {k: v.numpy() for k, v in scales.items()})


def test_explicit_map_and_find_original_dit(tmp_path, cfg):
    module, scales, ref = build_release(cfg)
    (tmp_path / "v").mkdir()
    src = write_release(tmp_path / "v", module, scales, with_map=False)
    torch.save({"module": scales}, tmp_path / "scales.pt")
    state, fp8_scales = conv.read_original(src, fp8_map=tmp_path / "scales.pt")
    assert_trees_equal(conv.from_original(state, cfg, fp8_scales), conv.from_original(ref, cfg))
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        conv.read_original(src, fp8_map=tmp_path / "nope.pt")
    assert conv.find_original_dit(tmp_path / "v") == src
    bf16 = tmp_path / "v" / "mp_rank_00_model_states.pt"
    torch.save({"module": {}}, bf16)
    assert conv.find_original_dit(tmp_path / "v") == bf16
    with pytest.raises(FileNotFoundError, match=f"mp_rank_00_model_states.pt or {FP8_FILE}"):
        conv.find_original_dit(tmp_path)
    with pytest.raises(ValueError, match="holds no float8 tensors"):
        conv.read_original(bf16, fp8_map=tmp_path / "scales.pt")


# ------------------------------------------------------------------------------------------- CLI / inspect


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "convert_weights", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_cli_converts_fp8_release(tmp_path, cfg):
    module, scales, ref = build_release(cfg)
    src = write_release(tmp_path, module, scales)
    out = tmp_path / "ckpt"
    r = _cli("dit", "--src", str(src), "--out", str(out), "--config", "configs/tiny.yaml")
    assert r.returncode == 0, r.stderr
    assert_trees_equal(load_params(out), conv.from_original(ref, cfg))
    # explicit --fp8-map (map not beside the checkpoint), in process
    (tmp_path / MAP_FILE).rename(tmp_path / "elsewhere.pt")
    out2 = tmp_path / "ckpt2"
    assert main(["dit", "--src", str(src), "--out", str(out2), "--config", "configs/tiny.yaml",
                 "--fp8-map", str(tmp_path / "elsewhere.pt")]) == 0
    assert_trees_equal(load_params(out2), conv.from_original(ref, cfg))


def test_cli_without_map_exits_2_naming_it(tmp_path, cfg):
    module, scales, _ = build_release(cfg)
    src = write_release(tmp_path, module, scales, with_map=False)
    out = tmp_path / "never"
    r = _cli("dit", "--src", str(src), "--out", str(out), "--config", "configs/tiny.yaml")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path / MAP_FILE) in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [FP8_FILE]


def test_inspect_reports_fp8_and_map(tmp_path, cfg):
    module, scales, _ = build_release(cfg)
    src = write_release(tmp_path, module, scales, with_map=False)
    n = len(fp8_layers(cfg))
    report = inspect_file(str(src))
    assert f"fp8: {n} float8 tensors (float8_e4m3fn x{n})" in report
    assert f"fp8 map: MISSING {tmp_path / MAP_FILE}" in report and "variant: image" in report
    torch.save({"module": {k: v for k, v in scales.items() if k != "double_blocks.1.txt_mlp.fc2"}},
               tmp_path / MAP_FILE)
    report = inspect_file(str(src))
    assert f"fp8 map: found {tmp_path / MAP_FILE} ({n - 1} scales)" in report
    assert "MISMATCH float8 weights without a scale (1): double_blocks.1.txt_mlp.fc2" in report
    torch.save({"module": scales}, tmp_path / MAP_FILE)
    assert "fp8 map: OK" in inspect_file(str(src))
