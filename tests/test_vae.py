"""3D causal VAE: parity with diffusers' AutoencoderKLHunyuanVideo (weights converted by our converter), tiled
encode/decode against diffusers' tiling configured to the original's rules, frame-causal attention without a
dense mask, flat tiled-decode memory, full-size shapes/manifests, conversion CLI and bad input.

Measured on CPU fp32 (tiny widths (8,16,16,16), 4 groups; untiled batch 2, tiled batch 1): untiled encoder
mean/logvar max |err| <= 1.4e-6, decoder <= 7.6e-6 (1, 5 and 9 frames); tiled encode 1.6e-6, decode 6.0e-6.
Tolerance TOL = 1e-4 throughout.
"""

from __future__ import annotations

import copy
import json
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLHunyuanVideo

from convert_weights import vae as conv
from convert_weights.__main__ import main
from convert_weights.rules import ConversionError
from hcjax import vae
from hcjax.checkpoint import load_params
from hcjax.config import VAEConfig, preset
from tests.conftest import ROOT

TOL = 1e-4
FULL_PARAMS = 246_478_803


@pytest.fixture(autouse=True)
def _torch_one_thread():
    """The tiny torch reference runs much faster single-threaded (OpenMP spin-waits on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def to_torch(x):
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, 1)))


def from_torch(t):
    return np.moveaxis(t.detach().numpy(), 1, -1)


@pytest.fixture(scope="module")
def tiny():
    """(cfg, diffusers model with tiling off, our params converted from its state_dict)."""
    cfg = preset("tiny").vae
    torch.manual_seed(0)
    model = AutoencoderKLHunyuanVideo(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, latent_channels=cfg.latent_channels,
        block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups, scaling_factor=cfg.scaling_factor).eval()
    with torch.no_grad():  # non-trivial GroupNorm affines so that scale/bias mapping is exercised
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    model.use_framewise_encoding = model.use_framewise_decoding = False
    model.use_tiling = False
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    params = conv.from_diffusers(sd, cfg)
    return cfg, model, params, sd


def err(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


# --------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("thw", [(1, 16, 24), (5, 24, 16), (9, 16, 32)])
def test_untiled_parity_with_diffusers(tiny, thw):
    """Encoder mean/logvar and decoder output, non-square; measured ~1e-6 (encode) / ~5e-6 (decode)."""
    cfg, model, params, _ = tiny
    rng = np.random.default_rng(sum(thw))
    x = rng.uniform(-1, 1, (2, *thw, 3)).astype(np.float32)
    mean, logvar = vae.encode_posterior(params, cfg, x, tiled=False)  # apply(..., method="encode")
    with torch.no_grad():
        post = model.encode(to_torch(x)).latent_dist
    e_mean, e_logvar = err(mean, from_torch(post.mean)), err(logvar, from_torch(post.logvar))
    t, h, w = thw
    z = rng.standard_normal((2, (t - 1) // 4 + 1, h // 8, w // 8, cfg.latent_channels)).astype(np.float32)
    ours = vae.decode_latents(params, cfg, z * cfg.scaling_factor, tiled=False, clip=False)
    with torch.no_grad():
        ref = from_torch(model.decode(to_torch(z)).sample)
    e_dec = err(ours, ref)
    print(f"frames {t} {h}x{w}: mean {e_mean:.2e} logvar {e_logvar:.2e} decode {e_dec:.2e}")
    assert max(e_mean, e_logvar, e_dec) <= TOL
    if t == 5:  # the scaled helpers: mean path and the documented sampling formula
        z_mean = vae.encode_video(params, cfg, x, tiled=False)
        assert err(z_mean, from_torch(post.mean) * cfg.scaling_factor) <= TOL
        key = jax.random.key(3)
        z_s = vae.encode_video(params, cfg, x, key=key, tiled=False)
        eps = np.asarray(jax.random.normal(key, z_mean.shape, jnp.float32))
        want = (from_torch(post.mean) + np.exp(0.5 * from_torch(post.logvar)) * eps) * cfg.scaling_factor
        assert err(z_s, want) <= TOL
        assert err(z_s, z_mean) > 1e-3  # actually sampled
        pix = vae.decode_latents(params, cfg, z * cfg.scaling_factor, tiled=False)
        assert err(pix, np.clip(ref, -1, 1)) <= TOL


def _diffusers_tiled(model, cfg: VAEConfig):
    """diffusers with the original's tiling: spec hunyuanvideo-vs-diffusers.md section 4, scaled to the tiny
    sample_size/sample_tsize (stride = 0.75 * tile)."""
    m = copy.deepcopy(model)
    s, t = cfg.sample_size, cfg.sample_tsize
    m.use_framewise_encoding = m.use_framewise_decoding = True
    m.enable_tiling(tile_sample_min_height=s, tile_sample_min_width=s, tile_sample_min_num_frames=t,
                    tile_sample_stride_height=int(s * 0.75), tile_sample_stride_width=int(s * 0.75),
                    tile_sample_stride_num_frames=int(t * 0.75))
    return m


def test_tiled_encode_matches_diffusers(tiny):
    """25 frames at 40x48 with tiles of 17 frames / 32 px: temporal tiles at 0, 12 (+ a 1-frame tile at 24
    that only contributes a dropped frame), rows and columns at 0, 24. Measured ~2e-6."""
    cfg, model, params, _ = tiny
    k = vae.tiling_constants(cfg)
    assert (k["enc_stride_px"], k["enc_blend_lat"], k["enc_stride_fr"], k["enc_blend_lat_t"]) == (24, 1, 12, 1)
    x = np.random.default_rng(1).uniform(-1, 1, (1, 25, 40, 48, 3)).astype(np.float32)
    vae.tile_fn.cache_clear()   # a fresh jitted tile function: count only this call's compilations
    fn = vae.tile_fn(cfg, "moments")
    mean, logvar = vae.encode_posterior(params, cfg, x, tiled=True)
    assert fn._cache_size() == 1  # every tile (incl. smaller border/tail tiles) ran the same compiled function
    with torch.no_grad():
        post = _diffusers_tiled(model, cfg).encode(to_torch(x)).latent_dist
    e_mean, e_logvar = err(mean, from_torch(post.mean)), err(logvar, from_torch(post.logvar))
    print(f"tiled encode: mean {e_mean:.2e} logvar {e_logvar:.2e}")
    assert max(e_mean, e_logvar) <= TOL
    with torch.no_grad():  # the tiling is really in effect (untiled differs)
        plain = from_torch(model.encode(to_torch(x)).latent_dist.mean)
    assert err(mean, plain) > 1e-2


def test_tiled_decode_matches_diffusers(tiny):
    """6 latent frames at 6x5 with tiles of 5 frames / 4 latent px: temporal tiles at 0, 3, rows and columns
    at 0, 3 (2 tiles along each axis, smaller ones at the ends). Measured ~7e-6."""
    cfg, model, params, _ = tiny
    z = np.random.default_rng(2).standard_normal((1, 6, 6, 5, cfg.latent_channels)).astype(np.float32)
    vae.tile_fn.cache_clear()
    fn = vae.tile_fn(cfg, "decode")
    ours = vae.decode_latents(params, cfg, z * cfg.scaling_factor, tiled=True, clip=False)
    assert fn._cache_size() == 1
    with torch.no_grad():
        ref = from_torch(_diffusers_tiled(model, cfg).decode(to_torch(z)).sample)
        plain = from_torch(model.decode(to_torch(z)).sample)
    e = err(ours, ref)
    print(f"tiled decode: {e:.2e}")
    assert e <= TOL
    assert err(ours, plain) > 1e-2


def test_tiled_decode_memory_flat_in_length(tiny):
    """9 vs 17 latent frames (4x4 latents, temporal tiles of 5): device side, both lengths run the same single
    compiled tile executable (no recompile; identical compiled memory); host side, the tracemalloc peak of the
    tiling loop beyond the output array itself stays flat (only blend tails of neighbours are kept)."""
    cfg, _, params, _ = tiny
    vae.tile_fn.cache_clear()
    fn = vae.tile_fn(cfg, "decode")
    tile = np.zeros((1, 5, 4, 4, cfg.latent_channels), np.float32)
    valid = np.array([5, 4, 4], np.int32)
    device, host, compiled = {}, {}, {}
    for t in (9, 17):
        z = np.random.default_rng(t).standard_normal((1, t, 4, 4, cfg.latent_channels)).astype(np.float32)
        tracemalloc.start()
        out = vae.tiled_decode(params, cfg, z)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert out.shape == (1, 4 * (t - 1) + 1, 32, 32, 3)
        host[t] = peak - out.nbytes
        compiled[t] = fn._cache_size()
        m = fn.lower(params, tile, valid).compile().memory_analysis()
        device[t] = m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
    print(f"tiled decode 9 -> 17 latent frames: device {device[9]} -> {device[17]} B, host working set "
          f"(peak minus output) {host[9]} -> {host[17]} B, output {out.nbytes} B")
    assert compiled[17] == compiled[9] >= 1
    assert device[17] / device[9] - 1 < 0.10
    assert host[17] / host[9] - 1 < 0.10


# --------------------------------------------------------------------------------------------- conv3d


@pytest.mark.parametrize("shape,kernel,stride", [
    ((2, 7, 12, 10, 5), (3, 3, 3, 5, 6), (1, 1, 1)),     # resnet conv
    ((2, 9, 12, 10, 5), (3, 3, 3, 5, 6), (2, 2, 2)),     # time + space downsample
    ((1, 8, 8, 8, 4), (3, 3, 3, 4, 4), (1, 2, 2)),       # space-only downsample
    ((1, 5, 6, 6, 3), (1, 3, 3, 3, 2), (1, 1, 1)),       # one temporal tap
])
def test_conv3d_impls_match_torch_conv3d(shape, kernel, stride):
    """The CPU paths (one 2D conv per temporal tap, summed; taps folded into channels) and XLA's native 3D conv
    against torch's conv3d, values and gradients."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal(kernel).astype(np.float32)
    xt = torch.tensor(x.transpose(0, 4, 1, 2, 3), requires_grad=True)
    wt = torch.tensor(w.transpose(4, 3, 0, 1, 2), requires_grad=True)
    yt = torch.nn.functional.conv3d(xt, wt, stride=stride)
    yt.square().sum().backward()
    ref = yt.detach().numpy().transpose(0, 2, 3, 4, 1)
    for impl in ("sum", "taps", "native"):
        out = vae.conv3d(jnp.asarray(x), jnp.asarray(w), stride, impl)
        gx, gw = jax.grad(lambda a, b: jnp.sum(vae.conv3d(a, b, stride, impl) ** 2), argnums=(0, 1))(x, w)
        assert out.shape == ref.shape
        for got, want in ((out, ref), (gx, xt.grad.numpy().transpose(0, 2, 3, 4, 1)),
                          (gw, wt.grad.numpy().transpose(2, 3, 4, 1, 0))):
            assert err(got, want) <= 2e-6 * np.abs(want).max(), impl
    with pytest.raises(ValueError, match="impl"):
        vae.conv3d(jnp.asarray(x), jnp.asarray(w), stride, "im2col")


