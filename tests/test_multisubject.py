"""Multi-subject customization (issue 24): K reference images, K names, K reference latent frames.

K = 1 must stay bit-identical to the single-reference code: ``tests/data/k1_baseline.npz`` was written by
``tests/data/k1_baseline.py`` from the code before the change (bit for bit on the machine that wrote it; on a CPU
whose kernels round differently, up to that rounding: ``ROUNDING``).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.data import k1_baseline


@pytest.fixture(scope="module")
def k1_now():
    return k1_baseline.compute()


# Another CPU's kernels round differently: on the AVX2-only machine of 2026-12-07 nearly every element of every
# frozen array (text towers included, which K does not touch) moved in its last bits, at most 3.7e-7 of the array's
# largest magnitude. A change to the K = 1 path (a reference token more or less, another RoPE index) moves the
# outputs by orders of magnitude more.
ROUNDING = 2e-6


def test_single_reference_is_bit_identical_to_the_frozen_outputs(k1_now):
    """Bit for bit on the machine that froze the outputs; elsewhere equal up to that machine's rounding
    (``ROUNDING`` of each array's largest magnitude)."""
    frozen = np.load(k1_baseline.PATH)
    assert sorted(frozen.files) == sorted(k1_now)
    for key in frozen.files:
        now, want = np.asarray(k1_now[key]), frozen[key]
        if not np.array_equal(now, want):
            assert now.dtype == want.dtype and np.issubdtype(want.dtype, np.floating), key
            np.testing.assert_allclose(now, want, rtol=0, atol=ROUNDING * np.abs(want).max(), err_msg=key)


# ------------------------------------------------------------------------------------------- DiT with K references


def _rope_k(grid, dims, theta, k, columns=False):
    """cos/sin written from the issue-24 rule in numpy: reference k at t=-k (k=1..K), w shifted by W', then video;
    ``columns``: reference k only at the w of the k-th of K equal columns."""
    t, h, w = grid
    c = w // k if columns else w
    pos = [(-float(j), hh, ww + w) for j in range(1, k + 1) for hh in range(h)
           for ww in range((j - 1) * c if columns else 0, (j - 1) * c + c if columns else w)]
    pos += [(tt, hh, ww) for tt in range(t) for hh in range(h) for ww in range(w)]
    pos = np.array(pos, np.float32)
    cos, sin = [], []
    for axis, d in enumerate(dims):
        omega = (1.0 / (np.float32(theta) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))).astype(np.float32)
        ang = pos[:, axis:axis + 1] * omega[None, :]
        cos.append(np.repeat(np.cos(ang), 2, axis=1))
        sin.append(np.repeat(np.sin(ang), 2, axis=1))
    return np.concatenate(cos, 1), np.concatenate(sin, 1)


