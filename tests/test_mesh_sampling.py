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
from hcjax import batching
from hcjax import models as M
from hcjax import pipeline
from hcjax import sharding as S
from hcjax import vae
from hcjax.vae import tiling
from hcjax.axes import DEFAULT_RULES
from hcjax.config import ConfigError, MeshConfig, load_config
from tests.conftest import ROOT

TINY = ROOT / "configs" / "default_tiny.yaml"
REF = str(ROOT / "assets" / "demo_subject.png")
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


def test_vae_decode_tiles_spread_over_the_mesh(one_device):
    """3 samples x 4 tiles (2x2, smaller ones at the edges) on 8 devices: groups of 8 + 4 (the last filled), one
    sample's tiles split across groups. Equal to one device decoding each sample; per device one tile's memory."""
    models, *_ = one_device
    cfg = models.cfg.vae
    mesh = mesh_of((2, 2, 2, 1))
    z = np.random.default_rng(0).normal(size=(3, 2, 4, 6, cfg.latent_channels)).astype(np.float32)
    want = np.concatenate([vae.decode_latents(models.vae, cfg, z[i:i + 1], clip=False) for i in range(3)])
    spread = tiling.spread_fn(cfg, "decode", mesh)
    got = np.asarray(vae.decode_latents(models.vae, cfg, z, clip=False, mesh=mesh))
    assert got.shape == want.shape == (3, 5, 32, 48, 3)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), np.abs(got - want).max()
    assert spread._cache_size() == 1                                # every group ran the one spread executable
    # per device: the same compiled working set as ONE tile on one device (not D tiles)
    tile = tiling.tiling_constants(cfg)
    shape = (1, 2, tile["tile_lat"], tile["tile_lat"], cfg.latent_channels)
    local = tiling.tile_fn(cfg, "decode").lower(vae.unwrap_params(models.vae), np.zeros(shape, np.float32),
                                                np.zeros(3, np.int32)).compile().memory_analysis()
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names))
    stacked = spread.lower(tiling.on_mesh(models.vae, mesh),
                           jax.ShapeDtypeStruct((8, *shape), jnp.float32, sharding=sh),
                           jax.ShapeDtypeStruct((8, 3), jnp.int32, sharding=sh)).compile().memory_analysis()
    assert stacked.temp_size_in_bytes <= 1.1 * local.temp_size_in_bytes, (stacked, local)
    assert stacked.argument_size_in_bytes <= 1.1 * local.argument_size_in_bytes


def test_data_axis_runs_samples_in_parallel(one_device):
    """Mesh 2 2 2 1: two requests (other seed and prompt) as ONE loop of batch 2 x 2 guidance branches, the
    samples over ``data``; each equals its one-device run alone. A third sample of the same shape fills a group with
    a copy of itself and reuses the compiled loop."""
    models, req, want_latents, want_frames = one_device
    other = dataclasses.replace(req, seed=12, pos_prompt="a blue cube rolls")
    want_other = np.asarray(pipeline.denoise(models, pipeline.prepare(models, other)))
    placed = pipeline.place(models, mesh_of((2, 2, 2, 1)))
    assert batching.group_size(placed) == 2
    items = [(pipeline.prepare(placed, r), r.seed) for r in (req, other, dataclasses.replace(req, seed=13))]
    groups = list(batching.groups(placed, items))
    assert [[seed for _, seed in g] for g in groups] == [[11, 12], [13]]
    before = pipeline.COMPILE_COUNT[0]
    pair = batching.stack(placed, [p for p, _ in groups[0]])
    assert pair.noise.shape[0] == 2 and pair.conds.batch == 4
    latents = np.asarray(pipeline.denoise(placed, pair))
    for got, want in zip(latents, (want_latents, want_other)):
        err = np.abs(got - want[0]).max() / np.abs(want).max()
        assert err <= LATENT_RTOL, err
    assert np.abs(latents[0] - latents[1]).max() > 0.1                # really two different samples
    single = batching.stack(placed, [p for p, _ in groups[1]])       # one sample filled to the group size
    assert single.noise.shape[0] == 2
    pipeline.denoise(placed, single)
    assert pipeline.COMPILE_COUNT[0] - before == 1                   # one compile for both groups
    frames = pipeline.decode_batch(placed, latents[:1])
    assert np.abs(frames[0].astype(int) - want_frames.astype(int)).max() <= 1


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


