"""LoRA import and application: peft's diffusers model and merged-weight references, kohya/original formats,
strict key tables, merged vs unmerged, several adapters, adapter files and the ``convert_weights lora`` CLI."""

from __future__ import annotations

import copy
import json

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from convert_weights import dit as conv
from convert_weights import lora as lconv
from convert_weights.__main__ import main as cli_main
from hcjax import lora
from hcjax.config import PRESET_DIR
from hcjax.dit import HunyuanDiT, abstract_params
from hcjax.sharding import shard_params
from tests.dit_reference import diffusers_model, state_dict_numpy, tiny_cfg, to_original_names, to_torch_video

REL_TOL = 1e-5

# peft target sets: the attention q/k/v/out and MLP Linears of the double and single blocks ("blocks"), and
# every Linear of the model ("all": also modulations, the refiner, the embedders and the final layer)
BLOCK_TARGETS = (r".*transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|"
                 r"to_add_out)|ff\.net\.0\.proj|ff\.net\.2|ff_context\.net\.0\.proj|ff_context\.net\.2|proj_mlp|"
                 r"proj_out)")


def inputs(cfg, seed=0, b=2, thw=(2, 4, 4), s=8):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, *thw, cfg.in_channels)).astype(np.float32)
    # t < 100: at t ~ 1000 the fp32 sinusoid cos(t * f) amplifies one-ulp differences of exp(f) between XLA and
    # torch to ~6e-6 relative in the *base* model's output, which would leave the 1e-5 bound no room to test the
    # LoRA (measured: base 6e-6 / LoRA 1e-5 at t ~ 1000; 1e-6 / 2e-6 at t < 100)
    t = rng.uniform(0, 100, size=(b,)).astype(np.float32)
    text = rng.standard_normal((b, s, cfg.text_states_dim)).astype(np.float32)
    mask = np.ones((b, s), np.int64)
    mask[1, 5:] = 0
    pooled = rng.standard_normal((b, cfg.text_states_dim_2)).astype(np.float32)
    return x, t, text, mask, pooled


def run_torch(model, x, t, text, mask, pooled):
    with torch.no_grad():
        out = model(to_torch_video(x), torch.from_numpy(t), torch.from_numpy(text), torch.from_numpy(mask),
                    torch.from_numpy(pooled), return_dict=False)[0]
    return out.numpy().transpose(0, 2, 3, 4, 1)


def run_merged(cfg, params, x, t, text, mask, pooled):
    fn = jax.jit(lambda p, *a: HunyuanDiT(cfg).apply({"params": p}, *a))
    return np.asarray(fn(params, x, t, text, mask.astype(np.int32), pooled))


def run_unmerged(cfg, params, adapters, scale, x, t, text, mask, pooled):
    fn = jax.jit(lambda p, ad, s, *a: lora.apply(HunyuanDiT(cfg), p, ad, s, *a))
    return np.asarray(fn(params, adapters, scale, x, t, text, mask.astype(np.int32), pooled))


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def peft_model(cfg, targets, r=4, alpha=8.0, rank_pattern=None, seed=3):
    from peft import LoraConfig

    model = diffusers_model(cfg, seed=seed)
    base = state_dict_numpy(model)
    if targets == "all":
        targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    model.add_adapter(LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, rank_pattern=rank_pattern or {},
                                 init_lora_weights=False))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        n = 0
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
                n += 1
    assert n > 0
    return model.eval(), base


def peft_state_dict(model, prefix="transformer."):
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(model)
    return {prefix + k: v.detach().numpy().copy() for k, v in sd.items()}


@pytest.mark.parametrize("targets", ["blocks", "all"])
def test_peft_lora_matches_peft_model(targets):
    """Our import of peft's LoRA, applied to our converted base, equals peft's model (merged and unmerged)."""
    cfg = tiny_cfg()
    model, base_sd = peft_model(cfg, BLOCK_TARGETS if targets == "blocks" else "all", r=4, alpha=8.0)
    sd = peft_state_dict(model)
    assert all(k.startswith("transformer.") for k in sd)
    assert any(".single_transformer_blocks.1.proj_out.lora_B" in k for k in sd)
    params = conv.from_diffusers(base_sd, cfg)
    adapters = lconv.convert(sd, cfg)              # no alpha in a peft file: alpha = r, user scale = 8 / 4
    scale = 8.0 / 4
    data = inputs(cfg)
    ref = run_torch(model, *data)
    model.disable_adapters()
    ref_base = run_torch(model, *data)
    model.enable_adapters()
    assert rel(ref_base, ref) > 1e-2, "the LoRA must change the output for this test to mean anything"
    merged = run_merged(cfg, lora.merge(params, adapters, scale), *data)
    unmerged = run_unmerged(cfg, params, adapters, scale, *data)
    print(f"peft {targets}: merged rel err {rel(merged, ref):.2e}, unmerged {rel(unmerged, ref):.2e}")
    assert rel(merged, ref) <= REL_TOL
    assert rel(unmerged, ref) <= REL_TOL


