"""Frozen configuration dataclasses, YAML loading and ``--set a.b=value`` overrides.

Every YAML file in ``configs/`` maps onto :class:`Config`; its top-level sections are the fields below
(``dit``, ``vae``, ``llama``, ``clip_vision``, ``clip_text``, ``llava``, ``mesh``). Unknown keys are an error
naming the key and the file. Field names of :class:`DiTConfig` follow the original HunyuanVideo argument names.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

import yaml

ATTENTION_IMPLS = ("xla", "chunked", "cudnn", "splash")
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "nothing_saveable")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A config file, key or value is invalid."""


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """HYVideoDiffusionTransformer hyper-parameters (defaults: the released HYVideo-T/2 image model)."""

    hidden_size: int = 3072
    num_heads: int = 24
    depth_double_blocks: int = 20
    depth_single_blocks: int = 40
    mlp_width_ratio: float = 4.0
    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_channels: int = 16
    out_channels: int = 16
    rope_dim_list: tuple[int, ...] = (16, 56, 56)
    rope_theta: float = 256.0
    text_states_dim: int = 4096
    text_states_dim_2: int = 768
    refiner_depth: int = 2
    guidance_embed: bool = False
    qkv_bias: bool = True
    audio_condition: bool = False
    video_condition: bool = False
    bg_in_channels: int = 32            # editing: 16 background + 16 mask latent channels
    # audio conditioning (AudioProjNet2 + PerceiverAttentionCA), used when audio_condition
    audio_seq_len: int = 10
    audio_blocks: int = 5
    audio_channels: int = 384
    audio_intermediate_dim: int = 1024
    audio_context_tokens: int = 4
    audio_ca_dim_hidden: int = 1024
    audio_ca_heads: int = 1
    audio_inject_blocks: tuple[int, ...] = (1, 3, 5, 7, 9, 11)
    # numerics / execution
    dtype: str = "float32"              # compute dtype of activations
    param_dtype: str = "float32"        # storage dtype of parameters
    attention: str = "chunked"          # xla | chunked | cudnn | splash
    attention_block_q: int = 512        # chunked attention block sizes
    attention_block_kv: int = 512
    remat: str = "none"                 # nn.remat policy for scanned blocks
    norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_width_ratio)

    def validate(self, where: str = "dit") -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"{where}.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if sum(self.rope_dim_list) != self.head_dim:
            raise ConfigError(f"{where}.rope_dim_list={self.rope_dim_list} must sum to head_dim={self.head_dim}")
        if any(d % 2 for d in self.rope_dim_list):
            raise ConfigError(f"{where}.rope_dim_list={self.rope_dim_list} must contain even sizes")
        if len(self.patch_size) != 3:
            raise ConfigError(f"{where}.patch_size must have 3 entries (t, h, w), got {self.patch_size}")
        if self.attention not in ATTENTION_IMPLS:
            raise ConfigError(f"{where}.attention={self.attention!r}; expected one of {ATTENTION_IMPLS}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"{where}.remat={self.remat!r}; expected one of {REMAT_POLICIES}")
        for f in ("dtype", "param_dtype"):
            if getattr(self, f) not in DTYPES:
                raise ConfigError(f"{where}.{f}={getattr(self, f)!r}; expected one of {DTYPES}")
        if self.dtype == "float16":
            raise ConfigError(f"{where}.dtype=float16 is not supported for the DiT (it overflows); use bfloat16")
        if self.depth_single_blocks < 1 or self.depth_double_blocks < 0:
            raise ConfigError(f"{where}: need depth_single_blocks >= 1 and depth_double_blocks >= 0")
        if self.audio_condition and max(self.audio_inject_blocks, default=-1) >= self.depth_double_blocks:
            raise ConfigError(f"{where}.audio_inject_blocks={self.audio_inject_blocks} exceed depth_double_blocks")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKLCausal3D (884-16c-hy0801) hyper-parameters."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    time_compression_ratio: int = 4
    spatial_compression_ratio: int = 8
    mid_block_add_attention: bool = True
    scaling_factor: float = 0.476986
    sample_size: int = 256              # spatial tile size in pixels
    sample_tsize: int = 64              # temporal tile size in frames
    tile_overlap_factor: float = 0.25
    dtype: str = "float32"
    param_dtype: str = "float32"

    def validate(self, where: str = "vae") -> None:
        for f in ("dtype", "param_dtype"):
            if getattr(self, f) not in DTYPES:
                raise ConfigError(f"{where}.{f}={getattr(self, f)!r}; expected one of {DTYPES}")
        n = len(self.block_out_channels)
        if self.time_compression_ratio != 4:
            raise ConfigError(f"{where}.time_compression_ratio={self.time_compression_ratio}; only 4 is supported")
        if n < 3 or self.spatial_compression_ratio != 2 ** (n - 1):
            raise ConfigError(f"{where}.spatial_compression_ratio={self.spatial_compression_ratio} must be "
                              f"2**(len(block_out_channels)-1) with at least 3 blocks; got {n} blocks")
        for ch in self.block_out_channels:
            if ch % self.norm_num_groups:
                raise ConfigError(f"{where}.block_out_channels entry {ch} is not divisible by "
                                  f"norm_num_groups={self.norm_num_groups}")
        if self.sample_size % self.spatial_compression_ratio or self.sample_tsize % self.time_compression_ratio:
            raise ConfigError(f"{where}: sample_size={self.sample_size} must be a multiple of "
                              f"{self.spatial_compression_ratio} and sample_tsize={self.sample_tsize} of "
                              f"{self.time_compression_ratio}")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Llama-3 decoder of LLaVA-Llama-3-8B v1.1."""

    vocab_size: int = 128320
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    dtype: str = "float32"
    param_dtype: str = "float32"

    def validate(self, where: str = "llama") -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"{where}: num_attention_heads must be a multiple of num_key_value_heads")
        if self.head_dim % 2:
            raise ConfigError(f"{where}.head_dim={self.head_dim} must be even (RoPE)")
        for f in ("dtype", "param_dtype"):
            if getattr(self, f) not in DTYPES:
                raise ConfigError(f"{where}.{f}={getattr(self, f)!r}; expected one of {DTYPES}")


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig:
    """CLIP ViT-L/14-336 vision tower (LLaVA image encoder)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    dtype: str = "float32"
    param_dtype: str = "float32"

    def validate(self, where: str = "clip_vision") -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(f"{where}.image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{where}.hidden_size must be a multiple of num_attention_heads")
        for f in ("dtype", "param_dtype"):
            if getattr(self, f) not in DTYPES:
                raise ConfigError(f"{where}.{f}={getattr(self, f)!r}; expected one of {DTYPES}")


@dataclasses.dataclass(frozen=True)
class ClipTextConfig:
    """CLIP-L text tower (text_encoder_2)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    eos_token_id: int = 2
    dtype: str = "float32"
    param_dtype: str = "float32"

    def validate(self, where: str = "clip_text") -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{where}.hidden_size must be a multiple of num_attention_heads")
        for f in ("dtype", "param_dtype"):
            if getattr(self, f) not in DTYPES:
                raise ConfigError(f"{where}.{f}={getattr(self, f)!r}; expected one of {DTYPES}")


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    """LLaVA fusion glue and the HunyuanCustom text-stage constants (spec section 3)."""

    image_token_index: int = 128257
    pad_token_id: int = 128258
    vision_feature_layer: int = -2
    projector_hidden_act: str = "gelu"
    hidden_state_skip_layer: int = 2
    crop_start: int = 95                # tokens before the user text (BOS + system part + user header)
    text_len: int = 256                 # tokenizer max_length = text_len + crop_start
    clip_text_len: int = 77
    item_name: str = "object"           # positive prompt suffix "\nThe {item_name} looks like<image>"
    negative_item_name: str = "person"  # the negative prompt always uses 'person' (spec 3.1)
    uncond_mask_rewrite: bool = True    # spec 3.4 (the released pipeline always applies it)
    keep_unused: bool = True            # keep lm_head, final norm, vision post_layernorm (unused) in params

    def validate(self, where: str = "llava") -> None:
        if self.projector_hidden_act not in ("gelu", "gelu_pytorch_tanh", "quick_gelu", "silu"):
            raise ConfigError(f"{where}.projector_hidden_act={self.projector_hidden_act!r} is not supported")
        if self.hidden_state_skip_layer < 0 or self.crop_start < 0 or self.text_len < 1:
            raise ConfigError(f"{where}: need hidden_state_skip_layer >= 0, crop_start >= 0 and text_len >= 1")


@dataclasses.dataclass(frozen=True)
class WhisperConfig:
    """Whisper-tiny audio encoder (audio mode only; spec 2.3 and Appendix A). Runs in float32 in the original."""

    num_mel_bins: int = 80
    d_model: int = 384
    encoder_layers: int = 4
    encoder_attention_heads: int = 6
    encoder_ffn_dim: int = 1536
    max_source_positions: int = 1500    # encoder frames (20 ms each); the mel input is twice as long
    layer_norm_eps: float = 1e-5
    dtype: str = "float32"
    param_dtype: str = "float32"

    def validate(self, where: str = "whisper") -> None:
        if self.d_model % self.encoder_attention_heads:
            raise ConfigError(f"{where}.d_model={self.d_model} is not divisible by "
                              f"encoder_attention_heads={self.encoder_attention_heads}")
        for f in ("dtype", "param_dtype"):
            if getattr(self, f) not in DTYPES:
                raise ConfigError(f"{where}.{f}={getattr(self, f)!r}; expected one of {DTYPES}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh over axes (data, fsdp, sequence, tensor); -1 fills with the remaining devices."""

    data: int = 1
    fsdp: int = -1
    sequence: int = 1
    tensor: int = 1
    sequence_parallel: str = "ulysses"   # ulysses | ring | auto (ulysses when the heads allow it, else ring)
    rules: str = "default"               # logical-axis rule set (hcjax.sharding.RULE_SETS)

    AXES: typing.ClassVar[tuple[str, ...]] = ("data", "fsdp", "sequence", "tensor")
    SEQUENCE_PARALLEL: typing.ClassVar[tuple[str, ...]] = ("ulysses", "ring", "auto")
    RULE_SETS: typing.ClassVar[tuple[str, ...]] = ("default", "fsdp_only", "replicated")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, a) for a in self.AXES)

    def validate(self, where: str = "mesh") -> None:
        """Checks that need no devices or model (those are in ``hcjax.sharding.check_mesh``)."""
        for a in self.AXES:
            v = getattr(self, a)
            if v == 0 or v < -1:
                raise ConfigError(f"{where}.{a}={v}: mesh degrees are positive integers, or -1 to fill the devices")
        if sum(v == -1 for v in self.shape) > 1:
            raise ConfigError(f"{where}: at most one of {self.AXES} may be -1 (got {dict(zip(self.AXES, self.shape))})")
        if self.sequence_parallel not in self.SEQUENCE_PARALLEL:
            raise ConfigError(f"{where}.sequence_parallel={self.sequence_parallel!r}; expected one of "
                              f"{self.SEQUENCE_PARALLEL}")
        if self.rules not in self.RULE_SETS:
            raise ConfigError(f"{where}.rules={self.rules!r}; expected one of {self.RULE_SETS}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Training data (``hcjax.data``): a raw dataset directory (mp4 + per-clip JSON) in ``raw`` mode, or the output
    of ``python -m hcjax.precompute`` (cached latents and text embeddings) in ``precomputed`` mode."""

    path: str = ""
    mode: str = "precomputed"          # precomputed | raw
    num_frames: int = 33               # video frames per sample (4k+1)
    frame_stride: int = 1              # temporal subsampling of the source video
    buckets: tuple[tuple[int, int], ...] = ((256, 256),)    # (height, width) in pixels, multiples of 16
    ref_source: str = "auto"           # auto (the clip's reference image if any, else a frame) | image | frame
    ref_frame: int = 0                 # frame of the sampled window used as reference (-1: a random frame)
    workers: int = 0                   # grain worker processes (0: read in the training process)
    threads: int = 2                   # reading threads per process
    prefetch: int = 2                  # per-thread read-ahead buffer
    seed: int = 0                      # shuffling / frame sampling
    strict: bool = False               # raise on the first bad clip instead of logging and skipping it
    # encoders (raw mode and hcjax.precompute)
    vae_weights: str = ""              # hcjax VAE checkpoint dir, or "random" (random weights: tests/demos only)
    text_encoder: str = "llava"        # llava | hash (deterministic word-hash stand-in without weights: tests/demos)
    llava_dir: str = ""                # tokenizer + preprocessor dir of llava-llama-3-8b-v1_1
    clip_dir: str = ""                 # tokenizer dir of openai_clip-vit-large-patch14
    llava_weights: str = ""            # default: llava_dir
    clip_weights: str = ""             # default: clip_dir
    whisper_weights: str = ""          # audio models: hcjax Whisper checkpoint dir

    MODES: typing.ClassVar[tuple[str, ...]] = ("precomputed", "raw")
    TEXT_ENCODERS: typing.ClassVar[tuple[str, ...]] = ("llava", "hash")
    REF_SOURCES: typing.ClassVar[tuple[str, ...]] = ("auto", "image", "frame")

    def validate(self, where: str = "train.data") -> None:
        if self.mode not in self.MODES:
            raise ConfigError(f"{where}.mode={self.mode!r}; expected one of {self.MODES}")
        if self.text_encoder not in self.TEXT_ENCODERS:
            raise ConfigError(f"{where}.text_encoder={self.text_encoder!r}; expected one of {self.TEXT_ENCODERS}")
        if self.ref_source not in self.REF_SOURCES:
            raise ConfigError(f"{where}.ref_source={self.ref_source!r}; expected one of {self.REF_SOURCES}")
        if self.num_frames < 1 or (self.num_frames - 1) % 4:
            raise ConfigError(f"{where}.num_frames={self.num_frames}: the causal VAE needs 4k+1 frames (1, 5, 9, ...)")
        if self.frame_stride < 1:
            raise ConfigError(f"{where}.frame_stride={self.frame_stride} must be >= 1")
        if not self.buckets:
            raise ConfigError(f"{where}.buckets is empty; give at least one [height, width]")
        for hw in self.buckets:
            if len(hw) != 2 or any(v < 16 or v % 16 for v in hw):
                raise ConfigError(f"{where}.buckets entry {list(hw)}: expected [height, width], positive multiples "
                                  "of 16 (VAE 8x and patch 2x)")
        if not -1 <= self.ref_frame < self.num_frames:
            raise ConfigError(f"{where}.ref_frame={self.ref_frame} must be in [-1, num_frames)")
        if self.workers < 0 or self.threads < 1 or self.prefetch < 0:
            raise ConfigError(f"{where}: need workers >= 0, threads >= 1 and prefetch >= 0")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Flow-matching training (``hcjax.training``, ``train.py``)."""

    seed: int = 0
    steps: int = 1000
    batch_size: int = 8                # global batch over all hosts; must divide by mesh data * fsdp
    learning_rate: float = 1e-5
    lr_schedule: str = "cosine"        # cosine | constant (both after a linear warmup)
    warmup_steps: int = 100
    end_lr_ratio: float = 0.0          # cosine end value as a fraction of learning_rate
    weight_decay: float = 0.0          # AdamW decay (kernels and embeddings only)
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0             # global-norm clipping (0: off)
    ema_decay: float = 0.0             # EMA of params (0: off)
    timestep_sampling: str = "logit_normal"   # logit_normal | uniform
    flow_shift: float = 1.0            # sigma shift of the training noise levels
    drop_text: float = 0.1             # condition dropout for CFG: negative-branch text conditioning
    drop_image: float = 0.0            # white-image reference latents (ip-CFG)
    drop_audio: float = 0.1            # all-zero audio features
    init_from: str = ""                # hcjax DiT checkpoint dir (converted weights); "" = random init
    log_every: int = 10
    save_every: int = 500
    keep: int = 3                      # checkpoints kept
    async_save: bool = True
    data: DataConfig = DataConfig()

    LR_SCHEDULES: typing.ClassVar[tuple[str, ...]] = ("cosine", "constant")
    SAMPLING: typing.ClassVar[tuple[str, ...]] = ("logit_normal", "uniform")

    def validate(self, where: str = "train") -> None:
        for f in ("steps", "batch_size", "log_every", "save_every", "keep"):
            if getattr(self, f) < 1:
                raise ConfigError(f"{where}.{f}={getattr(self, f)} must be >= 1")
        if self.learning_rate <= 0 or self.warmup_steps < 0:
            raise ConfigError(f"{where}: need learning_rate > 0 and warmup_steps >= 0")
        if self.lr_schedule not in self.LR_SCHEDULES:
            raise ConfigError(f"{where}.lr_schedule={self.lr_schedule!r}; expected one of {self.LR_SCHEDULES}")
        if self.timestep_sampling not in self.SAMPLING:
            raise ConfigError(f"{where}.timestep_sampling={self.timestep_sampling!r}; expected one of {self.SAMPLING}")
        if self.flow_shift <= 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError(f"{where}: need flow_shift > 0, grad_clip >= 0 and weight_decay >= 0")
        for f in ("drop_text", "drop_image", "drop_audio", "ema_decay"):
            if not 0.0 <= getattr(self, f) < 1.0:
                raise ConfigError(f"{where}.{f}={getattr(self, f)} must be in [0, 1)")
        if not 0.0 <= self.end_lr_ratio <= 1.0:
            raise ConfigError(f"{where}.end_lr_ratio={self.end_lr_ratio} must be in [0, 1]")
        self.data.validate(f"{where}.data")


@dataclasses.dataclass(frozen=True)
class VAETrainConfig:
    """Training the 3D causal VAE from scratch (``train.py --stage vae``; the demo model): L1 + MSE reconstruction
    of random ``crop`` x ``crop`` x ``frames`` windows of a raw clip directory, plus ``kl_weight`` x KL."""

    steps: int = 1000
    batch_size: int = 8
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    frames: int = 5                    # 4k+1 frames per training window
    crop: int = 32                     # square crop side in pixels (multiple of the spatial compression)
    kl_weight: float = 1e-4
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    init_logvar: float = -6.0          # initial posterior log-variance (quant_conv bias of the logvar half)
    seed: int = 0
    log_every: int = 50
    data: str = ""                     # raw clip directory (mp4 files); default: train.data.path
    init_from: str = ""                # hcjax VAE checkpoint to continue from ("" : random init)
    ref_fraction: float = 0.0          # share of windows that are stills of the clips' *_ref.png reference images
    finetune_steps: int = 0            # hcjax.demo: a second run continuing the first (fresh optimizer, seed + 1)
    finetune_learning_rate: float = 1e-3
    microbatch: int = 0                # windows per forward/backward pass, gradients averaged (0 : the whole batch)

    def validate(self, where: str = "vae_train") -> None:
        for f in ("steps", "batch_size", "frames", "crop", "log_every"):
            if getattr(self, f) < 1:
                raise ConfigError(f"{where}.{f}={getattr(self, f)} must be >= 1")
        if (self.frames - 1) % 4:
            raise ConfigError(f"{where}.frames={self.frames}: the causal VAE needs 4k+1 frames (1, 5, 9, ...)")
        if self.learning_rate <= 0 or self.kl_weight < 0 or self.mse_weight < 0 or self.warmup_steps < 0:
            raise ConfigError(f"{where}: need learning_rate > 0 and kl_weight, mse_weight, warmup_steps >= 0")
        if not 0.0 <= self.ref_fraction <= 1.0:
            raise ConfigError(f"{where}.ref_fraction={self.ref_fraction} must be in [0, 1]")
        if self.microbatch < 0 or (self.microbatch and self.batch_size % self.microbatch):
            raise ConfigError(f"{where}.microbatch={self.microbatch} must be 0 (whole batch) or divide "
                              f"{where}.batch_size={self.batch_size}")


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """Defaults of ``sample.py`` for this model (each is a CLI flag; the flag wins). Released presets: 720p."""

    video_size: tuple[int, int] = (720, 1280)
    frames: int = 129
    steps: int = 30
    flow_shift: float = 13.0
    cfg_scale: float = 7.5
    ip_cfg_scale: float = 0.0          # image guidance (spec 6.3; image model only, 0 = off as released)
    fps: int = 25
    ref_image: str = ""                # path relative to the repository root ("" : assets/demo_subject.png)
    pos_prompt: str = "Realistic, High-quality. The object moves across the scene."
    item_name: str = "object"

    def validate(self, where: str = "sample") -> None:
        h, w = self.video_size
        if h < 16 or w < 16 or h % 16 or w % 16:
            raise ConfigError(f"{where}.video_size={list(self.video_size)}: need multiples of 16")
        if self.frames < 1 or (self.frames - 1) % 4:
            raise ConfigError(f"{where}.frames={self.frames}: need 4k+1 frames")
        if self.steps < 1 or self.flow_shift <= 0 or self.fps < 1:
            raise ConfigError(f"{where}: need steps >= 1, flow_shift > 0 and fps >= 1")


@dataclasses.dataclass(frozen=True)
class Config:
    dit: DiTConfig = DiTConfig()
    vae: VAEConfig = VAEConfig()
    llama: LlamaConfig = LlamaConfig()
    clip_vision: ClipVisionConfig = ClipVisionConfig()
    clip_text: ClipTextConfig = ClipTextConfig()
    llava: LlavaConfig = LlavaConfig()
    mesh: MeshConfig = MeshConfig()
    whisper: WhisperConfig = WhisperConfig()
    train: TrainConfig = TrainConfig()
    vae_train: VAETrainConfig = VAETrainConfig()
    sample: SampleConfig = SampleConfig()

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            sub = getattr(self, f.name)
            if hasattr(sub, "validate"):
                sub.validate(f.name)
        from .sharding import check_mesh  # mesh vs DiT heads / kernel, device-count independent

        check_mesh(self.mesh, self.dit)
        return self


# ----------------------------------------------------------------------------------------------- building


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Convert a YAML value to the annotated field type, with an error naming ``where``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        elem = args[0] if args else Any
        if len(args) > 1 and args[1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} entries, got {list(value)}")
            return tuple(_coerce(a, v, where) for a, v in zip(args, value))
        return tuple(_coerce(elem, v, where) for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):     # YAML 1.1 reads 1e-9 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys raise naming the key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            loc = f"{where}.{key}" if where else key
            raise ConfigError(f"unknown config key {loc!r} (valid keys of {cls.__name__}: {sorted(names)})")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _apply_override(data: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected the form a.b=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {item!r}: empty key component")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {p!r} is not a section")
    node[parts[-1]] = yaml.safe_load(raw)


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load a YAML preset (or the defaults when ``path`` is None) and apply ``a.b=value`` overrides."""
    data: dict = {}
    where = "<defaults>"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        where = str(path)
        text = path.read_text()     # a run's config.json too (JSON writes 1e-06, which YAML 1.1 reads as a string)
        loaded = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        data = loaded
    for item in overrides:
        _apply_override(data, item)
    try:
        cfg = from_dict(Config, data)
        return cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def config_from_json(text: str) -> Config:
    return from_dict(Config, json.loads(text)).validate()


PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"


def preset(name: str, overrides: typing.Sequence[str] = ()) -> Config:
    """Load ``configs/<name>.yaml``."""
    return load_config(PRESET_DIR / f"{name}.yaml", overrides)
