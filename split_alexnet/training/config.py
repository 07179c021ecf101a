"""The training run's settings: typed sections (the network, data, optimizer, schedule,
fine-tuning, runtime, checkpointing, logging), each field carrying its own rules.

Every field is a flag of the same name, flat on the command line (``batch_size`` is
``--batch-size`` whatever its section) and in a TOML file either flat or under its section's
table (``[optim] lr = 0.02``: ``training/options.py``). A field's metadata holds everything
about it, so nothing is kept in a list beside it:

* ``help``, ``choices`` and the numeric range (``min``, ``max``, ``above``, ``below``:
  ``utils.flags``), which ``--help``, the command line, TOML files and the checks below share;
* ``run``: True when the setting defines the run, so that a resume must give the run's value
  (``runfolder.check_same_run``); False for a setting a resume may change (where the data
  is, devices, logging). The network's fields (:class:`ModelConfig`) all define the run;
* a bool field whose default is True gets a ``--no-NAME`` flag as well (from its default).

A :class:`TrainConfig` is checked once, when it is made (``__post_init__``: every value, then
the rules between settings), and never changed afterwards: variants are new configs
(:meth:`TrainConfig.with_settings`). The network's class count is not a setting: the trainer
resolves it once from the data (:meth:`TrainConfig.with_classes`). Adding a setting is one
field in its section (and its line in docs/training.md); the flag, its TOML key, its checks,
its place in checkpoints and the resume rule follow from the field.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterator, Sequence

from split_alexnet.data.dataset import PCA_MODES
from split_alexnet.network.model import TOWER_LAYERS, WEIGHT_LAYERS, ModelConfig, layers_through
from split_alexnet.network.parallelize import AMP_CHOICES
from split_alexnet.network.placement import DEVICE_HELP
from split_alexnet.network.hybrid import HYBRID_SCHEDULES
from split_alexnet.training.distributed import BACKENDS, PARALLEL
from split_alexnet.training.optim import FC_UPDATES, LR_BATCH_RULES, OPTIMIZERS, parse_schedule
from split_alexnet.utils.cli import UsageError
from split_alexnet.utils.flags import BOUNDS, WORKERS, check_number, layer_names

PROG = "split_alexnet.train"

#: The largest --seed: it and the seeds derived from it stay within 63 bits.
MAX_SEED = 2 ** 62
#: torch.finfo(torch.float32).max: the update rule's scalars (lr, lr * weight decay) are
#: float32 inside the kernels, and a larger one cannot be converted.
FLOAT32_MAX = 3.4028234663852886e38
#: The named recipes (``training/recipes.py``), ``paper`` first: the default.
RECIPE_NAMES = ("paper", "bvlc")


def setting(default: Any, help: str, *, run: bool, choices: Sequence[str] | None = None,
            **bounds: Any) -> Any:
    """A field with its flag's help text, whether it defines the run (``run``), its allowed
    values and its numeric range (``min``, ``max``, ``above``, ``below``) as metadata."""
    unknown = set(bounds) - set(BOUNDS)
    if unknown:
        raise TypeError(f"unknown bounds {sorted(unknown)}")
    return field(default=default, metadata={"help": help, "run": run, "choices": choices,
                                            **bounds})


# ----------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class DataSettings:
    """Where the images are and how they are read and augmented."""

    data: str | None = setting(None, "Dataset root with train/<class>/ and val/<class>/ "
                                     "(prepared or not).", run=False)
    pca: str = setting("paper", "PCA colour noise: 'paper' (alpha_i * lambda_i, lambda of "
                                "[0,1]-scaled RGB), 'paper-255' (lambda of 0-255 RGB, "
                                "literally: drowns the image), 'sqrt' (Krizhevsky's code), "
                                "'off'.", run=True, choices=PCA_MODES)
    holdout: int = setting(0, "Hold out this many training images per class (chosen from "
                              "--seed); their centre-crop error drives the plateau schedule "
                              "and best.pt, and val drives nothing (0: val drives them, the "
                              "paper).", run=True, min=0)
    workers: int = setting(4, "DataLoader worker processes per training process.", run=False,
                           **WORKERS)
    strict: bool = setting(False, "Unreadable images are fatal instead of skipped and counted.",
                           run=False)


@dataclass(frozen=True)
class OptimSettings:
    """The update rule and the batch it sees."""

    optimizer: str = setting("paper", "'paper' (lr inside the velocity, section 5) or 'torch' "
                                      "(torch.optim.SGD).", run=True, choices=OPTIMIZERS)
    lr: float = setting(0.01, "Initial learning rate (the paper: 0.01, the same for every "
                              "layer).", run=True, above=0, max=FLOAT32_MAX)
    momentum: float = setting(0.9, "Momentum of the paper's update rule.", run=True, min=0,
                              below=1)
    weight_decay: float = setting(5e-4, "Weight decay of the paper's update rule (inside the "
                                        "velocity, times lr).", run=True, min=0,
                                  max=FLOAT32_MAX)
    bias_lr_mult: float = setting(1.0, "The biases' learning rate is this times the weights' "
                                       "(the paper: 1; Caffe and cuda-convnet: 2).", run=True,
                                  min=0, max=FLOAT32_MAX)
    bias_decay: bool = setting(True, "Weight decay on the biases too (the paper); "
                                     "--no-bias-decay: none (Caffe, cuda-convnet).", run=True)
    batch_size: int = setting(128, "Images per optimizer step (the paper: 128). Global under "
                                   "torchrun unless --per-process-batch.", run=True, min=1)
    per_process_batch: bool = setting(False, "Under torchrun: --batch-size is per process "
                                             "instead of global.", run=True)
    lr_batch_rule: str = setting("off", "Each layer's lr times sqrt(k) ('sqrt', Krizhevsky 2014) "
                                        "or k ('linear', Goyal et al. 2017) for a batch k times "
                                        "--lr-batch-reference; 'off' (docs/scaling.md).",
                                 run=True, choices=LR_BATCH_RULES)
    lr_batch_reference: int = setting(128, "The batch --lr is meant for under --lr-batch-rule "
                                           "(the paper: 128).", run=True, min=1)


@dataclass(frozen=True)
class ScheduleSettings:
    """How long the run trains, how its learning rate falls, and when it evaluates."""

    epochs: int = setting(90, "Passes over the training set (the paper: about 90).",
                          run=False, min=1)
    max_steps: int | None = setting(None, "Stop after this many optimizer steps in total "
                                          "(smoke runs); a checkpoint is saved.", run=False,
                                    min=1)
    lr_schedule: str = setting("plateau", "'plateau': divide by 10 when val error stops "
                                          "improving (the paper); 'step:N': every N epochs; "
                                          "'step-iters:N': every N steps.", run=True)
    plateau_patience: int = setting(1, "Epochs without a new best val top-1 error before the "
                                       "plateau schedule divides the rate (epochs, also with "
                                       "--eval-every N: each evaluation counts N).", run=True,
                                    min=0)
    lr_drops: int = setting(3, "At most this many divisions by 10 (the paper: three).",
                            run=True, min=0)
    plateau_min_epochs: int = setting(0, "The plateau schedule keeps each rate at least this "
                                         "many epochs before it divides it (0: no minimum).",
                                      run=True, min=0)
    plateau_threshold: float = setting(0.0, "The plateau schedule counts an error as an "
                                            "improvement only below best * (1 - this) (0: any "
                                            "decrease, the paper).", run=True, min=0, below=1)
    eval_every: int = setting(1, "Evaluate the centre crop every this many epochs.", run=False,
                              min=1)
    ten_crop: bool = setting(True, "At the end, evaluate with ten crops and averaged softmax "
                                   "(the paper); --no-ten-crop skips it.", run=False)


@dataclass(frozen=True)
class FineTuneSettings:
    """Starting from another checkpoint's weights (training/finetune.py, docs/pretrained.md)."""

    init_from: str | None = setting(
        None, "Start from this checkpoint's weights (one written by train, of either layout, "
              "or by split_alexnet.convert): every layer is loaded, fc8 is re-initialised "
              "unless the classes are the same. Read only when a run starts, not on "
              "--resume.", run=True)
    reinit: str | None = setting(
        None, f"With --init-from: layers to re-initialise by --init instead of loading them, a "
              f"comma list of {', '.join(WEIGHT_LAYERS)}.", run=True)
    freeze_through: str | None = setting(
        None, f"Keep this layer and every earlier one fixed (one of {', '.join(TOWER_LAYERS)}): "
              "no gradient, no update, no weight decay, no momentum.", run=True)
    lr_mult_new: float = setting(
        1.0, "With --init-from: learning-rate multiplier of the re-initialised layers, weights "
             "and biases (Caffe's lr_mult).", run=True, min=0, max=FLOAT32_MAX)

    @property
    def reinit_layers(self) -> tuple[str, ...]:
        """--reinit as layer names, in network order."""
        return layer_names(self.reinit, "--reinit", WEIGHT_LAYERS)

    @property
    def frozen_layers(self) -> tuple[str, ...]:
        """--freeze-through LAYER: LAYER and every layer before it."""
        return () if self.freeze_through is None else layers_through(self.freeze_through)


