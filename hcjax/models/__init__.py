"""Loading: ``load(source) -> Models``, the one place that turns weights on disk into what sampling needs.

Sources (:func:`resolve` decides once, from the arguments alone, before any weight is read):

1. **Embedded demo** (``source=None``): the demo model ``assets/demo/model``, an hcjax bundle as in 2 built by
   ``python -m demo build`` (see ``configs/demo.yaml``).
2. **hcjax bundle** (a directory with ``dit/ vae/ llava/ clip/`` and, for the audio model, ``whisper/``): each an
   hcjax checkpoint (``config.json`` + ``params/``); ``llava``/``clip``/``whisper`` also hold the tokenizer /
   preprocessor files. The DiT's ``config.json`` decides the variant.
3. **Original ``models/`` download**: ``hunyuancustom_720P[_audio|_editing]/mp_rank_00_model_states[_fp8].pt``,
   ``vae_3d/hyvae_v1_0801/pytorch_model.pt``, ``llava-llama-3-8b-v1_1/``, ``openai_clip-vit-large-patch14/``,
   ``whisper-tiny/``; converted on first use into ``models/.hcjax/<variant>`` (a bundle as in 2, see
   :mod:`.original`), later runs load that bundle.

``config=PRESET`` without a source gives that preset with seeded random weights and the bundled tiny tokenizers
(``configs/default_tiny.yaml``: every component at toy width; its output is noise by construction).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .. import dit, sharding, vae
from ..checkpoint import (check_bundle_configs, check_tensor_files, load_checkpoint_config, load_params,
                          random_params)
from ..conditioning import clip, llava, whisper
from ..config import PRESET_DIR, Config, apply_overrides, load_config
from ..pipeline import Models, offload_towers, place
from .original import ORIGINAL_DIT, ORIGINAL_PRESET, convert_original, is_original, variant_of
from .text import load_text_encoders

ROOT = Path(__file__).resolve().parent.parent.parent
TINY_TOKENIZERS = ROOT / "assets" / "tiny_tokenizers"
DEFAULT_CONFIG = PRESET_DIR / "default_tiny.yaml"      # random-weights preset (tests, pipeline smoke runs)
DEMO_BUNDLE = ROOT / "assets" / "demo" / "model"       # the embedded default
DEMO_HINT = ("recreate it with `python -m demo build --workdir RUN --train-vae` (3 to 5 hours on a 2-core CPU; "
             "see README 'Demo model'), or pass --ckpt-dir, or --config configs/default_tiny.yaml for random weights")
COMPONENTS = ("dit", "vae", "llava", "clip")

__all__ = ["Models", "Source", "load", "resolve", "load_bundle", "random_models", "convert_original",
           "ORIGINAL_DIT", "ORIGINAL_PRESET", "DEMO_BUNDLE", "TINY_TOKENIZERS", "ROOT"]


@dataclasses.dataclass(frozen=True)
class Source:
    """Where the weights come from (``kind``: demo | bundle | original | random) and the config they imply."""

    kind: str
    cfg: Config
    path: Path | None = None            # bundle or models/ directory; None for random weights
    variant: str | None = None          # original layout: image | audio | editing
    seed: int = 0                       # random weights


def random_models(cfg: Config | None = None, seed: int = 0, tokenizers: Path = TINY_TOKENIZERS) -> Models:
    """Seeded random weights for every component of ``cfg`` (default: the tiny preset) + the tiny tokenizers."""
    cfg = cfg or load_config(DEFAULT_CONFIG)
    text = load_text_encoders(
        tokenizers / "llava", tokenizers / "clip", cfg,
        llava_params=random_params(lambda k: llava.init_params(cfg, k), seed + 2),
        clip_params=random_params(lambda k: clip.init_text_params(cfg.clip_text, k), seed + 3))
    audio = cfg.dit.audio_condition
    return Models(cfg, random_params(lambda k: dit.init_params(cfg.dit, k), seed),
                  random_params(lambda k: vae.init_params(cfg, k), seed + 1), text,
                  random_params(lambda k: whisper.init_params(cfg.whisper, k), seed + 4) if audio else None,
                  whisper.feature_extractor(None) if audio else None)


def is_bundle(d: Path) -> bool:
    return all((Path(d) / c / "config.json").is_file() for c in COMPONENTS)


def demo_bundle() -> Path:
    """The demo bundle, or a clear error when it is missing (e.g. a partial clone)."""
    missing = [c for c in COMPONENTS if not (DEMO_BUNDLE / c / "params").is_dir()
               or not (DEMO_BUNDLE / c / "config.json").is_file()]
    if missing:
        raise FileNotFoundError(f"the embedded demo model {DEMO_BUNDLE} is missing or incomplete (no "
                                f"{', '.join(missing)}; a partial clone?): {DEMO_HINT}")
    return DEMO_BUNDLE


def resolve(source: str | Path | None = None, config: str | Path | None = None, overrides=(),
            variant: str | None = None, seed: int = 0) -> Source:
    """Decide the source and its config from the arguments alone (no weights read; cheap, for early checks).

    With the original layout, ``config`` is the model size to convert to (default: the released preset of the
    variant); with a bundle it is an error, since a bundle brings its own config (change it with ``overrides``)."""
    if source is None and config is None:
        d = demo_bundle()
        return Source("demo", apply_overrides(load_checkpoint_config(d / "dit"), overrides), d)
    if source is None:
        return Source("random", load_config(config, overrides), None, seed=seed)
    d = Path(source)
    if not d.is_dir():
        raise FileNotFoundError(f"--ckpt-dir {d} does not exist or is not a directory")
    if is_bundle(d):
        if config is not None:
            raise ValueError(f"--config {config} with the hcjax bundle --ckpt-dir {d}: a bundle brings its own config "
                             "(adjust it with --set a.b=v)")
        return Source("bundle", apply_overrides(load_checkpoint_config(d / "dit"), overrides), d)
    if is_original(d):
        v = variant_of(d, variant)
        converted = d / ".hcjax" / v
        if config is not None:
            cfg = load_config(config, overrides)
        elif is_bundle(converted):
            cfg = apply_overrides(load_checkpoint_config(converted / "dit"), overrides)
        else:
            cfg = load_config(PRESET_DIR / ORIGINAL_PRESET[v], overrides)
        return Source("original", cfg, d, v)
    raise FileNotFoundError(f"--ckpt-dir {d}: neither an hcjax bundle ({'/, '.join(COMPONENTS)}/) nor an original "
                            f"models/ download ({', '.join(ORIGINAL_DIT.values())}/...)")


def load_bundle(d: str | Path, overrides=(), cfg: Config | None = None, mesh=None, mesh_cfg=None) -> Models:
    """An hcjax bundle directory (module docstring); ``cfg`` (default: the DiT's config.json + overrides). With
    ``mesh`` the DiT and the text towers are restored straight into their shardings (nothing whole on one device)."""
    d = Path(d)
    for c in COMPONENTS:
        if not (d / c / "config.json").is_file():
            raise FileNotFoundError(f"{d}: missing hcjax checkpoint {c}/ (config.json + params/)")
    cfg = cfg or apply_overrides(load_checkpoint_config(d / "dit"), overrides)
    parts = [c for c in (*COMPONENTS, "whisper") if (d / c / "config.json").is_file()]
    check_bundle_configs(d, cfg, parts)
    for c in parts:                     # truncated tensor files: found from the indexes before any weight is read
        check_tensor_files(d / c / "params", name=d / c)
    text = load_text_encoders(d / "llava", d / "clip", cfg, mesh=mesh)
    dit_target = None
    if mesh is not None and not (cfg.dit.use_fp8 or cfg.dit.cpu_offload):
        dit_target = sharding.abstract_sharded(dit.abstract_params(cfg.dit), mesh, sharding.rules_for(mesh_cfg))
    wp = fe = None
    if cfg.dit.audio_condition:
        if not (d / "whisper" / "config.json").is_file():
            raise FileNotFoundError(f"{d}: the audio DiT needs whisper/ (hcjax checkpoint + preprocessor_config.json)")
        wp, fe = load_params(d / "whisper"), whisper.feature_extractor(d / "whisper")
    return Models(cfg, load_params(d / "dit", dit_target), load_params(d / "vae"), text, wp, fe)


def load(source: str | Path | Source | None = None, config: str | Path | None = None, overrides=(),
         variant: str | None = None, seed: int = 0, *, mesh=None, mesh_cfg=None) -> Models:
    """Everything sampling needs from ``source`` (a :class:`Source` from :func:`resolve`, or its arguments);
    with ``mesh`` the DiT and text params are placed on it (:func:`hcjax.pipeline.place`, rules of ``mesh_cfg``)."""
    src = source if isinstance(source, Source) else resolve(source, config, overrides, variant, seed)
    if mesh is not None:
        if src.cfg.dit.use_fp8 or src.cfg.dit.cpu_offload:
            raise ValueError("sampling on a mesh with dit.use_fp8 / dit.cpu_offload is not supported (one-device "
                             "memory options); drop --use-fp8 / --cpu-offload or run on one device")
    if src.kind == "random":
        models = random_models(src.cfg, src.seed)
    elif src.kind == "original":
        models = load_bundle(convert_original(src.path, src.variant, cfg=src.cfg), cfg=src.cfg, mesh=mesh,
                             mesh_cfg=mesh_cfg)
    else:
        models = load_bundle(src.path, cfg=src.cfg, mesh=mesh, mesh_cfg=mesh_cfg)
    if mesh is not None:
        return place(models, mesh, mesh_cfg)
    if src.cfg.dit.use_fp8 or src.cfg.dit.cpu_offload:      # fp8 block weights / host-resident block stacks
        models.dit = dit.runtime_params(models.dit, src.cfg.dit)
    return offload_towers(models)                           # cpu_offload: text towers + VAE in host memory


def load_models(ckpt_dir=None, config=None, overrides=(), seed: int = 0, variant: str | None = None) -> Models:
    """Former name of :func:`load` (same arguments)."""
    return load(ckpt_dir, config, overrides, variant, seed)
