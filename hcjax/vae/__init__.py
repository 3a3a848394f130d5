"""The 3D causal VAE of HunyuanCustom (``AutoencoderKLCausal3D``, spec 4) and its tiled encode/decode.

``layers``: convs, causal padding, masked GroupNorm, frame-causal attention; ``model``: the Flax modules,
parameter init/shapes; ``checks``: input shape checks; ``tiling``: host-side tiled runners (spec 4.5);
``api``: ``encode_video`` / ``decode_latents`` and friends. Layouts: video ``[B, T, H, W, 3]`` in [-1, 1],
latents ``[B, t, h, w, C]`` (channels-last).
"""

from .api import decode_latents, encode_moments, encode_posterior, encode_video
from .checks import validate_latents, validate_video
from .layers import CausalConv3d, Conv, GroupNorm, Valid, causal_conv3d, conv3d, frame_causal_attention
from .model import (
    Attention, AutoencoderKLCausal3D, Decoder, Encoder, MidBlock, ResnetBlock, abstract_params, block_plan,
    count_params, init_params, split_moments, unwrap_params, vae_config,
)
from .tiling import tile_fn, tiled_decode, tiled_moments, tiling_constants

__all__ = [
    "Attention", "AutoencoderKLCausal3D", "CausalConv3d", "Conv", "Decoder", "Encoder", "GroupNorm", "MidBlock",
    "ResnetBlock", "Valid", "abstract_params", "block_plan", "causal_conv3d", "conv3d", "count_params",
    "decode_latents", "encode_moments", "encode_posterior", "encode_video", "frame_causal_attention", "init_params",
    "split_moments", "tile_fn", "tiled_decode", "tiled_moments", "tiling_constants", "unwrap_params",
    "validate_latents", "validate_video", "vae_config",
]