@dataclass(frozen=True)
class RuntimeSettings:
    """Where and how fast the run computes: devices, processes, seeds, fast paths."""

    gpus: str | None = setting(None, DEVICE_HELP["gpus"], run=False)
    devices: str | None = setting(None, DEVICE_HELP["devices"], run=False)
    single_device: bool = setting(False, DEVICE_HELP["single_device"], run=False)
    parallel: str = setting("pair", "Under torchrun: 'pair' (both towers in each process, DDP "
                                    "across processes), 'towers' (a process per tower, DDP "
                                    "across pairs) or 'hybrid' (Krizhevsky 2014: convolutions "
                                    "data-parallel, fc6-fc8 split; docs/scaling.md).",
                            run=False, choices=PARALLEL)
    hybrid_schedule: str = setting("gather", "--parallel hybrid: fc6-fc8 on all K*b images at "
                                             "once ('gather') or on each process's b in turn "
                                             "('sequential', K passes).", run=False,
                                   choices=HYBRID_SCHEDULES)
    fc_updates: str = setting("once", "fc6-fc8 update once per step ('once') or after each "
                                      "pass of the sequential hybrid ('each'; cuda-convnet2's "
                                      "updatePeriod K or 1).", run=True, choices=FC_UPDATES)
    backend: str = setting("auto", "Under torchrun: the torch.distributed backend, 'auto' "
                                   "(nccl when every device is a GPU, gloo otherwise), 'nccl' "
                                   "or 'gloo'.", run=False, choices=BACKENDS)
    seed: int = setting(0, "Seeds the weights, the dropout masks, the data order and every "
                           "augmentation.", run=True, min=0, max=MAX_SEED)
    channels_last: bool = setting(False, "Fast path: NHWC weights and inputs (the same "
                                         "function; docs/benchmarks.md).", run=False)
    amp: str = setting("off", "Autocast: 'off' (fp32, the faithful default), 'bf16' or 'fp16' "
                              "(with a GradScaler on CUDA).", run=False, choices=AMP_CHOICES)
    compile: bool = setting(False, "Fast path: nn.Module.compile() (compiles on the first "
                                   "steps; docs/benchmarks.md). Checkpoints hold the same "
                                   "weights; evaluation runs compiled in one process and "
                                   "eager under torchrun.", run=False)
    cudnn_benchmark: bool = setting(False, "Fast path: let cuDNN time its algorithms per "
                                           "shape (CUDA; not bitwise reproducible).", run=False)


