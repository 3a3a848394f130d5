"""Editing mode: mask / background preparation (spec 2.2, checklist 15), bg latents through the VAE, and the
editing DiT forward (spec 5.11) against diffusers blocks + a PyTorch bg_in / bg_proj. Expected mask values come
from numpy re-derivations (hand-written elliptical element, shift-based dilation), not from the code under test."""

from __future__ import annotations

import json
import warnings

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch

from convert_weights import dit as conv
from convert_weights.rules import ConversionError
from hcjax import vae as vae_lib
from hcjax.conditioning import video as V
from hcjax.config import preset
from hcjax.dit import HunyuanDiT, abstract_params, count_params
from hcjax.media import read_video, write_video
from tests.dit_reference import (
    diffusers_model, from_torch_video, spec_rope, state_dict_numpy, tiny_cfg, to_original_names, to_torch_video,
)

TOL = 1e-4

# OpenCV's 5x5 MORPH_ELLIPSE, written out (independent of cv2)
ELLIPSE5 = np.array([[0, 0, 1, 0, 0],
                     [1, 1, 1, 1, 1],
                     [1, 1, 1, 1, 1],
                     [1, 1, 1, 1, 1],
                     [0, 0, 1, 0, 0]], bool)


def dilate_numpy(binary: np.ndarray, kernel: np.ndarray, iterations: int, erode: bool = False) -> np.ndarray:
    """Binary dilation/erosion by shifting (border: outside pixels never win, like OpenCV's default)."""
    out = binary.copy()
    kh, kw = kernel.shape
    for _ in range(iterations):
        pad_val = True if erode else False
        p = np.pad(out, ((kh // 2, kh // 2), (kw // 2, kw // 2)), constant_values=pad_val)
        acc = np.ones_like(out) if erode else np.zeros_like(out)
        for dy in range(kh):
            for dx in range(kw):
                if kernel[dy, dx]:
                    win = p[dy:dy + out.shape[0], dx:dx + out.shape[1]]
                    acc = (acc & win) if erode else (acc | win)
        out = acc
    return out


def synthetic_mask_video(n=5, h=32, w=48):
    m = np.zeros((n, h, w, 3), np.uint8)
    m[:, 16, 20] = 255                              # a single pixel: dilation radius 3 iterations x 2 = 6
    m[:, 4:10, 36:44] = 255                         # a block (for erosion)
    return m


def test_mask_dilation_radius_and_threshold():
    mask = synthetic_mask_video()
    got = V.process_mask_frame(mask[0], (32, 48), expand_scale=5)
    want = dilate_numpy(mask[0, ..., 0] > 0, ELLIPSE5, 3)
    np.testing.assert_array_equal(got == 255, want)
    assert set(np.unique(got)) <= {0, 255}
    ys, xs = np.nonzero(dilate_numpy(np.pad(np.ones((1, 1), bool), 8), ELLIPSE5, 3))
    assert ys.max() - 8 == 6 and xs.max() - 8 == 6                                 # radius 6 along the axes
    assert got[16, 26] == 255 and got[16, 27] == 0 and got[22, 20] == 255 and got[23, 20] == 0
    assert got[16 + 5, 20 + 5] == 0 and got[16 + 4, 20 + 4] == 255                  # rounded corners (ellipse)
    # erosion (negative scale) and no morphology at 0
    ero = V.process_mask_frame(mask[0], (32, 48), expand_scale=-3)
    k3 = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)                         # OpenCV's 3x3 ellipse
    np.testing.assert_array_equal(ero == 255, dilate_numpy(mask[0, ..., 0] > 0, k3, 3, erode=True))
    np.testing.assert_array_equal(V.process_mask_frame(mask[0], (32, 48), 0), mask[0, ..., 0])
    # threshold at 127.5 and the BGR->gray formula applied to RGB data (R and B weights swapped)
    g = np.zeros((16, 16, 3), np.uint8)
    g[0, 0] = 127
    g[0, 1] = 128
    g[1, 0] = (255, 0, 0)       # gray = 0.114 * 255 = 29 -> 0
    g[1, 1] = (0, 255, 0)       # 0.587 * 255 = 150 -> 255
    g[1, 2] = (0, 0, 255)       # 0.299 * 255 = 76 -> 0
    g[1, 3] = (0, 128, 255)     # 0.587 * 128 + 0.299 * 255 = 151.4 -> 255
    out = V.process_mask_frame(g, (16, 16), 0)
    assert out[0, 0] == 0 and out[0, 1] == 255
    assert [out[1, i] for i in range(4)] == [0, 255, 0, 255]


def test_prepare_pixels_background_and_mask():
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (9, 32, 48, 3), dtype=np.uint8)
    mask = synthetic_mask_video(9)
    bg, m = V.prepare_editing_pixels(video, mask, expand_scale=5)
    inside = np.stack([dilate_numpy(f[..., 0] > 0, ELLIPSE5, 3) for f in mask])
    assert bg.shape == m.shape == (1, 9, 32, 48, 3) and bg.dtype == np.float32
    np.testing.assert_array_equal(bg[0][inside], -1.0)                              # masked pixels: black -> -1
    np.testing.assert_allclose(bg[0][~inside], video[~inside] / 255.0 * 2 - 1, atol=1e-6)
    np.testing.assert_array_equal(m[0][inside], 1.0)                                # mask video: +1 in, -1 out
    np.testing.assert_array_equal(m[0][~inside], -1.0)
    # single-channel masks and a smaller mask of the same aspect ratio (warning + bilinear resize)
    bg1, m1 = V.prepare_editing_pixels(video, mask[..., 0], expand_scale=5)
    np.testing.assert_array_equal(m1, m)
    small = np.zeros((9, 16, 24, 3), np.uint8)
    small[:, 4:12, 6:18] = 255
    with pytest.warns(UserWarning, match="resizing the mask"):
        _, ms = V.prepare_editing_pixels(video, small, expand_scale=0, mask_name="small_mask.mp4", lenient=True)
    assert ms[0, 0, 8:24, 12:36].min() == 1.0 and ms[0, 0, :6].max() == -1.0


def test_prepare_pixels_bad_inputs():
    rng = np.random.default_rng(1)
    video = rng.integers(0, 256, (9, 32, 48, 3), dtype=np.uint8)
    mask = synthetic_mask_video(9)
    with pytest.warns(UserWarning) as rec:
        bg, _ = V.prepare_editing_pixels(video, mask[:6], video_name="in.mp4", mask_name="m.mp4", lenient=True)
    msgs = [str(r.message) for r in rec]
    assert any("in.mp4 has 9 frames but m.mp4 has 6" in m for m in msgs)
    assert any("in.mp4: 6 frames is not 4k+1; using the first 5" in m for m in msgs)
    assert bg.shape[1] == 5                                                          # min(9, 6) -> 4k+1 = 5
    with pytest.raises(ValueError, match="m.mp4 is 48x48 but in.mp4 is 48x32"):
        V.prepare_editing_pixels(video, np.zeros((9, 48, 48, 3), np.uint8), video_name="in.mp4", mask_name="m.mp4")
    with pytest.raises(ValueError, match="in.mp4: frame size 40x32"):
        V.prepare_editing_pixels(video[:, :, :40], mask[:, :, :40], video_name="in.mp4")
    noise = rng.integers(0, 256, mask.shape, dtype=np.uint8)                         # a natural image, not a mask
    with pytest.raises(ValueError, match="noise.mp4 does not look like a binary mask"):
        V.prepare_editing_pixels(video, noise, mask_name="noise.mp4")
    V.prepare_editing_pixels(video, noise, max_gray_fraction=None)                   # the check can be disabled


def test_editing_files(tmp_path):
    rng = np.random.default_rng(2)
    base = np.repeat(rng.integers(40, 216, (1, 2, 3, 3), dtype=np.uint8), 16, axis=1).repeat(16, axis=2)
    video = np.repeat(base, 9, axis=0)                                              # 9 frames, 32x48, blocky
    mask = np.zeros((9, 32, 48, 3), np.uint8)
    mask[:, 8:24, 16:32] = 255
    vp = write_video(tmp_path / "in.mp4", video, lossless=True)
    mp = write_video(tmp_path / "mask.mp4", mask, lossless=True)
    decoded = read_video(vp)
    assert decoded.shape == video.shape and np.array_equal(decoded, video)           # lossless: exact
    bg, m = V.load_editing_pixels(vp, mp, expand_scale=5)
    inside = np.stack([dilate_numpy(f[..., 0] > 0, ELLIPSE5, 3) for f in mask])
    assert np.array_equal(m[0, ..., 0] > 0, inside) and np.all(bg[0][inside] == -1.0)
    # different lengths: warning naming both files
    short = write_video(tmp_path / "short_mask.mp4", mask[:5], lossless=True)
    with pytest.warns(UserWarning, match="short_mask.mp4"):
        bg5, _ = V.load_editing_pixels(vp, short, lenient=True)
    assert bg5.shape[1] == 5
    # unreadable / missing files
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="broken.mp4"):
        V.load_editing_pixels(bad, mp)
    with pytest.raises(FileNotFoundError, match="missing_mask.mp4"):
        V.load_editing_pixels(vp, tmp_path / "missing_mask.mp4")


