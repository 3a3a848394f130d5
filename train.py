"""hcjax training entry point: flow-matching fine-tuning of the HunyuanCustom DiT.

    python train.py --config configs/train_tiny.yaml --workdir RUN [--set a.b=value ...] [--resume]
    python train.py --config configs/demo.yaml --stage vae --workdir RUN_VAE    # the VAE, from scratch
    python train.py --config CFG --workdir RUN --set train.lora.rank=32 --set train.init_from=BASE   # LoRA

LoRA (``train.lora.rank > 0``, docs/lora.md): adapters only on the frozen base; checkpoints hold the adapters and
the last step writes ``RUN/adapter.safetensors`` for ``sample.py --lora``.

Data: ``train.data.path`` is a dataset written by ``python -m hcjax.precompute`` (``train.data.mode:
precomputed``, what large runs use) or a raw directory of mp4 + JSON clips (``mode: raw``, encoded online).
Writes ``RUN/checkpoints`` (orbax, async, keep-N), ``RUN/metrics.jsonl``, ``RUN/tensorboard`` and
``RUN/config.json``. ``--resume`` continues from the latest complete checkpoint (params, optimizer, EMA, step,
data position; ``--stage vae`` likewise). A run that fails or is interrupted before its first checkpoint
removes what it created in ``--workdir``. Bad input ends with a one-line message and exit code 2 (``--debug`` shows the traceback); a
NaN/Inf loss stops with exit code 3 and keeps the last good checkpoint; Ctrl-C exits with 130 (SIGTERM 143).
"""

from __future__ import annotations

from hcjax.cli import exit_process, guard_imports, run_cli

if __name__ == "__main__":
    guard_imports()                 # an interrupt while the heavy modules import: one line, exit 130/143

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402

from hcjax import memory  # noqa: E402
from hcjax.checkpoint import check_workdir, cleanup_on_failure  # noqa: E402
from hcjax.config import load_config  # noqa: E402
from hcjax.precompute import load_text_encoders_for  # noqa: E402
from hcjax.runtime import enable_compilation_cache, initialize_distributed  # noqa: E402
from hcjax.training import NonFiniteError, train  # noqa: E402
from hcjax.vae_training import train_vae  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="hcjax YAML with a train: section (e.g. configs/train_tiny.yaml)")
    p.add_argument("--workdir", required=True, help="run directory (checkpoints, metrics, TensorBoard)")
    p.add_argument("--set", action="append", default=[], metavar="A.B=V", help="config override (repeatable)")
    p.add_argument("--stage", choices=("dit", "vae"), default="dit",
                   help="dit: flow matching of the DiT (default); vae: train the 3D causal VAE from scratch "
                        "(vae_train: section; data: vae_train.data or train.data.path, a raw clip directory)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --workdir")
    p.add_argument("--no-progress", action="store_true", help="plain log lines even on a terminal")
    p.add_argument("--no-compile-cache", action="store_true", help="do not use the persistent XLA compilation cache "
                   "($HCJAX_CACHE_DIR, default ~/.cache/hcjax/xla)")
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="multi-process: process 0's address "
                   "(with --num-processes and --process-id); JAX_COORDINATOR_ADDRESS in the environment works too")
    p.add_argument("--num-processes", type=int, default=None, help="multi-process: number of processes")
    p.add_argument("--process-id", type=int, default=None, help="multi-process: this process's index")
    p.add_argument("--distributed", choices=("auto",), default=None,
                   help="auto: jax.distributed on TPU pods / SLURM / Open MPI (the cluster gives the addresses)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def run(args) -> None:
    check_workdir(args.workdir)
    initialize_distributed(args.coordinator, args.num_processes, args.process_id, auto=args.distributed == "auto"
                           or os.environ.get("HCJAX_DISTRIBUTED") == "1")
    cfg = load_config(args.config, args.set)
    enable_compilation_cache(not args.no_compile_cache)
    progress = False if args.no_progress else None
    with cleanup_on_failure(args.workdir):      # a run that fails before its first checkpoint leaves nothing
        if args.stage == "vae":
            train_vae(cfg, args.workdir, resume=args.resume, print_fn=lambda s: print(s, flush=True),
                      progress=progress)
            return
        if not cfg.train.data.path:
            raise ValueError("no training data: set train.data.path (e.g. --set train.data.path=DIR)")
        memory.check(memory.training_estimate(cfg), f"train.py --config {args.config}",
                     "lower train.batch_size or the bucket size, set dit.remat, or train.microbatch")
        text = load_text_encoders_for(cfg) if cfg.train.data.mode == "raw" else None
        train(cfg, args.workdir, resume=args.resume, print_fn=lambda s: print(s, flush=True), progress=progress,
              text_encoders=text)


def main(argv=None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    # orbax logs an interrupted save wait with a traceback before re-raising it: the one line is ours (--debug: all)
    logging.getLogger("absl").setLevel(logging.ERROR if args.debug else logging.CRITICAL)
    return run_cli(lambda: run(args), debug=args.debug, codes={NonFiniteError: 3, FloatingPointError: 3})


if __name__ == "__main__":
    exit_process(main())
