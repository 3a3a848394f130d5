"""``python -m convert_weights <component> --src ... --out ...`` and ``python -m convert_weights inspect FILE``.

Each component module (``convert_weights/<component>.py``) provides ``convert_file(args) -> Path``; this
file only parses arguments and turns errors into one-line messages with exit code 2 (``--debug`` re-raises),
Ctrl-C into 130 (SIGTERM 143; an interrupted conversion leaves no output). ``inspect`` of a truncated or corrupt file:
``error: broken checkpoint: ...``, exit 2.
"""

from __future__ import annotations

from hcjax.cli import exit_process, guard_imports, run_cli

if __name__ == "__main__":
    guard_imports()                 # an interrupt while the heavy modules import: one line, exit 130/143

import argparse  # noqa: E402
import importlib  # noqa: E402

from .inspect_ckpt import inspect_file  # noqa: E402

COMPONENTS = {
    "dit": "HunyuanCustom / HunyuanVideo transformer (original or diffusers format)",
    "vae": "3D causal VAE (original vae_3d/.../pytorch_model.pt or diffusers format)",
    "llava": "LLaVA-Llama-3-8B text+image encoder (hub or transformers 5.x names)",
    "clip": "CLIP-L text encoder",
    "whisper": "Whisper-tiny audio encoder",
    "lora": "LoRA for the DiT (diffusers/peft, kohya/musubi or original names) -> hcjax adapter.safetensors",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m convert_weights", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_text in COMPONENTS.items():
        s = sub.add_parser(name, help=help_text)
        s.add_argument("--src", required=True, help="checkpoint file (.pt/.bin/.safetensors) or safetensors dir")
        s.add_argument("--out", required=True, help="output directory (orbax params + config.json)")
        s.add_argument("--format", default=None, help="source naming: original | diffusers | hf (component specific)")
        s.add_argument("--config", default=None, help="hcjax YAML preset to convert into (default: detected)")
        s.add_argument("--set", action="append", default=[], metavar="A.B=V", help="config override")
        s.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                       help="cast parameters (default: keep the checkpoint's dtype)")
        s.add_argument("--key", default=None, help="top-level key holding the state dict (component default)")
        s.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
        s.add_argument("--debug", action="store_true", help="show tracebacks")
        if name == "dit":
            s.add_argument("--fp8-map", default=None, metavar="FILE",
                           help="scale map of an fp8 checkpoint (default: X_map.pt beside X.pt)")
    s = sub.add_parser("inspect", help="print variant, counts, dtypes and mismatches from metadata only")
    s.add_argument("file")
    s.add_argument("--key", default=None)
    s.add_argument("--fp8-map", default=None, metavar="FILE", help="scale map of an fp8 DiT (default: X_map.pt)")
    s.add_argument("--debug", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def run():
        if args.command == "inspect":
            print(inspect_file(args.file, key=args.key, fp8_map=args.fp8_map))
            return 0
        module = importlib.import_module(f"convert_weights.{args.command}")
        out = module.convert_file(args)
        print(f"wrote {out}")
        return 0

    return run_cli(run, debug=args.debug)


if __name__ == "__main__":
    exit_process(main())