@pytest.mark.parametrize("t,cout,stride", [(1, 6, (1, 1, 1)), (2, 6, (1, 1, 1)), (5, 6, (1, 1, 1)),
                                           (5, 3, (1, 1, 1)), (4, 5, (1, 2, 2)), (5, 6, (2, 1, 1))])
def test_causal_conv3d_matches_torch_replicate_padded_conv3d(t, cout, stride):
    """The CPU path without a materialised time pad (per-tap 2D convs over all frames, delayed outputs; the taps
    in the output channels when Co <= 4) against torch: first frame repeated twice in front, then conv3d.
    Values and gradients; every impl."""
    rng = np.random.default_rng(t + cout)
    x = rng.standard_normal((2, t, 6, 7, 4)).astype(np.float32)
    w = rng.standard_normal((3, 3, 3, 4, cout)).astype(np.float32)
    xt = torch.tensor(x.transpose(0, 4, 1, 2, 3), requires_grad=True)
    wt = torch.tensor(w.transpose(4, 3, 0, 1, 2), requires_grad=True)
    yt = torch.nn.functional.conv3d(torch.cat([xt[:, :, :1], xt[:, :, :1], xt], dim=2), wt, stride=stride)
    (yt * torch.linspace(-1, 2, yt.numel()).reshape(yt.shape)).sum().backward()
    ref = yt.detach().numpy().transpose(0, 2, 3, 4, 1)
    wgt = np.linspace(-1, 2, ref.size, dtype=np.float32).reshape(yt.shape).transpose(0, 2, 3, 4, 1)
    for impl in ("sum", "taps", "native"):
        def f(a, b, impl=impl):
            return vae.causal_conv3d(a, b, stride, 2, impl)
        out = f(jnp.asarray(x), jnp.asarray(w))
        gx, gw = jax.grad(lambda a, b: jnp.sum(f(a, b) * wgt), argnums=(0, 1))(x, w)
        assert out.shape == ref.shape, impl
        for got, want in ((out, ref), (gx, xt.grad.numpy().transpose(0, 2, 3, 4, 1)),
                          (gw, wt.grad.numpy().transpose(2, 3, 4, 1, 0))):
            assert err(got, want) <= 2e-6 * np.abs(want).max(), impl


