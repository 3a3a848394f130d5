"""Model configs: the DiT, the 3D causal VAE and the conditioning towers (Llama, CLIP, LLaVA glue, Whisper).

Field names of :class:`DiTConfig` follow the original HunyuanVideo argument names; its last fields only choose
how the model executes (numerics, attention kernel and sequence parallelism, remat), not its parameters.
"""

from __future__ import annotations

import dataclasses
import typing

from ..axes import SEQUENCE_PARALLEL
from .base import ConfigError, check_dtypes

ATTENTION_IMPLS = ("xla", "chunked", "cudnn", "splash")
REF_TOKENS = ("frame", "column")
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "nothing_saveable")


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
    # which tokens of K >= 2 reference latent frames the DiT reads (same parameters; K = 1 unchanged): "frame" each
    # whole frame (K H'W' tokens); "column" reference k only its k-th of K equal columns (H'W' tokens in all), for
    # references laid out in columns (ref_layout: columns), where the rest of each frame is white padding
    ref_tokens: str = "frame"
    # numerics / execution
    dtype: str = "float32"              # compute dtype of activations
    param_dtype: str = "float32"        # storage dtype of parameters
    attention: str = "chunked"          # xla | chunked | cudnn | splash
    attention_block_q: int = 512        # chunked attention block sizes
    attention_block_kv: int = 512
    # how attention splits the token axis over the mesh `sequence` axis (hcjax.attention); no effect without one.
    sequence_parallel: str = "ulysses"  # ulysses | ring | auto (ulysses when the heads allow it, else ring)
    ulysses_degree: int = 0             # U > 0: Ulysses in groups of U x ring across sequence/U groups (hybrid USP;
                                        # U = sequence: pure Ulysses, 1: pure ring); 0: sequence_parallel decides
    attention_interpret: bool = False   # splash: run the Pallas kernel in interpret mode (CPU tests)
    remat: str = "none"                 # nn.remat policy for scanned blocks
    unroll_layers: bool = False         # block stacks as straight-line code instead of a scan over layers: the same
                                        # maths; faster for a few small blocks on a CPU (the demo DiT's train step
                                        # 1.15x), slower to compile and larger for deep models
    norm_eps: float = 1e-6
    # memory (issue 23; hcjax.dit.storage): all four leave the numbers unchanged except use_fp8
    ffn_chunk: int = 0                  # tokens per chunk of modulate/MLP/linear1/linear2 in the blocks (0 = off)
    cfg_batch: int = 0                  # guidance branches per DiT pass (0 = all in one batch, 1 = sequential)
    use_fp8: bool = False               # block Linears held as float8_e4m3fn + per-layer scale, de-quantised per block
    cpu_offload: bool = False           # block stacks held in pinned host memory, one layer brought in per step

    SEQUENCE_PARALLEL: typing.ClassVar[tuple[str, ...]] = SEQUENCE_PARALLEL

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
        if self.ref_tokens not in REF_TOKENS:
            raise ConfigError(f"{where}.ref_tokens={self.ref_tokens!r}; expected one of {REF_TOKENS}")
        if self.sequence_parallel not in SEQUENCE_PARALLEL:
            raise ConfigError(f"{where}.sequence_parallel={self.sequence_parallel!r}; expected one of "
                              f"{SEQUENCE_PARALLEL}")
        if self.ulysses_degree < 0:
            raise ConfigError(f"{where}.ulysses_degree={self.ulysses_degree} must be >= 0 (0: sequence_parallel "
                              "decides; U > 0: Ulysses groups of U x ring)")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"{where}.remat={self.remat!r}; expected one of {REMAT_POLICIES}")
        check_dtypes(self, where)
        if self.dtype == "float16":
            raise ConfigError(f"{where}.dtype=float16 is not supported for the DiT (it overflows); use bfloat16")
        if self.depth_single_blocks < 1 or self.depth_double_blocks < 0:
            raise ConfigError(f"{where}: need depth_single_blocks >= 1 and depth_double_blocks >= 0")
        if self.ffn_chunk < 0 or self.cfg_batch < 0:
            raise ConfigError(f"{where}: ffn_chunk={self.ffn_chunk} and cfg_batch={self.cfg_batch} must be >= 0 "
                              "(0 = off / all guidance branches in one batch)")
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
        check_dtypes(self, where)
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
        check_dtypes(self, where)


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
        check_dtypes(self, where)


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
        check_dtypes(self, where)


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
        check_dtypes(self, where)