def test_bg_latents_through_vae():
    cfg = preset("tiny").vae
    rng = np.random.default_rng(3)
    abstract = nn.unbox(vae_lib.abstract_params(cfg))            # random values of the right shapes (init is slow)
    params = jax.tree.map(lambda a: (0.2 * rng.standard_normal(a.shape)).astype(np.float32), abstract)
    video = rng.integers(0, 256, (5, 16, 32, 3), dtype=np.uint8)
    mask = np.zeros((5, 16, 32, 3), np.uint8)
    mask[:, 4:10, 8:20] = 255
    bg, m = V.prepare_editing_pixels(video, mask, expand_scale=3)
    z = np.asarray(V.encode_editing_latents(params, cfg, bg, m, tiled=False))
    c = cfg.latent_channels
    assert z.shape == (1, 2, 2, 4, 2 * c)
    zb = np.asarray(vae_lib.encode_video(params, cfg, bg, None, False))              # already scaled
    zm = np.asarray(vae_lib.encode_video(params, cfg, m, None, False))
    np.testing.assert_array_equal(z[..., :c], zb)                                     # channel order [bg, mask]
    np.testing.assert_array_equal(z[..., c:], zm)
    assert np.abs(zb - zm).max() > 1e-3


# ------------------------------------------------------------------------------------------- DiT


