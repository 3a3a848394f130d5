"""Sharding: mesh construction and bad input, logical-rule coverage, parameter placement of the full-size DiT,
and sharded DiT forwards (FSDP x sequence, data x sequence x tensor; Ulysses and ring) equal to one device."""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from hcjax import attention, dit, layers
from hcjax import sharding as S
from hcjax.dit import audio as dit_audio
from hcjax.dit import blocks as dit_blocks
from hcjax.dit import model as dit_model
from hcjax.axes import fit_spec
from hcjax.config import ConfigError, MeshConfig, apply_overrides, load_config, preset

FULL = ("hunyuancustom_720p", "hunyuancustom_720p_audio", "hunyuancustom_720p_editing")
DESIGN_NAMES = {"embed", "heads", "head_dim", "mlp", "layers", "vocab", "conv_in", "conv_out",
                "act_batch", "act_seq", "act_embed", "act_heads", "act_mlp"}
TOL = 1e-5  # sharded vs single-device forward, fp32 (measured ~1e-6)


def abstract_mesh(shape):
    return jax.sharding.AbstractMesh(shape, S.AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)


# ------------------------------------------------------------------------------------------- mesh / config


def test_minus_one_fills_the_devices():
    assert S.resolve_shape(MeshConfig(data=1, fsdp=-1, sequence=2, tensor=1), 8) == (1, 4, 2, 1)
    assert S.resolve_shape(MeshConfig(data=2, fsdp=1, sequence=-1, tensor=2), 8) == (2, 1, 2, 2)
    mesh = S.make_mesh(MeshConfig(fsdp=2, sequence=-1), preset("tiny").dit)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "sequence": 4, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("mesh_cfg, n, match", [
    (MeshConfig(data=3, fsdp=1), 8, "needs 3 devices but 8 are available"),
    (MeshConfig(data=1, fsdp=4, sequence=4), 8, "needs 16 devices"),
    (MeshConfig(fsdp=-1, sequence=3), 8, "do not divide|does not divide"),
])
def test_mesh_that_does_not_match_the_devices(mesh_cfg, n, match):
    with pytest.raises(ConfigError, match=match):
        S.resolve_shape(mesh_cfg, n)


def test_make_mesh_checks_the_real_device_count():
    with pytest.raises(ConfigError, match="needs 16 devices but 8"):
        S.make_mesh(MeshConfig(fsdp=2, sequence=8), preset("tiny").dit)


@pytest.mark.parametrize("override, match", [
    ("mesh.fsdp=0", "positive integers, or -1"),
    ("mesh.sequence=-2", "positive integers, or -1"),
    ("mesh.sequence=-1", "at most one of"),           # fsdp is already -1 in the preset
    ("dit.sequence_parallel=stripes", "sequence_parallel='stripes'"),
    ("mesh.rules=everything", "rules='everything'"),
    ("dit.attention=flash", "attention='flash'"),
])
def test_bad_mesh_values_fail_at_config_load(override, match):
    with pytest.raises(ConfigError, match=match):
        preset("hunyuancustom_720p", [override])


def test_splash_is_a_valid_attention_setting():
    assert preset("hunyuancustom_720p", ["dit.attention=splash"]).dit.attention == "splash"


def test_degrees_checked_against_the_24_heads():
    dit_cfg = preset("hunyuancustom_720p").dit

    def chk(sequence_parallel="ulysses", dit_cfg=dit_cfg, **kw):
        return S.check_mesh(MeshConfig(**kw), dataclasses.replace(dit_cfg, sequence_parallel=sequence_parallel))

    with pytest.raises(ConfigError, match="tensor=5 must divide the 24 attention heads"):
        chk(tensor=5)
    with pytest.raises(ConfigError, match="does not fit Ulysses.* set dit.sequence_parallel: ring"):
        chk(sequence=5, sequence_parallel="ulysses")
    with pytest.raises(ConfigError, match="does not fit Ulysses: .* 12 heads per tensor shard"):
        chk(sequence=8, tensor=2, sequence_parallel="ulysses")
    splash = dataclasses.replace(dit_cfg, attention="splash")
    for sp_mode in ("auto", "ulysses", "ring"):
        with pytest.raises(ConfigError, match="fits neither Ulysses nor ring: .* ring attention needs dit.attention"):
            chk(sequence=16, sequence_parallel=sp_mode, dit_cfg=splash)
    with pytest.raises(ConfigError, match="ring attention needs .* Ulysses would fit"):
        chk(sequence=8, sequence_parallel="ring", dit_cfg=splash)
    assert chk(sequence=8) == "ulysses"
    assert chk(sequence=5, sequence_parallel="ring") == "ring"
    assert chk(sequence=16, sequence_parallel="auto") == "ring"
    assert chk(sequence=8, tensor=2, sequence_parallel="auto") == "ring"
    assert chk(sequence=12, tensor=2, sequence_parallel="auto") == "ulysses"
    assert chk(sequence=6, tensor=4, sequence_parallel="auto") == "ulysses"
    assert chk(fsdp=8) is None


