"""Sampling on a device mesh (issue 22): hybrid Ulysses x ring attention (USP) against one device, the whole
pipeline (text towers + DiT sharded, tokens split, guidance branches over data/fsdp) on the 8 fake CPU devices
against the one-device result, the ``sample.py`` mesh / ``--input-json`` / ``--num-images`` flags and their bad
input. Multi-process runs are in ``tests/test_multiprocess.py``."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sample
from hcjax import attention as A
from hcjax import models as M
from hcjax import pipeline
from hcjax import sharding as S
from hcjax.axes import DEFAULT_RULES
from hcjax.config import ConfigError, MeshConfig, load_config
from tests.conftest import ROOT

TINY = ROOT / "configs" / "default_tiny.yaml"
REQ = dict(video_size=(32, 48), frames=5, steps=3, seed=11)
LATENT_RTOL = 1e-5          # max |sharded - one device| / max |one device|, fp32 (issue 22)


def mesh_of(shape):
    return S.make_mesh(MeshConfig(*shape))


# ------------------------------------------------------------------------------------------- hybrid attention


@pytest.mark.parametrize("shape, u, impl", [
    ((1, 1, 8, 1), 4, "chunked"),      # Ulysses 4 x ring 2
    ((1, 1, 8, 1), 2, "xla"),          # Ulysses 2 x ring 4, one dense block per ring step
    ((1, 2, 4, 1), 2, "chunked"),      # with batch over fsdp
    ((1, 1, 4, 2), 2, "chunked"),      # with heads over tensor: 4 local heads, groups of 2
])
def test_hybrid_attention_equals_one_device(shape, u, impl):
    kq, kk, kv_ = jax.random.split(jax.random.key(0), 3)
    b, length, n, d = 3, 27, 8, 8                           # L=27 divides no degree: padded
    q, k, v = (jax.random.normal(x, (b, length, n, d)) for x in (kq, kk, kv_))
    lens = jnp.array([27, 20, 5])
    want = np.asarray(A.dot_product_attention(q, k, v, kv_lengths=lens, impl="xla"))
    with jax.set_mesh(mesh_of(shape)), nn.logical_axis_rules(DEFAULT_RULES):
        fn = jax.jit(lambda *a: A.dot_product_attention(*a[:3], kv_lengths=a[3], impl=impl, block_q=4, block_kv=4,
                                                        ulysses_degree=u))
        jaxpr = str(jax.make_jaxpr(fn)(q, k, v, lens))
        got = np.asarray(fn(q, k, v, lens))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    assert "all_to_all" in jaxpr and "ppermute" in jaxpr            # both stages really ran


def test_ulysses_degree_plan_and_bad_input():
    assert A.sequence_plan(8, 8, "ulysses", 0) == 8 and A.sequence_plan(4, 8, "auto", 0) == 1
    assert A.sequence_plan(4, 8, "ulysses", 4) == 4                 # the degree overrides the mode
    with pytest.raises(ValueError, match="must divide the sequence degree 8"):
        A.sequence_plan(4, 8, "ulysses", 3)
    with pytest.raises(ValueError, match="must divide the 2 heads"):
        A.sequence_plan(2, 8, "ulysses", 4)
    with pytest.raises(ValueError, match="ring attention composes"):
        A.sequence_plan(8, 8, "ulysses", 4, impl="splash")
    tiny = load_config(TINY).dit
    chk = lambda u, **kw: S.check_mesh(MeshConfig(**kw), dataclasses.replace(tiny, ulysses_degree=u))  # noqa: E731
    assert chk(4, sequence=8) == "hybrid"
    assert chk(1, sequence=8) == "ring" and chk(2, sequence=2) == "ulysses"
    with pytest.raises(ConfigError, match="ulysses_degree=3 must divide mesh.sequence=8"):
        chk(3, sequence=8)
    with pytest.raises(ConfigError, match="must divide the 2 heads per tensor shard"):
        chk(4, sequence=4, tensor=2)
    with pytest.raises(ConfigError, match="ulysses_degree=-1 must be >= 0"):
        dataclasses.replace(tiny, ulysses_degree=-1).validate()


def test_default_mesh_puts_devices_on_sequence_where_heads_allow():
    tiny = load_config(TINY).dit                                    # 4 heads
    assert S.default_mesh_config(tiny, 8).shape == (1, 2, 4, 1)
    assert S.default_mesh_config(dataclasses.replace(tiny, num_heads=8, hidden_size=128, rope_dim_list=(4, 6, 6)),
                                 8).shape == (1, 1, 8, 1)
    assert S.default_mesh_config(dataclasses.replace(tiny, sequence_parallel="ring"), 8).shape == (1, 1, 8, 1)
    assert S.mesh_config((1, -1, 2, 1), tiny, 8).shape == (1, 4, 2, 1)
    with pytest.raises(ConfigError, match="needs 16 devices but 8 are available"):
        S.mesh_config((1, 1, 16, 1), tiny, 8)


# ------------------------------------------------------------------------------------------- whole pipeline


@pytest.fixture(scope="module")
def one_device():
    cfg = load_config(TINY)
    models = M.random_models(cfg, seed=0)
    req = pipeline.Request.from_config(cfg.sample, **REQ)
    prep = pipeline.prepare(models, req)
    latents = np.asarray(pipeline.denoise(models, prep))
    return models, req, latents, pipeline.decode(models, latents)


@pytest.mark.parametrize("shape, sp_mode, ulysses", [
    ((1, 2, 4, 1), "ulysses", 0),
    ((1, 1, 8, 1), "ring", 0),
    ((2, 2, 2, 1), "ulysses", 0),       # the two guidance branches over data, weights over fsdp x sequence
    ((1, 1, 8, 1), "ulysses", 4),       # Ulysses 4 x ring 2
])
def test_mesh_sampling_equals_one_device(one_device, shape, sp_mode, ulysses):
    models, req, want_latents, want_frames = one_device
    dit_cfg = dataclasses.replace(models.cfg.dit, sequence_parallel=sp_mode, ulysses_degree=ulysses)
    variant = dataclasses.replace(models, cfg=dataclasses.replace(models.cfg, dit=dit_cfg))
    mesh = mesh_of(shape)
    placed = pipeline.place(variant, mesh)
    leaf = placed.dit["double_blocks"]["img_attn_qkv"]["kernel"]
    assert len(leaf.sharding.device_set) == 8 and not leaf.sharding.is_fully_replicated      # really sharded
    text_sharded = [not x.sharding.is_fully_replicated for x in jax.tree.leaves(placed.text.llava_params)]
    assert any(text_sharded) == (shape[1] > 1)                      # text towers: embed over fsdp
    prep = pipeline.prepare(placed, req)
    latents = np.asarray(pipeline.denoise(placed, prep))
    err = np.abs(latents - want_latents).max() / np.abs(want_latents).max()
    assert err <= LATENT_RTOL, err
    frames = pipeline.decode(placed, latents)
    assert np.abs(frames.astype(int) - want_frames.astype(int)).max() <= 1


def test_generate_takes_a_mesh(one_device):
    models, req, _, want_frames = one_device
    frames, _ = pipeline.generate(models, req, mesh=mesh_of((1, 2, 4, 1)))
    assert np.abs(frames.astype(int) - want_frames.astype(int)).max() <= 1


# ------------------------------------------------------------------------------------------- sample.py


SMALL = ["--config", str(TINY), "--sample-n-frames", "5", "--infer-steps", "2", "--no-compile-cache"]


def test_cli_mesh_writes_one_mp4_with_the_placement(tmp_path, capsys):
    rc = sample.main([*SMALL, "--save-path", str(tmp_path), "--video-size", "32", "32", "--mesh", "1", "1", "-1", "1",
                      "--ulysses-degree", "4", "--output-name", "usp"])
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["usp.json", "usp.mp4"]
    settings = json.loads((tmp_path / "usp.json").read_text())
    assert settings["mesh"] == {"data": 1, "fsdp": 1, "sequence": 8, "tensor": 1}
    assert settings["ulysses_degree"] == 4 and settings["processes"] == 1


@pytest.mark.parametrize("args, message", [
    (["--mesh", "1", "1", "16", "1"], "needs 16 devices but 8 are available"),
    (["--mesh", "1", "1", "8", "1", "--ulysses-degree", "3"], "ulysses_degree=3 must divide mesh.sequence=8"),
    (["--mesh", "1", "1", "8", "1", "--sequence-parallel", "ulysses"], "does not fit Ulysses"),
    (["--mesh", "1", "1", "1", "8"], "mesh.tensor=8 must divide the 4 attention heads"),
    (["--ulysses-degree", "2"], "needs a sequence axis: give --mesh"),
])
def test_cli_bad_mesh_exit_2_before_loading(tmp_path, capsys, args, message):
    rc = sample.main([*SMALL, "--save-path", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert "phase load" not in err and err.count("\n") == 1 and not list(tmp_path.rglob("*.mp4"))


def _write_json(path, entries):
    path.write_text(json.dumps(entries))
    return str(path)


def test_input_json_loads_once_and_compiles_once_per_shape(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "_COMPILED", {})
    before = pipeline.COMPILE_COUNT[0]
    requests = _write_json(tmp_path / "req.json", [
        {"pos_prompt": "a red ball", "video_size": [32, 32], "seed": 1, "output_name": "a"},
        {"pos-prompt": "a blue cube", "video_size": [32, 48], "output_name": "b"},
        {"pos_prompt": "a red ball", "video_size": [32, 32], "seed": 5, "num_images": 2, "output_name": "c"},
    ])
    rc = sample.main([*SMALL, "--save-path", str(tmp_path / "out"), "--input-json", requests, "--seed", "9"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert pipeline.COMPILE_COUNT[0] - before == 2                  # 3 requests (4 samples) of 2 shapes
    assert err.count("phase load") == 1
    names = sorted(p.name for p in (tmp_path / "out").glob("*.json"))
    assert names == ["a.json", "b.json", "c_0.json", "c_1.json"]
    got = {n: json.loads((tmp_path / "out" / n).read_text()) for n in names}
    assert [got[n]["seed"] for n in names] == [1, 9, 5, 6]          # the flag is the default; num_images: +1
    assert got["b.json"]["pos_prompt"] == "a blue cube" and got["b.json"]["video_size"] == [32, 48]


def test_num_images_makes_n_seeds(tmp_path, capsys):
    rc = sample.main([*SMALL, "--save-path", str(tmp_path), "--video-size", "32", "32", "--num-images", "2",
                      "--seed", "3", "--output-name", "n"])
    assert rc == 0, capsys.readouterr().err
    seeds = [json.loads((tmp_path / f"n_{k}.json").read_text())["seed"] for k in range(2)]
    assert seeds == [3, 4] and len(list(tmp_path.glob("*.mp4"))) == 2


@pytest.mark.parametrize("entries, message", [
    ([{"pos_prompt": "x"}, {"video_size": [30, 48]}], "request 1: --video-size must be multiples of 16"),
    ([{"prompt": "x"}], "request 0: field 'prompt' is not a request field"),
    ([{"seed": "7"}], "request 0: field 'seed': expected an integer"),
    ([{}, {}, {"ref_image": "/nonexistent/ref.png"}], "request 2: field 'ref_image' /nonexistent/ref.png"),
    ([{"num_images": 0}], "request 0: --num-images 0 must be >= 1"),
    ({"pos_prompt": "x"}, "expected a non-empty JSON list"),
])
def test_input_json_bad_request_named_before_loading(tmp_path, capsys, entries, message):
    rc = sample.main([*SMALL, "--save-path", str(tmp_path / "out"), "--input-json",
                      _write_json(tmp_path / "r.json", entries)])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert "phase load" not in err and not (tmp_path / "out").exists()
