"""Loading everything sampling needs (``pipeline.Models``) from one of three sources.

1. **Embedded default** (no weights given): the demo model ``assets/demo/model`` (an hcjax bundle as in 2,
   trained by ``python -m hcjax.demo build``, see ``configs/demo.yaml``). With a ``config`` instead, that preset
   with randomly initialised weights (seeded) and the bundled tiny tokenizers in ``assets/tiny_tokenizers``
   (``configs/default_tiny.yaml``: every component at toy width; its output is noise by construction).
2. **hcjax bundle** (``--ckpt-dir DIR`` with ``DIR/dit``, ``DIR/vae``, ``DIR/llava``, ``DIR/clip`` and, for the
   audio model, ``DIR/whisper``): each an hcjax checkpoint (``config.json`` + ``params/``); ``llava``/``clip``/
   ``whisper`` also hold the tokenizer / preprocessor files.
3. **Original ``models/`` download** (``--ckpt-dir models``): ``hunyuancustom_720P[_audio|_editing]/
   mp_rank_00_model_states.pt``, ``vae_3d/hyvae_v1_0801/pytorch_model.pt``, ``llava-llama-3-8b-v1_1/``,
   ``openai_clip-vit-large-patch14/``, ``whisper-tiny/``. Converted on first use into ``DIR/.hcjax/<variant>``
   (a bundle as in 2) with a progress bar; later runs load the converted bundle.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import flax.linen as nn
import jax

from .checkpoint import load_checkpoint_config, load_params, save_params
from .config import PRESET_DIR, Config, load_config
from .pipeline import Models

ROOT = Path(__file__).resolve().parent.parent
TINY_TOKENIZERS = ROOT / "assets" / "tiny_tokenizers"
DEFAULT_CONFIG = PRESET_DIR / "default_tiny.yaml"      # random-weights preset (tests, pipeline smoke runs)
DEMO_BUNDLE = ROOT / "assets" / "demo" / "model"       # the embedded default
DEMO_HINT = ("recreate it with `python -m hcjax.demo build --workdir RUN` (about an hour on a 2-core CPU; "
             "see README 'Demo model'), or pass --ckpt-dir, or --config configs/default_tiny.yaml for random weights")
ORIGINAL_DIT = {"image": "hunyuancustom_720P", "audio": "hunyuancustom_audio_720P",
                "editing": "hunyuancustom_editing_720P"}
ORIGINAL_PRESET = {"image": "hunyuancustom_720p.yaml", "audio": "hunyuancustom_720p_audio.yaml",
                   "editing": "hunyuancustom_720p_editing.yaml"}


def random_params(init_fn, seed: int, std: float = 0.02):
    """Random weights with the structure of ``init_fn(key)`` without compiling it: shapes from ``jax.eval_shape``,
    values from numpy (norm scales 1, biases 0, other tensors N(0, std)). For the embedded default only."""
    import numpy as np

    abstract = nn.unbox(jax.eval_shape(init_fn, jax.random.key(0)))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(path[-1].key) if hasattr(path[-1], "key") else str(path[-1])
        if name == "scale":
            return np.ones(leaf.shape, leaf.dtype)
        if name == "bias":
            return np.zeros(leaf.shape, leaf.dtype)
        return (rng.standard_normal(leaf.shape) * std).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def random_models(cfg: Config | None = None, seed: int = 0, tokenizers: Path = TINY_TOKENIZERS) -> Models:
    """The embedded default: random weights for every component (seeded) and the bundled tiny tokenizers."""
    from . import dit, vae
    from .conditioning import clip, llava, whisper

    cfg = cfg or load_config(DEFAULT_CONFIG)
    text = llava.load_text_encoders(
        tokenizers / "llava", tokenizers / "clip", cfg,
        llava_params=random_params(lambda k: llava.init_params(cfg, k), seed + 2),
        clip_params=random_params(lambda k: clip.init_text_params(cfg.clip_text, k), seed + 3))
    wparams = random_params(lambda k: whisper.init_params(cfg.whisper, k), seed + 4) \
        if cfg.dit.audio_condition else None
    return Models(cfg, random_params(lambda k: dit.init_params(cfg.dit, k), seed),
                  random_params(lambda k: vae.init_params(cfg, k), seed + 1), text,
                  wparams, whisper.feature_extractor(None) if cfg.dit.audio_condition else None)


def demo_bundle() -> Path:
    """The demo bundle, or a clear error when it is missing (e.g. a partial clone)."""
    missing = [c for c in ("dit", "vae", "llava", "clip") if not (DEMO_BUNDLE / c / "params").is_dir()
               or not (DEMO_BUNDLE / c / "config.json").is_file()]
    if missing:
        raise FileNotFoundError(f"the embedded demo model {DEMO_BUNDLE} is missing or incomplete (no "
                                f"{', '.join(missing)}; a partial clone?): {DEMO_HINT}")
    return DEMO_BUNDLE


def is_bundle(d: Path) -> bool:
    return all((d / c / "config.json").is_file() for c in ("dit", "vae", "llava", "clip"))


def load_bundle(d: Path, overrides=()) -> Models:
    """An hcjax bundle directory (see module docstring). The DiT's config.json decides the variant."""
    from .conditioning import llava, whisper

    d = Path(d)
    for c in ("dit", "vae", "llava", "clip"):
        if not (d / c / "config.json").is_file():
            raise FileNotFoundError(f"{d}: missing hcjax checkpoint {c}/ (config.json + params/)")
    cfg = _with_overrides(load_checkpoint_config(d / "dit"), overrides)
    text = llava.load_text_encoders(d / "llava", d / "clip", cfg)
    wp, fe = None, None
    if cfg.dit.audio_condition:
        if not (d / "whisper" / "config.json").is_file():
            raise FileNotFoundError(f"{d}: the audio DiT needs whisper/ (hcjax checkpoint + preprocessor_config.json)")
        wp = load_params(d / "whisper")
        fe = whisper.feature_extractor(d / "whisper")
    return Models(cfg, load_params(d / "dit"), load_params(d / "vae"), text, wp, fe)