def test_sequence_parallel_moved_from_mesh_to_dit(tmp_path):
    """``mesh.sequence_parallel`` (run configs saved before it moved to the DiT) still loads, as
    ``dit.sequence_parallel``; ``apply_overrides`` takes it too and validates the result."""
    f = tmp_path / "old_run.json"
    f.write_text(json.dumps({"mesh": {"fsdp": -1, "sequence": 5, "sequence_parallel": "ring"}}))
    cfg = load_config(f)
    assert cfg.dit.sequence_parallel == "ring" and cfg.mesh.sequence == 5
    assert not hasattr(cfg.mesh, "sequence_parallel")
    base = preset("hunyuancustom_720p")
    assert base.dit.sequence_parallel == "ulysses"
    assert apply_overrides(base, ["mesh.sequence_parallel=auto"]).dit.sequence_parallel == "auto"
    assert apply_overrides(base, ["dit.sequence_parallel=ring", "mesh.sequence=5"]).mesh.sequence == 5
    with pytest.raises(ConfigError, match="does not fit Ulysses"):       # 24 heads over 5: ring only
        apply_overrides(base, ["mesh.sequence=5"])
    assert base.dit.sequence_parallel == "ulysses" and base.mesh.sequence == 1     # cfg itself unchanged


# ------------------------------------------------------------------------------------------- rules


def _activation_names(monkeypatch) -> set[str]:
    """Logical names the model passes to ``constrain`` (traced on a tiny model with every option enabled)."""
    seen: set[str] = set()
    orig = layers.constrain

    def recording(x, names):
        seen.update(n for n in names if n is not None)
        return orig(x, names)

    monkeypatch.setattr(layers, "constrain", recording)
    patched = [m for m in (dit_audio, dit_blocks, dit_model) if hasattr(m, "constrain")]
    assert patched
    for module in patched:
        monkeypatch.setattr(module, "constrain", recording)
    cfg = dataclasses.replace(preset("tiny").dit, audio_condition=True, video_condition=True)
    args, kwargs = dit.example_inputs(cfg, batch=2, latent_thw=(2, 4, 4), abstract=True)
    params = nn.unbox(dit.abstract_params(cfg))
    jax.eval_shape(lambda p, a, kw: dit.HunyuanDiT(cfg).apply({"params": p}, *a, **kw), params, args, kwargs)
    return seen


def test_every_logical_name_used_is_in_every_rule_set(monkeypatch):
    weights = set().union(*(S.logical_names(dit.abstract_params(preset(n).dit)) for n in FULL))
    acts = _activation_names(monkeypatch) | set(attention.ATTN_LOGICAL)
    assert {"embed", "heads", "mlp", "layers"} <= weights and {"act_batch", "act_seq", "act_mlp"} <= acts
    for name, rules in S.RULE_SETS.items():
        ruled = {k for k, _ in rules}
        assert weights | acts | DESIGN_NAMES <= ruled, (name, (weights | acts | DESIGN_NAMES) - ruled)
        mesh_axes = {a for _, v in rules if v for a in ((v,) if isinstance(v, str) else v)}
        assert mesh_axes <= set(S.AXES), (name, mesh_axes)


