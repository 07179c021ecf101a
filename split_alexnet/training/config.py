"""The training config: one frozen dataclass, filled from defaults, the demo preset, a TOML
file and the command line, in that order (later wins). Saved inside every checkpoint.

Every field is a flag of the same name (``batch_size`` is ``--batch-size``), also in a TOML
file given with ``--config``; the fields of :class:`ModelConfig` (``--arch``, ``--lrn``, ...)
are flags of their own, flat like the rest. Each flag's help and allowed values are its
field's metadata, so ``--help`` and the checks in :meth:`TrainConfig.validate` say the same;
so are the numeric ones' ranges (``min``, ``max``, ``above``, ``below``: ``utils.flags``), checked
on the command line, in a TOML file (with each value's type) and in :meth:`TrainConfig.validate`
alike. Every float must be finite.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Sequence

from split_alexnet.data.dataset import PCA_MODES
from split_alexnet.network.model import (TOWER_LAYERS, WEIGHT_LAYERS, ModelConfig,
                                         layers_through)
from split_alexnet.network.parallelize import AMP_CHOICES
from split_alexnet.network.placement import DEVICE_HELP
from split_alexnet.training.distributed import BACKENDS
from split_alexnet.training.optim import OPTIMIZERS, SCHEDULES, parse_schedule
from split_alexnet.utils.cli import UsageError
from split_alexnet.utils.flags import BOUNDS, WORKERS, Number, check_number

try:  # Python 3.11+; on 3.10 the optional dependency tomli reads --config files
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ModuleNotFoundError:
        tomllib = None  # type: ignore[assignment]

PROG = "split_alexnet.train"


#: The largest --seed: it and the seeds derived from it stay within 63 bits.
MAX_SEED = 2 ** 62
#: torch.finfo(torch.float32).max: the update rule's scalars (lr, lr * weight decay) are
#: float32 inside the kernels, and a larger one cannot be converted.
FLOAT32_MAX = 3.4028234663852886e38


def _setting(default: Any, help: str, choices: Sequence[str] | None = None,
             **bounds: Any) -> Any:
    """A field with its flag's help text, allowed values and numeric range (``min``, ``max``,
    ``above``, ``below``) as metadata."""
    return field(default=default, metadata={"help": help, "choices": choices, **bounds})


#: The named recipes (:data:`RECIPES`), ``paper`` first: the default.
RECIPE_NAMES = ("paper", "bvlc")
#: The switches that are on by default: ``--no-NAME`` turns each off.
NEGATABLE = ("ten_crop", "bias_decay")


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run. Build it with :func:`parse_config` (flags) or
    directly, then :meth:`validate`; ``dataclasses.replace`` or :meth:`with_settings` give
    variants."""

    data: str | None = _setting(
        None, "Dataset root with train/<class>/ and val/<class>/ (prepared or not).")
    out: str = _setting("runs/alexnet", "Run folder: checkpoints, metrics.jsonl, curves.png, "
                                        "config.json.")
    gpus: str | None = _setting(None, DEVICE_HELP["gpus"])
    devices: str | None = _setting(None, DEVICE_HELP["devices"])
    single_device: bool = _setting(False, DEVICE_HELP["single_device"])
    model: ModelConfig = field(default_factory=ModelConfig)
    """The network (flags --arch, --init, --lrn, --activation, --pool, --dropout)."""
    epochs: int = _setting(90, "Passes over the training set (the paper: about 90).", min=1)
    batch_size: int = _setting(128, "Images per optimizer step (the paper: 128). Global under "
                                    "torchrun unless --per-process-batch.", min=1)
    per_process_batch: bool = _setting(False, "Under torchrun: --batch-size is per process "
                                              "instead of global.")
    backend: str = _setting("auto", "Under torchrun: the torch.distributed backend, 'auto' "
                                    "(nccl when every device is a GPU, gloo otherwise), 'nccl' "
                                    "or 'gloo'.", BACKENDS)
    lr: float = _setting(0.01, "Initial learning rate (the paper: 0.01, the same for every "
                               "layer).", above=0, max=FLOAT32_MAX)
    momentum: float = _setting(0.9, "Momentum of the paper's update rule.", min=0, below=1)
    weight_decay: float = _setting(5e-4, "Weight decay of the paper's update rule (inside the "
                                         "velocity, times lr).", min=0, max=FLOAT32_MAX)
    optimizer: str = _setting("paper", "'paper' (lr inside the velocity, section 5) or 'torch' "
                                       "(torch.optim.SGD).", OPTIMIZERS)
    lr_schedule: str = _setting("plateau", "'plateau': divide by 10 when val error stops "
                                           "improving (the paper); 'step:N': every N epochs.")
    plateau_patience: int = _setting(1, "Epochs without a new best val top-1 error before the "
                                        "plateau schedule divides the rate (epochs, also with "
                                        "--eval-every N: each evaluation counts N).", min=0)
    lr_drops: int = _setting(3, "At most this many divisions by 10 (the paper: three).", min=0)
    pca: str = _setting("paper", "PCA colour noise: 'paper' (alpha_i * lambda_i, lambda of "
                                 "[0,1]-scaled RGB), 'paper-255' (lambda of 0-255 RGB, "
                                 "literally: drowns the image), 'sqrt' (Krizhevsky's code), "
                                 "'off'.", PCA_MODES)
    workers: int = _setting(4, "DataLoader worker processes per training process.", **WORKERS)
    seed: int = _setting(0, "Seeds the weights, the dropout masks, the data order and every "
                            "augmentation.", min=0, max=MAX_SEED)
    max_steps: int | None = _setting(None, "Stop after this many optimizer steps in total "
                                           "(smoke runs); a checkpoint is saved.", min=1)
    resume: str | None = _setting(None, "'auto' (OUT/last.pt, falling back to the newest good "
                                        "epoch checkpoint) or a path.")
    # run folder
    overwrite: bool = _setting(False, "Start a new run in an --out that already holds one, "
                                      "deleting its checkpoints, metrics.jsonl, curves.png and "
                                      "config.json (without it such an --out is refused).")
    resume_lr: float | None = _setting(None, "With --resume: continue at this learning rate "
                                             "instead of the checkpoint's; recorded in "
                                             "metrics.jsonl as an \"lr_change\" record.",
                                  above=0, max=FLOAT32_MAX)
    checkpoint_minutes: float = _setting(30.0, "Also save OUT/last.pt every this many minutes "
                                               "inside an epoch (0: after every step).", min=0)
    keep_last: int = _setting(3, "Keep the last K epoch checkpoints (OUT/epoch_NNN.pt) besides "
                                 "last.pt and best.pt (0: keep them all).", min=0)
    log_interval: int = _setting(20, "Steps between lines of progress and metrics.jsonl "
                                     "records.", min=1)
    tensorboard: bool = _setting(False, "Also write the training records as TensorBoard "
                                        "events in OUT/tensorboard (needs the tensorboard "
                                        "package: the 'tensorboard' extra).")
    watchdog_steps: int = _setting(500, "After this many steps, warn once if the training loss "
                                        "is still at chance, ln(classes) (docs/experiments.md); "
                                        "0 disables.", min=0)
    ten_crop: bool = _setting(True, "At the end, evaluate with ten crops and averaged softmax "
                                    "(the paper).")
    eval_every: int = _setting(1, "Evaluate the centre crop every this many epochs.", min=1)
    strict: bool = _setting(False, "Unreadable images are fatal instead of skipped and counted.")
    channels_last: bool = _setting(False, "Fast path: NHWC weights and inputs (the same "
                                          "function; docs/benchmarks.md).")
    amp: str = _setting("off", "Autocast: 'off' (fp32, the faithful default), 'bf16' or 'fp16' "
                               "(with a GradScaler on CUDA).", AMP_CHOICES)
    compile: bool = _setting(False, "Fast path: nn.Module.compile() (compiles on the first "
                                    "steps; docs/benchmarks.md). Checkpoints hold the same "
                                    "weights; evaluation runs compiled in one process and "
                                    "eager under torchrun.")
    cudnn_benchmark: bool = _setting(False, "Fast path: let cuDNN time its algorithms per "
                                            "shape (CUDA; not bitwise reproducible).")
    # recipes and bias handling (RECIPES; docs/training.md, "Choosing a recipe")
    recipe: str = _setting("paper", "A named recipe, every setting with its source: 'paper' "
                                    "(as printed, the defaults) or 'bvlc' (Caffe's "
                                    "bvlc_alexnet); flags, TOML and --demo win over it.",
                           RECIPE_NAMES)
    print_recipe: bool = _setting(False, "Print the recipe's resolved settings with their "
                                         "sources and exit, doing nothing else.")
    bias_lr_mult: float = _setting(1.0, "The biases' learning rate is this times the weights' "
                                        "(the paper: 1; Caffe and cuda-convnet: 2).", min=0,
                                   max=FLOAT32_MAX)
    bias_decay: bool = _setting(True, "Weight decay on the biases too (the paper); "
                                      "--no-bias-decay: none (Caffe, cuda-convnet).")
    # the plateau schedule's guards (docs/fidelity.md, "the plateau reading")
    plateau_min_epochs: int = _setting(0, "The plateau schedule keeps each rate at least this "
                                          "many epochs before it divides it (0: no minimum).",
                                       min=0)
    plateau_threshold: float = _setting(0.0, "The plateau schedule counts an error as an "
                                             "improvement only below best * (1 - this) (0: any "
                                             "decrease, the paper).", min=0, below=1)
    # a plan instead of a run (training/plan.py)
    plan: bool = _setting(False, "Print what the run will do (steps, schedule, checkpoints and "
                                 "their disk, memory per device and projected time from a few "
                                 "real steps) and exit, writing nothing into --out.")
    plan_steps: int = _setting(5, "With --plan: time this many training steps (after one "
                                  "warm-up step) for the projected time.", min=1, max=10_000)
    # a hold-out set drives the schedule (docs/training.md, "Hold-out")
    holdout: int = _setting(0, "Hold out this many training images per class (chosen from "
                               "--seed); their centre-crop error drives the plateau schedule "
                               "and best.pt, and val drives nothing (0: val drives them, the "
                               "paper).", min=0)
    demo: bool = _setting(False, "Generate the demo dataset under OUT/demo_data and train on "
                                 "it with the demo preset.")
    config: str | None = _setting(None, "A TOML file with any of these settings (dashes or "
                                        "underscores); flags on the command line win.")
    # fine-tuning (training/finetune.py, docs/pretrained.md)
    init_from: str | None = _setting(
        None, "Start from this checkpoint's weights (one written by train, of either layout, "
              "or by split_alexnet.convert): every layer is loaded, fc8 is re-initialised "
              "unless the classes are the same. Read only when a run starts, not on "
              "--resume.")
    reinit: str | None = _setting(
        None, f"With --init-from: layers to re-initialise by --init instead of loading them, a "
              f"comma list of {', '.join(WEIGHT_LAYERS)}.")
    freeze_through: str | None = _setting(
        None, f"Keep this layer and every earlier one fixed (one of {', '.join(TOWER_LAYERS)}): "
              "no gradient, no update, no weight decay, no momentum.")
    lr_mult_new: float = _setting(
        1.0, "With --init-from: learning-rate multiplier of the re-initialised layers, weights "
             "and biases (Caffe's lr_mult).", min=0, max=FLOAT32_MAX)
    finetune: bool = _setting(
        False, "Caffe's fine-tuning recipe (models/finetune_flickr_style), printed with its "
               "sources; needs --init-from. Flags on the command line win.")

    # --------------------------------------------------------------------------------
    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> "TrainConfig":
        """A config from flat settings (flag names with underscores, as in :meth:`to_dict`),
        not yet validated. A value of the wrong type, outside a flag's range or choices is a
        :class:`UsageError`."""
        values = _check_settings(values)
        model = {k: v for k, v in values.items() if k in MODEL_FLAGS}
        rest = {k: v for k, v in values.items() if k not in MODEL_FLAGS}
        try:
            return cls(**rest, model=ModelConfig(**model))
        except ValueError as e:  # ModelConfig's own checks, e.g. the dropout range
            raise UsageError(f"--{e}") from None

    def with_settings(self, **settings: Any) -> "TrainConfig":
        """This config with some flat settings changed (``activation="tanh"``), validated."""
        settings = _check_settings(settings)
        model = {k: v for k, v in settings.items() if k in MODEL_FLAGS}
        rest = {k: v for k, v in settings.items() if k not in MODEL_FLAGS}
        try:
            return replace(self, model=replace(self.model, **model), **rest).validate()
        except ValueError as e:
            raise UsageError(f"--{e}") from None

    def validate(self) -> "TrainConfig":
        """Check every setting (a :class:`UsageError` for the first bad one) and return the
        resolved copy: ``--arch half`` is always single-device, and ``--demo`` without
        ``--data`` trains on OUT/demo_data. ``self`` is left as it is."""
        _check_settings(self.to_dict())
        if self.lr * self.weight_decay > FLOAT32_MAX:
            raise UsageError(f"--lr times --weight-decay is {self.lr * self.weight_decay:.3g}, "
                             f"beyond float32 (at most {FLOAT32_MAX:.3g})")
        try:
            parse_schedule(self.lr_schedule)
        except ValueError as e:
            raise UsageError(str(e)) from None
        if self.gpus is not None and self.devices is not None:
            raise UsageError("give --gpus or --devices, not both")
        check_fine_tuning(self)
        data = self.data
        if data is None and self.demo:
            data = str(Path(self.out) / "demo_data")
        return replace(self, data=data,
                       single_device=self.single_device or self.model.arch == "half")

    @property
    def layout(self) -> str:
        return "collapsed" if self.single_device else "split"

    def to_dict(self) -> dict[str, Any]:
        """Every setting, flat, by flag name (config.json, checkpoints)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "model":
                out.update({k: getattr(self.model, k) for k in MODEL_FLAGS})
            else:
                out[f.name] = getattr(self, f.name)
        return out

    def to_argv(self, *, leave_out: Sequence[str] = ("config",)) -> list[str]:
        """The flags that give this config: every setting that differs from the default
        (except those in ``leave_out``), as ``python -m split_alexnet.train`` takes them."""
        default = TrainConfig().to_dict()
        return to_flags({k: v for k, v in self.to_dict().items()
                         if k not in leave_out and v != default[k]})


def to_flags(settings: dict[str, Any]) -> list[str]:
    """Flat settings as command-line flags: ``{"activation": "tanh"}`` -> ``--activation
    tanh``; True switches become bare flags, ``ten_crop=False`` is ``--no-ten-crop``."""
    argv: list[str] = []
    for name, value in settings.items():
        if name in NEGATABLE:
            argv.append(flag_name(name) if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, bool):
            argv += [flag_name(name)] if value else []
        elif name == "resume" and value == "auto":
            argv.append("--resume")
        else:
            argv += [flag_name(name), _format(value)]
    return argv


#: The flags that set a field of :class:`ModelConfig` (``num_classes`` comes from the data).
MODEL_FLAGS = tuple(f.name for f in fields(ModelConfig) if f.name != "num_classes")


def _format(value: Any) -> str:
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    return str(value)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _flag_fields() -> list[dataclasses.Field]:
    """Every flag's field, in --help order: TrainConfig's, with ModelConfig's in its place."""
    out = []
    for f in fields(TrainConfig):
        if f.name == "model":
            out += [m for m in fields(ModelConfig) if m.name in MODEL_FLAGS]
        else:
            out.append(f)
    return out