def editing_setup(cfg, seed):
    model = diffusers_model(cfg, seed=seed)
    torch.manual_seed(seed + 100)
    pt, ph, pw = cfg.patch_size
    bg_in = torch.nn.Conv3d(cfg.bg_in_channels, cfg.hidden_size, (pt, ph, pw), stride=(pt, ph, pw))
    bg_proj = torch.nn.Linear(cfg.hidden_size, cfg.hidden_size)
    extra = {"bg_in.proj.weight": bg_in.weight, "bg_in.proj.bias": bg_in.bias,
             "bg_proj.weight": bg_proj.weight, "bg_proj.bias": bg_proj.bias}
    extra = {k: v.detach().numpy().copy() for k, v in extra.items()}
    params = conv.from_original(to_original_names(state_dict_numpy(model), cfg) | extra, cfg)
    return model, bg_in.eval(), bg_proj.eval(), params


def reference_editing_forward(model, bg_in, bg_proj, cfg, x, t, text, mask, pooled, ref, bg):
    """diffusers blocks; video tokens get bg_proj(bg_in(bg)) right after patch embedding, reference tokens not."""
    with torch.no_grad():
        xt, reft = to_torch_video(x), to_torch_video(ref)
        b, _, tt, hh, ww = xt.shape
        pt, ph, pw = cfg.patch_size
        grid = (tt // pt, hh // ph, ww // pw)
        tt_ = torch.from_numpy(t)
        temb, _ = model.time_text_embed(tt_, torch.from_numpy(pooled), None)
        bg_tok = bg_in(to_torch_video(bg)).flatten(2).transpose(1, 2)               # [B, T'H'W', D]
        vid = model.x_embedder(xt) + bg_proj(bg_tok)
        ref_tok = model.x_embedder(reft)
        enc = model.context_embedder(torch.from_numpy(text), tt_, torch.from_numpy(mask))
        img = torch.cat([ref_tok, vid], dim=1)
        cos, sin = spec_rope(grid, cfg.rope_dim_list, cfg.rope_theta, with_ref=True)
        rope = (torch.from_numpy(cos), torch.from_numpy(sin))
        n_img = img.shape[1]
        valid = n_img + torch.from_numpy(mask).sum(1)
        attn_mask = (torch.arange(n_img + enc.shape[1])[None, :] < valid[:, None])[:, None, None, :]
        for blk in model.transformer_blocks:
            img, enc = blk(img, enc, temb, attn_mask, rope)
        for blk in model.single_transformer_blocks:
            img, enc = blk(img, enc, temb, attn_mask, rope)
        out = model.proj_out(model.norm_out(img[:, ref_tok.shape[1]:], temb))
        out = out.reshape(b, grid[0], grid[1], grid[2], -1, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return from_torch_video(out.flatten(6, 7).flatten(4, 5).flatten(2, 3))


def test_editing_dit_forward_against_reference():
    cfg = tiny_cfg(video_condition=True, attention="chunked", attention_block_q=16, attention_block_kv=16)
    model, bg_in, bg_proj, params = editing_setup(cfg, seed=50)
    rng = np.random.default_rng(51)
    b, (t_, h_, w_), s = 2, (2, 4, 6), 8
    x = rng.standard_normal((b, t_, h_, w_, cfg.in_channels)).astype(np.float32)
    t = rng.uniform(0, 1000, size=(b,)).astype(np.float32)
    text = rng.standard_normal((b, s, cfg.text_states_dim)).astype(np.float32)
    mask = np.ones((b, s), np.int64)
    mask[0, 5:] = 0
    pooled = rng.standard_normal((b, cfg.text_states_dim_2)).astype(np.float32)
    ref = rng.standard_normal((b, 1, h_, w_, cfg.in_channels)).astype(np.float32)
    bg = rng.standard_normal((b, t_, h_, w_, cfg.bg_in_channels)).astype(np.float32)
    fn = jax.jit(lambda p, g: HunyuanDiT(cfg).apply({"params": p}, x, t, text, mask.astype(np.int32), pooled,
                                                    ref_latents=ref, bg_latents=g))
    want = reference_editing_forward(model, bg_in, bg_proj, cfg, x, t, text, mask, pooled, ref, bg)
    got = np.asarray(fn(params, bg))
    err = float(np.abs(got - want).max())
    print(f"editing DiT forward: max abs err {err:.2e} (max |ref| {np.abs(want).max():.1f})")
    assert got.shape == want.shape and err <= TOL
    assert np.abs(np.asarray(fn(params, np.zeros_like(bg))) - got).max() > 1e-3    # the background matters
    with pytest.raises(ValueError, match="bg_latents"):
        HunyuanDiT(cfg).apply({"params": params}, x, t, text, mask.astype(np.int32), pooled, ref_latents=ref)


def test_full_size_editing_variant(manifests_dir):
    cfg = preset("hunyuancustom_720p_editing").dit
    assert count_params(abstract_params(cfg)) == 12_820_619_328
    shapes = {k: tuple(v) for k, v in json.loads((manifests_dir / "hunyuancustom_editing_720P.json").read_text())
              ["params"].items()}
    assert len(shapes) == 856 and conv.detect_variant(shapes, "original").name == "editing"
    conv.check(shapes, cfg, "original")
    with pytest.raises(ConversionError, match="editing variant"):
        conv.check(shapes, preset("hunyuancustom_720p_audio").dit, "original")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = {k: v for k, v in shapes.items() if not k.startswith("bg_")}
        assert len(image) == 852 and conv.detect_variant(image, "original").name == "image"
