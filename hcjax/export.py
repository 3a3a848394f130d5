"""Training runs -> a bundle ``sample.py --ckpt-dir`` loads: ``python -m hcjax.export``.

    python -m hcjax.export --dit-run RUN --vae-run VAE_RUN --text-from BUNDLE --out OUT
    python -m hcjax.export --dit-run RUN --vae BUNDLE/vae  --text-from BUNDLE --out OUT
    python -m hcjax.export --dit-run RUN --vae random      --text-from random --out OUT   # train_tiny-style runs

Components (the bundle layout of :mod:`hcjax.models`):

* ``dit/``: the DiT params of ``RUN/checkpoints`` (``--step``, default the latest; the EMA params when the run
  keeps them, ``--no-ema`` for the raw ones), in fp32 as trained.
* ``vae/``: ``--vae-run VAE_RUN`` (``train.py --stage vae``: ``VAE_RUN/params``, with its measured scaling factor),
  ``--vae DIR`` (any hcjax VAE checkpoint, e.g. ``BUNDLE/vae``) or ``--vae random`` (the seeded random VAE that
  ``train.data.vae_weights: random`` encoded the run's latents with: the same weights).
* ``llava/``, ``clip/`` (and ``whisper/`` for an audio DiT): ``--text-from BUNDLE`` copies a bundle's towers with
  their tokenizer files; ``--text-from random`` writes seeded random towers of the run's sizes with the tiny
  tokenizers of ``assets/tiny_tokenizers`` and their ``llava`` settings (``configs/default_tiny.yaml``), as
  ``sample.py --config`` does.

One config for all components: the DiT run's, with the ``vae`` section of the VAE source and the text sections
(``llama``, ``clip_vision``, ``clip_text``, ``llava``, ``whisper``) of the text source; ``sample.video_size`` and
``sample.frames`` become the run's largest bucket and ``train.data.num_frames`` (the shapes it was trained on);
``--set a.b=v`` overrides anything. The pieces must fit: the VAE's latent channels and compression ratios as in
the run (its latents), the towers' widths as the DiT's text inputs; any mismatch is an error naming both sides.
The bundle's ``train.data`` keeps the run's data settings but not its paths into the training machine's files
(``DataConfig.LOCAL_PATHS`` emptied): a shared bundle names no file of the machine it came from but the DiT run
in ``export.json``, and training from its config asks for a data path instead of reading a dead one.
A run trained on the weight-free ``hash`` text stage gets a warning (no tower produces those states).

The bundle is written under ``.OUT.partial-<pid>`` and renamed at the end: a failed or interrupted export leaves
nothing; an existing ``--out`` is an error unless ``--overwrite``. LoRA runs: not yet (the DiT stage only).
"""

from __future__ import annotations

from .cli import exit_process, guard_imports, run_cli

if __name__ == "__main__":
    guard_imports()                 # an interrupt while the heavy modules import: one line, exit 130/143

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from .checkpoint import (TrainCheckpoints, atomic_dir, check_workdir, load_checkpoint_config, load_params,  # noqa: E402
                         random_params, save_params)
from .conditioning import clip, llava, whisper  # noqa: E402
from .config import PRESET_DIR, Config, apply_overrides, config_from_json, load_config, to_dict  # noqa: E402
from .models import TINY_TOKENIZERS  # noqa: E402
from .vae import abstract_params as vae_abstract_params  # noqa: E402

TEXT_SECTIONS = ("llama", "clip_vision", "clip_text", "llava", "whisper")
TOWERS = ("llava", "clip", "whisper")


