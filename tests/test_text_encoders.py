"""Text encoders: Llama / CLIP / LLaVA parity with transformers (weights converted by our converters), the
4.41.2 legacy merge incl. pads, crop and masks checked against spec 3.2-3.4, the user-facing text stage with tiny
tokenizers built here, converters vs the manifests, bad input, and sharded placement on 8 fake CPU devices.

Expected values come from transformers (5.23, fp32, eager attention) or from the spec formulas, never from the
code under test. Measured max abs errors are printed (``pytest -s``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as hf

from convert_weights import clip as conv_clip
from convert_weights import llava as conv_llava
from convert_weights.__main__ import main
from convert_weights.rules import ConversionError
from hcjax.conditioning import llava as L
from hcjax.conditioning import text as T
from hcjax.conditioning.clip import ClipTextModel, ClipVisionModel, abstract_text_params
from hcjax.conditioning.llama import LlamaModel
from hcjax.config import Config, load_config, preset
from hcjax.models import text as MT
from hcjax.sharding import abstract_sharded
from tests.conftest import MANIFESTS

TOL = 1e-4  # max abs error vs the fp32 PyTorch reference (measured ~1e-6)
PROMPT = "A man walks a dog in the park. Realistic, High-quality."
NEGATIVE = "blurry, low quality"


# ------------------------------------------------------------------------------------------- builders


def make_llava_tokenizer(path: Path, base_vocab: int = 500) -> Path:
    """Llama-3-like byte-level BPE (BOS via post-processor) + ``<image>`` and ``<pad>`` as added specials."""
    from demo.build import make_llava_tokenizer as build

    corpus = [L.PROMPT_TEMPLATE.format(PROMPT), "\nThe object looks like", "\nThe person looks like"] * 3
    return build(path, base_vocab, corpus)


def make_clip_tokenizer(path: Path) -> Path:
    """CLIP BPE over printable ASCII (each char alone and word-final) + a few merges; EOS has the highest id."""
    chars = [chr(c) for c in range(33, 127)]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    hf.CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(str(path))
    return path


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights well away from the identity-like default init (norm scales ~1 +- 0.2, biases nonzero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and ("norm" in name or "layrnorm" in name):
                p.copy_(1.0 + 0.2 * noise if name.endswith("weight") else 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / np.sqrt(p.shape[-1] if p.ndim == 2 else np.prod(p.shape[1:])) * 0.8
                        if "embed" not in name else 0.5 * noise)
    return model.eval()


def hf_llama_config(c) -> hf.LlamaConfig:
    return hf.LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                          num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                          num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rope_theta=c.rope_theta,
                          rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings,
                          tie_word_embeddings=False, attn_implementation="eager")


def hf_vision_config(c) -> hf.CLIPVisionConfig:
    return hf.CLIPVisionConfig(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                               num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                               image_size=c.image_size, patch_size=c.patch_size, hidden_act=c.hidden_act,
                               layer_norm_eps=c.layer_norm_eps, attn_implementation="eager")


def hf_text_config(c, eos_token_id) -> hf.CLIPTextConfig:
    return hf.CLIPTextConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                             num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                             max_position_embeddings=c.max_position_embeddings, hidden_act=c.hidden_act,
                             layer_norm_eps=c.layer_norm_eps, eos_token_id=eos_token_id, bos_token_id=0,
                             pad_token_id=1, attn_implementation="eager")


def numpy_sd(model) -> dict:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def to_hub_names(sd: dict) -> dict:
    """transformers 5.x LLaVA names -> the hub / 4.41.2 layout (manifest notes)."""
    ren = [("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
           ("model.vision_tower.", "vision_tower.vision_model."),
           ("model.multi_modal_projector.", "multi_modal_projector.")]
    out = {}
    for k, v in sd.items():
        for a, b in ren:
            if k.startswith(a):
                k = b + k[len(a):]
                break
        out[k] = v
    return out


def jitted(module, **kw):
    """``module.apply`` under jit (keyword options fixed): eager op-by-op dispatch is slow on CPU."""
    return jax.jit(lambda p, *a: module.apply({"params": p}, *a, **kw))


def err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    llava_dir = make_llava_tokenizer(root / "llava-llama-3-8b-v1_1")
    clip_dir = make_clip_tokenizer(root / "openai_clip-vit-large-patch14")
    return root, llava_dir, clip_dir


@pytest.fixture(scope="module")
def cfg(dirs) -> Config:
    """tiny.yaml with ``crop_start`` measured on the tiny tokenizer (tokens before the user text)."""
    tok = MT.load_llava_tokenizer(dirs[1])
    crop = len(tok(L.PROMPT_TEMPLATE.split("{}")[0])["input_ids"])
    full = tok(L.build_prompt(PROMPT, "object"))["input_ids"]
    assert full[:crop] == tok(L.PROMPT_TEMPLATE.split("{}")[0])["input_ids"]  # the prefix tokenises stably
    c = preset("tiny")
    c = dataclasses.replace(c, llava=dataclasses.replace(c.llava, crop_start=crop))
    assert tok.convert_tokens_to_ids("<image>") == c.llava.image_token_index
    assert tok.pad_token_id == c.llava.pad_token_id
    return c


@pytest.fixture(scope="module")
def hf_llava(cfg):
    torch.manual_seed(0)
    config = hf.LlavaConfig(vision_config=hf_vision_config(cfg.clip_vision), text_config=hf_llama_config(cfg.llama),
                            image_token_index=cfg.llava.image_token_index, projector_hidden_act="gelu",
                            vision_feature_layer=-2, vision_feature_select_strategy="default",
                            tie_word_embeddings=False)
    return randomize(hf.LlavaForConditionalGeneration(config), seed=1)


@pytest.fixture(scope="module")
def hf_clip(cfg):
    torch.manual_seed(0)
    config = hf.CLIPConfig(text_config=hf_text_config(cfg.clip_text, 2).to_dict(),
                           vision_config=hf_vision_config(cfg.clip_vision).to_dict(), projection_dim=8)
    return randomize(hf.CLIPModel(config), seed=2)


@pytest.fixture(scope="module")
def llava_params(cfg, hf_llava):
    return conv_llava.from_hf(numpy_sd(hf_llava), cfg)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(40, 23, 3), dtype=np.uint8)   # tall, odd-sized: padding on the sides


# ------------------------------------------------------------------------------------------- towers


def test_llama_parity_all_hidden_states(cfg):
    c = cfg.llama
    torch.manual_seed(0)
    ref = randomize(hf.LlamaModel(hf_llama_config(c)), seed=3)
    params = conv_llava.from_hf_llama(numpy_sd(ref), c)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, c.vocab_size, size=(2, 19))
    mask = np.ones((2, 19), np.int64)
    mask[1, 13:] = 0                                        # right padding in row 1
    pos = np.stack([np.arange(19), np.arange(19) * 3 + 5])  # arbitrary position ids (RoPE)
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos),
                  output_hidden_states=True)
    run = jax.jit(lambda p, i, m, q: LlamaModel(c).apply({"params": p}, input_ids=i, attention_mask=m, position_ids=q,
                                                         output_hidden_states=True))
    last, hidden = run(params, ids, mask, pos)
    assert len(hidden) == len(out.hidden_states) == c.num_hidden_layers + 1
    errs = [err(a, b.numpy()) for a, b in zip(hidden, out.hidden_states)]
    print("llama hidden-state errors", errs, "last", err(last, out.last_hidden_state.numpy()))
    assert max(errs) < TOL and err(last, out.last_hidden_state.numpy()) < TOL
    # running only a prefix of the layers gives hidden_states[k] without the final norm
    part, _ = jax.jit(lambda p, i, m, q: LlamaModel(c).apply(
        {"params": p}, input_ids=i, attention_mask=m, position_ids=q, num_layers=c.num_hidden_layers - 2,
        final_norm=False))(params, ids, mask, pos)
    assert err(part, out.hidden_states[-3].numpy()) < TOL


@pytest.mark.parametrize("eos_token_id", [2, 193])
def test_clip_text_parity_pooled(cfg, dirs, eos_token_id):
    """Legacy argmax pooling (released config eos_token_id=2) and the first-EOS rule, vs CLIPTextModel."""
    c = dataclasses.replace(cfg.clip_text, eos_token_id=eos_token_id)
    torch.manual_seed(0)
    ref = randomize(hf.CLIPTextModel(hf_text_config(c, eos_token_id)), seed=4)
    params = conv_clip.from_hf(numpy_sd(ref), c)
    tok = MT.load_clip_tokenizer(dirs[2])
    ids, mask = T.tokenize_clip(tok, [PROMPT, "x", ""], cfg)
    if eos_token_id == 2:
        ids[2, 5] = c.vocab_size - 1   # an id above EOS: argmax picks it, as the legacy rule does
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
    last, pooled = jitted(ClipTextModel(c))(params, ids, mask)
    e_last, e_pool = err(last, out.last_hidden_state.numpy()), err(pooled, out.pooler_output.numpy())
    print(f"clip text eos={eos_token_id}: last {e_last:.2e} pooled {e_pool:.2e}")
    assert e_last < TOL and e_pool < TOL
    eos = tok.eos_token_id
    first_eos = (ids == eos).argmax(1)
    rows = ids.argmax(1) if eos_token_id == 2 else first_eos
    np.testing.assert_allclose(pooled, out.last_hidden_state.numpy()[np.arange(3), rows], atol=TOL)


def test_clip_vision_parity_hidden_state_minus_2(cfg):
    c = cfg.clip_vision
    torch.manual_seed(0)
    ref = randomize(hf.CLIPVisionModel(hf_vision_config(c)), seed=5)
    params = conv_clip.from_hf_vision(numpy_sd(ref), c)
    x = np.random.default_rng(1).standard_normal((2, 3, c.image_size, c.image_size)).astype(np.float32)
    with torch.no_grad():
        out = ref(pixel_values=torch.tensor(x), output_hidden_states=True)
    sel = jitted(ClipVisionModel(c), feature_layer=-2)(params, x.transpose(0, 2, 3, 1))
    e = err(sel, out.hidden_states[-2].numpy())
    print(f"clip vision hidden_states[-2] error {e:.2e}")
    assert e < TOL


# ------------------------------------------------------------------------------------------- LLaVA fusion


def expand_image_token(ids_valid: np.ndarray, image_id: int, n: int) -> np.ndarray:
    k = int(np.flatnonzero(ids_valid == image_id)[0])
    return np.concatenate([ids_valid[:k], np.full(n, image_id), ids_valid[k + 1:]])


def hf_llava_valid(model, ids_valid, image_id, n, pixels_nhwc):
    """Modern LLaVA with ``<image>`` pre-expanded to ``n`` placeholders: all hidden states of the valid tokens."""
    expanded = expand_image_token(ids_valid, image_id, n)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(expanded[None], dtype=torch.long),
                    pixel_values=torch.tensor(pixels_nhwc[None].transpose(0, 3, 1, 2)), output_hidden_states=True)
    return [h[0].numpy() for h in out.hidden_states]


@pytest.fixture(scope="module")
def fusion_case(cfg, dirs, image):
    tok = MT.load_llava_tokenizer(dirs[1])
    pre = MT.load_image_preprocessor(dirs[1], cfg)
    texts = [L.build_prompt(PROMPT, "object"), L.build_prompt(NEGATIVE, "person")]
    ids, mask = T.tokenize_llava(tok, texts, cfg)
    pixels = np.stack([pre(image), pre.white()])
    return ids, mask, pixels


_ALL_HIDDEN = {}


def all_hidden(cfg, params, case):
    """Our LLaVA with every hidden state (computed once per module)."""
    if "out" not in _ALL_HIDDEN:
        _ALL_HIDDEN["out"] = jitted(L.llava_model(cfg), output_hidden_states=True)(params, *case)
    return _ALL_HIDDEN["out"]


def test_llava_fusion_parity_valid_tokens(cfg, hf_llava, llava_params, fusion_case):
    ids, mask, pixels = fusion_case
    n = L.num_image_features(cfg.clip_vision)
    hidden, merged_mask, _ = all_hidden(cfg, llava_params, fusion_case)
    selected, _, _ = jitted(L.llava_model(cfg))(llava_params, ids, mask, pixels)
    for b in range(2):
        nv = int(mask[b].sum())
        ref = hf_llava_valid(hf_llava, ids[b, :nv], cfg.llava.image_token_index, n, pixels[b])
        assert len(ref) == len(hidden)
        errs = [err(h[b, :nv + n - 1], r) for h, r in zip(hidden, ref)]
        e_sel = err(selected[b, :nv + n - 1], ref[-(cfg.llava.hidden_state_skip_layer + 1)])
        print(f"llava row {b}: N={nv}, hidden-state errors max {max(errs):.2e}, hidden_states[-3] {e_sel:.2e}")
        assert max(errs) < TOL and e_sel < TOL
        assert np.all(np.asarray(merged_mask[b, :nv + n - 1]) == 1) and np.all(np.asarray(merged_mask[b, nv + n - 1:]) == 0)


def test_llava_pad_tokens_follow_spec_3_2(cfg, hf_llava, llava_params, fusion_case):
    """Pads: zero input embedding (id == pad id), position id 1, never a key, attend to all valid tokens.

    Reference: transformers' Llama fed with embeddings/positions/mask built here from the spec formulas.
    """
    ids, mask, pixels = fusion_case
    lc, n = cfg.llava, L.num_image_features(cfg.clip_vision)
    hidden, _, pos = all_hidden(cfg, llava_params, fusion_case)
    t = ids.shape[1]
    for b in range(2):
        nv = int(mask[b].sum())
        assert nv < t and np.all(ids[b, nv:] == lc.pad_token_id)
        k = nv - 1                                                # <image> is the last non-pad token
        assert ids[b, k] == lc.image_token_index
        with torch.no_grad():
            feats = hf_llava.model.get_image_features(
                pixel_values=torch.tensor(pixels[b:b + 1].transpose(0, 3, 1, 2))).pooler_output[0]
            emb = hf_llava.model.get_input_embeddings()(torch.tensor(ids[b], dtype=torch.long))
            merged = torch.cat([emb[:k], feats, torch.zeros(t - nv, emb.shape[1])])
            m = np.r_[np.ones(nv + n - 1), np.zeros(t - nv)].astype(np.int64)
            p = np.r_[np.arange(nv + n - 1), np.ones(t - nv)].astype(np.int64)
            out = hf_llava.model.language_model(inputs_embeds=merged[None], attention_mask=torch.tensor(m[None]),
                                                position_ids=torch.tensor(p[None]), output_hidden_states=True)
        np.testing.assert_array_equal(np.asarray(pos[b]), p)
        errs = [err(h[b], r[0].numpy()) for h, r in zip(hidden, out.hidden_states)]
        print(f"llava pads row {b}: {t - nv} pads, errors max {max(errs):.2e}")
        assert max(errs) < TOL
        h3 = np.asarray(hidden[-3][b, nv + n - 1:])
        assert np.allclose(h3, h3[:1], atol=1e-6)              # all pads share one hidden vector


def test_crop_and_masks_follow_spec(cfg, hf_llava, llava_params, fusion_case):
    """Spec 3.3 (conditional: ones [0,N-c), zeros [N-c,text_len), ones [text_len, S)) and 3.4 (uncond prefix)."""
    ids, mask, pixels = fusion_case
    lc, n = cfg.llava, L.num_image_features(cfg.clip_vision)
    c, tl = lc.crop_start, lc.text_len
    states, tmask = jax.jit(L.llava_states, static_argnums=1)(llava_params, cfg, ids, mask, pixels)
    s = tl + n - 1
    assert states.shape == (2, s, cfg.llama.hidden_size) and tmask.shape == (2, s)
    for b in range(2):
        nv = int(mask[b].sum())
        assert c < nv - 1
        want = np.zeros(s, np.int32)
        want[: nv - c] = 1
        want[tl:] = 1
        np.testing.assert_array_equal(np.asarray(tmask[b]), want)
        assert int(tmask[b].sum()) == nv + n - 1 - c       # = number of valid text + image tokens after the crop
        ref = hf_llava_valid(hf_llava, ids[b, :nv], lc.image_token_index, n, pixels[b])[-3]
        # layout: text [0, N-c-1), image [N-c-1, N-c-1+n), pads after
        e = err(states[b, : nv - 1 - c], ref[c: nv - 1])
        e_img = err(states[b, nv - 1 - c: nv - 1 - c + n], ref[nv - 1: nv - 1 + n])
        assert e < TOL and e_img < TOL
    rewritten = np.asarray(T.uncond_mask_rewrite(tmask, n))
    for b in range(2):
        nv = int(mask[b].sum())
        want = (np.arange(s) < nv - c).astype(np.int32)     # N_u - crop ones: text tokens + the first image token
        np.testing.assert_array_equal(rewritten[b], want)


def test_llava_hub_and_v5_names_give_same_params(cfg, hf_llava, llava_params):
    sd = numpy_sd(hf_llava)
    hub = conv_llava.from_hf(to_hub_names(sd), cfg)
    jax.tree.map(np.testing.assert_array_equal, hub, llava_params)
    small = dataclasses.replace(cfg, llava=dataclasses.replace(cfg.llava, keep_unused=False))
    dropped = conv_llava.from_hf(sd, small)
    assert "lm_head" not in dropped and "norm" not in dropped["language_model"]
    assert "post_layernorm" not in dropped["vision_tower"]


# ------------------------------------------------------------------------------------------- text stage


@pytest.fixture(scope="module")
def model_dirs(dirs, hf_llava, hf_clip):
    """The user's layout: tokenizer + safetensors weights in each local model dir."""
    root, llava_dir, clip_dir = dirs
    hf_llava.save_pretrained(str(llava_dir), safe_serialization=True)
    hf_clip.save_pretrained(str(clip_dir), safe_serialization=True)
    return llava_dir, clip_dir