def _torch_k_refs(model, cfg, x, t, text, mask, pooled, refs, columns=False):
    """diffusers sub-modules with K reference frames ahead of the video (independent of hcjax.dit); ``columns``:
    of reference k only its k-th of K equal columns (latent pixels ``[(k-1) W/K, k W/K)``)."""
    import torch

    from tests.dit_reference import from_torch_video, to_torch_video

    with torch.no_grad():
        xt = to_torch_video(x)
        b, _, tt, hh, ww = xt.shape
        pt, ph, pw = cfg.patch_size
        grid = (tt // pt, hh // ph, ww // pw)
        t_ = torch.from_numpy(t)
        temb, _ = model.time_text_embed(t_, torch.from_numpy(pooled), None)
        k, c = refs.shape[1], refs.shape[3] // refs.shape[1] if columns else refs.shape[3]
        ref_tok = torch.cat([model.x_embedder(to_torch_video(refs[:, j:j + 1, :, j * c:j * c + c] if columns
                                                             else refs[:, j:j + 1])) for j in range(k)], 1)
        enc = model.context_embedder(torch.from_numpy(text), t_, torch.from_numpy(mask))
        img = torch.cat([ref_tok, model.x_embedder(xt)], dim=1)
        cos, sin = _rope_k(grid, cfg.rope_dim_list, cfg.rope_theta, refs.shape[1], columns)
        rope = (torch.from_numpy(cos), torch.from_numpy(sin))
        total = img.shape[1] + enc.shape[1]
        valid = img.shape[1] + torch.from_numpy(mask).sum(1)
        attn_mask = (torch.arange(total)[None, :] < valid[:, None])[:, None, None, :]
        for blk in model.transformer_blocks:
            img, enc = blk(img, enc, temb, attn_mask, rope)
        for blk in model.single_transformer_blocks:
            img, enc = blk(img, enc, temb, attn_mask, rope)
        out = model.proj_out(model.norm_out(img[:, ref_tok.shape[1]:], temb))
        out = out.reshape(b, grid[0], grid[1], grid[2], -1, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return from_torch_video(out.flatten(6, 7).flatten(4, 5).flatten(2, 3))


def test_rope_positions_of_k_references():
    from hcjax.rope import position_grid

    pos = np.asarray(position_grid((2, 2, 3), 3))
    assert pos.shape == (3 * 6 + 2 * 6, 3)
    for j in range(3):
        blk = pos[6 * j:6 * (j + 1)]
        assert (blk[:, 0] == -(j + 1)).all()
        np.testing.assert_array_equal(blk[:, 1:], [[h, w + 3] for h in range(2) for w in range(3)])
    np.testing.assert_array_equal(np.asarray(position_grid((2, 2, 3), True)),             # True = one slice
                                  np.concatenate([pos[:6], pos[18:]]))
    np.testing.assert_array_equal(np.asarray(position_grid((2, 2, 3), 0))[:, 0], [0] * 6 + [1] * 6)


def _two_reference_inputs(rng, cfg, width: int, timesteps, text_lengths, text_len: int = 8):
    """A batch of two: a 2x4x``width`` latent video, its timesteps, text (valid prefixes of ``text_lengths``),
    pooled text and two reference latent frames the size of a video frame."""
    b = len(timesteps)
    x = rng.standard_normal((b, 2, 4, width, cfg.in_channels)).astype(np.float32)
    text = rng.standard_normal((b, text_len, cfg.text_states_dim)).astype(np.float32)
    mask = (np.arange(text_len)[None] < np.asarray(text_lengths)[:, None]).astype(np.int32)
    pooled = rng.standard_normal((b, cfg.text_states_dim_2)).astype(np.float32)
    refs = rng.standard_normal((b, 2, 4, width, cfg.in_channels)).astype(np.float32)
    return x, np.asarray(timesteps, np.float32), text, mask, pooled, refs


def test_dit_with_two_references_matches_independent_reference():
    import jax

    from convert_weights import dit as conv
    from hcjax.dit import HunyuanDiT
    from tests.dit_reference import diffusers_model, state_dict_numpy, tiny_cfg

    cfg = tiny_cfg(attention="chunked", attention_block_q=16, attention_block_kv=16)
    model = diffusers_model(cfg, seed=2)
    params = conv.from_diffusers(state_dict_numpy(model), cfg)
    rng = np.random.default_rng(5)
    x, t, text, mask, pooled, refs = _two_reference_inputs(rng, cfg, 6, [250.0, 700.0], [6, 3])
    fn = jax.jit(lambda p, *a: HunyuanDiT(cfg).apply({"params": p}, *a[:5], ref_latents=a[5]))
    got = np.asarray(fn(params, x, t, text, mask, pooled, refs))
    want = _torch_k_refs(model, cfg, x, t, text, mask.astype(np.int64), pooled, refs)
    err = float(np.abs(got - want).max())
    print(f"two-reference path: max abs err {err:.2e}")
    assert got.shape == x.shape and err <= 1e-4, err
    # both references matter, and their order does (distinct time slots)
    other = refs.copy()
    other[:, 1] = rng.standard_normal(other[:, 1].shape)
    assert np.abs(np.asarray(fn(params, x, t, text, mask, pooled, other)) - got).max() > 1e-3
    swapped = np.ascontiguousarray(refs[:, ::-1])
    assert np.abs(np.asarray(fn(params, x, t, text, mask, pooled, swapped)) - got).max() > 1e-3


def test_rope_positions_of_column_references():
    from hcjax.rope import position_grid

    pos = np.asarray(position_grid((2, 2, 4), 2, ref_columns=True))
    assert pos.shape == (2 * 2 * 2 + 2 * 2 * 4, 3)                  # two half-width references, then the video
    np.testing.assert_array_equal(pos[:4], [[-1, h, w + 4] for h in range(2) for w in (0, 1)])
    np.testing.assert_array_equal(pos[4:8], [[-2, h, w + 4] for h in range(2) for w in (2, 3)])
    np.testing.assert_array_equal(pos[8:], np.asarray(position_grid((2, 2, 4), 0)))
    np.testing.assert_array_equal(np.asarray(position_grid((2, 2, 4), 1, ref_columns=True)),
                                  np.asarray(position_grid((2, 2, 4), 1)))
    with pytest.raises(ValueError, match="3 reference columns do not divide a grid 4 tokens wide"):
        position_grid((2, 2, 4), 3, ref_columns=True)


def test_dit_column_references_match_independent_reference():
    """``dit.ref_tokens="column"``: reference k brings only its k-th column's tokens (diffusers parts, numpy RoPE);
    pixels outside a reference's column change nothing, one reference is the whole-frame path bit for bit."""
    import dataclasses

    import jax

    from convert_weights import dit as conv
    from hcjax import pipeline
    from hcjax.dit import HunyuanDiT
    from tests.dit_reference import diffusers_model, state_dict_numpy, tiny_cfg

    frame = tiny_cfg(attention="chunked", attention_block_q=16, attention_block_kv=16)
    cfg = dataclasses.replace(frame, ref_tokens="column")
    model = diffusers_model(cfg, seed=3)
    params = conv.from_diffusers(state_dict_numpy(model), cfg)
    rng = np.random.default_rng(6)
    x, t, text, mask, pooled, refs = _two_reference_inputs(rng, cfg, 8, [300.0, 800.0], [5, 7])
    b, s = text.shape[:2]

    def run(c, r, **kw):
        return np.asarray(jax.jit(lambda p, *a: HunyuanDiT(c).apply({"params": p}, *a[:5], ref_latents=a[5], **kw))(
            params, x, t, text, mask, pooled, r))

    got = run(cfg, refs)
    want = _torch_k_refs(model, cfg, x, t, text, mask.astype(np.int64), pooled, refs, columns=True)
    err = float(np.abs(got - want).max())
    print(f"column references: max abs err {err:.2e}")
    assert got.shape == x.shape and err <= 1e-4, err
    outside = refs.copy()                                   # reference 1's right half, reference 2's left half
    outside[:, 0, :, 4:], outside[:, 1, :, :4] = rng.standard_normal((2, b, 4, 4, cfg.in_channels))
    np.testing.assert_array_equal(run(cfg, outside), got)
    assert np.abs(run(frame, outside) - run(frame, refs)).max() > 1e-3     # the whole-frame path reads them
    inside = refs.copy()
    inside[:, 1, :, 4:] += 1.0
    assert np.abs(run(cfg, inside) - got).max() > 1e-3
    np.testing.assert_array_equal(run(cfg, refs[:, :1]), run(frame, refs[:, :1]))
    conds = pipeline.Conditions(text, mask, pooled, ref_latents=refs)
    step = jax.jit(lambda p: HunyuanDiT(cfg).apply({"params": p}, x, t, text, mask, pooled, ref_latents=refs,
                                                   return_cache=True)[1].x)
    want_shape = (b, 2 * 2 * 2 + 2 * 2 * 4 + s, cfg.hidden_size)           # 2 x (2 x 2) reference + 2 x 2 x 4 video
    assert step(params).shape == pipeline._cache_shape(cfg, x.shape, conds) == want_shape
    with pytest.raises(ValueError, match="3 reference columns do not divide a latent 4 tokens wide"):
        run(cfg, np.concatenate([refs, refs[:, :1]], axis=1))


def test_column_references_need_the_columns_layout_and_one_subject_count():
    import dataclasses

    from hcjax import pipeline
    from hcjax.config import ConfigError, preset
    from hcjax.data.batch import TrainBatch
    from hcjax.training import check_ref_columns

    base = preset("tiny")
    cfg = dataclasses.replace(base, dit=dataclasses.replace(base.dit, ref_tokens="column"))
    with pytest.raises(ConfigError, match="dit.ref_tokens=column .* needs train.data.ref_layout=columns"):
        cfg.validate()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, data=dataclasses.replace(cfg.train.data, ref_layout="columns"))).validate()
    with pytest.raises(ConfigError, match="dit.ref_tokens='row'"):
        dataclasses.replace(cfg, dit=dataclasses.replace(cfg.dit, ref_tokens="row")).validate()
    req = dict(pos_prompt="a man and a dog", item_name=["man", "dog"], ref_image=["a.png", "b.png"])
    with pytest.raises(ValueError, match="dit.ref_tokens=column.*need --ref-layout columns"):
        pipeline.validate_request(cfg, pipeline.Request(**req))
    pipeline.validate_request(cfg, pipeline.Request(ref_layout="columns", **req))
    pipeline.validate_request(cfg, pipeline.Request(pos_prompt="a man", ref_image="a.png"))   # one: any layout
    batch = TrainBatch(latents=np.zeros((2, 1, 4, 4, 4)), text_states=np.zeros((2, 3, 4)),
                       text_mask=np.ones((2, 3)), text_states_2=np.zeros((2, 4)),
                       ref_latents=np.zeros((2, 2, 4, 4, 4)), null_ref_latents=np.zeros((2, 2, 4, 4, 4)), ref_mask=np.array([[1, 1], [1, 0]]))
    with pytest.raises(ValueError, match=r"mixes clips of \[1, 2\] subjects"):
        check_ref_columns(cfg, batch)
    check_ref_columns(base, batch)                                  # whole frames: padded references are masked
    check_ref_columns(cfg, dataclasses.replace(batch, ref_mask=np.ones((2, 2), np.int32)))