@pytest.mark.parametrize("shape", [(1, 1, 8, 1), (1, 8, 1, 1), (1, 2, 2, 2), (2, 1, 2, 2), (1, 8, 8, 1)])
def test_every_large_parameter_is_sharded(shape):
    """Full-size 720p DiT (12.8 B): every parameter above 1 MB is split over at least one mesh axis."""
    mesh = abstract_mesh(shape)
    boxed = dit.abstract_params(preset("hunyuancustom_720p").dit)
    shardings = S.param_shardings(boxed, mesh)
    values = nn.unbox(boxed)
    total = per_device = 0
    unsharded = []
    for (path, v), s in zip(jax.tree_util.tree_leaves_with_path(values), jax.tree.leaves(shardings)):
        nbytes = math.prod(v.shape) * v.dtype.itemsize
        axes = [a for e in s.spec if e for a in ((e,) if isinstance(e, str) else e)]
        split = math.prod(mesh.shape[a] for a in axes)
        for dim, e in zip(v.shape, s.spec):
            if e:
                assert dim % math.prod(mesh.shape[a] for a in ((e,) if isinstance(e, str) else e)) == 0
        if nbytes > 2**20 and split == 1:
            unsharded.append(jax.tree_util.keystr(path))
        total += nbytes
        per_device += nbytes // split
    assert not unsharded, unsharded
    print(f"mesh {shape}: {total / 2**30:.1f} GiB fp32 params, {per_device / 2**30:.2f} GiB per device")
    weight_ways = math.prod(shape[1:])              # weights are replicated over `data` (pure replicas)
    assert per_device < total / (weight_ways * 0.9) + 2**27