@dataclass(frozen=True)
class CheckpointSettings:
    """The run folder and what is saved into it."""

    out: str = setting("runs/alexnet", "Run folder: checkpoints, metrics.jsonl, curves.png, "
                                       "config.json.", run=False)
    checkpoint_minutes: float = setting(30.0, "Also save OUT/last.pt every this many minutes "
                                              "inside an epoch (0: after every step).",
                                        run=False, min=0)
    keep_last: int = setting(1, "Keep the last K epoch checkpoints (OUT/epoch_NNN.pt) besides "
                                "last.pt and best.pt (0: keep them all); the newest is the "
                                "fallback of --resume when last.pt is damaged.", run=False,
                             min=0)


@dataclass(frozen=True)
class LoggingSettings:
    """What the run reports while it trains."""

    log_interval: int = setting(20, "Steps between lines of progress and metrics.jsonl "
                                    "records (the loss is read from the device only then).",
                                run=False, min=1)
    watchdog_steps: int = setting(500, "After this many steps, warn once if the training loss "
                                       "is still at chance, ln(classes) "
                                       "(docs/experiments.md); 0 disables.", run=False, min=0)
    tensorboard: bool = setting(False, "Also write the training records as TensorBoard events "
                                       "in OUT/tensorboard (needs the tensorboard package: the "
                                       "'tensorboard' extra).", run=False)
    stop_on_divergence: bool = setting(False, "Stop the run (exit 1, nothing saved after the "
                                              "last good checkpoint) when a log window's mean "
                                              "training loss exceeds 3 x ln(classes); without "
                                              "it one warning line. A non-finite loss or weight "
                                              "always stops the run.", run=False)


#: The sections of :class:`TrainConfig`, by attribute name, in --help order.
SECTIONS: dict[str, type] = {
    "model": ModelConfig, "data": DataSettings, "optim": OptimSettings,
    "schedule": ScheduleSettings, "finetune": FineTuneSettings, "runtime": RuntimeSettings,
    "checkpoint": CheckpointSettings, "logging": LoggingSettings}