def test_dit_step_cache_and_bad_reference_shapes_with_k_references():
    import dataclasses

    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from hcjax import pipeline
    from hcjax.config import preset
    from hcjax.dit import HunyuanDiT, init_params

    cfg = dataclasses.replace(preset("tiny").dit, depth_single_blocks=2)
    params = nn.unbox(init_params(cfg, jax.random.key(1)))
    rng = np.random.default_rng(1)
    b = 2
    args = (jnp.asarray(rng.standard_normal((b, 2, 4, 4, cfg.in_channels)), jnp.float32),
            jnp.asarray([100.0, 900.0]), jnp.asarray(rng.standard_normal((b, 5, cfg.text_states_dim)), jnp.float32),
            jnp.ones((b, 5), jnp.int32), jnp.asarray(rng.standard_normal((b, cfg.text_states_dim_2)), jnp.float32))
    refs = jnp.asarray(rng.standard_normal((b, 3, 4, 4, cfg.in_channels)), jnp.float32)
    net = HunyuanDiT(cfg)
    full = net.apply({"params": params}, *args, ref_latents=refs)
    out, cache = net.apply({"params": params}, *args, ref_latents=refs, return_cache=True)
    conds = pipeline.Conditions(args[2], args[3], args[4], ref_latents=refs)
    assert cache.x.shape == pipeline._cache_shape(cfg, (1, 2, 4, 4, cfg.in_channels), conds)
    assert cache.x.shape[1] == 3 * 4 + 2 * 4 + 5                   # K H'W' + T'H'W' + S tokens
    np.testing.assert_allclose(np.asarray(out), np.asarray(full), atol=1e-5)
    again = net.apply({"params": params}, *args, ref_latents=refs, cache=cache)
    np.testing.assert_allclose(np.asarray(again), np.asarray(full), atol=1e-5)
    with pytest.raises(ValueError, match=r"ref_latents must be \[B,K,H,W,C\]"):
        net.apply({"params": params}, *args, ref_latents=refs[:, :, :2])
    with pytest.raises(ValueError, match=r"ref_latents must be"):
        net.apply({"params": params}, *args, ref_latents=refs[:, :0])


