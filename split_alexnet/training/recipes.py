"""The named recipes and presets, as data: every setting with its source or its reason, and
the one formatter that prints such a table.

* :data:`RECIPES`: ``--recipe paper`` (the defaults, each with the paper's section) and
  ``--recipe bvlc`` (Caffe's bvlc_alexnet, each with its file and line);
* :data:`PRESETS`: ``--demo`` (the tiny generated set) and ``--finetune`` (Caffe's
  fine-tuning recipe), each setting with its reason.

Order of precedence (``training/options.py``): defaults <- recipe <- presets <- a calling
tool's settings <- TOML file <- command line.
"""

from __future__ import annotations

from typing import Any

from split_alexnet.training.config import TrainConfig, format_value, to_flags
from split_alexnet.utils.cli import UsageError

#: A table of settings: flat setting name -> (value, its source or reason).
Table = dict[str, tuple[Any, str]]

#: Recipe changes for the tiny generated demo set, each with its reason (docs/training.md).
DEMO_PRESET: Table = {
    "init": ("caffe", "the paper's biases of 1 sit at chance for hundreds of steps on a small "
                      "set (measured: docs/experiments.md, \"The init question\"); Caffe's "
                      "0.1 learns within ~60 steps"),
    "batch_size": (32, "a 2-core CPU trains about 40-50 images/s; 32 gives ~30 steps per epoch"),
    "epochs": (14, "the demo set is 1,000 images; 14 epochs (~440 steps) fit in under 10 "
                   "minutes on 2 cores"),
    "lr_schedule": ("step:11", "too few epochs for a plateau to show; one drop late in the run"),
    "workers": (2, "two cores"),
    "log_interval": (10, "short epochs"),
    "watchdog_steps": (150, "the demo's loss leaves chance (ln 10) within ~100 steps; a run "
                            "still there at step 150 is not learning"),
}



_TV = "BVLC/caffe models/bvlc_alexnet/train_val.prototxt"
_SOLVER = "BVLC/caffe models/bvlc_alexnet/solver.prototxt"
_README = "BVLC/caffe models/bvlc_alexnet/readme.md"

#: Each recipe's settings, each with its source (a file by repository and path and the quoted
#: line, or the paper's section). ``paper`` is the defaults, listed with their sources.
RECIPES: dict[str, Table] = {
    "paper": {
        "init": ("paper", "Krizhevsky et al. 2012, section 5: weights N(0, 0.01), biases 1 in "
                          "conv2, conv4, conv5 and the fully connected layers, 0 elsewhere"),
        "lrn": ("paper", "section 3.3: k = 2, n = 5, alpha = 1e-4, beta = 0.75, as printed"),
        "bias_lr_mult": (1.0, "section 5: \"We used an equal learning rate for all layers\""),
        "bias_decay": (True, "section 5: the update rule decays every weight w_i"),
        "batch_size": (128, "section 5: \"a batch size of 128 examples\""),
        "lr": (0.01, "section 5: \"The learning rate was initialized at 0.01\""),
        "lr_schedule": ("plateau", "section 5: \"divide the learning rate by 10 when the "
                                   "validation error rate stopped improving\""),
        "lr_drops": (3, "section 5: \"reduced three times prior to termination\""),
        "epochs": (90, "section 5: \"roughly 90 cycles through the training set\""),
        "pca": ("paper", "section 4.1: PCA colour noise, alpha_i * lambda_i"),
    },
    "bvlc": {
        "init": ("caffe", f"{_TV}: biases \"value: 0.1\" where the paper has 1, fc6/fc7 "
                          f"\"std: 0.005\"; {_README}: \"initializing non-zero biases to 0.1 "
                          "instead of 1 (found necessary for training, as initialization to 1 "
                          "gave flat loss)\""),
        "bias_lr_mult": (2.0, f"{_TV}: every bias \"lr_mult: 2\" (\"blobs_lr: 2\" at commit "
                              "c2aaebd)"),
        "bias_decay": (False, f"{_TV}: every bias \"decay_mult: 0\" (\"weight_decay: 0\" at "
                              "commit c2aaebd)"),
        "lrn": ("caffe", f"{_TV}: LRN \"local_size: 5 alpha: 0.0001 beta: 0.75\", Caffe's "
                         "alpha/n with k = 1"),
        "batch_size": (256, f"{_TV} at commit c2aaebd, the TRAIN data layer: \"batch_size: "
                            "256\""),
        "lr": (0.01, f"{_SOLVER}: \"base_lr: 0.01\""),
        "momentum": (0.9, f"{_SOLVER}: \"momentum: 0.9\""),
        "weight_decay": (5e-4, f"{_SOLVER}: \"weight_decay: 0.0005\""),
        "lr_schedule": ("step-iters:100000", f"{_SOLVER}: \"lr_policy: \"step\"\", "
                                             "\"gamma: 0.1\", \"stepsize: 100000\""),
        "lr_drops": (4, f"{_SOLVER}: 450,000 iterations in steps of 100,000 divide the rate "
                        "at 100k, 200k, 300k and 400k"),
        "max_steps": (450_000, f"{_SOLVER}: \"max_iter: 450000\""),
        "epochs": (90, f"an upper bound: {_SOLVER}'s \"max_iter\" (--max-steps) ends the run "
                       "(on ILSVRC-2012, 1,281,167 images, 5,004 steps of 256 per epoch, "
                       "450,000 steps are 89.9 epochs)"),
        "pca": ("off", f"{_README}: \"not training with the relighting data-augmentation\"; "
                       f"{_TV}: only \"mirror: true\", \"crop_size: 227\" and "
                       "\"mean_file\" (random 227 crops, mirrors, the mean image: as here)"),
    },
}