def test_peft_metadata_alpha_and_rank_pattern():
    """With the file's peft config (diffusers' safetensors metadata) alpha and per-module ranks are applied."""
    cfg = tiny_cfg()
    pattern = {"single_transformer_blocks.0.proj_out": 2, "transformer_blocks.1.attn.to_k": 3}
    model, base_sd = peft_model(cfg, BLOCK_TARGETS, r=4, alpha=6.0, rank_pattern=pattern, seed=5)
    sd = peft_state_dict(model, prefix="")
    assert sd["single_transformer_blocks.0.proj_out.lora_A.weight"].shape[0] == 2
    peft_cfg = json.loads(json.dumps(model.peft_config["default"].to_dict(), default=list))
    adapters = lconv.convert(sd, cfg, "peft", peft_config=peft_cfg)
    params = conv.from_diffusers(base_sd, cfg)
    data = inputs(cfg, seed=1)
    ref = run_torch(model, *data)
    assert rel(run_merged(cfg, lora.merge(params, adapters), *data), ref) <= REL_TOL
    assert rel(run_unmerged(cfg, params, adapters, 1.0, *data), ref) <= REL_TOL


# ------------------------------------------------------------------------------------------- kohya / original


def original_linears(cfg):
    """Original-name Linear modules (name, out, in) of the double and single blocks (musubi's targets)."""
    d, f = cfg.hidden_size, cfg.mlp_hidden
    out = []
    for i in range(cfg.depth_double_blocks):
        for s in ("img", "txt"):
            b = f"double_blocks.{i}.{s}"
            out += [(f"{b}_attn_qkv", 3 * d, d), (f"{b}_attn_proj", d, d), (f"{b}_mlp.fc1", f, d),
                    (f"{b}_mlp.fc2", d, f), (f"{b}_mod.linear", 6 * d, d)]
    for i in range(cfg.depth_single_blocks):
        b = f"single_blocks.{i}"
        out += [(f"{b}.linear1", 3 * d + f, d), (f"{b}.linear2", d, d + f), (f"{b}.modulation.linear", 3 * d, d)]
    return out


def kohya_lora(cfg, seed=0):
    """A musubi-style LoRA (rank varies per module, alpha != rank) and the merged original state dict."""
    rng = np.random.default_rng(seed)
    sd, deltas = {}, {}
    for j, (name, n_out, n_in) in enumerate(original_linears(cfg)):
        if name.startswith("double_blocks.1.txt_mlp"):
            continue                                  # a layer without this module: zero rows in the stack
        r = 2 + j % 3
        alpha = np.float32(1.5 * r + 1.0)
        down = (0.2 * rng.standard_normal((r, n_in))).astype(np.float32)
        up = (0.2 * rng.standard_normal((n_out, r))).astype(np.float32)
        k = "lora_unet_" + name.replace(".", "_")
        sd[f"{k}.lora_down.weight"], sd[f"{k}.lora_up.weight"], sd[f"{k}.alpha"] = down, up, alpha
        deltas[name] = (alpha / r) * (up.astype(np.float64) @ down.astype(np.float64))
    return sd, deltas


def merged_original(base_orig, deltas):
    out = dict(base_orig)
    for name, dw in deltas.items():
        out[f"{name}.weight"] = (base_orig[f"{name}.weight"].astype(np.float64) + dw).astype(np.float32)
    return out


def test_kohya_lora_equals_merged_original_weights():
    cfg = tiny_cfg()
    model = diffusers_model(cfg, seed=7)
    base = to_original_names(state_dict_numpy(model), cfg)
    sd, deltas = kohya_lora(cfg)
    adapters = lconv.convert(sd, cfg)
    info = {}
    lconv.convert(sd, cfg, "musubi", info=info)
    assert info["format"] == "kohya"
    params = conv.from_original(base, cfg)
    ref_params = conv.from_original(merged_original(base, deltas), cfg)
    ours = lora.merge(params, adapters)
    for path, want in lconv_flat(ref_params).items():
        got = np.asarray(lconv_flat(ours)[path])
        assert np.allclose(got, want, rtol=0, atol=1e-6), path
    data = inputs(cfg, seed=2)
    ref = run_merged(cfg, ref_params, *data)
    assert rel(ref, run_merged(cfg, params, *data)) > 1e-2
    assert rel(run_merged(cfg, ours, *data), ref) <= REL_TOL
    assert rel(run_unmerged(cfg, params, adapters, 1.0, *data), ref) <= REL_TOL