@pytest.mark.parametrize("mesh", [[], ["--mesh", "2", "2", "2", "1"]])
def test_input_json_loads_once_and_compiles_once_per_shape(tmp_path, capsys, monkeypatch, mesh):
    """One device, and mesh 2 2 2 1 where same-shape samples run 2 at a time (a + c_0 together; b and c_1 each fill
    a group of 2): compilations per shape, never per group."""
    monkeypatch.setattr(pipeline, "_COMPILED", {})
    before = pipeline.COMPILE_COUNT[0]
    requests = _write_json(tmp_path / "req.json", [
        {"pos_prompt": "a red ball", "video_size": [32, 32], "seed": 1, "output_name": "a"},
        {"pos-prompt": "a blue cube", "video_size": [32, 48], "output_name": "b"},
        {"pos_prompt": "a red ball", "video_size": [32, 32], "seed": 5, "num_images": 2, "output_name": "c"},
    ])
    rc = sample.main([*SMALL, "--save-path", str(tmp_path / "out"), "--input-json", requests, "--seed", "9", *mesh])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert pipeline.COMPILE_COUNT[0] - before == 2                  # 3 requests (4 samples) of 2 shapes
    assert err.count("phase load") == 1
    names = sorted(p.name for p in (tmp_path / "out").glob("*.json"))
    assert names == ["a.json", "b.json", "c_0.json", "c_1.json"]
    got = {n: json.loads((tmp_path / "out" / n).read_text()) for n in names}
    assert [got[n]["seed"] for n in names] == [1, 9, 5, 6]          # the flag is the default; num_images: +1
    assert got["b.json"]["pos_prompt"] == "a blue cube" and got["b.json"]["video_size"] == [32, 48]
    batch = [got[n]["timings"].get("batch", 1) for n in names]
    assert batch == ([2, 1, 2, 1] if mesh else [1, 1, 1, 1])
    assert len(list((tmp_path / "out").glob("*.mp4"))) == 4


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
    ([{}, {"ref_image": [REF] * 5}], "request 1: field 'ref_image': expected a string or a list of 1 to 4"),
    ([{"ref_image": [REF, 3]}], "request 0: field 'ref_image': expected a string or a list"),
    ([{"ref_image": [REF, REF], "item_name": ["dog"]}], "request 0: --item-name: give one name per --ref-image"),
    ([{"item_name": []}], "request 0: field 'item_name': expected a string or a list of 1 to 4"),
    ([{"cache": "fastest"}], "request 0: field 'cache': expected one of \"deepcache\", \"teacache\""),
    ([{"use_deepcache": 2}], "request 0: field 'use_deepcache': expected one of 0, 1"),
    ([{"use_deepcache": True}], "request 0: field 'use_deepcache': expected one of 0, 1"),
    ([{"pose_enhance": "yes"}], "request 0: field 'pose_enhance': expected true or false"),
    ([{"cache_threshold": "low"}], "request 0: field 'cache_threshold': expected a number"),
    ([{"cache": "teacache", "cache_threshold": -1}], "request 0: --cache-threshold must be >= 0"),
    ([{"ip_cfg_scale": [1]}], "request 0: field 'ip_cfg_scale': expected a number"),
    ([{"neg_prompt": 5}], "request 0: field 'neg_prompt': expected a string"),
    ([{"expand_scale": 1.5}], "request 0: field 'expand_scale': expected an integer"),
    ([{"input_audio": "/nonexistent/a.wav"}], "request 0: field 'input_audio' /nonexistent/a.wav: file not found"),
    ([{"input_video": "/nonexistent/v.mp4"}], "request 0: field 'input_video' /nonexistent/v.mp4: file not found"),
    ([{"cache": "magcache", "cache_ratios": "/nonexistent/r.json"}],
     "request 0: field 'cache_ratios' /nonexistent/r.json: file not found"),
    ([{"audio_strength": "x"}], "request 0: field 'audio_strength': expected a number"),
])
def test_input_json_bad_request_named_before_loading(tmp_path, capsys, entries, message):
    rc = sample.main([*SMALL, "--save-path", str(tmp_path / "out"), "--input-json",
                      _write_json(tmp_path / "r.json", entries)])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert "phase load" not in err and not (tmp_path / "out").exists()


def test_every_request_flag_is_a_json_field(tmp_path):
    """Every sample.py flag is either per run or an --input-json field, and a request giving every per-request
    field of the image model (a multi-subject list, cache settings, guidance) comes out as the Request it names."""
    flags = set(vars(sample.parse([])))
    assert flags == sample.RUN_FLAGS | set(sample.JSON_FIELDS) and not sample.RUN_FLAGS & set(sample.JSON_FIELDS)
    entry = {"ref_image": [REF, REF], "item_name": ["dog", "cat"], "pos_prompt": "two pets", "neg_prompt": "blur",
             "video_size": [32, 48], "sample_n_frames": 9, "infer_steps": 4, "flow_shift_eval_video": 5.0,
             "cfg_scale": 6, "ip_cfg_scale": 2.5, "use_deepcache": 0, "cache": "teacache", "cache_threshold": 0.2,
             "audio_strength": 0.5, "expand_scale": 3, "seed": 4, "fps": 12, "output_name": "pets", "num_images": 2,
             "pose_enhance": False, "dwpose_dir": str(tmp_path)}
    args = sample.parse([*SMALL, "--input-json", _write_json(tmp_path / "r.json", [entry])])
    jobs = sample.plan_requests(args, M.resolve(None, str(TINY), []))
    assert [(r.seed, stem) for r, stem in jobs] == [(4, "pets_0"), (5, "pets_1")]
    r = jobs[0][0]
    assert (r.ref_image, r.item_name, r.pos_prompt, r.neg_prompt) == ([REF, REF], ["dog", "cat"], "two pets", "blur")
    assert (r.video_size, r.frames, r.steps, r.flow_shift, r.cfg_scale, r.ip_cfg_scale) == ((32, 48), 9, 4, 5.0,
                                                                                              6.0, 2.5)
    assert (r.use_deepcache, r.cache, r.cache_threshold, r.audio_strength, r.expand_scale, r.fps) == (
        False, "teacache", 0.2, 0.5, 3, 12)
    assert r.dwpose_dir == str(tmp_path) and r.pose_enhance is False