# ------------------------------------------------------------------------------------------- text: K <image> tokens


def test_legacy_merge_expands_each_image_token_to_its_own_features():
    import jax.numpy as jnp

    from hcjax.conditioning.llava import legacy_merge

    img_id, pad_id, n, d = 7, 9, 3, 4
    ids = np.array([[1, 2, img_id, 3, img_id, pad_id, pad_id, pad_id],
                    [1, img_id, 2, 3, 4, img_id, pad_id, pad_id]], np.int32)
    mask = (ids != pad_id).astype(np.int32)
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((2, 8, d)).astype(np.float32)
    feats = rng.standard_normal((2, 2, n, d)).astype(np.float32)
    got_e, got_m, got_p = (np.asarray(a) for a in legacy_merge(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(emb),
                                                                jnp.asarray(feats), img_id, pad_id))
    assert got_e.shape == (2, 8 + 2 * (n - 1), d)
    for b in range(2):                       # the reference: walk the tokens, expand the k-th <image> to feats[b, k]
        rows, m, k = [], [], 0
        for p, tok in enumerate(ids[b]):
            if tok == img_id:
                rows += list(feats[b, k])
                m += [1] * n
                k += 1
            else:
                rows.append(np.zeros(d, np.float32) if tok == pad_id else emb[b, p])
                m.append(int(mask[b, p]))
        m = np.array(m)
        np.testing.assert_array_equal(got_e[b], np.stack(rows))
        np.testing.assert_array_equal(got_m[b], m)
        np.testing.assert_array_equal(got_p[b], np.where(m == 0, 1, np.cumsum(m) - 1))
    # K = 1 written as [B, n, D] and as [B, 1, n, D] agree
    ids1 = ids.copy()
    ids1[0, 4], ids1[1, 5] = pad_id, pad_id                     # one <image> per row
    one = legacy_merge(jnp.asarray(ids1), jnp.asarray((ids1 != pad_id).astype(np.int32)), jnp.asarray(emb),
                       jnp.asarray(feats[:, 0]), img_id, pad_id)
    one_k = legacy_merge(jnp.asarray(ids1), jnp.asarray((ids1 != pad_id).astype(np.int32)), jnp.asarray(emb),
                         jnp.asarray(feats[:, :1]), img_id, pad_id)
    for a, b_ in zip(one, one_k):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b_))