def test_group_norm_single_pass_stats_masked_and_offset():
    """GroupNorm's one-pass (shifted) statistics against a float64 numpy GroupNorm: channels with a large common
    offset (mean 300, std 1: a plain E[x^2] - E[x]^2 in fp32 would lose the variance), and a padded input whose
    statistics must cover the valid prefix only (garbage beyond it)."""
    rng = np.random.default_rng(0)
    b, t, h, w, c, g = 2, 3, 5, 4, 8, 4
    x = (300.0 + rng.standard_normal((b, t, h, w, c)) * np.linspace(0.5, 2, c)).astype(np.float32)
    scale, bias = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)

    def ref(v):
        v = v.astype(np.float64).reshape(*v.shape[:4], g, c // g)
        mu = v.mean(axis=(1, 2, 3, 5), keepdims=True)
        var = v.var(axis=(1, 2, 3, 5), keepdims=True)
        return (((v - mu) / np.sqrt(var + 1e-6)).reshape(*v.shape[:4], c) * scale + bias)

    gn = vae.GroupNorm(g)
    p = {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}
    # fp32 at an offset of 300 rounds by 300 * 2^-24, over the narrowest channel's std 0.5 and the largest scale:
    # a few such roundings are the floor (2.2e-4 on an AVX2-only CPU, under 2e-4 on others); lost variance is O(1)
    tol = max(2e-4, 4 * np.finfo(np.float32).eps * np.abs(x).max() / 0.5 * np.abs(scale).max())
    assert err(gn.apply(p, x), ref(x)) <= tol
    padded = np.full((b, t + 2, h + 3, w + 1, c), 1e4, np.float32)
    padded[:, :t, :h, :w] = x
    out = np.asarray(gn.apply(p, padded, (jnp.int32(t), jnp.int32(h), jnp.int32(w))))
    assert err(out[:, :t, :h, :w], ref(x)) <= tol
    assert np.isfinite(out).all()


# --------------------------------------------------------------------------------------------- attention


def test_frame_causal_attention_matches_dense_numpy_reference():
    rng = np.random.default_rng(0)
    b, t, s, c = 2, 3, 6, 8
    q, k, v = (rng.standard_normal((b, t, s, c)).astype(np.float32) for _ in range(3))
    key_valid = np.array([1, 1, 0, 1, 0, 1], bool)
    out = np.asarray(vae.frame_causal_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(key_valid)))
    # dense reference: token (i, a) may see (j, b) iff j <= i and key b valid
    L = t * s
    qf, kf, vf = q.reshape(b, L, c), k.reshape(b, L, c), v.reshape(b, L, c)
    frame = np.repeat(np.arange(t), s)
    allowed = (frame[None, :] <= frame[:, None]) & np.tile(key_valid, t)[None, :]
    sc = np.einsum("blc,bmc->blm", qf, kf) / np.sqrt(c)
    sc = np.where(allowed[None], sc, -np.inf)
    p = np.exp(sc - sc.max(-1, keepdims=True))
    ref = np.einsum("blm,bmc->blc", p / p.sum(-1, keepdims=True), vf).reshape(b, t, s, c)
    assert err(out, ref) <= 1e-5