def _is_flag(section: str, f: dataclasses.Field) -> bool:
    """Every field is a flag except the network's class count (the data decides it)."""
    return not (section == "model" and f.name == "num_classes")


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run, in sections; checked when made. Build it from flags
    with ``training.options.parse_config``, from flat settings with :meth:`from_flat`, or
    directly from sections; :meth:`with_settings` gives variants."""

    recipe: str = setting("paper", "A named recipe, every setting with its source: 'paper' "
                                   "(as printed, the defaults) or 'bvlc' (Caffe's "
                                   "bvlc_alexnet); flags, TOML and --demo win over it.",
                          run=True, choices=RECIPE_NAMES)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataSettings = field(default_factory=DataSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    finetune: FineTuneSettings = field(default_factory=FineTuneSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)

    def __post_init__(self) -> None:
        for name, value in self.to_dict().items():
            check_value(name, value)
        o = self.optim
        if o.lr * o.weight_decay > FLOAT32_MAX:
            raise UsageError(f"--lr times --weight-decay is {o.lr * o.weight_decay:.3g}, "
                             f"beyond float32 (at most {FLOAT32_MAX:.3g})")
        try:
            parse_schedule(self.schedule.lr_schedule)
        except ValueError as e:
            raise UsageError(str(e)) from None
        rt = self.runtime
        if rt.gpus is not None and rt.devices is not None:
            raise UsageError("give --gpus or --devices, not both")
        if rt.fc_updates == "each" and (rt.parallel, rt.hybrid_schedule) != ("hybrid",
                                                                             "sequential"):
            raise UsageError("--fc-updates each needs --parallel hybrid --hybrid-schedule "
                             "sequential (the K passes it updates after)")
        check_fine_tuning(self.finetune)

    # ---------------------------------------------------------------- flat views
    @classmethod
    def from_flat(cls, values: dict[str, Any], base: "TrainConfig | None" = None) \
            -> "TrainConfig":
        """A config from flat settings (flag names with underscores, as :meth:`to_dict` gives
        them) over ``base`` (default: the defaults), checked. An unknown name, a value of the
        wrong type, outside a flag's range or choices is a :class:`UsageError`."""
        base = base or cls()
        values = {k: check_value(k, v) for k, v in values.items()}
        top = {k: v for k, v in values.items() if FLAGS[k][0] is None}
        try:
            parts = {s: replace(getattr(base, s), **{k: v for k, v in values.items()
                                                      if FLAGS[k][0] == s})
                     for s in SECTIONS}
        except ValueError as e:  # ModelConfig's own checks, e.g. the dropout range
            raise UsageError(f"--{e}") from None
        return replace(base, **top, **parts)

    def with_settings(self, **settings: Any) -> "TrainConfig":
        """This config with some flat settings changed (``activation="tanh"``), checked."""
        return TrainConfig.from_flat(settings, base=self)

    def with_classes(self, num_classes: int) -> "TrainConfig":
        """This config with the network's class count, which the data decides."""
        return replace(self, model=replace(self.model, num_classes=num_classes))

    def to_dict(self, *, with_model: bool = True) -> dict[str, Any]:
        """Every setting, flat, by flag name (config.json), without the class count; without
        the network's settings unless ``with_model`` (a checkpoint keeps those, class count
        included, once: in its ``model_config``)."""
        return {name: value for name, (section, _, value) in self._flat()
                if with_model or section != "model"}

    def run_settings(self) -> dict[str, Any]:
        """The settings that define the run (metadata ``run``), flat."""
        return {name: value for name, (_, f, value) in self._flat()
                if f.metadata.get("run", True)}

    def _flat(self) -> Iterator[tuple[str, tuple[str | None, dataclasses.Field, Any]]]:
        for name, (section, f) in FLAGS.items():
            owner = self if section is None else getattr(self, section)
            yield name, (section, f, getattr(owner, f.name))

    def to_argv(self, *, leave_out: Sequence[str] = ()) -> list[str]:
        """The flags that give this config: every setting that differs from the default
        (except those in ``leave_out``), as ``python -m split_alexnet.train`` takes them."""
        default = TrainConfig().to_dict()
        return to_flags({k: v for k, v in self.to_dict().items()
                         if k not in leave_out and v != default[k]})


