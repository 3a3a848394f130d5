"""Frozen configuration dataclasses, YAML loading and ``--set a.b=value`` overrides (floor 0).

* :mod:`.models`   model configs: :class:`DiTConfig`, :class:`VAEConfig`, :class:`LlamaConfig`,
                   :class:`ClipVisionConfig`, :class:`ClipTextConfig`, :class:`LlavaConfig`, :class:`WhisperConfig`
* :mod:`.run`      run configs: :class:`MeshConfig` (+ :func:`check_mesh`), :class:`DataConfig`,
                   :class:`TrainConfig` (+ :class:`LoraConfig`), :class:`VAETrainConfig`, :class:`SampleConfig`, the top-level :class:`Config`
* :mod:`.loading`  :func:`load_config`, :func:`preset`, :func:`apply_overrides`, :func:`from_dict`, :func:`to_dict`

Every YAML file in ``configs/`` maps onto :class:`Config`. Unknown keys are an error naming the key and the file.
"""

from .base import DTYPES, ConfigError
from .loading import (  # _apply_override, _coerce: private helpers, importable here as before the split
    PRESET_DIR, _apply_override, _coerce, apply_overrides, config_from_json, from_dict, load_config, preset, to_dict,
)
from .models import (
    ATTENTION_IMPLS, REMAT_POLICIES, ClipTextConfig, ClipVisionConfig, DiTConfig, LlamaConfig, LlavaConfig,
    VAEConfig, WhisperConfig,
)
from .run import (
    DEFAULT_LORA_TARGETS, REF_LAYOUTS, Config, DataConfig, LoraConfig, MeshConfig, SampleConfig, TrainConfig,
    VAETrainConfig, check_mesh,
)

__all__ = [
    "ATTENTION_IMPLS", "DTYPES", "PRESET_DIR", "REMAT_POLICIES", "ClipTextConfig", "ClipVisionConfig", "Config",
    "ConfigError", "DEFAULT_LORA_TARGETS", "DataConfig", "DiTConfig", "LlamaConfig", "LlavaConfig", "LoraConfig",
    "MeshConfig", "REF_LAYOUTS", "SampleConfig", "TrainConfig", "VAEConfig", "VAETrainConfig", "WhisperConfig",
    "apply_overrides", "check_mesh", "config_from_json", "from_dict", "load_config", "preset", "to_dict",
]