def test_fit_spec_drops_axes_that_do_not_divide():
    mesh = abstract_mesh((1, 2, 4, 2))
    # 8 takes fsdp x sequence; 6 keeps fsdp only (6 % (2*4) != 0); 3 takes nothing; 24 keeps both
    assert fit_spec(P(("fsdp", "sequence"), "tensor"), (8, 4), mesh) == P(("fsdp", "sequence"), "tensor")
    assert fit_spec(P(("fsdp", "sequence"), "tensor"), (6, 3), mesh) == P("fsdp", None)
    assert fit_spec(P(("sequence", "fsdp")), (12, 5), mesh) == P("sequence", None)   # 12 % (4*2) != 0
    assert fit_spec(P(None, ("fsdp", "sequence")), (1, 24, 7), mesh) == P(None, ("fsdp", "sequence"), None)
    # axes the mesh lacks are dropped (the text towers on a mesh without `sequence`)
    small = jax.sharding.AbstractMesh((2, 2), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    assert fit_spec(P(("fsdp", "sequence"), "tensor"), (8, 4), small) == P("fsdp", "tensor")


def test_abstract_sharded_full_size_bf16():
    mesh = S.make_mesh(MeshConfig(fsdp=1, sequence=8), preset("hunyuancustom_720p").dit)
    tree = S.abstract_sharded(dit.abstract_params(preset("hunyuancustom_720p").dit), mesh, dtype=jnp.bfloat16)
    leaves = jax.tree.leaves(tree)
    assert all(isinstance(x, jax.ShapeDtypeStruct) and x.dtype == jnp.bfloat16 for x in leaves)
    per_device = sum(math.prod(x.sharding.shard_shape(x.shape)) * 2 for x in leaves)
    total = sum(math.prod(x.shape) * 2 for x in leaves)
    assert per_device < total / 7.5, (per_device, total)
    qkv = tree["double_blocks"]["img_attn_qkv"]["kernel"]
    assert qkv.sharding.spec == P(None, ("fsdp", "sequence"), None, "tensor", None)


def test_shard_params_plain_dict_needs_names():
    cfg = preset("tiny").dit
    mesh = S.make_mesh(MeshConfig(fsdp=2, sequence=2, tensor=2), cfg)
    plain = nn.unbox(_numpy_params(cfg, 0))
    with pytest.raises(ValueError, match="carry no logical axis names"):
        S.shard_params(plain, mesh)
    placed = S.shard_params(plain, mesh, like=dit.abstract_params(cfg))
    k = placed["single_blocks"]["linear1_qkv"]["kernel"]           # [layers, D, 3, N, K]
    assert k.sharding.spec == P(None, ("fsdp", "sequence"), None, "tensor", None)
    assert k.addressable_shards[0].data.shape == (k.shape[0], k.shape[1] // 4, 3, k.shape[3] // 2, k.shape[4])
    np.testing.assert_array_equal(np.asarray(k), np.asarray(plain["single_blocks"]["linear1_qkv"]["kernel"]))
    with pytest.raises(ValueError, match="does not match"):
        S.shard_params({"img_in": plain["img_in"]}, mesh, like=dit.abstract_params(cfg))


# ------------------------------------------------------------------------------------------- sharded forward


CFG = dataclasses.replace(preset("tiny").dit, attention="chunked", attention_block_q=8, attention_block_kv=8)


def _inputs(text_len: int, seed: int = 0, batch: int = 2):
    """Latent (2, 4, 6): 12 video + 6 reference tokens; text with padding (5 of ``text_len`` valid in every
    even sample, all valid in the odd ones)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 2, 4, 6, CFG.in_channels)).astype(np.float32)
    t = np.resize(np.array([250.0, 875.0, 40.0, 600.0], np.float32), batch)
    text = rng.standard_normal((batch, text_len, CFG.text_states_dim)).astype(np.float32)
    mask = np.ones((batch, text_len), np.int32)
    mask[0::2, 5:] = 0
    pooled = rng.standard_normal((batch, CFG.text_states_dim_2)).astype(np.float32)
    ref = rng.standard_normal((batch, 1, 4, 6, CFG.in_channels)).astype(np.float32)
    return (x, t, text, mask, pooled, ref)


def _forward(cfg):
    return lambda p, x, t, text, mask, pooled, ref: dit.HunyuanDiT(cfg).apply(
        {"params": p}, x, t, text, mask, pooled, ref_latents=ref)


def _numpy_params(cfg, seed: int):
    """Boxed parameters filled with seeded numpy noise (no XLA compile of ``init``: that alone takes seconds)."""
    rng = np.random.default_rng(seed)

    def fill(path, x):
        value = 0.05 * rng.standard_normal(x.unbox().shape) + (1.0 if "scale" in jax.tree_util.keystr(path) else 0.0)
        return x.replace_boxed(value.astype(np.float32))

    return jax.tree_util.tree_map_with_path(fill, dit.abstract_params(cfg),
                                            is_leaf=lambda x: isinstance(x, nn.Partitioned))


@pytest.fixture(scope="module")
def tiny_params():
    return _numpy_params(CFG, 1)        # every weight non-trivial (biases, norms included)


_REFERENCE: dict[tuple[int, int], np.ndarray] = {}


def _single_device(params, text_len, batch=2):
    if (text_len, batch) not in _REFERENCE:
        _REFERENCE[text_len, batch] = np.asarray(
            jax.jit(_forward(CFG))(nn.unbox(params), *_inputs(text_len, batch=batch)))
    return _REFERENCE[text_len, batch]


# mesh (data, fsdp, sequence, tensor), mode, kernel, text length, batch. 18 image tokens + 7 text = 25 tokens:
# divisible by neither degree (padded); + 6 text = 24 tokens divides both (no padding). Batch 4 is split over
# data x fsdp together (issue 5: with tensor > 1 XLA miscompiled the matmuls; see ``hcjax.layers.gathered``).
DIT_CASES = [
    ((1, 2, 4, 1), "ulysses", "chunked", 7, 2),
    ((1, 2, 4, 1), "ring", "xla", 7, 2),
    ((2, 1, 2, 2), "ulysses", "xla", 7, 2),
    ((2, 1, 2, 2), "ring", "chunked", 6, 2),
    ((2, 2, 1, 2), "ulysses", "xla", 7, 4),
    ((2, 2, 2, 1), "ring", "chunked", 6, 4),
]


@pytest.mark.parametrize("shape, mode, impl, text_len, batch", DIT_CASES, ids=lambda c: str(c))
def test_sharded_dit_forward_equals_single_device(tiny_params, shape, mode, impl, text_len, batch):
    want = _single_device(tiny_params, text_len, batch)
    cfg = dataclasses.replace(CFG, attention=impl, sequence_parallel=mode)
    mesh_cfg = MeshConfig(*shape)
    mesh = S.make_mesh(mesh_cfg, cfg)
    params = S.shard_params(tiny_params, mesh)
    kernel = params["double_blocks"]["img_attn_qkv"]["kernel"]
    assert kernel.addressable_shards[0].data.size < kernel.size      # parameters really are split
    inputs = [jax.device_put(a, S.input_sharding(mesh, a.shape)) for a in _inputs(text_len, batch=batch)]
    assert inputs[0].addressable_shards[0].data.shape[0] == batch // (shape[0] * shape[1])
    with S.use_mesh(mesh, mesh_cfg):
        fn = jax.jit(_forward(cfg))
        jaxpr = str(jax.make_jaxpr(fn)(params, *inputs))
        got = np.asarray(fn(params, *inputs))
    n_tokens = 18 + text_len
    err = float(np.abs(got - want).max())
    print(f"{shape} {mode} {impl} batch={batch} tokens={n_tokens} (pad {(-n_tokens) % shape[2]}): max abs err "
          f"{err:.2e} (max |out| {np.abs(want).max():.2f})")
    assert got.shape == want.shape and err <= TOL
    sp = shape[2] > 1
    assert ("ppermute" in jaxpr) == (sp and mode == "ring") and ("all_to_all" in jaxpr) == (sp and mode == "ulysses")


def test_sharded_audio_dit_forward_equals_single_device():
    """Audio model: the per-frame perceiver cross-attention runs on sequence-sharded video tokens (ring here,
    with tensor=2: the single audio head is kept whole) and matches one device."""
    cfg = dataclasses.replace(CFG, audio_condition=True, attention="xla", sequence_parallel="ring")
    params = _numpy_params(cfg, 3)
    rng = np.random.default_rng(4)
    x, t, text, mask, pooled, ref = _inputs(7, seed=5)
    from hcjax.dit import audio_feature_shape

    audio = rng.standard_normal(audio_feature_shape(cfg, 2, x.shape[1])).astype(np.float32)
    fwd = lambda p, *a: dit.HunyuanDiT(cfg).apply({"params": p}, *a[:5], ref_latents=a[5], audio_features=a[6])  # noqa: E731
    want = np.asarray(jax.jit(fwd)(nn.unbox(params), x, t, text, mask, pooled, ref, audio))
    mesh_cfg = MeshConfig(2, 1, 2, 2)
    mesh = S.make_mesh(mesh_cfg, cfg)
    with S.use_mesh(mesh, mesh_cfg):
        got = np.asarray(jax.jit(fwd)(S.shard_params(params, mesh), x, t, text, mask, pooled, ref, audio))
    err = float(np.abs(got - want).max())
    print(f"audio DiT (2, 1, 2, 2) ring: max abs err {err:.2e}")
    assert err <= TOL


def test_sequence_parallel_mode_is_part_of_the_jit_key(tiny_params):
    """One jitted forward taking the DiT config as a static argument is retraced per ``dit.sequence_parallel``
    (no stale Ulysses program under ring) and reused for a repeated mode."""
    traces = []

    @functools.partial(jax.jit, static_argnums=0)
    def fwd(cfg, p, *inputs):
        traces.append(cfg.sequence_parallel)
        return _forward(cfg)(p, *inputs)

    mesh_cfg = MeshConfig(1, 2, 4, 1)
    mesh = S.make_mesh(mesh_cfg, CFG)
    params = S.shard_params(tiny_params, mesh)
    inputs = _inputs(7)
    hlo = {}
    with S.use_mesh(mesh, mesh_cfg):
        for mode in ("ulysses", "ring", "ulysses"):
            hlo[mode] = fwd.lower(dataclasses.replace(CFG, sequence_parallel=mode), params, *inputs).as_text()
    assert traces == ["ulysses", "ring"], traces
    assert "all_to_all" in hlo["ulysses"] and "collective_permute" not in hlo["ulysses"]
    assert "collective_permute" in hlo["ring"] and "all_to_all" not in hlo["ring"]
