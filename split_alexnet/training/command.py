"""The ``split_alexnet.train`` command: parse the flags, then print the recipe, or print the
recipe and presets in use (before any check that uses their values) and plan the run or
train it and print its result.

    python -m split_alexnet.train --demo                                # generated data, 2 CPU cores, < 10 min
    python -m split_alexnet.train --data /data/ilsvrc12 --gpus 0,1      # the paper: one tower per GPU
    python -m split_alexnet.train --data /data/ilsvrc12 --gpus 0,0      # both towers on one GPU
    python -m split_alexnet.train --data /data/ilsvrc12 --gpus 0 --single-device   # collapsed layout
    python -m split_alexnet.train --data DIR --devices cpu,cpu --max-steps 20       # smoke run
    python -m split_alexnet.train --out runs/alexnet --resume           # continue from last.pt
    torchrun --nproc-per-node 4 -m split_alexnet.train --data DIR       # 2 pairs of GPUs, DDP

Every flag: ``python -m split_alexnet.train --help`` and docs/training.md. The run itself:
:class:`~split_alexnet.training.trainer.Trainer`.
"""

from __future__ import annotations

import json
import sys
from typing import Sequence

import split_alexnet.training.distributed as dist_util
from split_alexnet.training.config import PROG, TrainConfig
from split_alexnet.training.options import Command, parse_command
from split_alexnet.training.plan import plan
from split_alexnet.training.recipes import PRESET_TITLES, PRESETS, RECIPES, describe
from split_alexnet.training.trainer import train
from split_alexnet.utils.cli import run


def announce(cfg: TrainConfig, cmd: Command) -> None:
    """Rank 0, before the plan or the run and so before any of their checks (the data, the
    batch against the training set): the recipe (unless the paper's) and each preset in
    use, every setting with its source and the value the run uses."""
    if dist_util.env_context().rank != 0:
        return
    if cfg.recipe != "paper":
        print(f"recipe {cfg.recipe} (flags, TOML and --demo win):\n"
              + describe(RECIPES[cfg.recipe], cfg), file=sys.stderr)
    for name, preset in PRESETS.items():
        if getattr(cmd, name):
            print(f"{PRESET_TITLES[name]} (flags given on the command line win):\n"
                  + describe(preset, cfg), file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    cfg, cmd = parse_command(argv)
    if cmd.print_recipe:
        print(f"recipe {cfg.recipe}:\n{describe(RECIPES[cfg.recipe], cfg)}")
        return 0
    announce(cfg, cmd)  # a refusal that follows names what the table showed
    if cmd.plan:
        text = plan(cfg, cmd)  # every process takes part in the timed steps
        if dist_util.env_context().rank == 0:
            print(text)
        return 0
    result = train(cfg, cmd)
    if dist_util.env_context().rank == 0:
        print(json.dumps(result.to_json()), file=sys.stdout)
    return 0


def cli() -> None:
    """The console command: ``main`` with one-line errors and exit codes."""
    sys.exit(run(main, PROG))
