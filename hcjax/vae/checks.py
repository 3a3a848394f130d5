"""Shape checks of the VAE's inputs (channels-last video and latents), raising ``ValueError`` with the layout."""

from __future__ import annotations

from ..config import VAEConfig


def validate_video(cfg: VAEConfig, video) -> None:
    shape = getattr(video, "shape", None)
    if shape is None or len(shape) != 5:
        raise ValueError(f"video must be [B, T, H, W, C] (channels-last), got shape {shape}")
    b, t, h, w, ch = shape
    if ch != cfg.in_channels:
        raise ValueError(f"video has {ch} channels in its last axis; expected {cfg.in_channels} "
                         f"(layout [B, T, H, W, C], channels-last)")
    r = cfg.time_compression_ratio
    if t < 1 or (t - 1) % r:
        raise ValueError(f"video has {t} frames; the causal VAE needs {r}k+1 frames (1, {r + 1}, {2 * r + 1}, ...)")
    s = cfg.spatial_compression_ratio
    for name, n in (("height", h), ("width", w)):
        if n < 1 or n % s:
            kind = "odd" if n % 2 else "not a multiple of the spatial compression"
            raise ValueError(f"video {name} {n} is {kind}; it must be a positive multiple of {s}")
    if b < 1:
        raise ValueError("video batch is empty")


def validate_latents(cfg: VAEConfig, z) -> None:
    shape = getattr(z, "shape", None)
    if shape is None or len(shape) != 5:
        raise ValueError(f"latents must be [B, T, H, W, C] (channels-last), got shape {shape}")
    b, t, h, w, ch = shape
    if ch != cfg.latent_channels:
        raise ValueError(f"latents have {ch} channels in their last axis; expected {cfg.latent_channels} "
                         f"(layout [B, T, H, W, C], channels-last)")
    if min(b, t, h, w) < 1:
        raise ValueError(f"latents have an empty axis: shape {tuple(shape)}")