def test_encode_prompts_end_to_end(cfg, model_dirs, hf_llava, hf_clip, image):
    llava_dir, clip_dir = model_dirs
    enc = MT.load_text_encoders(llava_dir, clip_dir, cfg)
    pos, neg = T.encode_prompts(enc, PROMPT, image, negative_prompts=NEGATIVE)
    lc, n = cfg.llava, L.num_image_features(cfg.clip_vision)
    s = lc.text_len + n - 1
    for br in (pos, neg):
        assert br.text_states.shape == (1, s, cfg.llama.hidden_size)
        assert br.text_mask.shape == (1, s) and br.text_states_2.shape == (1, cfg.clip_text.hidden_size)
    assert err(pos.text_states, neg.text_states) > 0.1
    # independent reference: tokenizer from transformers directly, spec 2.1 preprocessing re-derived here
    tok = hf.AutoTokenizer.from_pretrained(str(llava_dir), local_files_only=True)
    limit = lc.text_len + lc.crop_start
    white = ((1.0 - np.array(L.CLIP_MEAN)) / np.array(L.CLIP_STD)).astype(np.float32)
    ih, iw = image.shape[:2]
    size = cfg.clip_vision.image_size
    nw = int(iw / ih * size)                                   # tall image: height = size
    import cv2
    padded = np.full((size, size, 3), 255, np.uint8)
    padded[:, (size - nw) // 2:(size - nw) // 2 + nw] = cv2.resize(image, (nw, size), interpolation=cv2.INTER_LINEAR)
    ref_pix = ((padded / 255.0 - np.array(L.CLIP_MEAN)) / np.array(L.CLIP_STD)).astype(np.float32)
    for br, text, pix in ((pos, PROMPT + "<|eot_id|>\nThe object looks like<image>", ref_pix),
                          (neg, NEGATIVE + "<|eot_id|>\nThe person looks like<image>", np.broadcast_to(white, ref_pix.shape))):
        full = L.PROMPT_TEMPLATE.split("{}")[0] + text
        ids = np.array(tok(full)["input_ids"])
        nv = len(ids)
        assert nv <= limit
        ref = hf_llava_valid(hf_llava, ids, lc.image_token_index, n, pix)[-3]
        e = err(br.text_states[0, : nv - 1 - lc.crop_start + n], ref[lc.crop_start:])
        print(f"encode_prompts llava states error ({'pos' if br is pos else 'neg'}) {e:.3e}")
        assert e < TOL
        cl = hf.AutoTokenizer.from_pretrained(str(clip_dir), local_files_only=True)
        cids = cl([text.split("<|eot_id|>")[0]], max_length=77, padding="max_length", truncation=True,
                  return_tensors="pt")
        with torch.no_grad():
            pooled = hf_clip.text_model(**cids).pooler_output.numpy()
        assert err(br.text_states_2, pooled) < TOL
        if br is pos:
            want = np.zeros(s, np.int32)
            want[: nv - lc.crop_start] = 1
            want[lc.text_len:] = 1
        else:
            want = (np.arange(s) < nv - lc.crop_start).astype(np.int32)
        np.testing.assert_array_equal(np.asarray(br.text_mask[0]), want)


def test_item_name_and_negative_name(cfg):
    assert L.build_prompt("p", "cat").endswith("<|eot_id|>\nThe cat looks like<image>")
    assert cfg.llava.item_name == "object" and cfg.llava.negative_item_name == "person"
    assert L.PROMPT_TEMPLATE.count("video.2. The color") == 1


# ------------------------------------------------------------------------------------------- bad input


def test_prompt_too_long_names_the_limit(cfg, dirs):
    tok = MT.load_llava_tokenizer(dirs[1])
    limit = cfg.llava.text_len + cfg.llava.crop_start
    with pytest.raises(ValueError, match=f"limit of {limit}.*<image>"):
        T.tokenize_llava(tok, [L.build_prompt("walking dog " * 40, "object")], cfg)
    with pytest.raises(ValueError, match="exactly one <image>"):
        T.tokenize_llava(tok, [L.build_prompt("a <image> here", "object")], cfg)


def test_missing_files_are_named(cfg, dirs, model_dirs, tmp_path):
    llava_dir, clip_dir = model_dirs
    broken = tmp_path / "llava"
    shutil.copytree(llava_dir, broken)
    (broken / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        MT.load_text_encoders(broken, clip_dir, cfg)
    no_weights = tmp_path / "clip"
    shutil.copytree(clip_dir, no_weights)
    for f in no_weights.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        MT.load_clip_params(no_weights, cfg)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002.safetensors"):
        MT.load_llava_params(sharded, cfg)
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        MT.load_clip_tokenizer(tmp_path / "nowhere")


def test_tokenizer_config_mismatch(cfg, dirs):
    bad = dataclasses.replace(cfg, llava=dataclasses.replace(cfg.llava, image_token_index=7))
    with pytest.raises(ValueError, match="image_token_index"):
        T.tokenize_llava(MT.load_llava_tokenizer(dirs[1]), [L.build_prompt("x", "object")], bad)


# ------------------------------------------------------------------------------------------- full size


def _manifest(name):
    return json.loads((MANIFESTS / name).read_text())["params"]


def test_full_size_counts_and_manifests():
    full = load_config(None)
    assert L.count_params(L.abstract_params(full)) == 8_355_272_704
    assert L.count_params(abstract_text_params(full.clip_text)) == 123_060_480
    llava_m, clip_m = _manifest("llava-llama-3-8b-v1_1.json"), _manifest("clip-vit-large-patch14_text.json")
    out = conv_llava.check(llava_m, full)
    assert out["language_model/layers/self_attn/k_proj/kernel"] == (32, 4096, 8, 128)
    assert conv_llava.check(to_hub_names(llava_m), full) == out
    conv_clip.check(clip_m, full)
    hub_clip = {f"text_model.{k}": v for k, v in clip_m.items()}
    hub_clip.update({"text_model.embeddings.position_ids": [1, 77], "logit_scale": [], "text_projection.weight":
                     [768, 768], "visual_projection.weight": [768, 1024], "vision_model.post_layernorm.weight": [1024]})
    conv_clip.check(hub_clip, full)


def test_full_size_text_stage_shapes():
    """Released sizes, abstractly: 351 tokens + 576 image features -> 831 states of width 4096 (spec 3.3)."""
    full = load_config(None)
    params = nn.unbox(L.abstract_params(full))
    ids = jax.ShapeDtypeStruct((2, 351), jnp.int32)
    pix = jax.ShapeDtypeStruct((2, 336, 336, 3), jnp.float32)
    states, mask = jax.eval_shape(lambda p, i, m, x: L.llava_states(p, full, i, m, x), params, ids, ids, pix)
    assert states.shape == (2, 831, 4096) and mask.shape == (2, 831)
    assert L.num_image_features(full.clip_vision) == 576


@pytest.mark.parametrize("edit", ["remove", "rename", "reshape"])
def test_manifest_check_names_bad_keys(edit):
    full = load_config(None)
    m = dict(_manifest("llava-llama-3-8b-v1_1.json"))
    key = "model.language_model.layers.7.mlp.up_proj.weight"
    if edit == "remove":
        del m[key]
    elif edit == "rename":
        m["model.language_model.layers.7.mlp.upproj.weight"] = m.pop(key)
    else:
        m[key] = [14336, 4095]
    with pytest.raises(ConversionError, match=r"layers\.7\.mlp\.up" if edit != "reshape" else "up_proj"):
        conv_llava.check(m, full)
    c = dict(_manifest("clip-vit-large-patch14_text.json"))
    c["final_layer_norm.weight"] = [767]
    with pytest.raises(ConversionError, match="final_layer_norm"):
        conv_clip.check(c, full)


# ------------------------------------------------------------------------------------------- CLI, sharding


def test_cli_converts_and_loads(cfg, model_dirs, tmp_path, image):
    llava_dir, clip_dir = model_dirs
    tiny = str(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml")
    crop = f"llava.crop_start={cfg.llava.crop_start}"
    assert main(["llava", "--src", str(llava_dir), "--out", str(tmp_path / "llava"), "--config", tiny,
                 "--set", crop]) == 0
    assert main(["clip", "--src", str(clip_dir), "--out", str(tmp_path / "clip"), "--config", tiny]) == 0
    assert main(["clip", "--src", str(clip_dir), "--out", str(tmp_path / "clip"), "--config", tiny]) == 2  # exists
    a = MT.load_text_encoders(llava_dir, clip_dir, cfg, llava_weights=tmp_path / "llava", clip_weights=tmp_path / "clip")
    b = MT.load_text_encoders(llava_dir, clip_dir, cfg)
    pa, _ = T.encode_prompts(a, PROMPT, image)
    pb, _ = T.encode_prompts(b, PROMPT, image)
    for x, y in zip(pa, pb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # restore the converted checkpoint straight into a sharded layout on 8 devices
    c = MT.load_text_encoders(llava_dir, clip_dir, cfg, llava_weights=tmp_path / "llava", clip_weights=tmp_path / "clip",
                             mesh=mesh_8())
    emb = c.llava_params["language_model"]["embed_tokens"]["embedding"]
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    pc, _ = T.encode_prompts(c, PROMPT, image)
    for x, y in zip(pc, pb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


def mesh_8():
    assert jax.device_count() == 8
    return jax.make_mesh((1, 4, 1, 2), ("data", "fsdp", "sequence", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 4)


def test_sharded_params_on_8_devices(cfg, llava_params, fusion_case):
    mesh = mesh_8()
    abstract = L.abstract_params(cfg)
    used = set()
    for x in jax.tree.leaves((abstract, abstract_text_params(cfg.clip_text)),
                             is_leaf=lambda x: isinstance(x, nn.Partitioned)):
        used.update(n for n in x.names if n is not None)
    assert used <= {r[0] for r in L.TEXT_RULES}, used - {r[0] for r in L.TEXT_RULES}
    sharded = L.shard_llava_params(llava_params, cfg, mesh)
    q = sharded["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    emb = sharded["language_model"]["embed_tokens"]["embedding"]
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert len(emb.addressable_shards) == 8 and emb.addressable_shards[0].data.shape == (256, 8)
    ids, mask, pixels = fusion_case
    fn = jax.jit(L.llava_states, static_argnums=1)
    want = fn(llava_params, cfg, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels))
    got = fn(sharded, cfg, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels))
    e = err(got[0], want[0])
    print(f"sharded vs single-device text_states error {e:.2e}")
    assert e < 1e-5
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    # the released 8B layout, abstractly: per-device shard shapes under the default rules
    full = abstract_sharded(L.abstract_params(load_config(None)), mesh, L.TEXT_RULES, dtype="bfloat16")
    emb = full["language_model"]["embed_tokens"]["embedding"]
    assert emb.sharding.shard_shape(emb.shape) == (128320 // 2, 4096 // 4)
    k = full["language_model"]["layers"]["self_attn"]["k_proj"]["kernel"]
    assert k.sharding.shard_shape(k.shape) == (32, 1024, 4, 128)
