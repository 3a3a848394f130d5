"""The HunyuanCustom MM-DiT in Flax (``HYVideoDiffusionTransformer``, spec 5).

``blocks``: refiner, double/single-stream blocks, final layer, layer-stack runner; ``audio``: the AudioNet adapters
of the audio DiT (``AudioProjNet2``, ``PerceiverAttentionCA``; DiT parameters ``audio_proj``/``audio_models_k``);
``storage``: the run-time form of the block stacks (raw bits, fp8 + scale, host offload; ``runtime_params``);
``model``: ``HunyuanDiT``, ``StepCache``, input validation, example inputs and parameter init/shapes.
"""

from .audio import AudioProjNet2, PerceiverAttentionCA, audio_feature_shape
from .blocks import (
    ACT, ACT_HEADS, REMAT_POLICIES, DoubleStreamBlock, FinalLayer, RefinerBlock, SingleStreamBlock,
    SingleTokenRefiner, run_stack, scanned, token_chunks,
)
from .storage import runtime_params, take_layer
from .model import (
    HunyuanDiT, StepCache, abstract_params, count_params, example_inputs, init_params, reference_columns,
    reference_tokens, validate_inputs,
)

__all__ = [
    "ACT", "ACT_HEADS", "REMAT_POLICIES", "AudioProjNet2", "DoubleStreamBlock", "FinalLayer", "HunyuanDiT",
    "PerceiverAttentionCA", "RefinerBlock", "SingleStreamBlock", "SingleTokenRefiner", "StepCache",
    "abstract_params", "audio_feature_shape", "count_params", "example_inputs", "init_params", "run_stack",
    "reference_columns", "reference_tokens", "runtime_params", "scanned", "take_layer", "token_chunks",
    "validate_inputs",
]
