"""Conditioning encoders: text (LLaVA, CLIP), audio (Whisper; the AudioNet adapters live in hcjax.dit.audio), video
(editing)."""
