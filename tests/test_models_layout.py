"""Sampling straight from an original ``models/`` download layout (tiny stand-ins built from PyTorch models)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers as hf

from hcjax import models as M
from hcjax.config import load_config
from hcjax.pipeline import Request, generate
from tests.conftest import ROOT
from tests.dit_reference import diffusers_model, state_dict_numpy, to_original_names
from tests.test_text_encoders import hf_llama_config, hf_text_config, hf_vision_config, randomize


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    from diffusers import AutoencoderKLHunyuanVideo

    cfg = load_config(M.DEFAULT_CONFIG)
    d = tmp_path_factory.mktemp("models")
    # DiT: original names under 'module'
    dit_sd = to_original_names(state_dict_numpy(diffusers_model(cfg.dit, seed=0)), cfg.dit)
    (d / "hunyuancustom_720P").mkdir()
    torch.save({"module": {k: torch.from_numpy(v) for k, v in dit_sd.items()}},
               d / "hunyuancustom_720P" / "mp_rank_00_model_states.pt")
    # VAE: 'vae.'-prefixed keys under 'state_dict'
    v = cfg.vae
    vae = AutoencoderKLHunyuanVideo(in_channels=3, out_channels=3, latent_channels=v.latent_channels,
                                    block_out_channels=v.block_out_channels, layers_per_block=v.layers_per_block,
                                    norm_num_groups=v.norm_num_groups)
    (d / "vae_3d" / "hyvae_v1_0801").mkdir(parents=True)
    torch.save({"state_dict": {f"vae.{k}": t for k, t in vae.state_dict().items()}},
               d / "vae_3d" / "hyvae_v1_0801" / "pytorch_model.pt")
    # LLaVA and CLIP: HF dirs with safetensors + the tokenizers
    llava = hf.LlavaForConditionalGeneration(hf.LlavaConfig(
        vision_config=hf_vision_config(cfg.clip_vision), text_config=hf_llama_config(cfg.llama),
        image_token_index=cfg.llava.image_token_index, projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="default", tie_word_embeddings=False))
    randomize(llava, 1).save_pretrained(str(d / "llava-llama-3-8b-v1_1"), safe_serialization=True)
    clip = hf.CLIPTextModel(hf_text_config(cfg.clip_text, 2))
    randomize(clip, 2).save_pretrained(str(d / "openai_clip-vit-large-patch14"), safe_serialization=True)
    for name, sub in (("llava", "llava-llama-3-8b-v1_1"), ("clip", "openai_clip-vit-large-patch14")):
        for f in (M.TINY_TOKENIZERS / name).iterdir():
            shutil.copy2(f, d / sub / f.name)
    return d, cfg


def test_sampling_from_original_layout_converts_once(models_dir):
    d, cfg = models_dir
    out = M.convert_original(d, cfg=cfg, dtype="float32")
    assert out == d / ".hcjax" / "image" and M.is_bundle(out)
    stamp = (out / "dit" / "config.json").stat().st_mtime_ns
    assert M.convert_original(d, cfg=cfg) == out                     # second call reuses the converted bundle
    assert (out / "dit" / "config.json").stat().st_mtime_ns == stamp
    models = M.load_models(d)
    assert models.cfg.dit == cfg.dit
    req = Request(ref_image=str(ROOT / "assets/demo_subject.png"), pos_prompt="the object moves left",
                  video_size=(32, 32), frames=5, steps=2)
    frames, _ = generate(models, req)
    assert frames.shape == (5, 32, 32, 3) and frames.dtype == np.uint8
    assert frames.std() > 0    # trained-shape random weights give a non-constant video


def test_incomplete_layout_names_the_missing_file(tmp_path):
    (tmp_path / "hunyuancustom_720P").mkdir()
    (tmp_path / "hunyuancustom_720P" / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="llava-llama-3-8b-v1_1"):
        M.convert_original(tmp_path, cfg=load_config(M.DEFAULT_CONFIG))
    assert not (tmp_path / ".hcjax").exists() or not any((tmp_path / ".hcjax").iterdir())


def test_fp8_release_layout_converts_and_samples(models_dir, tmp_path):
    """Only the fp8 DiT (+ its scale map) in the variant folder: `sample.py --ckpt-dir` de-quantises and runs."""
    from hcjax.checkpoint import load_params
    from tests.test_fp8 import build_release, write_release

    src, cfg = models_dir
    d = tmp_path / "models"
    d.mkdir()
    for sub in ("vae_3d", "llava-llama-3-8b-v1_1", "openai_clip-vit-large-patch14"):
        (d / sub).symlink_to(src / sub)
    (d / "hunyuancustom_720P").mkdir()
    module, scales, ref = build_release(cfg.dit)
    write_release(d / "hunyuancustom_720P", module, scales)
    r = subprocess.run([sys.executable, "sample.py", "--ckpt-dir", str(d), "--config", str(M.DEFAULT_CONFIG),
                        "--save-path", str(tmp_path / "out"), "--video-size", "32", "32", "--sample-n-frames", "5",
                        "--infer-steps", "2"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "out").glob("*.mp4"))) == 1
    converted = load_params(d / ".hcjax" / "image" / "dit")
    layer = "double_blocks.0.img_attn_qkv"
    want = ref[f"{layer}.weight"]                       # torch: bf16(W_fp8) * bf16(scale), [out, in]
    got = np.asarray(converted["double_blocks"]["img_attn_qkv"]["kernel"][0], np.float32)
    np.testing.assert_array_equal(got.reshape(got.shape[0], -1).T, want)
