"""Whisper-tiny audio encoder (Flax) and HunyuanCustom's per-video-frame audio windows (spec 2.3, checklist 10).

Ports transformers' ``WhisperEncoder`` (``modeling_whisper.py``; HunyuanCustom calls ``wav2vec.encoder`` of a
``WhisperModel`` loaded from ``whisper-tiny/``) and the feature code of ``hymm_sp`` (``get_audio_feature`` /
``encode_audio``). Shapes: log-mel input ``mel [B, 2P, M]`` (channels-last: ``2P`` = 3000 mel frames of 10 ms,
``M`` = 80 bins); hidden states ``[B, P, Lw, C]`` with ``P`` = 1500 encoder frames (20 ms), ``Lw = layers + 1`` = 5
states, ``C = d_model`` = 384; windows ``[1, F, 10, Lw, C]`` for ``F`` video frames.

The ``Lw`` hidden states are, in order: the conv-stem output plus positional table, the outputs of encoder layers
1 .. L-1, and the final-LayerNorm output of layer L (transformers' ``output_hidden_states`` ordering; the raw
output of the last layer is not included).

Pipeline (:func:`audio_prompts_from_file`): decode the audio file to mono 16 kHz (:func:`hcjax.media.read_audio`,
``librosa.load`` semantics); ``WhisperFeatureExtractor`` log-mels of the first 30 s; the encoder; windows of 10
encoder frames per video frame starting at ``2f`` after 4 leading zero frames (25 fps); all-zero windows past the
end of the audio.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..config import WhisperConfig
from ..layers import Dense, LayerNorm, logical, to_dtype
from ..media import read_audio

SAMPLE_RATE = 16000
CHUNK_SAMPLES = 480_000          # 30 s: one WhisperFeatureExtractor chunk; only the first one is encoded
ENCODER_FPS = 50.0               # encoder frames per second (20 ms each)
WINDOW = 10                      # encoder frames per video frame
LEAD = 4                         # zero frames prepended before windowing
AUDIO_FPS = 25.0                 # the frame rate the original hard-wires (640 samples per video frame)


# ------------------------------------------------------------------------------------------- encoder


class WhisperAttention(nn.Module):
    """Bidirectional self-attention; ``k_proj`` has no bias (as in Whisper). Softmax in fp32."""

    cfg: WhisperConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        kw = dict(dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype))
        n = cfg.encoder_attention_heads
        k = cfg.d_model // n
        proj = lambda name, bias: Dense((n, k), ("embed", "heads", "head_dim"), use_bias=bias, name=name, **kw)  # noqa: E731
        q, kk, v = proj("q_proj", True)(x), proj("k_proj", False)(x), proj("v_proj", True)(x)
        s = jnp.einsum("bqnd,bknd->bnqk", q, kk, preferred_element_type=jnp.float32) * (k ** -0.5)
        p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
        o = jnp.einsum("bnqk,bknd->bqnd", p, v)
        return Dense(cfg.d_model, ("heads", "head_dim", "embed"), in_ndim=2, name="out_proj", **kw)(o)


class WhisperEncoderLayer(nn.Module):
    """Pre-LN block: ``x + attn(LN(x))`` then ``x + fc2(gelu(fc1(LN(x))))`` (exact GELU)."""

    cfg: WhisperConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        kw = dict(dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype))
        dt = kw["dtype"]
        h = LayerNorm(cfg.layer_norm_eps, name="self_attn_layer_norm", param_dtype=kw["param_dtype"])(x).astype(dt)
        x = x + WhisperAttention(cfg, name="self_attn")(h)
        h = LayerNorm(cfg.layer_norm_eps, name="final_layer_norm", param_dtype=kw["param_dtype"])(x).astype(dt)
        h = jax.nn.gelu(Dense(cfg.encoder_ffn_dim, ("embed", "mlp"), name="fc1", **kw)(h), approximate=False)
        return x + Dense(cfg.d_model, ("mlp", "embed"), name="fc2", **kw)(h)


class WhisperEncoder(nn.Module):
    """``mel [B, 2P, M]`` (channels-last log-mels) -> hidden states ``[B, P, layers+1, d_model]`` (see module doc)."""

    cfg: WhisperConfig

    @nn.compact
    def __call__(self, mel):
        cfg = self.cfg
        kw = dict(dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype))
        dt = kw["dtype"]
        want = 2 * cfg.max_source_positions
        if mel.ndim != 3 or mel.shape[1] != want or mel.shape[2] != cfg.num_mel_bins:
            raise ValueError(f"Whisper mel input must be [B, {want}, {cfg.num_mel_bins}] (channels-last, "
                             f"{want} frames of 10 ms); got {tuple(mel.shape)}")
        conv_init = lambda: logical(nn.initializers.lecun_normal(), (None, "conv_in", "conv_out"))  # noqa: E731
        conv = lambda name, stride: nn.Conv(cfg.d_model, (3,), strides=(stride,), padding=((1, 1),), name=name,  # noqa: E731
                                            kernel_init=conv_init(), **kw)
        x = jax.nn.gelu(conv("conv1", 1)(mel.astype(dt)), approximate=False)
        x = jax.nn.gelu(conv("conv2", 2)(x), approximate=False)
        pos = nn.Embed(cfg.max_source_positions, cfg.d_model, name="embed_positions", param_dtype=kw["param_dtype"],
                       embedding_init=logical(nn.initializers.normal(0.02), (None, "embed")))
        x = x + pos.embedding.astype(dt)[None]
        states = [x]
        for i in range(cfg.encoder_layers):
            x = WhisperEncoderLayer(cfg, name=f"layers_{i}")(x)
            states.append(x)
        states[-1] = LayerNorm(cfg.layer_norm_eps, name="layer_norm", param_dtype=kw["param_dtype"])(x).astype(dt)
        return jnp.stack(states, axis=2)


@functools.lru_cache(maxsize=8)
def _encoder_fn(cfg: WhisperConfig):
    return jax.jit(lambda p, mel: WhisperEncoder(cfg).apply({"params": p}, mel))


def encode(params, cfg: WhisperConfig, mel) -> jax.Array:
    """Jitted :class:`WhisperEncoder` forward: ``mel [B, 2P, M]`` -> ``[B, P, layers+1, d_model]`` (float32)."""
    return _encoder_fn(cfg)(params, jnp.asarray(mel)).astype(jnp.float32)


def init_params(cfg: WhisperConfig, key: jax.Array) -> dict:
    mel = jnp.zeros((1, 2 * cfg.max_source_positions, cfg.num_mel_bins), jnp.float32)
    return WhisperEncoder(cfg).init(key, mel)["params"]


def abstract_params(cfg: WhisperConfig) -> dict:
    return jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))


# ------------------------------------------------------------------------------------------- features


def feature_extractor(whisper_dir: str | Path | None = None):
    """transformers ``WhisperFeatureExtractor`` from the local ``whisper-tiny/`` directory (its
    ``preprocessor_config.json``), or with the Whisper defaults (80 bins, n_fft 400, hop 160, 30 s) when ``None``."""
    from transformers import WhisperFeatureExtractor

    if whisper_dir is None:
        return WhisperFeatureExtractor()
    d = Path(whisper_dir)
    if not (d / "preprocessor_config.json").is_file():
        raise FileNotFoundError(f"{d}: not a Whisper directory (missing preprocessor_config.json); pass the local "
                                "whisper-tiny/ folder of the HunyuanCustom weights")
    return WhisperFeatureExtractor.from_pretrained(str(d), local_files_only=True)


def log_mel(wave: np.ndarray, extractor=None) -> np.ndarray:
    """Log-mel features of the first 30 s, channels-last ``[1, 3000, 80]`` float32.

    The original runs the extractor on every 30 s chunk and concatenates, but encodes only the first 3000 frames;
    each chunk is normalised on its own, so that equals extracting the first chunk alone.
    """
    extractor = extractor if extractor is not None else feature_extractor()
    feats = extractor(np.asarray(wave[:CHUNK_SAMPLES], np.float32), sampling_rate=SAMPLE_RATE,
                      return_tensors="np").input_features                      # [1, 80, 3000]
    return np.ascontiguousarray(np.asarray(feats, np.float32).transpose(0, 2, 1))


# ------------------------------------------------------------------------------------------- windows


def frames_per_video_frame(fps: float) -> int:
    step = ENCODER_FPS / float(fps)
    if fps <= 0 or abs(step - round(step)) > 1e-9:
        raise ValueError(f"audio fps={fps}: the encoder runs at {ENCODER_FPS:g} frames/s, so fps must divide it "
                         f"(25 as in the original, or 12.5, 10, ...)")
    return int(round(step))


def audio_frame_count(num_samples: int, fps: float = AUDIO_FPS) -> int:
    """Video frames covered by the audio: ``len // 640`` at 25 fps (``floor(len * fps / 16000)`` in general)."""
    return int(num_samples * float(fps) // SAMPLE_RATE)


def audio_windows(hidden: np.ndarray, video_length: int, audio_len: int, fps: float = AUDIO_FPS) -> np.ndarray:
    """Per-video-frame windows ``[video_length, 10, Lw, C]`` from encoder states ``hidden [P, Lw, C]``.

    Prepend 4 zero frames; video frame ``f < min(video_length, audio_len)`` takes padded frames
    ``[s f, s f + 10)`` with ``s = 50 / fps`` (2 at 25 fps), zeros where that runs past the encoded 30 s (the
    original would fail there); frames from ``audio_len`` on are all zero (not features of silence).
    """
    hidden = np.asarray(hidden, np.float32)
    if hidden.ndim != 3:
        raise ValueError(f"hidden states must be [P, Lw, C]; got {hidden.shape}")
    step = frames_per_video_frame(fps)
    n_audio = max(0, min(int(video_length), int(audio_len)))
    p = hidden.shape[0]
    need = LEAD + step * max(n_audio - 1, 0) + WINDOW
    padded = np.zeros((max(LEAD + p, need), *hidden.shape[1:]), np.float32)
    padded[LEAD : LEAD + p] = hidden
    out = np.zeros((int(video_length), WINDOW, *hidden.shape[1:]), np.float32)
    for f in range(n_audio):
        out[f] = padded[step * f : step * f + WINDOW]
    return out


def audio_prompts_from_file(path: str | Path, params, cfg: WhisperConfig, video_length: int, *, extractor=None,
                            fps: float = AUDIO_FPS) -> np.ndarray:
    """Audio file -> ``audio_prompts [1, video_length, 10, layers+1, d_model]`` float32 (spec 2.3).

    Warns (naming the file) when the audio is shorter than the video: the missing frames get zero features.
    The unconditional CFG branch uses ``zeros_like`` of the result.
    """
    path = Path(path)
    wave = read_audio(path, SAMPLE_RATE)
    audio_len = audio_frame_count(wave.shape[0], fps)
    if audio_len < video_length:
        warnings.warn(f"{path}: the audio lasts {wave.shape[0] / SAMPLE_RATE:.2f} s = {audio_len} video frames at "
                      f"{fps:g} fps, shorter than the {video_length} video frames; the remaining "
                      f"{video_length - audio_len} frames get all-zero audio features", stacklevel=2)
    mel = log_mel(wave, extractor)
    if mel.shape[1] != 2 * cfg.max_source_positions or mel.shape[2] != cfg.num_mel_bins:
        raise ValueError(f"{path}: the feature extractor produced mels {mel.shape[1:]} but the Whisper config expects "
                         f"({2 * cfg.max_source_positions}, {cfg.num_mel_bins})")
    hidden = np.asarray(encode(params, cfg, mel))[0]                            # [P, Lw, C]
    return audio_windows(hidden, video_length, audio_len, fps)[None]