def dit_from_run(run: str | Path, step: int | None = None, ema: bool = True) -> tuple[dict, Config, int, bool]:
    """``(params, config, step, EMA used)`` of a DiT training run's checkpoint (``RUN`` or ``RUN/checkpoints``)."""
    run = Path(run)
    ck_dir = run / "checkpoints" if (run / "checkpoints").is_dir() else run
    if not ck_dir.is_dir():
        raise FileNotFoundError(f"--dit-run {run}: no such run directory (expected RUN/checkpoints from train.py)")
    ck = TrainCheckpoints(ck_dir, read_only=True)
    try:
        step = ck.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"--dit-run {run}: no complete checkpoint in {ck_dir}")
        cfg = config_from_json(json.dumps(ck.config_dict(step)))
        state, _ = ck.restore(step)
    finally:
        ck.close()
    if not isinstance(state, dict) or "params" not in state or "opt_state" not in state:
        raise ValueError(f"--dit-run {run}: step {step} is not a DiT training checkpoint (a VAE run? use --vae-run)")
    used_ema = ema and "ema" in state
    return (state["ema"] if used_ema else state["params"]), cfg, step, used_ema


def vae_source(arg: str, run_cfg: Config) -> tuple[dict, Config]:
    """``(params, config with its vae section)`` of ``--vae`` / ``--vae-run`` (module docstring)."""
    if arg == "random":
        return random_params(vae_abstract_params(run_cfg.vae), run_cfg.train.data.seed, std=None), run_cfg
    d = Path(arg)
    if (d / "params" / "config.json").is_file():          # a VAE run directory
        d = d / "params"
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"VAE source {arg}: not an hcjax checkpoint (config.json + params/) nor a VAE run "
                                "(RUN/params from train.py --stage vae)")
    return load_params(d), load_checkpoint_config(d)


def check_fit(cfg: Config, run_cfg: Config, vae_from: str, text_from: str) -> None:
    """The assembled config's pieces fit the DiT run (module docstring); ``ValueError`` naming both sides."""
    problems = []
    v, rv = cfg.vae, run_cfg.vae
    for f in ("latent_channels", "time_compression_ratio", "spatial_compression_ratio"):
        if getattr(v, f) != getattr(rv, f):
            problems.append(f"vae.{f}: VAE {vae_from} {getattr(v, f)}, DiT run {getattr(rv, f)}")
    if cfg.dit.in_channels != v.latent_channels:
        problems.append(f"dit.in_channels {cfg.dit.in_channels} != the VAE's latent_channels {v.latent_channels}")
    if cfg.dit.text_states_dim != cfg.llama.hidden_size:
        problems.append(f"dit.text_states_dim {cfg.dit.text_states_dim} != llama.hidden_size "
                        f"{cfg.llama.hidden_size} of the towers from {text_from}")
    if cfg.dit.text_states_dim_2 != cfg.clip_text.hidden_size:
        problems.append(f"dit.text_states_dim_2 {cfg.dit.text_states_dim_2} != clip_text.hidden_size "
                        f"{cfg.clip_text.hidden_size} of the towers from {text_from}")
    if problems:
        raise ValueError("the exported pieces do not fit together: " + "; ".join(problems))


