"""Audio mode: Whisper encoder + converter, audio windows, audio files, AudioProjNet2 / PerceiverAttentionCA and
the audio DiT forward (spec 2.3, 5.10, checklist 10). References: transformers' Whisper, a PyTorch adapter written
here from the spec's formulas, diffusers' HunyuanVideo blocks, and numpy loops over the spec's index rules."""

from __future__ import annotations

import dataclasses
import json
import warnings

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from convert_weights import dit as conv
from convert_weights.__main__ import main
from convert_weights import whisper as wconv
from convert_weights.rules import ConversionError
from hcjax.checkpoint import load_params
from hcjax.conditioning import whisper as W
from hcjax.config import PRESET_DIR, WhisperConfig, preset
from hcjax.dit import AudioProjNet2, HunyuanDiT, PerceiverAttentionCA, abstract_params, count_params
from hcjax.media import read_audio
from tests.dit_reference import (
    diffusers_model, from_torch_video, spec_rope, state_dict_numpy, tiny_cfg, to_original_names, to_torch_video,
)

TOL = 1e-4          # fp32 parity bound (measured errors are printed; typically 1e-6 .. 1e-5)


# ------------------------------------------------------------------------------------------- Whisper


def hf_whisper(d=16, layers=3, heads=2, ffn=24, mels=12, positions=20, seed=0, cls="WhisperModel"):
    import transformers

    hc = transformers.WhisperConfig(
        d_model=d, encoder_layers=layers, encoder_attention_heads=heads, encoder_ffn_dim=ffn, num_mel_bins=mels,
        max_source_positions=positions, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=8,
        vocab_size=50, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(hc).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    cfg = WhisperConfig(num_mel_bins=mels, d_model=d, encoder_layers=layers, encoder_attention_heads=heads,
                        encoder_ffn_dim=ffn, max_source_positions=positions)
    return model, cfg


def hf_hidden_states(encoder, mel_bcl: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        hs = encoder(torch.from_numpy(mel_bcl), output_hidden_states=True).hidden_states
    return np.stack([h.numpy() for h in hs], axis=2)          # [B, P, layers+1, C]


@pytest.mark.parametrize("cls", ["WhisperModel", "WhisperForConditionalGeneration"])
def test_whisper_encoder_parity(cls):
    model, cfg = hf_whisper(cls=cls)
    sd = state_dict_numpy(model)
    params = wconv.convert(sd, cfg)                             # encoder.* or model.encoder.* (+ decoder skipped)
    mel = np.random.default_rng(0).standard_normal((2, cfg.num_mel_bins, 40)).astype(np.float32)
    encoder = model.encoder if cls == "WhisperModel" else model.model.encoder
    want = hf_hidden_states(encoder, mel)
    got = np.asarray(W.encode(params, cfg, mel.transpose(0, 2, 1)))
    err = float(np.abs(got - want).max())
    print(f"Whisper ({cls}) hidden states: shape {got.shape}, max abs err {err:.2e}")
    assert want.shape == (2, 20, cfg.encoder_layers + 1, cfg.d_model) == got.shape
    assert err <= TOL
    # The last state is the final LayerNorm output, not the raw last layer.
    with torch.no_grad():
        last = encoder(torch.from_numpy(mel)).last_hidden_state.numpy()
    np.testing.assert_allclose(got[:, :, -1], last, atol=TOL)


def test_whisper_manifest_and_strictness(manifests_dir):
    shapes = {k: tuple(v) for k, v in json.loads((manifests_dir / "whisper-tiny_encoder.json").read_text())
              ["params"].items()}
    out = wconv.check(shapes, WhisperConfig())
    assert len(shapes) == len(out) == 67
    assert sum(int(np.prod(s)) for s in out.values()) == 8_208_384
    # hub layout (model.encoder.* + decoder) is accepted, a missing / an extra encoder tensor is not
    hub = {f"model.{k}": v for k, v in shapes.items()} | {"model.decoder.embed_tokens.weight": (51865, 384)}
    assert wconv.check(hub, WhisperConfig()) == out
    missing = dict(shapes)
    del missing["encoder.layers.2.fc1.bias"]
    with pytest.raises(ConversionError, match="encoder.layers.2.fc1.bias"):
        wconv.check(missing, WhisperConfig())
    extra = shapes | {"encoder.layers.4.fc1.bias": (1536,)}
    with pytest.raises(ConversionError, match="encoder.layers.4.fc1.bias"):
        wconv.check(extra, WhisperConfig())
    with pytest.raises(ConversionError, match="not a Whisper state dict"):
        wconv.check({"foo.weight": (1,)}, WhisperConfig())


def test_whisper_convert_cli(tmp_path, capsys):
    model, cfg = hf_whisper(d=8, layers=4, heads=2, ffn=16, mels=80, positions=1500)
    src = tmp_path / "whisper-tiny"
    src.mkdir()
    save_file({k: np.ascontiguousarray(v) for k, v in state_dict_numpy(model).items()}, src / "model.safetensors")
    tiny = str(PRESET_DIR / "tiny.yaml")
    assert main(["whisper", "--src", str(src), "--out", str(tmp_path / "out"), "--config", tiny]) == 0
    params = load_params(tmp_path / "out")
    np.testing.assert_array_equal(params["conv1"]["kernel"],
                                  state_dict_numpy(model)["encoder.conv1.weight"].transpose(2, 1, 0))
    # a shape mismatch (default 384-wide config) is a one-line error naming the file, exit code 2
    assert main(["whisper", "--src", str(src), "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "mis-shaped" in err and err.count("\n") == 1
    assert main(["whisper", "--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out3")]) == 2
    assert "nowhere" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- windows


def windows_numpy(hidden, video_length, audio_len):
    """Spec 2.3 element by element: frame f, slot w reads encoder frame 2f + w - 4 (zero outside the audio)."""
    p = hidden.shape[0]
    out = np.zeros((video_length, 10, *hidden.shape[1:]), np.float32)
    for f in range(min(video_length, audio_len)):
        for w in range(10):
            src = 2 * f + w - 4
            if 0 <= src < p:
                out[f, w] = hidden[src]
    return out


@pytest.mark.parametrize("video_length,audio_len,p", [(33, 100, 1500), (33, 20, 1500), (17, 60, 24)])
def test_windows_against_numpy(video_length, audio_len, p):
    lw, c = 5, 3
    ramp = np.arange(p, dtype=np.float32)[:, None, None] + 1.0      # per-encoder-frame ramp, 1-based
    hidden = ramp + 1000.0 * np.arange(lw)[None, :, None] + 0.01 * np.arange(c)[None, None, :]
    got = W.audio_windows(hidden, video_length, audio_len)
    want = windows_numpy(hidden, video_length, audio_len)
    np.testing.assert_array_equal(got, want)
    # explicit spot checks of the rule: frame 0 = 4 zeros then encoder frames 0..5; frame 1 starts at frame -2
    np.testing.assert_array_equal(got[0, :4], 0)
    np.testing.assert_array_equal(got[0, 4:, 0, 0], np.arange(1, 7))
    np.testing.assert_array_equal(got[1, :2], 0)
    np.testing.assert_array_equal(got[1, 2:, 0, 0], np.arange(1, 9))
    n_audio = min(video_length, audio_len)
    assert np.all(got[n_audio:] == 0)                            # past the audio: all zero, not silence features
    if p < 2 * (n_audio - 1) + 6:                                # windows running past the encoded frames: zeros
        assert got[n_audio - 1, -1, 0, 0] == 0


def test_window_rejects_bad_fps():
    with pytest.raises(ValueError, match="fps"):
        W.audio_windows(np.zeros((10, 5, 3)), 5, 5, fps=24)
    assert W.audio_frame_count(16000) == 25 and W.audio_frame_count(16639) == 25 and W.audio_frame_count(640) == 1


# ------------------------------------------------------------------------------------------- audio files


def _sine(sr, seconds, freq=440.0, channels=1):
    t = np.arange(int(sr * seconds)) / sr
    y = 0.5 * np.sin(2 * np.pi * freq * t)
    return np.stack([y * (1.0 - 0.3 * ch) for ch in range(channels)], axis=1).astype(np.float32)


def test_load_audio_wav_resample_and_mp3(tmp_path):
    import soundfile as sf

    y16 = _sine(16000, 0.5)
    sf.write(tmp_path / "a.wav", y16, 16000, subtype="FLOAT")
    np.testing.assert_array_equal(read_audio(tmp_path / "a.wav"), y16[:, 0])     # no resampling at 16 kHz

    st = _sine(44100, 1.0, channels=2)
    sf.write(tmp_path / "b.wav", st, 44100, subtype="FLOAT")
    got = read_audio(tmp_path / "b.wav")
    n = int(np.ceil(44100 * 16000 / 44100))
    assert got.shape == (n,)                                     # librosa's fix_length: ceil(n * ratio)
    t = np.arange(n) / 16000
    want = 0.5 * 0.85 * np.sin(2 * np.pi * 440.0 * t)              # mean of the two channels (1 and 0.7 gain)
    err = np.abs(got[200:-200] - want[200:-200]).max()
    print(f"44.1 kHz stereo -> 16 kHz mono: max abs err vs analytic sine {err:.2e}")
    assert err < 2e-3

    sf.write(tmp_path / "c.mp3", _sine(16000, 1.0), 16000, format="MP3")
    mp3 = read_audio(tmp_path / "c.mp3")
    assert abs(mp3.shape[0] - 16000) < 2000 and 0.3 < np.abs(mp3).max() < 0.7


def test_feature_extractor_from_local_dir(tmp_path):
    from transformers import WhisperFeatureExtractor

    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        W.feature_extractor(tmp_path)
    WhisperFeatureExtractor(chunk_length=30).save_pretrained(tmp_path)
    fe = W.feature_extractor(tmp_path)
    wave = np.sin(np.arange(8000) / 7.0).astype(np.float32)
    mel = W.log_mel(wave, fe)
    want = WhisperFeatureExtractor()(wave, sampling_rate=16000, return_tensors="np").input_features
    assert mel.shape == (1, 3000, 80)
    np.testing.assert_array_equal(mel, want.transpose(0, 2, 1))


def test_load_audio_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        read_audio(tmp_path / "nope.wav")
    bad = tmp_path / "broken.wav"
    bad.write_text("this is not audio")
    with pytest.raises(ValueError, match="broken.wav"):
        read_audio(bad)


def test_audio_prompts_from_file_end_to_end(tmp_path):
    """soundfile + transformers feature extractor + transformers encoder + numpy windows vs the hcjax pipeline."""
    import soundfile as sf
    from transformers import WhisperFeatureExtractor

    model, cfg = hf_whisper(d=8, layers=4, heads=2, ffn=16, mels=80, positions=1500, seed=3)
    params = wconv.convert(state_dict_numpy(model), cfg)
    rng = np.random.default_rng(1)
    wave = (0.1 * rng.standard_normal(16000) + _sine(16000, 1.0)[:, 0]).astype(np.float32)    # 1 s -> 25 frames
    path = tmp_path / "speech.wav"
    sf.write(path, wave, 16000, subtype="FLOAT")
    with pytest.warns(UserWarning, match="speech.wav"):
        got = W.audio_prompts_from_file(path, params, cfg, video_length=33)
    mel = WhisperFeatureExtractor()(wave, sampling_rate=16000, return_tensors="np").input_features
    want = windows_numpy(hf_hidden_states(model.encoder, mel.astype(np.float32))[0], 33, 25)[None]
    err = float(np.abs(got - want).max())
    print(f"audio prompts end to end: shape {got.shape}, max abs err {err:.2e}")
    assert got.shape == (1, 33, 10, 5, 8) and err <= TOL
    assert np.all(got[0, 25:] == 0) and np.abs(got[0, 24]).max() > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")                            # long enough: no warning
        assert W.audio_prompts_from_file(path, params, cfg, video_length=25).shape == (1, 25, 10, 5, 8)


# ------------------------------------------------------------------------------------------- adapters


class TorchAudioProj(torch.nn.Module):
    """AudioProjNet2 from spec 5.10: flatten (window, layer, channel) -> ReLU MLP -> (ctx, D) -> LayerNorm."""

    def __init__(self, c):
        super().__init__()
        self.ctx, self.d = c.audio_context_tokens, c.hidden_size
        self.proj1 = torch.nn.Linear(c.audio_seq_len * c.audio_blocks * c.audio_channels, c.audio_intermediate_dim)
        self.proj2 = torch.nn.Linear(c.audio_intermediate_dim, c.audio_intermediate_dim)
        self.proj3 = torch.nn.Linear(c.audio_intermediate_dim, self.ctx * self.d)
        self.norm = torch.nn.LayerNorm(self.d, eps=1e-5)

    def forward(self, x):                                        # [B, F, W, Lw, C] -> [B, F, ctx, D]
        b, f = x.shape[:2]
        h = torch.relu(self.proj1(x.reshape(b * f, -1)))
        h = torch.relu(self.proj2(h))
        return self.norm(self.proj3(h).reshape(b * f, self.ctx, self.d)).reshape(b, f, self.ctx, self.d)


class TorchPerceiverCA(torch.nn.Module):
    """PerceiverAttentionCA from spec 5.10 (one head of width dh, s = dh^-1/4 on q and k, fp32 softmax)."""

    def __init__(self, c):
        super().__init__()
        d, dh = c.hidden_size, c.audio_ca_dim_hidden
        self.dh = dh
        self.norm1 = torch.nn.LayerNorm(d, eps=1e-5)
        self.norm2 = torch.nn.LayerNorm(d, eps=1e-5)
        self.to_q = torch.nn.Linear(d, dh, bias=False)
        self.to_kv = torch.nn.Linear(d, 2 * dh, bias=False)
        self.to_out = torch.nn.Linear(dh, d, bias=False)

    def forward(self, audio, video):                             # [N, A, D], [N, Q, D] -> [N, Q, D]
        a, z = self.norm1(audio), self.norm2(video)
        q = self.to_q(z)
        k, v = self.to_kv(a).chunk(2, dim=-1)
        s = self.dh ** -0.25
        w = (q * s) @ (k * s).transpose(-2, -1)
        w = torch.softmax(w.float(), dim=-1).type(w.dtype)
        return self.to_out(w @ v)


def regroup_torch(tokens):
    """Latent frame 0 = video frame 0 four times; latent frame k>=1 = video frames 4k-3 .. 4k (frame-major)."""
    b, f, ctx, d = tokens.shape
    t = (f - 1) // 4 + 1
    groups = []
    for k in range(t):
        frames = [0, 0, 0, 0] if k == 0 else list(range(4 * k - 3, 4 * k + 1))
        groups.append(torch.cat([tokens[:, i] for i in frames], dim=1))       # [B, 4 ctx, D]
    return torch.stack(groups, dim=1)                                          # [B, T, 4 ctx, D]


def torch_adapters(c, seed):
    torch.manual_seed(seed)
    proj = TorchAudioProj(c)
    cas = [TorchPerceiverCA(c) for _ in c.audio_inject_blocks]
    with torch.no_grad():
        for m in [proj, *cas]:
            for p in m.parameters():
                p.add_(0.2 * torch.randn_like(p))                # to_out is zero-initialised in training: perturb
    sd = {f"audio_proj.{k}": v.numpy().copy() for k, v in proj.state_dict().items()}
    for i, m in enumerate(cas):
        sd |= {f"audio_models.{i}.{k}": v.numpy().copy() for k, v in m.state_dict().items()}
    return proj.eval(), [m.eval() for m in cas], sd


def audio_cfg(**kw):
    base = dict(audio_condition=True, depth_double_blocks=4, audio_inject_blocks=(0, 2), attention="xla")
    return tiny_cfg(**(base | kw))


def audio_setup(cfg, seed):
    model = diffusers_model(cfg, seed=seed)
    proj, cas, asd = torch_adapters(cfg, seed + 100)
    params = conv.from_original(to_original_names(state_dict_numpy(model), cfg) | asd, cfg)
    return model, proj, cas, params


def test_adapters_against_spec_reimplementation():
    cfg = audio_cfg()
    _, proj, cas, params = audio_setup(cfg, seed=20)
    rng = np.random.default_rng(0)
    b, t, h, w = 2, 3, 2, 3
    feats = rng.standard_normal((b, 4 * (t - 1) + 1, 10, cfg.audio_blocks, cfg.audio_channels)).astype(np.float32)
    video = rng.standard_normal((b, t * h * w, cfg.hidden_size)).astype(np.float32)
    with torch.no_grad():
        tok_ref = regroup_torch(proj(torch.from_numpy(feats)))
        ca_ref = cas[1](tok_ref.reshape(b * t, -1, cfg.hidden_size),
                        torch.from_numpy(video).reshape(b * t, h * w, cfg.hidden_size)).reshape(b, t * h * w, -1)
    tok = AudioProjNet2(cfg).apply({"params": params["audio_proj"]}, feats)
    out = PerceiverAttentionCA(cfg).apply({"params": params["audio_models_1"]}, video, tok, (t, h, w))
    e1, e2 = float(np.abs(np.asarray(tok) - tok_ref.numpy()).max()), float(np.abs(np.asarray(out) - ca_ref.numpy()).max())
    print(f"AudioProjNet2 max abs err {e1:.2e}; PerceiverAttentionCA max abs err {e2:.2e}")
    assert tok.shape == (b, t, 16, cfg.hidden_size) and e1 <= TOL and e2 <= TOL
    # latent frame 0 holds video frame 0's four tokens four times
    np.testing.assert_array_equal(np.asarray(tok)[:, 0, :4], np.asarray(tok)[:, 0, 12:])
    with pytest.raises(ValueError, match="4k\\+1"):
        AudioProjNet2(cfg).apply({"params": params["audio_proj"]}, feats[:, :4])


def reference_audio_forward(model, proj, cas, cfg, x, t, text, mask, pooled, ref, feats, strength):
    """diffusers blocks + the spec adapters: inject after the configured double blocks, zero on reference tokens."""
    with torch.no_grad():
        xt, reft = to_torch_video(x), to_torch_video(ref)
        b, _, tt, hh, ww = xt.shape
        pt, ph, pw = cfg.patch_size
        grid = (tt // pt, hh // ph, ww // pw)
        tt_ = torch.from_numpy(t)
        temb, _ = model.time_text_embed(tt_, torch.from_numpy(pooled), None)
        vid = model.x_embedder(xt)
        ref_tok = model.x_embedder(reft)
        enc = model.context_embedder(torch.from_numpy(text), tt_, torch.from_numpy(mask))
        img = torch.cat([ref_tok, vid], dim=1)
        n_ref = ref_tok.shape[1]
        cos, sin = spec_rope(grid, cfg.rope_dim_list, cfg.rope_theta, with_ref=True)
        rope = (torch.from_numpy(cos), torch.from_numpy(sin))
        n_img = img.shape[1]
        valid = n_img + torch.from_numpy(mask).sum(1)
        attn_mask = (torch.arange(n_img + enc.shape[1])[None, :] < valid[:, None])[:, None, None, :]
        tokens = regroup_torch(proj(torch.from_numpy(feats)))                 # [B, T, 16, D]
        d = cfg.hidden_size
        for i, blk in enumerate(model.transformer_blocks):
            img, enc = blk(img, enc, temb, attn_mask, rope)
            if i in cfg.audio_inject_blocks:
                ca = cas[cfg.audio_inject_blocks.index(i)]
                v = img[:, n_ref:].reshape(b * grid[0], grid[1] * grid[2], d)
                delta = ca(tokens.reshape(b * grid[0], -1, d), v).reshape(b, -1, d) * strength
                img = img + torch.cat([torch.zeros_like(img[:, :n_ref]), delta], dim=1)
        for blk in model.single_transformer_blocks:
            img, enc = blk(img, enc, temb, attn_mask, rope)
        out = model.proj_out(model.norm_out(img[:, n_ref:], temb))
        out = out.reshape(b, grid[0], grid[1], grid[2], -1, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return from_torch_video(out.flatten(6, 7).flatten(4, 5).flatten(2, 3))


def _inputs(cfg, b, thw, s, seed):
    rng = np.random.default_rng(seed)
    t_, h_, w_ = thw
    x = rng.standard_normal((b, t_, h_, w_, cfg.in_channels)).astype(np.float32)
    t = rng.uniform(0, 1000, size=(b,)).astype(np.float32)
    text = rng.standard_normal((b, s, cfg.text_states_dim)).astype(np.float32)
    mask = np.ones((b, s), np.int64)
    mask[-1, s // 2:] = 0
    pooled = rng.standard_normal((b, cfg.text_states_dim_2)).astype(np.float32)
    ref = rng.standard_normal((b, 1, h_, w_, cfg.in_channels)).astype(np.float32)
    feats = rng.standard_normal((b, 4 * (t_ - 1) + 1, 10, cfg.audio_blocks, cfg.audio_channels)).astype(np.float32)
    return x, t, text, mask, pooled, ref, feats


def test_audio_dit_forward_against_reference():
    cfg = audio_cfg()
    model, proj, cas, params = audio_setup(cfg, seed=30)
    x, t, text, mask, pooled, ref, feats = _inputs(cfg, 2, (3, 4, 6), 8, seed=31)
    net = HunyuanDiT(cfg)
    fn = jax.jit(lambda p, f, s: net.apply({"params": p}, x, t, text, mask.astype(np.int32), pooled,
                                           ref_latents=ref, audio_features=f, audio_strength=s))
    want = reference_audio_forward(model, proj, cas, cfg, x, t, text, mask, pooled, ref, feats, 0.8)
    got = np.asarray(fn(params, feats, 0.8))
    err = float(np.abs(got - want).max())
    print(f"audio DiT forward (inject after {cfg.audio_inject_blocks} of {cfg.depth_double_blocks}): "
          f"max abs err {err:.2e} (max |ref| {np.abs(want).max():.1f})")
    assert got.shape == want.shape and err <= TOL
    # zero features (the unconditional branch) still contribute; strength 0 removes the audio path
    zeros = np.zeros_like(feats)
    want0 = reference_audio_forward(model, proj, cas, cfg, x, t, text, mask, pooled, ref, zeros, 0.8)
    got0 = np.asarray(fn(params, zeros, 0.8))
    assert np.abs(got0 - want0).max() <= TOL
    off = np.asarray(fn(params, zeros, 0.0))
    assert np.abs(got0 - off).max() > 1e-3
    # remat policy: same numbers
    cfg_r = dataclasses.replace(cfg, remat="dots_saveable")
    got_r = np.asarray(HunyuanDiT(cfg_r).apply({"params": params}, x, t, text, mask.astype(np.int32), pooled,
                                               ref_latents=ref, audio_features=feats, audio_strength=0.8))
    np.testing.assert_allclose(got_r, got, atol=1e-5)


def test_audio_dit_bad_inputs():
    cfg = audio_cfg(depth_double_blocks=2, audio_inject_blocks=(1,))
    model, proj, cas, params = audio_setup(cfg, seed=40)
    x, t, text, mask, pooled, ref, feats = _inputs(cfg, 1, (2, 4, 4), 8, seed=41)
    net = HunyuanDiT(cfg)
    a = (x, t, text, mask.astype(np.int32), pooled)
    with pytest.raises(ValueError, match="needs audio_features"):
        net.apply({"params": params}, *a, ref_latents=ref)
    with pytest.raises(ValueError, match=r"audio_features must be \[1, 5, 10, 5, 8\]"):
        net.apply({"params": params}, *a, ref_latents=ref, audio_features=feats[:, :4])


def test_full_size_audio_variant(manifests_dir):
    cfg = preset("hunyuancustom_720p_audio").dit
    assert count_params(abstract_params(cfg)) == 12_919_666_752
    shapes = {k: tuple(v) for k, v in json.loads((manifests_dir / "hunyuancustom_audio_720P.json").read_text())
              ["params"].items()}
    assert len(shapes) == 902 and conv.detect_variant(shapes, "original").name == "audio"
    conv.check(shapes, cfg, "original")
    with pytest.raises(ConversionError, match="audio variant"):
        conv.check(shapes, preset("hunyuancustom_720p").dit, "original")