def lconv_flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        p = f"{prefix}/{k}" if prefix else k
        out.update(lconv_flat(v, p) if isinstance(v, dict) else {p: np.asarray(v)})
    return out


def test_original_names_equal_kohya():
    cfg = tiny_cfg()
    sd, _ = kohya_lora(cfg, seed=1)
    orig = {}
    for k, v in sd.items():
        module, _, suffix = k.partition(".")
        name = next(n for n, _, _ in original_linears(cfg) if "lora_unet_" + n.replace(".", "_") == module)
        suffix = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}.get(suffix, suffix)
        orig[f"diffusion_model.{name}.{suffix}"] = v
    a, b = lconv.convert(sd, cfg), lconv.convert(orig, cfg)
    info = {}
    lconv.convert(orig, cfg, info=info)
    assert info["format"] == "original"
    fa, fb = lconv_flat(a), lconv_flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k])


def test_strict_keys_are_named():
    cfg = tiny_cfg()
    sd, _ = kohya_lora(cfg)
    bad = dict(sd)
    del bad["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    with pytest.raises(ValueError, match="lora_unet_double_blocks_0_img_attn_qkv.*no lora_B.weight/lora_up.weight"):
        lconv.convert(bad, cfg)
    extra = dict(sd)
    extra["lora_unet_double_blocks_7_img_attn_qkv.lora_down.weight"] = np.zeros((2, 64), np.float32)
    extra["lora_unet_double_blocks_0_img_attn_q_norm.lora_down.weight"] = np.zeros((2, 64), np.float32)
    with pytest.raises(ValueError, match="unexpected keys.*double_blocks_0_img_attn_q_norm.*double_blocks_7"):
        lconv.convert(extra, cfg)
    alpha_only = dict(sd)
    alpha_only["lora_unet_single_blocks_0_linear9.alpha"] = np.float32(1)
    with pytest.raises(ValueError, match="single_blocks_0_linear9"):
        lconv.convert(alpha_only, cfg)
    shaped = dict(sd)
    shaped["lora_unet_single_blocks_1_linear2.lora_down.weight"] = np.zeros((2, 64), np.float32)
    with pytest.raises(ValueError, match="mis-shaped.*single_blocks_1_linear2"):
        lconv.convert(shaped, cfg)
    dora = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": np.zeros((2, 64), np.float32),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": np.zeros((64, 2), np.float32),
            "transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector": np.zeros((64,), np.float32)}
    with pytest.raises(ValueError, match="lora_magnitude_vector"):
        lconv.convert(dora, cfg)
    with pytest.raises(ValueError, match="format"):
        lconv.convert({"foo.bar": np.zeros(1)}, cfg)


# ------------------------------------------------------------------------------------------- application


def random_adapters(params, paths, r, seed):
    rng = np.random.default_rng(seed)
    out = {}
    flat = lconv_flat(params)
    for path, n_in in paths:
        k = flat[f"{path}/kernel"].shape
        lead = k[:1] if path.startswith(("double_blocks", "single_blocks")) else ()
        a = rng.standard_normal((*k[: len(lead) + n_in], r)).astype(np.float32) * 0.3
        b = rng.standard_normal((*lead, r, *k[len(lead) + n_in:])).astype(np.float32) * 0.3
        node = out
        for part in path.split("/"):
            node = node.setdefault(part, {})
        node.update(lora_a=a, lora_b=b)
    return out