def _variant_of(models_dir: Path, variant: str | None) -> str:
    found = [v for v, sub in ORIGINAL_DIT.items() if (models_dir / sub / "mp_rank_00_model_states.pt").is_file()]
    if variant is not None:
        if variant not in found:
            raise FileNotFoundError(f"{models_dir}: no {ORIGINAL_DIT[variant]}/mp_rank_00_model_states.pt for the "
                                    f"{variant} mode (found: {found or 'none'})")
        return variant
    if len(found) != 1:
        raise FileNotFoundError(f"{models_dir}: expected exactly one of {sorted(ORIGINAL_DIT.values())}/"
                                f"mp_rank_00_model_states.pt (found {found or 'none'}); pass the mode explicitly")
    return found[0]


def convert_original(models_dir: Path, variant: str | None = None, dtype: str = "bfloat16",
                     cfg: Config | None = None) -> Path:
    """Convert an original ``models/`` download into an hcjax bundle ``models/.hcjax/<variant>`` (once).

    ``cfg`` defaults to the released preset of the detected variant."""
    from tqdm import tqdm

    from convert_weights import clip as cclip
    from convert_weights import dit as cdit
    from convert_weights import llava as cllava
    from convert_weights import vae as cvae
    from convert_weights import whisper as cwhisper
    from convert_weights.readers import read_state_dict

    import ml_dtypes
    import numpy as np

    variant = _variant_of(models_dir, variant)
    out = models_dir / ".hcjax" / variant
    if is_bundle(out):
        return out
    cfg = cfg or load_config(PRESET_DIR / ORIGINAL_PRESET[variant])
    npdt = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}[dtype]
    llava_dir = models_dir / "llava-llama-3-8b-v1_1"
    clip_dir = models_dir / "openai_clip-vit-large-patch14"
    whisper_dir = models_dir / "whisper-tiny"
    vae_file = models_dir / "vae_3d" / "hyvae_v1_0801" / "pytorch_model.pt"
    for p in [llava_dir, clip_dir, vae_file] + ([whisper_dir] if variant == "audio" else []):
        if not p.exists():
            raise FileNotFoundError(f"original model layout: missing {p}")
    tmp = out.with_name(f".{variant}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    jobs = [
        ("dit", lambda: cdit.from_original(read_state_dict(
            models_dir / ORIGINAL_DIT[variant] / "mp_rank_00_model_states.pt", "module"), cfg.dit, dtype=npdt)),
        ("vae", lambda: cvae.from_original(read_state_dict(vae_file), cfg, dtype=npdt)),
        ("llava", lambda: cllava.from_hf(read_state_dict(llava_dir), cfg, dtype=npdt)),
        ("clip", lambda: cclip.from_hf(read_state_dict(clip_dir), cfg.clip_text, dtype=npdt)),
    ]
    if variant == "audio":
        jobs.append(("whisper", lambda: cwhisper.convert(read_state_dict(whisper_dir), cfg)))
    try:
        for name, job in tqdm(jobs, desc=f"converting {models_dir} ({variant})", unit="component"):
            save_params(tmp / name, job(), cfg)
        for name, src in (("llava", llava_dir), ("clip", clip_dir), ("whisper", whisper_dir)):
            if (tmp / name).is_dir() and src.is_dir():
                for f in src.iterdir():
                    if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".pt")) and \
                            f.name not in ("config.json",):
                        shutil.copy2(f, tmp / name / f.name)
        tmp.replace(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def resolve_config(ckpt_dir: str | Path | None, config: str | Path | None = None, overrides=()) -> Config:
    """The config :func:`load_models` would use, without loading any weights (for early validation)."""
    if ckpt_dir is None and config is None:
        return _with_overrides(load_checkpoint_config(demo_bundle() / "dit"), overrides)
    if ckpt_dir is None:
        return load_config(config, overrides)
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"--ckpt-dir {d} does not exist")
    if is_bundle(d):
        return _with_overrides(load_checkpoint_config(d / "dit"), overrides)
    if any((d / sub).is_dir() for sub in ORIGINAL_DIT.values()):
        return load_config(PRESET_DIR / ORIGINAL_PRESET[_variant_of(d, None)], overrides)
    raise FileNotFoundError(f"--ckpt-dir {d}: neither an hcjax bundle (dit/, vae/, llava/, clip/) nor an original "
                            f"models/ download ({', '.join(ORIGINAL_DIT.values())}/...)")