def test_mid_block_attention_builds_no_dense_mask():
    """No intermediate of the decoder has an [L, L] pair of axes (L = all latent tokens)."""
    cfg = preset("tiny").vae
    t, h, w = 3, 4, 4
    L = t * h * w
    params = vae.abstract_params(cfg)
    z = jax.ShapeDtypeStruct((1, t, h, w, cfg.latent_channels), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda p, x: vae.AutoencoderKLCausal3D(cfg).apply(p, x, method="decode"))(
        {"params": params}, z)
    shapes = []

    def walk(jp):
        for eqn in jp.eqns:
            shapes.extend(tuple(getattr(o.aval, "shape", ())) for o in eqn.outvars)
            for p in eqn.params.values():
                inner = getattr(p, "jaxpr", p)
                if hasattr(inner, "eqns"):
                    walk(inner)

    walk(jaxpr.jaxpr)
    assert any(s[-2:] == (h * w, h * w) for s in shapes)  # the per-frame score blocks are there
    assert not any(len(s) >= 2 and sum(d == L for d in s) >= 2 for s in shapes)


# --------------------------------------------------------------------------------------------- full size


@pytest.fixture(scope="module")
def manifests(manifests_dir):
    files = {"original": "hyvae_884-16c-hy0801.json", "diffusers": "diffusers_AutoencoderKLHunyuanVideo_default.json"}
    return {fmt: json.loads((manifests_dir / name).read_text())["params"] for fmt, name in files.items()}