#: Caffe's fine-tuning recipe on this repository's flags (docs/training.md, "Fine-tuning"),
#: each with its source in BVLC/caffe: models/finetune_flickr_style/{solver,train_val}.prototxt
#: and examples/finetune_flickr_style/readme.md.
FINETUNE_PRESET: Table = {
    "lr": (0.001, "base_lr: 0.001, \"lr for fine-tuning should be lower than when starting "
                  "from scratch\" (models/finetune_flickr_style/solver.prototxt)"),
    "lr_mult_new": (10.0, "lr_mult 10 on the new fc8_flickr's weights (20 on its biases, 1 and "
                          "2 on the loaded layers) (models/finetune_flickr_style/"
                          "train_val.prototxt)"),
    "momentum": (0.9, "momentum: 0.9 (solver.prototxt), the paper's too"),
    "weight_decay": (5e-4, "weight_decay: 0.0005 (solver.prototxt), the paper's too"),
    "batch_size": (50, "batch_size: 50 (train_val.prototxt)"),
    "lr_schedule": ("step:12", "lr_policy \"step\", gamma 0.1, stepsize 20000 (solver.prototxt):"
                               " 20,000 iterations of 50 images over the 80,000 Flickr Style "
                               "images (examples/finetune_flickr_style/readme.md) are 12.5 "
                               "epochs"),
    "lr_drops": (4, "max_iter 100000 with stepsize 20000 (solver.prototxt): the rate drops "
                    "4 times"),
    "epochs": (60, "max_iter 100000 iterations of 50 images over 80,000 images are 62.5 "
                   "epochs; 60 keeps the 5 equal stages of step:12"),
}

#: The presets by the switch that applies them (``--demo``, ``--finetune``), in that order.
PRESETS: dict[str, Table] = {"demo": DEMO_PRESET, "finetune": FINETUNE_PRESET}
#: How the trainer names each preset when it prints it.
PRESET_TITLES = {"demo": "demo preset", "finetune": "fine-tuning preset"}


def recipe_settings(name: str) -> dict[str, Any]:
    """The flat settings of recipe ``name`` (:data:`RECIPES`)."""
    if name not in RECIPES:
        raise UsageError(f"--recipe must be one of {', '.join(RECIPES)}; got {name!r}")
    return values(RECIPES[name])


def values(table: Table) -> dict[str, Any]:
    """A table's flat settings, without their sources."""
    return {k: v for k, (v, _) in table.items()}


def describe(table: Table, cfg: TrainConfig | None = None) -> str:
    """One line per setting of ``table``, as its flag, with its source or reason; with
    ``cfg``, a setting that something later (a preset, a TOML file, a flag) changed shows the
    value the run uses."""
    now = cfg.to_dict() if cfg is not None else {}
    lines = []
    for k, (v, why) in table.items():
        used = f" (this run: {format_value(now[k])})" if k in now and now[k] != v else ""
        lines.append(f"  {' '.join(to_flags({k: v}))}{used}: {why}")
    return "\n".join(lines)