def test_build_prompt_one_phrase_per_subject():
    from hcjax.conditioning.llava import PROMPT_TEMPLATE, build_prompt

    assert build_prompt("p", ["man", "dog"]) == (PROMPT_TEMPLATE.format("p") + "\nThe man looks like<image>"
                                                 "\nThe dog looks like<image>")
    assert build_prompt("p", ["man"]) == build_prompt("p", "man")


@pytest.fixture(scope="module")
def tiny_models():
    from hcjax import models as M
    from hcjax.config import load_config

    return M.random_models(load_config(M.DEFAULT_CONFIG), seed=0)


def test_encode_prompts_with_two_subjects(tiny_models):
    from hcjax.conditioning.llava import num_image_features
    from hcjax.conditioning.text import encode_prompts, tokenize_llava
    from hcjax.conditioning.llava import build_prompt

    enc = tiny_models.text
    cfg = enc.cfg
    n, crop = num_image_features(cfg.clip_vision), cfg.llava.crop_start
    rng = np.random.default_rng(0)
    a, b, c = (rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(3))
    pos, neg = encode_prompts(enc, "two things", [a, b], negative_prompts="bad", item_names=["man", "dog"])
    s = cfg.llava.text_len + 2 * (n - 1)
    assert pos.text_states.shape[:2] == neg.text_states.shape[:2] == pos.text_mask.shape == (1, s)
    ids, mask = tokenize_llava(enc.llava_tokenizer, [build_prompt("two things", ["man", "dog"])], cfg, image_count=2)
    nv = int(mask.sum())
    want = np.r_[mask[0], np.ones(2 * (n - 1), np.int32)][crop:]           # spec 3.3 with K(n-1) appended ones
    np.testing.assert_array_equal(np.asarray(pos.text_mask[0]), want)
    neg_mask = np.asarray(neg.text_mask)
    assert neg_mask.sum() > 0 and neg_mask[0, cfg.llava.text_len + n - 1:].sum() == 0
    # the negative branch is the single-image one, zero-padded
    _, neg1 = encode_prompts(enc, "two things", a, negative_prompts="bad", item_names="man")
    k1 = neg1.text_states.shape[1]
    np.testing.assert_allclose(np.asarray(neg.text_states[:, :k1]), np.asarray(neg1.text_states), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(neg.text_mask[:, :k1]), np.asarray(neg1.text_mask))
    assert not np.asarray(neg.text_states[:, k1:]).any()
    # causal LM: a new second image leaves every state before its features unchanged and changes its features
    pos_c, _ = encode_prompts(enc, "two things", [a, c], negative_prompts="bad", item_names=["man", "dog"])
    k2 = int(np.flatnonzero(ids[0] == cfg.llava.image_token_index)[1]) + (n - 1) - crop   # 2nd image's first state
    da = np.abs(np.asarray(pos_c.text_states - pos.text_states))[0].max(axis=-1)
    assert da[:k2].max() == 0 and da[k2:k2 + n].max() > 1e-4
    assert nv < ids.shape[1]
    with pytest.raises(ValueError, match="one name per reference image"):
        encode_prompts(enc, "two things", [a, b], item_names=["man"])