def test_several_adapters_merged_unmerged_and_input_untouched():
    cfg = tiny_cfg()
    params = conv.from_diffusers(state_dict_numpy(diffusers_model(cfg, seed=9)), cfg)
    before = copy.deepcopy(lconv_flat(params))
    ad1 = random_adapters(params, [("double_blocks/img_attn_qkv", 1), ("single_blocks/linear2_attn", 2)], 3, 0)
    ad2 = random_adapters(params, [("double_blocks/img_attn_qkv", 1), ("final_layer/linear", 1)], 2, 1)
    both = lora.merge(params, [ad1, ad2], [0.5, -1.5])
    chained = lora.merge(lora.merge(params, ad1, 0.5), ad2, -1.5)
    for k, v in lconv_flat(chained).items():
        np.testing.assert_allclose(np.asarray(lconv_flat(both)[k]), v, rtol=0, atol=1e-6)
    # the delta of a stacked kernel, written out per layer with numpy
    a, b = ad1["double_blocks"]["img_attn_qkv"]["lora_a"], ad1["double_blocks"]["img_attn_qkv"]["lora_b"]
    want = before["double_blocks/img_attn_qkv/kernel"] + 0.5 * np.einsum("ldr,lrhnk->ldhnk", a, b)
    got = lconv_flat(lora.merge(params, ad1, 0.5))["double_blocks/img_attn_qkv/kernel"]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    for k, v in lconv_flat(params).items():
        np.testing.assert_array_equal(v, before[k])              # merge never modifies its input
    data = inputs(cfg, seed=3)
    ref = run_merged(cfg, both, *data)
    assert rel(ref, run_merged(cfg, params, *data)) > 1e-2
    assert rel(run_unmerged(cfg, params, [ad1, ad2], [0.5, -1.5], *data), ref) <= REL_TOL
    with pytest.raises(ValueError, match="2 adapters but 3 scales"):
        lora.merge(params, [ad1, ad2], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="double_blocks/nope: no such Dense"):
        lora.merge(params, {"double_blocks": {"nope": ad1["double_blocks"]["img_attn_qkv"]}})


def test_cli_writes_adapter_file(tmp_path):
    cfg = tiny_cfg()
    model, _ = peft_model(cfg, BLOCK_TARGETS, r=2, alpha=3.0, seed=11)
    sd = peft_state_dict(model)
    meta = {"lora_adapter_metadata": json.dumps(model.peft_config["default"].to_dict(), default=list)}
    src = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(sd, str(src), metadata=meta)
    out = tmp_path / "adapter"
    argv = ["lora", "--src", str(src), "--out", str(out), "--config", str(PRESET_DIR / "tiny.yaml")]
    assert cli_main(argv) == 0
    adapters, info = lora.load_adapter(out)
    assert info["format"] == "diffusers" and info["scaled"]
    assert info["source_modules"]["transformer_blocks.0.attn.to_q"]["scale"] == pytest.approx(1.5)
    want = lconv_flat(lconv.convert(sd, cfg, peft_config=json.loads(meta["lora_adapter_metadata"])))
    got = lconv_flat(adapters)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    assert cli_main(argv) == 2                                    # --out exists and no --overwrite


def test_new_adapters_count_init_and_sharding():
    cfg = tiny_cfg()
    abstract = abstract_params(cfg)
    r, d, f = 3, cfg.hidden_size, cfg.mlp_hidden
    per_double = 2 * r * ((d + 3 * d) + (d + d) + (d + f) + (f + d))        # img + txt: qkv, proj, fc1, fc2
    per_single = r * ((d + 3 * d) + (d + f) + (d + d) + (f + d))            # linear1 qkv/mlp, linear2 attn/mlp
    want = cfg.depth_double_blocks * per_double + cfg.depth_single_blocks * per_single
    assert lora.count_formula(abstract, r) == want
    ad = lora.init_adapters(abstract, r, key=jax.random.key(0))
    assert lora.count(ad) == want
    assert "img_mod" not in ad["double_blocks"] and "modulation" not in ad["single_blocks"]
    assert not np.any(np.asarray(ad["single_blocks"]["linear2_attn"]["lora_b"]))
    assert np.asarray(ad["single_blocks"]["linear2_attn"]["lora_a"]).shape == (cfg.depth_single_blocks, cfg.num_heads,
                                                                               cfg.head_dim, r)
    params = conv.from_diffusers(state_dict_numpy(diffusers_model(cfg, seed=12)), cfg)
    data = inputs(cfg, seed=4)
    # lora_b = 0: the model starts unchanged (up to XLA's fusion of the extra zero term)
    assert rel(run_unmerged(cfg, params, ad, 1.0, *data), run_merged(cfg, params, *data)) <= 1e-6
    with pytest.raises(ValueError, match="matches no DiT kernel"):
        lora.target_modules(abstract, "double_blocks/nothing")
    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"))
    placed = shard_params(ad, mesh, like=lora.boxed(abstract, ad))
    kernel = shard_params(params, mesh, like=abstract)["double_blocks"]["img_attn_qkv"]["kernel"]
    a = placed["double_blocks"]["img_attn_qkv"]["lora_a"]
    b = placed["double_blocks"]["img_attn_qkv"]["lora_b"]
    assert tuple(a.sharding.spec)[:2] == tuple(kernel.sharding.spec)[:2]       # layers, embed
    assert tuple(b.sharding.spec)[2:] == tuple(kernel.sharding.spec)[2:]       # (3, heads, head_dim)
