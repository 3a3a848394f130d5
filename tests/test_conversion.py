"""DiT conversion: full-size manifests (shape-only), strictness, variants, readers, CLI."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from convert_weights import dit as conv
from convert_weights.readers import read_state_dict
from convert_weights.rules import ConversionError
from hcjax.checkpoint import load_checkpoint_config, load_params
from hcjax.config import preset
from hcjax.dit import abstract_params, count_params
from tests.conftest import ROOT
from tests.dit_reference import diffusers_model, state_dict_numpy, tiny_cfg, to_original_names

PRESETS = {  # preset -> (manifest, format, released parameter count from spec Appendix B)
    "hunyuancustom_720p": ("hunyuancustom_720P.json", "original", 12_810_782_784),
    "hunyuancustom_720p_audio": ("hunyuancustom_audio_720P.json", "original", 12_919_666_752),
    "hunyuancustom_720p_editing": ("hunyuancustom_editing_720P.json", "original", 12_820_619_328),
}


def manifest(manifests_dir, name):
    return {k: tuple(v) for k, v in json.loads((manifests_dir / name).read_text())["params"].items()}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_full_size_param_count_equals_manifest(name, manifests_dir):
    file, _, released = PRESETS[name]
    shapes = manifest(manifests_dir, file)
    in_manifest = sum(int(np.prod(s)) for s in shapes.values())
    assert in_manifest == released
    assert count_params(abstract_params(preset(name).dit)) == released


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_check_accepts_released_manifests(name, manifests_dir):
    file, fmt, _ = PRESETS[name]
    shapes = manifest(manifests_dir, file)
    produced = conv.check(shapes, preset(name).dit, fmt)
    expected = {k: v.shape for k, v in jax.tree_util.tree_leaves_with_path(abstract_params(preset(name).dit))}
    assert len(produced) == len(expected)
    assert conv.detect_variant(shapes, fmt).name == {"hunyuancustom_720p": "image",
                                                     "hunyuancustom_720p_audio": "audio",
                                                     "hunyuancustom_720p_editing": "editing"}[name]


def test_check_accepts_diffusers_manifests(manifests_dir):
    cfg = preset("hunyuancustom_720p").dit
    conv.check(manifest(manifests_dir, "diffusers_HunyuanVideoTransformer3DModel_noguidance.json"), cfg, "diffusers")
    conv.check(manifest(manifests_dir, "diffusers_HunyuanVideoTransformer3DModel_default.json"),
               dataclasses.replace(cfg, guidance_embed=True), "diffusers")


def test_check_names_the_broken_key(manifests_dir):
    cfg = preset("hunyuancustom_720p").dit
    good = manifest(manifests_dir, "hunyuancustom_720P.json")
    removed = dict(good)
    del removed["double_blocks.7.img_attn_proj.weight"]
    with pytest.raises(ConversionError, match=r"missing tensors.*double_blocks\.7\.img_attn_proj\.weight"):
        conv.check(removed, cfg, "original")
    renamed = dict(good)
    renamed["single_blocks.3.linear_one.weight"] = renamed.pop("single_blocks.3.linear1.weight")
    with pytest.raises(ConversionError) as e:
        conv.check(renamed, cfg, "original")
    assert "single_blocks.3.linear1.weight" in str(e.value) and "single_blocks.3.linear_one.weight" in str(e.value)
    reshaped = dict(good)
    reshaped["final_layer.linear.weight"] = (64, 3071)
    with pytest.raises(ConversionError, match=r"mis-shaped.*final_layer/linear/kernel"):
        conv.check(reshaped, cfg, "original")


def test_wrong_variant_is_a_clear_error(manifests_dir):
    audio = manifest(manifests_dir, "hunyuancustom_audio_720P.json")
    with pytest.raises(ValueError, match="audio variant.*audio_condition=False"):
        conv.check(audio, preset("hunyuancustom_720p").dit, "original")
    image = manifest(manifests_dir, "hunyuancustom_720P.json")
    with pytest.raises(ValueError, match="not the editing variant"):
        conv.check(image, preset("hunyuancustom_720p_editing").dit, "original")


def test_mis_shaped_tensor_in_real_conversion():
    cfg = tiny_cfg()
    sd = state_dict_numpy(diffusers_model(cfg))
    sd["proj_out.weight"] = sd["proj_out.weight"][:, :-1]
    with pytest.raises(ConversionError, match="final_layer/linear/kernel"):
        conv.from_diffusers(sd, cfg)
    sd2 = state_dict_numpy(diffusers_model(cfg))
    sd2["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError, match=r"unexpected tensors \(1\): extra\.weight"):
        conv.from_diffusers(sd2, cfg)


def test_readers_keep_bf16_bits(tmp_path):
    from safetensors.torch import save_file

    t = torch.randn(4, 6).to(torch.bfloat16)
    save_file({"w": t}, str(tmp_path / "a.safetensors"))
    torch.save({"module": {"w": t}}, tmp_path / "a.pt")
    want = t.view(torch.int16).numpy()
    for path, key in ((tmp_path / "a.safetensors", None), (tmp_path / "a.pt", "module")):
        got = read_state_dict(path, key)["w"]
        assert str(got.dtype) == "bfloat16"
        np.testing.assert_array_equal(got.view(np.int16), want)


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "convert_weights", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_cli_converts_original_checkpoint_and_refuses_overwrite(tmp_path):
    cfg = tiny_cfg()
    model = diffusers_model(cfg, seed=3)
    sd = to_original_names(state_dict_numpy(model), cfg)
    src = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {k: torch.from_numpy(v) for k, v in sd.items()}}, src)
    out = tmp_path / "ckpt"
    r = _cli("dit", "--src", str(src), "--out", str(out), "--config", "configs/tiny.yaml")
    assert r.returncode == 0, r.stderr
    params = load_params(out)
    assert load_checkpoint_config(out).dit == preset("tiny").dit
    want = conv.from_original(sd, cfg)
    np.testing.assert_array_equal(params["single_blocks"]["linear2_attn"]["kernel"],
                                  want["single_blocks"]["linear2_attn"]["kernel"])
    # existing output is never overwritten silently
    marker = out / "config.json"
    before = marker.read_text()
    r = _cli("dit", "--src", str(src), "--out", str(out), "--config", "configs/tiny.yaml")
    assert r.returncode == 2 and "already exists" in r.stderr and "Traceback" not in r.stderr
    assert marker.read_text() == before
    # inspect reads metadata and names the format and variant
    r = _cli("inspect", str(src))
    assert r.returncode == 0, r.stderr
    assert "DiT (original format)" in r.stdout and "variant: image" in r.stdout


def test_cli_bad_input_leaves_no_output(tmp_path):
    cfg = tiny_cfg()
    sd = to_original_names(state_dict_numpy(diffusers_model(cfg)), cfg)
    del sd["final_layer.linear.bias"]
    src = tmp_path / "broken.pt"
    torch.save({"module": {k: torch.from_numpy(v) for k, v in sd.items()}}, src)
    out = tmp_path / "never"
    r = _cli("dit", "--src", str(src), "--out", str(out), "--config", "configs/tiny.yaml")
    assert r.returncode == 2
    assert "final_layer.linear.bias" in r.stderr and "Traceback" not in r.stderr and "broken.pt" in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".never*"))
    r = _cli("dit", "--src", str(tmp_path / "missing.pt"), "--out", str(out))
    assert r.returncode == 2 and "missing.pt" in r.stderr


def test_check_catches_a_mis_shaped_layer_beyond_the_first(manifests_dir):
    cfg = preset("hunyuancustom_720p").dit
    shapes = manifest(manifests_dir, "hunyuancustom_720P.json")
    shapes["double_blocks.7.img_mlp.fc1.weight"] = (12288, 3070)
    with pytest.raises(ConversionError, match=r"double_blocks/img_mlp/fc1/kernel.*layer 7"):
        conv.check(shapes, cfg, "original")