def test_full_size_param_count_and_manifests(manifests):
    cfg = preset("hunyuancustom_720p").vae
    assert vae.count_params(vae.abstract_params(cfg)) == FULL_PARAMS
    for fmt, shapes in manifests.items():
        out = conv.check(shapes, cfg, fmt)
        assert len(out) == 248 and sum(int(np.prod(s)) for s in out.values()) == FULL_PARAMS
    prefixed = {f"vae.{k}": v for k, v in manifests["original"].items()}
    assert len(conv.check(prefixed, cfg, "original")) == 248


@pytest.mark.parametrize("edit", ["remove", "rename", "reshape"])
def test_check_names_the_bad_key(manifests, edit):
    cfg = preset("hunyuancustom_720p").vae
    shapes = dict(manifests["diffusers"])
    key = "decoder.up_blocks.2.resnets.0.conv_shortcut.conv.weight"
    if edit == "remove":
        del shapes[key]
    elif edit == "rename":
        shapes["decoder.up_blocks.2.resnets.0.shortcut.conv.weight"] = shapes.pop(key)
    else:
        shapes[key] = [256, 512, 3, 3, 3]
    with pytest.raises(ConversionError, match=key.replace(".", r"\.")):
        conv.check(shapes, cfg, "diffusers")


def test_tiling_constants_match_the_original():
    """Spec 4.5 at full size: encode tiles 256 px / stride 192 / blend 8 latent / crop 24, 64(+1) frames / stride
    48 / blend 4 / keep 12; decode 32 latent / stride 24 / blend 64 px / crop 192, 16(+1) / 12 / 16 / 48."""
    k = vae.tiling_constants(preset("hunyuancustom_720p").vae)
    assert (k["tile_px"], k["enc_stride_px"], k["enc_blend_lat"], k["enc_limit_lat"]) == (256, 192, 8, 24)
    assert (k["tile_fr"], k["enc_stride_fr"], k["enc_blend_lat_t"], k["enc_limit_lat_t"]) == (64, 48, 4, 12)
    assert (k["tile_lat"], k["dec_stride_lat"], k["dec_blend_px"], k["dec_limit_px"]) == (32, 24, 64, 192)
    assert (k["tile_lat_t"], k["dec_stride_lat_t"], k["dec_blend_fr"], k["dec_limit_fr"]) == (16, 12, 16, 48)


