"""The original release's ``models/`` folder -> an hcjax bundle ``models/.hcjax/<variant>`` (converted once).

Layout read: ``hunyuancustom_720P[_audio|_editing]/mp_rank_00_model_states.pt`` (or the ``..._fp8.pt`` file with
its ``..._fp8_map.pt`` scales, de-quantised on conversion), ``vae_3d/hyvae_v1_0801/pytorch_model.pt``,
``llava-llama-3-8b-v1_1/``, ``openai_clip-vit-large-patch14/`` and, for the audio model, ``whisper-tiny/``.
The bundle is written under a temporary name and renamed at the end: an interrupted conversion leaves nothing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
from tqdm import tqdm

from convert_weights import clip as cclip
from convert_weights import dit as cdit
from convert_weights import llava as cllava
from convert_weights import vae as cvae
from convert_weights import whisper as cwhisper
from convert_weights.readers import read_state_dict

from ..checkpoint import save_params
from ..config import PRESET_DIR, Config, load_config

ORIGINAL_DIT = {"image": "hunyuancustom_720P", "audio": "hunyuancustom_audio_720P",
                "editing": "hunyuancustom_editing_720P"}
ORIGINAL_PRESET = {"image": "hunyuancustom_720p.yaml", "audio": "hunyuancustom_720p_audio.yaml",
                   "editing": "hunyuancustom_720p_editing.yaml"}
DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}
TOWERS = {"llava": "llava-llama-3-8b-v1_1", "clip": "openai_clip-vit-large-patch14", "whisper": "whisper-tiny"}
VAE_FILE = Path("vae_3d") / "hyvae_v1_0801" / "pytorch_model.pt"


def is_original(d: Path) -> bool:
    return any((Path(d) / sub).is_dir() for sub in ORIGINAL_DIT.values())


def _dit_file(folder: Path) -> Path | None:
    """The DiT checkpoint of one variant folder: the bf16 file, else the fp8 one; None when neither exists."""
    try:
        return cdit.find_original_dit(folder)
    except FileNotFoundError:
        return None


def variant_of(models_dir: Path, variant: str | None) -> str:
    """The variant whose DiT checkpoint is present (``variant`` checks a requested one)."""
    found = [v for v, sub in ORIGINAL_DIT.items() if _dit_file(models_dir / sub) is not None]
    if variant is not None:
        if variant not in found:
            raise FileNotFoundError(f"{models_dir}: no {ORIGINAL_DIT[variant]}/mp_rank_00_model_states[_fp8].pt "
                                    f"for the {variant} mode (found: {found or 'none'})")
        return variant
    if len(found) != 1:
        raise FileNotFoundError(f"{models_dir}: expected exactly one of {sorted(ORIGINAL_DIT.values())}/"
                                f"mp_rank_00_model_states[_fp8].pt (found {found or 'none'}); pass the mode explicitly")
    return found[0]


def convert_original(models_dir: Path, variant: str | None = None, dtype: str = "bfloat16",
                     cfg: Config | None = None) -> Path:
    """Convert once and return the bundle directory; ``cfg`` defaults to the released preset of the variant."""
    models_dir = Path(models_dir)
    variant = variant_of(models_dir, variant)
    out = models_dir / ".hcjax" / variant
    if all((out / c / "config.json").is_file() for c in ("dit", "vae", "llava", "clip")):
        return out
    cfg = cfg or load_config(PRESET_DIR / ORIGINAL_PRESET[variant])
    npdt = DTYPES[dtype]
    towers = {k: models_dir / v for k, v in TOWERS.items() if k != "whisper" or variant == "audio"}
    for p in [*towers.values(), models_dir / VAE_FILE]:
        if not p.exists():
            raise FileNotFoundError(f"original model layout: missing {p}")

    def convert_dit():
        state, scales = cdit.read_original(_dit_file(models_dir / ORIGINAL_DIT[variant]))
        return cdit.from_original(state, cfg.dit, fp8_scales=scales, dtype=npdt)

    jobs = [("dit", convert_dit),
            ("vae", lambda: cvae.from_original(read_state_dict(models_dir / VAE_FILE), cfg, dtype=npdt)),
            ("llava", lambda: cllava.from_hf(read_state_dict(towers["llava"]), cfg, dtype=npdt)),
            ("clip", lambda: cclip.from_hf(read_state_dict(towers["clip"]), cfg.clip_text, dtype=npdt))]
    if variant == "audio":
        jobs.append(("whisper", lambda: cwhisper.convert(read_state_dict(towers["whisper"]), cfg)))
    tmp = out.with_name(f".{variant}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for name, job in tqdm(jobs, desc=f"converting {models_dir} ({variant})", unit="component"):
            save_params(tmp / name, job(), cfg)
        for name, src in towers.items():        # tokenizer / preprocessor files travel with the weights
            for f in src.iterdir():
                if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".pt")) and f.name != "config.json":
                    shutil.copy2(f, tmp / name / f.name)
        tmp.replace(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