def _copy_tokenizer_files(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if f.is_file() and f.name != "config.json":
            shutil.copy2(f, dst / f.name)


def export_bundle(dit_run, out, *, vae: str, text_from: str, step: int | None = None, ema: bool = True,
                  overrides=(), overwrite: bool = False, print_fn=print) -> Path:
    """Assemble the bundle (module docstring); returns ``out``."""
    out = check_workdir(out, "--out")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty; choose another directory or pass --overwrite")
    dit_params, run_cfg, step, ema = dit_from_run(dit_run, step, ema)
    vae_params, vae_cfg = vae_source(vae, run_cfg)
    text_dir = None if text_from == "random" else Path(text_from)
    if text_dir is not None:
        missing = [c for c in ("llava", "clip") if not (text_dir / c / "config.json").is_file()]
        if missing:
            raise FileNotFoundError(f"--text-from {text_dir}: not an hcjax bundle (no {', '.join(missing)}/); give "
                                    "a bundle directory (e.g. assets/demo/model) or 'random'")
        text_cfg = load_checkpoint_config(text_dir / "llava")
    else:       # the run's tower sizes; the tokenizer settings of the tiny tokenizers (default_tiny.yaml)
        text_cfg = dataclasses.replace(run_cfg, llava=load_config(PRESET_DIR / "default_tiny.yaml").llava)
    h, w = max(run_cfg.train.data.buckets, key=lambda b: b[0] * b[1])
    data = to_dict(run_cfg)
    data["vae"] = to_dict(vae_cfg)["vae"]
    text = to_dict(text_cfg)
    for sec in TEXT_SECTIONS:
        data[sec] = text[sec]
    data["sample"] = {**data["sample"], "video_size": [h, w], "frames": run_cfg.train.data.num_frames}
    cfg = apply_overrides(config_from_json(json.dumps(data)), list(overrides))
    check_fit(cfg, run_cfg, vae, text_from)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, data=cfg.train.data.without_local_paths()))
    if run_cfg.train.data.text_encoder == "hash":
        print_fn("warning: the run trained on the word-hash text stage (train.data.text_encoder=hash); no text tower "
                 "produces those states, so samples of this bundle follow no prompt")
    if cfg.dit.audio_condition and text_dir is not None and not (text_dir / "whisper" / "config.json").is_file():
        raise FileNotFoundError(f"--text-from {text_dir}: the audio DiT needs whisper/ in the bundle")
    with atomic_dir(out, "partial") as tmp:
        save_params(tmp / "dit", dit_params, cfg)
        save_params(tmp / "vae", vae_params, cfg)
        towers = TOWERS if cfg.dit.audio_condition else TOWERS[:2]
        for i, name in enumerate(towers):
            if text_dir is not None:
                save_params(tmp / name, load_params(text_dir / name), cfg)
                _copy_tokenizer_files(text_dir / name, tmp / name)
                continue
            init = {"llava": lambda k: llava.init_params(cfg, k), "clip": lambda k: clip.init_text_params(
                cfg.clip_text, k), "whisper": lambda k: whisper.init_params(cfg.whisper, k)}[name]
            save_params(tmp / name, random_params(init, cfg.train.seed + 2 + i), cfg)
            if name != "whisper":
                _copy_tokenizer_files(TINY_TOKENIZERS / name, tmp / name)
        (tmp / "export.json").write_text(json.dumps({
            "dit_run": str(dit_run), "step": step, "ema": ema, "vae": vae, "text_from": text_from,
            "overrides": list(overrides)}, indent=1))
    print_fn(f"wrote {out}: DiT step {step}{' (EMA)' if ema else ''} of {dit_run}, VAE {vae}, text towers "
             f"{text_from}; sample with: python sample.py --ckpt-dir {out}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hcjax.export", description=__doc__.splitlines()[0])
    p.add_argument("--dit-run", required=True, help="train.py --workdir of the DiT run (RUN/checkpoints)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--no-ema", action="store_true", help="the raw params instead of the EMA ones")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--vae-run", default=None, help="train.py --stage vae --workdir of the VAE run")
    g.add_argument("--vae", default=None, help="an hcjax VAE checkpoint dir (e.g. BUNDLE/vae), or 'random' (the "
                   "seeded random VAE of train.data.vae_weights: random)")
    p.add_argument("--text-from", required=True, help="bundle whose llava/ clip/ (whisper/) to copy, or 'random'")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--set", action="append", default=[], metavar="A.B=V", help="config override of the bundle")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)
    vae = args.vae_run or args.vae
    return run_cli(lambda: export_bundle(args.dit_run, args.out, vae=vae, text_from=args.text_from, step=args.step,
                                         ema=not args.no_ema, overrides=args.set, overwrite=args.overwrite,
                                         print_fn=lambda s: print(s, file=sys.stderr if s.startswith("warning")
                                                                  else sys.stdout, flush=True)) and 0,
                   debug=args.debug)


if __name__ == "__main__":
    exit_process(main())


__all__ = ["dit_from_run", "export_bundle", "main", "vae_source"]
