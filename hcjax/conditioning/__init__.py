"""Conditioning encoders: text (LLaVA, CLIP), audio (Whisper + AudioNet), video (editing)."""
