"""Config loading/overrides and DiT bad-input errors."""

from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hcjax.config import ConfigError, apply_overrides, load_config, preset, to_dict
from hcjax.dit import HunyuanDiT, example_inputs, init_params
from tests.conftest import ROOT


def test_presets_load_and_match_original_arguments():
    image = preset("hunyuancustom_720p").dit
    assert (image.hidden_size, image.num_heads, image.depth_double_blocks, image.depth_single_blocks) == (3072, 24, 20, 40)
    assert image.patch_size == (1, 2, 2) and image.rope_dim_list == (16, 56, 56) and not image.guidance_embed
    assert preset("hunyuancustom_720p_audio").dit.audio_condition
    assert preset("hunyuancustom_720p_editing").dit.video_condition
    assert preset("tiny").dit.hidden_size == 64


def test_unknown_key_names_key_and_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("dit:\n  hidden_size: 64\n  num_head: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert "dit.num_head" in str(e.value) and str(f) in str(e.value)
    f.write_text("ditt:\n  hidden_size: 64\n")
    with pytest.raises(ConfigError, match="'ditt'"):
        load_config(f)


def test_set_overrides_and_type_errors():
    cfg = load_config(ROOT / "configs/tiny.yaml", ["dit.depth_single_blocks=3", "dit.patch_size=[1,2,2]",
                                                   "dit.attention=xla"])
    assert cfg.dit.depth_single_blocks == 3 and cfg.dit.attention == "xla"
    with pytest.raises(ConfigError, match="dit.hidden_size: expected an integer"):
        load_config(ROOT / "configs/tiny.yaml", ["dit.hidden_size=big"])
    with pytest.raises(ConfigError, match="attention='flash'"):
        load_config(ROOT / "configs/tiny.yaml", ["dit.attention=flash"])
    with pytest.raises(ConfigError, match="float16 is not supported"):
        load_config(ROOT / "configs/tiny.yaml", ["dit.dtype=float16"])
    with pytest.raises(ConfigError, match="a.b=value"):
        load_config(ROOT / "configs/tiny.yaml", ["dit.hidden_size"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(ROOT / "configs/nope.yaml")


def test_apply_overrides_returns_a_validated_copy():
    cfg = preset("tiny")
    new = apply_overrides(cfg, ["dit.depth_single_blocks=3", "train.learning_rate=2e-4", "dit.patch_size=[1,2,2]"])
    assert new.dit.depth_single_blocks == 3 and new.train.learning_rate == 2e-4 and new.dit.patch_size == (1, 2, 2)
    assert dataclasses.replace(new, dit=cfg.dit, train=cfg.train) == cfg               # nothing else changed
    assert cfg.dit.depth_single_blocks != 3 and apply_overrides(cfg, []) == cfg       # the input is untouched
    with pytest.raises(ConfigError, match="dit.num_head"):
        apply_overrides(cfg, ["dit.num_head=4"])
    with pytest.raises(ConfigError, match="a.b=value"):
        apply_overrides(cfg, ["dit.hidden_size"])
    with pytest.raises(ConfigError, match="rope_dim_list"):                            # validated, not just built
        apply_overrides(cfg, ["dit.hidden_size=128"])


@pytest.fixture(scope="module")
def tiny():
    cfg = preset("tiny").dit
    return cfg, jax.tree.map(np.asarray, nn.unbox(init_params(cfg, jax.random.key(0))))


def _call(cfg, params, *args, **kw):
    return HunyuanDiT(cfg).apply({"params": params}, *args, **kw)


def test_bad_shapes_raise_value_errors(tiny):
    cfg, params = tiny
    (x, t, text, mask, pooled), kw = example_inputs(cfg, batch=1, latent_thw=(1, 4, 4))
    with pytest.raises(ValueError, match=r"x must be \[B,T,H,W,4\]"):
        _call(cfg, params, x[0], t, text, mask, pooled)
    with pytest.raises(ValueError, match="divisible by patch_size"):
        _call(cfg, params, jnp.zeros((1, 1, 5, 4, 4)), t, text, mask, pooled)
    with pytest.raises(ValueError, match=r"text_states must be \[B,S,32\]"):
        _call(cfg, params, x, t, text[..., :5], mask, pooled)
    with pytest.raises(ValueError, match="text_mask must be"):
        _call(cfg, params, x, t, text, mask[:, :3], pooled)
    with pytest.raises(ValueError, match="zero valid tokens"):
        _call(cfg, params, x, t, text, jnp.zeros_like(mask), pooled)
    with pytest.raises(ValueError, match="ref_latents must be"):          # H,W differ from the video's
        _call(cfg, params, x, t, text, mask, pooled, ref_latents=jnp.zeros((1, 2, 3, 4, 4)))
    with pytest.raises(ValueError, match="ref_latents must be"):          # no subject axis
        _call(cfg, params, x, t, text, mask, pooled, ref_latents=jnp.zeros((1, 4, 4, 4)))
    with pytest.raises(ValueError, match=r"t must be \[B\]"):
        _call(cfg, params, x, t[None], text, mask, pooled)
    with pytest.raises(ValueError, match="guidance_embed=False"):
        _call(cfg, params, x, t, text, mask, pooled, guidance=t)
    with pytest.raises(ValueError, match="video_condition=False"):
        _call(cfg, params, x, t, text, mask, pooled, bg_latents=jnp.zeros((1, 1, 4, 4, 8)))


def test_mesh_checked_at_config_load():
    with pytest.raises(ConfigError, match="mesh.tensor=5 must divide the 24 attention heads"):
        load_config(ROOT / "configs/hunyuancustom_720p.yaml", ["mesh.tensor=5"])
    with pytest.raises(ConfigError, match="fits neither Ulysses nor ring"):
        load_config(ROOT / "configs/hunyuancustom_720p.yaml", ["mesh.sequence=16", "dit.attention=splash"])
    assert load_config(ROOT / "configs/hunyuancustom_720p.yaml", ["mesh.sequence=8"]).mesh.sequence == 8


def test_a_runs_config_json_loads_back(tmp_path):
    """train.py writes RUN/config.json; --config accepts it (YAML alone would read JSON's 1e-06 as a string)."""
    cfg = preset("demo")
    (tmp_path / "config.json").write_text(json.dumps(to_dict(cfg)))
    assert '1e-06' in (tmp_path / "config.json").read_text()
    assert load_config(tmp_path / "config.json") == cfg