def _with_overrides(cfg: Config, overrides) -> Config:
    if not overrides:
        return cfg
    import json

    from .config import _apply_override, from_dict, to_dict

    data = to_dict(cfg)
    for item in overrides:
        _apply_override(data, item)
    return from_dict(Config, json.loads(json.dumps(data))).validate()


def load_models(ckpt_dir: str | Path | None, config: str | Path | None = None, overrides=(), seed: int = 0,
                variant: str | None = None) -> Models:
    """Dispatch on the source (module docstring): the demo bundle when neither ``ckpt_dir`` nor ``config`` is given,
    random weights of ``config`` without ``ckpt_dir``. ``overrides`` apply in every case."""
    if ckpt_dir is None and config is None:
        return load_bundle(demo_bundle(), overrides)
    if ckpt_dir is None:
        return random_models(load_config(config, overrides), seed)
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"--ckpt-dir {d} does not exist")
    if is_bundle(d):
        return load_bundle(d, overrides)
    if any((d / sub).is_dir() for sub in ORIGINAL_DIT.values()):
        return load_bundle(convert_original(d, variant), overrides)
    raise FileNotFoundError(f"--ckpt-dir {d}: neither an hcjax bundle (dit/, vae/, llava/, clip/) nor an original "
                            f"models/ download ({', '.join(ORIGINAL_DIT.values())}/...)")