def test_bad_vae_configs():
    with pytest.raises(ValueError, match="norm_num_groups=3"):
        preset("tiny", ["vae.norm_num_groups=3"])
    with pytest.raises(ValueError, match="time_compression_ratio"):
        preset("tiny", ["vae.time_compression_ratio=8"])
    with pytest.raises(ValueError, match="do not tile the output"):  # 8-frame tiles: 0.75 * 2 latent frames
        vae.tiling_constants(preset("tiny", ["vae.sample_tsize=8"]).vae)


# --------------------------------------------------------------------------------------------- conversion


def test_original_layout_and_cli(tiny, tmp_path):
    """``vae.``-prefixed keys under ``state_dict`` (other keys ignored, as the original loader does), via the
    CLI; the written params equal the diffusers-format conversion."""
    cfg, model, params, sd = tiny
    original = {"state_dict": {**{f"vae.{k}": v for k, v in model.state_dict().items()},
                               "loss.logvar": torch.zeros(1)}}
    direct = conv.from_original({"state_dict": {f"vae.{k}": v for k, v in sd.items()}}, cfg)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), direct, params)
    src = tmp_path / "pytorch_model.pt"
    torch.save(original, src)
    tiny_yaml = str(ROOT / "configs" / "tiny.yaml")
    out = tmp_path / "vae_ckpt"
    assert main(["vae", "--src", str(src), "--out", str(out), "--config", tiny_yaml]) == 0
    loaded = load_params(out)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), loaded, params)
    # a full-size config does not match the tiny checkpoint: one-line error, exit code 2
    assert main(["vae", "--src", str(src), "--out", str(tmp_path / "x"), "--overwrite"]) == 2


def test_from_diffusers_rejects_missing_and_unexpected(tiny):
    cfg, _, _, sd = tiny
    bad = dict(sd)
    bad.pop("encoder.conv_in.conv.bias")
    bad["encoder.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError, match=r"encoder\.conv_in\.conv\.bias") as e:
        conv.from_diffusers(bad, cfg)
    assert "encoder.extra.weight" in str(e.value)


# --------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("shape,match", [
    ((1, 4, 16, 16, 3), "4k\\+1"),
    ((1, 6, 16, 16, 3), "4k\\+1"),
    ((1, 5, 17, 16, 3), "height 17 is odd"),
    ((1, 5, 16, 21, 3), "width 21 is odd"),
    ((1, 5, 16, 12, 3), "width 12 is not a multiple"),
    ((1, 5, 16, 16, 4), "4 channels"),
    ((5, 16, 16, 3), "B, T, H, W, C"),
])
def test_encode_bad_input(tiny, shape, match):
    cfg, _, params, _ = tiny
    for tiled in (True, False):
        with pytest.raises(ValueError, match=match):
            vae.encode_video(params, cfg, np.zeros(shape, np.float32), tiled=tiled)


@pytest.mark.parametrize("shape,match", [((1, 2, 2, 2, 3), "3 channels"), ((2, 2, 2, 4), "B, T, H, W, C"),
                                         ((1, 0, 2, 2, 4), "empty")])
def test_decode_bad_input(tiny, shape, match):
    cfg, _, params, _ = tiny
    with pytest.raises(ValueError, match=match):
        vae.decode_latents(params, cfg, np.zeros(shape, np.float32))