def _kind(f: dataclasses.Field) -> type:
    """A flag's type: int, float, bool or str (its field's annotation without ``| None``)."""
    return {"int": int, "float": float, "bool": bool}.get(str(f.type).split(" |")[0], str)


def _bounds(f: dataclasses.Field) -> dict[str, Any]:
    return {k: f.metadata[k] for k in BOUNDS if k in f.metadata}


def _check_value(name: str, f: dataclasses.Field, value: Any) -> Any:
    """``value`` for the flag of field ``f`` (an int becomes a float where a float is due), or
    a :class:`UsageError` that starts with ``name``: the wrong type, not finite, out of the
    field's range or not one of its choices. None passes where the field's default is None."""
    kind, allowed = _kind(f), f.metadata.get("choices")
    if value is None and f.default is None:
        return value
    if kind in (int, float):
        return check_number(name, value, kind, **_bounds(f))
    if not isinstance(value, kind):
        raise UsageError(f"{name} must be {'true or false' if kind is bool else 'a string'}, "
                         f"got {value!r}")
    if allowed and value not in allowed:
        raise UsageError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _check_settings(values: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Flat settings, each checked by :func:`_check_value` (messages name ``--flag``, or the
    TOML key after ``where``); returned with floats where floats are due."""
    by_name = {f.name: f for f in _flag_fields()}
    return {k: _check_value(where + k.replace("_", "-") if where else flag_name(k),
                            by_name[k], v) if k in by_name else v
            for k, v in values.items()}


#: Recipe changes for the tiny generated demo set, each with its reason (docs/training.md).
DEMO_PRESET: dict[str, tuple[Any, str]] = {
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


# ------------------------------------------------------------------------ named recipes
_TV = "BVLC/caffe models/bvlc_alexnet/train_val.prototxt"
_SOLVER = "BVLC/caffe models/bvlc_alexnet/solver.prototxt"
_README = "BVLC/caffe models/bvlc_alexnet/readme.md"

#: Each recipe's settings, each with its source (a file by repository and path and the quoted
#: line, or the paper's section). ``paper`` is the defaults, listed with their sources.
RECIPES: dict[str, dict[str, tuple[Any, str]]] = {
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


def recipe_settings(name: str) -> dict[str, Any]:
    """The flat settings of recipe ``name`` (:data:`RECIPES`)."""
    if name not in RECIPES:
        raise UsageError(f"--recipe must be one of {', '.join(RECIPES)}; got {name!r}")
    return {k: v for k, (v, _) in RECIPES[name].items()}


def describe_recipe(name: str, cfg: "TrainConfig | None" = None) -> str:
    """Recipe ``name``'s settings, one line each with its source; with ``cfg``, a setting that
    something later (--demo, TOML, a flag) changed shows the value the run uses."""
    now = cfg.to_dict() if cfg is not None else {}
    lines = []
    for k, (v, why) in RECIPES[name].items():
        used = f" (this run: {_format(now[k])})" if k in now and now[k] != v else ""
        lines.append(f"  {' '.join(to_flags({k: v}))}{used}: {why}")
    return "\n".join(lines)


#: Caffe's fine-tuning recipe on this repository's flags (docs/training.md, "Fine-tuning"),
#: each with its source in BVLC/caffe: models/finetune_flickr_style/{solver,train_val}.prototxt
#: and examples/finetune_flickr_style/readme.md.
FINETUNE_PRESET: dict[str, tuple[Any, str]] = {
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

PRESETS = {"demo": DEMO_PRESET, "finetune": FINETUNE_PRESET}


def layer_names(spec: str | None, flag: str, allowed: Sequence[str]) -> tuple[str, ...]:
    """A comma list of layer names (``"fc7,fc8"``), in network order; a name not in
    ``allowed`` is a :class:`UsageError`."""
    names = [n.strip() for n in (spec or "").split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or (spec is not None and not names):
        raise UsageError(f"{flag} takes layer names from {', '.join(allowed)}; got {spec!r}")
    return tuple(n for n in allowed if n in names)


def check_fine_tuning(cfg: "TrainConfig") -> None:
    """The fine-tuning flags: known layer names, and --init-from wherever
    a flag needs a source checkpoint."""
    reinit = layer_names(cfg.reinit, "--reinit", WEIGHT_LAYERS)
    if cfg.freeze_through is not None:
        layer_names(cfg.freeze_through, "--freeze-through", TOWER_LAYERS)
        if "," in cfg.freeze_through:
            raise UsageError(f"--freeze-through takes one layer name, got {cfg.freeze_through!r}")
        frozen = layers_through(cfg.freeze_through.strip())
        both = [n for n in reinit if n in frozen]
        if both:
            raise UsageError(f"--reinit {','.join(both)} and --freeze-through "
                             f"{cfg.freeze_through}: a re-initialised layer that is frozen "
                             "never learns")
    needs = [flag for flag, on in (("--reinit", cfg.reinit is not None),
                                   ("--lr-mult-new", cfg.lr_mult_new != 1.0),
                                   ("--finetune", cfg.finetune)) if on]
    if needs and cfg.init_from is None:
        raise UsageError(f"{' and '.join(needs)} need(s) --init-from CKPT, the checkpoint to "
                         "start from")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m {PROG}",
        description="Train the 2012 two-tower AlexNet with the paper's recipe.",
        argument_default=argparse.SUPPRESS)
    for f in _flag_fields():
        default = f.default
        choices = f.metadata.get("choices")
        help_ = f.metadata["help"] + (f" One of: {', '.join(choices)}." if choices else "")
        help_ = f"{help_} (default: {default})".replace("%", "%%")
        if isinstance(default, bool):
            p.add_argument(flag_name(f.name), action="store_true", help=help_)
            if f.name == "ten_crop":
                p.add_argument("--no-ten-crop", dest="ten_crop", action="store_false",
                               help="skip the final ten-crop evaluation")
            elif f.name in NEGATABLE:
                p.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name,
                               action="store_false", help=f"the opposite of {flag_name(f.name)}")
        elif f.name == "resume":
            p.add_argument("--resume", nargs="?", const="auto", metavar="PATH", help=help_)
        elif _kind(f) in (int, float):
            p.add_argument(flag_name(f.name), action=Number, kind=_kind(f),
                           metavar=f.name.upper(), help=help_, **_bounds(f))
        else:
            metavar = "{" + ",".join(choices) + "}" if choices else \
                "{" + ",".join(SCHEDULES) + "}" if f.name == "lr_schedule" else f.name.upper()
            p.add_argument(flag_name(f.name), metavar=metavar, help=help_)
    return p


def load_toml(path: str) -> dict[str, Any]:
    if tomllib is None:  # pragma: no cover - Python 3.10 without tomli
        raise UsageError("--config needs Python 3.11+ or 'pip install tomli'")
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"config file {path} is not UTF-8 text (byte {e.start}); TOML files "
                         "are UTF-8") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"config file {path} is not valid TOML: {e}") from None
    known = {f.name for f in _flag_fields()}
    out = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in known:
            raise UsageError(f"config file {path}: unknown setting {key!r}")
        out[name] = value
    return _check_settings(out, where=f"config file {path}: ")


def parse_config(argv: Sequence[str] | None = None, *,
                 base: dict[str, Any] | None = None) -> TrainConfig:
    """defaults <- recipe <- demo preset <- fine-tuning preset <- ``base`` (flat settings of a
    calling tool) <- TOML file <- command line, validated. The recipe is the one named last in
    that order; a preset applies when its switch (``demo``, ``finetune``) is set anywhere."""
    parser = build_parser()
    try:
        ns = vars(parser.parse_args(argv))
    except SystemExit as e:  # argparse already printed one line of usage error
        if e.code not in (0, None):
            raise SystemExit(2) from None
        raise
    base = dict(base or {})
    from_file = load_toml(ns["config"]) if ns.get("config") else {}
    recipe = ns.get("recipe", from_file.get("recipe", base.get("recipe", "paper")))
    values: dict[str, Any] = recipe_settings(_check_settings({"recipe": recipe})["recipe"])
    for name, preset in PRESETS.items():  # --demo, then --finetune
        if ns.get(name, from_file.get(name, base.get(name, False))):
            values.update({k: v for k, (v, _) in preset.items()})
    values.update(base)
    values.update(from_file)
    values.update(ns)
    return TrainConfig.from_flat(values).validate()


def describe_preset(preset: dict[str, tuple[Any, str]] | None = None,
                    cfg: "TrainConfig | None" = None) -> str:
    """One line per setting of ``preset`` (default: the demo's) with its reason; with ``cfg``,
    a setting that the command line (or a file) overrode says so."""
    lines = []
    for k, (v, why) in (DEMO_PRESET if preset is None else preset).items():
        used = None if cfg is None else cfg.to_dict()[k]
        note = f" [overridden: {_format(used)}]" if cfg is not None and used != v else ""
        lines.append(f"  {flag_name(k)} {_format(v)}: {why}{note}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(describe_preset(), file=sys.stderr)