def _flag_fields() -> dict[str, tuple[str | None, dataclasses.Field]]:
    """Every flag's (section, field), in --help order: TrainConfig's own fields, then each
    section's."""
    out: dict[str, tuple[str | None, dataclasses.Field]] = {}
    for f in fields(TrainConfig):
        if f.name in SECTIONS:
            for g in fields(SECTIONS[f.name]):
                if _is_flag(f.name, g):
                    if g.name in out:  # flags are flat: a name belongs to one section
                        raise TypeError(f"setting {g.name!r} is in two sections")
                    out[g.name] = (f.name, g)
        else:
            out[f.name] = (None, f)
    return out


#: flag name (underscores) -> (its section, or None for TrainConfig's own; its field).
FLAGS: dict[str, tuple[str | None, dataclasses.Field]] = _flag_fields()


def kind(f: dataclasses.Field) -> type:
    """A setting's value type: int, float, bool or str (its annotation without ``None``)."""
    return _KINDS[f.name]


def _kinds() -> dict[str, type]:
    out = {}
    for section, cls in ((None, TrainConfig), *SECTIONS.items()):
        for name, hint in typing.get_type_hints(cls).items():
            args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
            if name in FLAGS and FLAGS[name][0] == section:
                out[name] = args[0] if args[0] in (int, float, bool) else str
    return out


_KINDS: dict[str, type] = _kinds()


def bounds(f: dataclasses.Field) -> dict[str, Any]:
    return {k: f.metadata[k] for k in BOUNDS if k in f.metadata}


def check_value(name: str, value: Any, where: str = "") -> Any:
    """``value`` for setting ``name``, checked (a float where a float is due: an int 1 is
    1.0): the wrong type, not finite, out of the field's range, not one of its choices, or
    an empty string or one holding a NUL (a path that would be the current folder, or that
    no system call takes) is a :class:`UsageError` that names ``--flag`` (or the TOML key
    after ``where``). None passes where the field's default is None."""
    if name not in FLAGS:
        raise UsageError(f"{where or ''}unknown setting {name!r}")
    _, f = FLAGS[name]
    label = where + name.replace("_", "-") if where else flag_name(name)
    k, allowed = kind(f), f.metadata.get("choices")
    if value is None and f.default is None:
        return value
    if name == "init" and value is None:  # in code only: built without initialising
        return value
    if k in (int, float):
        return check_number(label, value, k, **bounds(f))
    if not isinstance(value, k):
        raise UsageError(f"{label} must be {'true or false' if k is bool else 'a string'}, "
                         f"got {value!r}")
    if k is str and (not value or "\0" in value):  # "" would mean the current folder
        raise UsageError(f"{label} must be a non-empty string without NUL characters, got "
                         f"{value!r}")
    if allowed and value not in allowed:
        raise UsageError(f"{label} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def negatable(name: str) -> bool:
    """A switch that is on by default has a ``--no-NAME`` flag."""
    f = FLAGS[name][1]
    return kind(f) is bool and f.default is True


def to_flags(settings: dict[str, Any]) -> list[str]:
    """Flat settings as command-line flags: ``{"activation": "tanh"}`` -> ``--activation
    tanh``; a True switch is a bare flag, a False one of a switch that is on by default is
    ``--no-NAME``."""
    argv: list[str] = []
    for name, value in settings.items():
        if name in FLAGS and negatable(name):
            argv.append(flag_name(name) if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, bool):
            argv += [flag_name(name)] if value else []
        else:
            argv += [flag_name(name), format_value(value)]
    return argv


def format_value(value: Any) -> str:
    """A setting's value as a flag or a message shows it (``1e-05``, not ``1.0000e-05``)."""
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    return str(value)


def check_fine_tuning(ft: FineTuneSettings) -> None:
    """The fine-tuning settings: known layer names, no frozen layer re-initialised, and
    --init-from wherever a setting needs a source checkpoint."""
    reinit = ft.reinit_layers
    if ft.freeze_through is not None:
        layer_names(ft.freeze_through, "--freeze-through", TOWER_LAYERS)
        if "," in ft.freeze_through:
            raise UsageError(f"--freeze-through takes one layer name, got {ft.freeze_through!r}")
        both = [n for n in reinit if n in ft.frozen_layers]
        if both:
            raise UsageError(f"--reinit {','.join(both)} and --freeze-through "
                             f"{ft.freeze_through}: a re-initialised layer that is frozen "
                             "never learns")
    needs = [flag for flag, on in (("--reinit", ft.reinit is not None),
                                   ("--lr-mult-new", ft.lr_mult_new != 1.0)) if on]
    if needs and ft.init_from is None:
        raise UsageError(f"{' and '.join(needs)} need(s) --init-from CKPT, the checkpoint to "
                         "start from")