# ------------------------------------------------------------------------------------------- pipeline + CLI


def _two_images(tmp_path):
    from PIL import Image

    paths = []
    for i, colour in enumerate([(220, 30, 30), (30, 30, 220), (30, 200, 30)]):
        img = np.full((40, 40, 3), 255, np.uint8)
        img[8:32, 8 + 4 * i:28 + 4 * i] = colour
        paths.append(str(tmp_path / f"s{i}.png"))
        Image.fromarray(img).save(paths[-1])
    return paths


def test_prepare_two_subjects_ipcfg_drops_every_reference(tiny_models, tmp_path):
    import dataclasses

    import jax.numpy as jnp

    from hcjax import pipeline

    a, b, c = _two_images(tmp_path)
    small = dict(video_size=(32, 48), frames=5, steps=2, seed=3, sample_posterior=False)   # posterior means
    req = pipeline.Request(ref_image=[a, b], pos_prompt="a man and a dog", item_name=["man", "dog"],
                           ip_cfg_scale=2.0, **small)
    prep = pipeline.prepare(tiny_models, req)
    ref = np.asarray(prep.conds.ref_latents)
    assert ref.shape == (3, 2, 4, 6, tiny_models.cfg.dit.in_channels)
    # branches [neg/white, pos/white, pos/real]: every frame of the first two is the white image's latent, the
    # real ones are each image's own latent (as a single-subject request encodes it)
    for k, path in enumerate((a, b)):
        single = np.asarray(pipeline.prepare(tiny_models, pipeline.Request(
            ref_image=path, pos_prompt="x", ip_cfg_scale=2.0, **small)).conds.ref_latents)
        np.testing.assert_allclose(ref[0, k], single[0, 0], atol=1e-5)
        np.testing.assert_allclose(ref[1, k], single[0, 0], atol=1e-5)
        np.testing.assert_allclose(ref[2, k], single[2, 0], atol=1e-5)
        assert np.abs(ref[2, k] - ref[0, k]).max() > 1e-2
    assert np.abs(ref[2, 0] - ref[2, 1]).max() > 1e-3
    lat = pipeline.denoise(tiny_models, prep)
    # the DiT sees the second reference: changing it changes the result
    other = pipeline.prepare(tiny_models, pipeline.Request(ref_image=[a, c], pos_prompt="a man and a dog",
                                                           item_name=["man", "dog"], ip_cfg_scale=2.0, **small))
    np.testing.assert_array_equal(np.asarray(other.conds.ref_latents)[2, 0], ref[2, 0])
    assert np.abs(np.asarray(other.conds.ref_latents)[2, 1] - ref[2, 1]).max() > 1e-2
    # only the second reference frame swapped (same text states): the denoised latents change
    swapped = np.array(ref)
    swapped[2, 1] = np.asarray(other.conds.ref_latents)[2, 1]
    prep2 = dataclasses.replace(prep, conds=prep.conds.replace(ref_latents=jnp.asarray(swapped)))
    diff = np.abs(np.asarray(pipeline.denoise(tiny_models, prep2)) - np.asarray(lat)).max()
    print(f"second reference swapped: latents change by {diff:.2e}")
    assert diff > 1e-6
    with pytest.raises(ValueError, match="one name per --ref-image"):
        pipeline.prepare(tiny_models, pipeline.Request(ref_image=[a, b], pos_prompt="x", item_name=["man"], **small))
    with pytest.raises(ValueError, match="1 to 4"):
        pipeline.prepare(tiny_models, pipeline.Request(ref_image=[a] * 5, pos_prompt="x", **small))


