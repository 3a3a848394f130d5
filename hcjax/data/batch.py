"""The typed training batch: what the loader (or the online encoders of raw mode) yields and the train step takes.

Shape letters (DESIGN.md): B batch (this host's share before :func:`hcjax.training.to_global`, the global batch
inside the step), T/H/W latent time/height/width, C latent channels, S text tokens, D text-state width
(``dit.text_states_dim``), D2 pooled width (``dit.text_states_dim_2``), K reference slots (subjects; 1 for
single-subject data). Fields of a variant the DiT does not have are ``None`` (an empty pytree node: no array, no
sharding, and a different compiled step); so is ``ref_mask`` in batches of single-subject clips only.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import numpy as np

TEXT_KEYS = ("text_states", "text_mask", "text_states_2")


@flax.struct.dataclass
class TrainBatch:
    """One batch of DiT training inputs (numpy on the host, global ``jax.Array`` in the step)."""

    latents: Any                     # [B, T, H, W, C]   scaled VAE latents of the clip (the target x0)
    ref_latents: Any                 # [B, K, H, W, C]   reference image latents, one frame per subject (spec 2.1)
    null_ref_latents: Any            # [B, K, H, W, C]   white-image latents (image dropout, spec 2.1)
    text_states: Any                 # [B, S, D]         LLaVA states of the caption (spec 3.6)
    text_mask: Any                   # [B, S]            int32, 1 on valid tokens
    text_states_2: Any               # [B, D2]           CLIP-L pooled
    audio_features: Any = None       # [B, T', 10, 5, 384] Whisper features per video frame (audio models)
    bg_latents: Any = None           # [B, T, H, W, 2C]  [masked background ; mask] latents (editing, spec 2.2)
    ref_mask: Any = None             # [B, K]            int32, 1 on a sample's real subjects (first), 0 on padding

    @classmethod
    def from_arrays(cls, arrays: dict) -> "TrainBatch":
        """Build from a dict of arrays (precomputed clips collated); unknown keys are an error naming them."""
        names = set(cls.__dataclass_fields__)
        unknown = sorted(set(arrays) - names)
        if unknown:
            raise ValueError(f"training batch: unknown arrays {unknown}; expected a subset of {sorted(names)}")
        missing = sorted(k for k in names if k not in arrays and cls.__dataclass_fields__[k].default is not None)
        if missing:
            raise ValueError(f"training batch: missing arrays {missing}")
        return cls(**{k: np.asarray(v) for k, v in arrays.items()})

    @property
    def size(self) -> int:
        return int(np.shape(self.latents)[0])