def test_cli_two_subjects_end_to_end_and_name_count_mismatch(tmp_path):
    import json
    import subprocess
    import sys

    from hcjax.media import read_video
    from tests.conftest import ROOT

    a, b, _ = _two_images(tmp_path)

    def cli(*args):
        return subprocess.run([sys.executable, "sample.py", "--config", "configs/default_tiny.yaml", "--save-path",
                               str(tmp_path / "out"), "--video-size", "32", "48", "--sample-n-frames", "5",
                               "--infer-steps", "2", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)

    r = cli("--ref-image", a, b, "--item-name", "man")
    assert r.returncode == 2 and "--item-name" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert [ln for ln in r.stderr.splitlines() if not ln.startswith("[hcjax] phase")] == [
        "error: --item-name: give one name per --ref-image image; got 1 name(s) for 2 image(s)"], r.stderr
    r = cli("--ref-image", a, b, a, b, a)
    assert r.returncode == 2 and "1 to 4" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = cli("--ref-image", a, b, "--item-name", "man", "dog", "--ref-layout", "diagonal")
    assert r.returncode == 2 and "--ref-layout: invalid choice: 'diagonal'" in r.stderr, r.stderr
    r = cli("--ref-image", a, b, "--item-name", "man", "dog", "--seed", "5", "--ip-cfg-scale", "2", "--ref-layout",
            "columns")
    assert r.returncode == 0, r.stderr
    mp4s = list((tmp_path / "out").glob("*.mp4"))
    assert len(mp4s) == 1 and read_video(mp4s[0]).shape == (5, 32, 48, 3)
    settings = json.loads(mp4s[0].with_suffix(".json").read_text())
    assert settings["ref_image"] == [a, b] and settings["item_name"] == ["man", "dog"]
    assert settings["ref_layout"] == "columns"


def test_sharded_dit_with_three_references_equals_single_device():
    """K = 3 references on a (data 1, fsdp 2, sequence 4, tensor 1) mesh: 18 reference + 12 video + 7 text = 37
    tokens, padded to the sequence degree by the attention; equals one device."""
    import dataclasses

    import flax.linen as nn
    import jax

    from hcjax import sharding as S
    from hcjax.config import MeshConfig
    from tests.test_sharding import CFG, _forward, _inputs, _numpy_params

    params = _numpy_params(CFG, 1)
    x, t, text, mask, pooled, _ = _inputs(7)
    refs = np.random.default_rng(9).standard_normal((2, 3, 4, 6, CFG.in_channels)).astype(np.float32)
    want = np.asarray(jax.jit(_forward(CFG))(nn.unbox(params), x, t, text, mask, pooled, refs))
    cfg = dataclasses.replace(CFG, sequence_parallel="ulysses")
    mesh_cfg = MeshConfig(1, 2, 4, 1)
    mesh = S.make_mesh(mesh_cfg, cfg)
    sparams = S.shard_params(params, mesh)
    inputs = [jax.device_put(a, S.input_sharding(mesh, a.shape)) for a in (x, t, text, mask, pooled, refs)]
    with S.use_mesh(mesh, mesh_cfg):
        got = np.asarray(jax.jit(_forward(cfg))(sparams, *inputs))
    err = float(np.abs(got - want).max())
    print(f"3 references on {mesh_cfg}: max abs err {err:.2e}")
    assert got.shape == x.shape and err <= 1e-4


# ------------------------------------------------------------------------------------------- reference layout


def _in_columns(images, height, width):
    """The 'columns' layout built by hand: image k padding-resized into the k-th equal column of a white frame."""
    from hcjax.media import pad_resize

    k, out = len(images), []
    for i, im in enumerate(images):
        lo, hi = i * width // k, (i + 1) * width // k
        frame = np.full((height, width, 3), 255, np.uint8)
        frame[:, lo:hi] = pad_resize(im, height, hi - lo)
        out.append(frame)
    return out


def test_layout_references_columns_and_centre(tmp_path):
    from hcjax.media import layout_references, read_image

    imgs = [read_image(p) for p in _two_images(tmp_path)]
    for k, width in ((2, 96), (3, 100)):
        placed = layout_references(imgs[:k], 48, width, "columns")
        assert len(placed) == k and all(p.shape == (48, width, 3) and p.dtype == np.uint8 for p in placed)
        for i, (got, want) in enumerate(zip(placed, _in_columns(imgs[:k], 48, width))):
            np.testing.assert_array_equal(got, want)
            # the coloured square lies inside column i only (columns 0-33, 33-66, 66-100 at width 100)
            cols = np.flatnonzero((got < 200).any(-1).any(0))
            assert i * width // k <= cols.min() and cols.max() < (i + 1) * width // k, (i, cols.min(), cols.max())
    for layout in ("centre", "columns"):       # one image, or the centre layout: the images unchanged
        assert all(a is b or np.array_equal(a, b) for a, b in zip(layout_references(imgs[:1], 48, 96, layout), imgs))
    assert all(np.array_equal(a, b) for a, b in zip(layout_references(imgs, 48, 96, "centre"), imgs))
    with pytest.raises(ValueError, match="reference layout must be one of"):
        layout_references(imgs, 48, 96, "diagonal")


def test_prepare_columns_layout_equals_references_placed_by_hand(tiny_models, tmp_path):
    """``ref_layout="columns"`` gives the VAE and the LLaVA fusion exactly the hand-placed frames (as files)."""
    from PIL import Image

    from hcjax import pipeline
    from hcjax.media import read_image

    a, b, _ = _two_images(tmp_path)
    small = dict(video_size=(32, 64), frames=5, steps=2, seed=3, ip_cfg_scale=2.0, sample_posterior=False)
    hand = []
    for i, im in enumerate(_in_columns([read_image(a), read_image(b)], 32, 64)):
        hand.append(str(tmp_path / f"placed{i}.png"))
        Image.fromarray(im).save(hand[-1])
    names = dict(pos_prompt="a man and a dog", item_name=["man", "dog"])
    cols = pipeline.prepare(tiny_models, pipeline.Request(ref_image=[a, b], ref_layout="columns", **names, **small))
    by_hand = pipeline.prepare(tiny_models, pipeline.Request(ref_image=hand, **names, **small))
    centre = pipeline.prepare(tiny_models, pipeline.Request(ref_image=[a, b], **names, **small))
    for field in ("ref_latents", "text_states", "text_mask", "text_states_2"):
        np.testing.assert_array_equal(np.asarray(getattr(cols.conds, field)), np.asarray(getattr(by_hand.conds, field)))
    assert np.abs(np.asarray(cols.conds.ref_latents) - np.asarray(centre.conds.ref_latents)).max() > 1e-2
    assert np.abs(np.asarray(cols.conds.text_states) - np.asarray(centre.conds.text_states)).max() > 1e-4
    one = [pipeline.prepare(tiny_models, pipeline.Request(ref_image=a, pos_prompt="x", ref_layout=lay, **small))
           for lay in ("centre", "columns")]
    for field in ("ref_latents", "text_states", "text_mask", "text_states_2"):
        np.testing.assert_array_equal(*(np.asarray(getattr(p.conds, field)) for p in one))
    with pytest.raises(ValueError, match="--ref-layout must be one of"):
        pipeline.prepare(tiny_models, pipeline.Request(ref_image=[a, b], pos_prompt="x", ref_layout="grid", **small))
