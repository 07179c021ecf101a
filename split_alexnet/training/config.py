"""The training config: one typed dataclass, filled from defaults, the demo preset, a TOML
file and the command line, in that order (later wins). Saved inside every checkpoint."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, fields
from typing import Any, Sequence

import torch

from split_alexnet.utils.cli import UsageError
from split_alexnet.network.parallelize import AMP_CHOICES
from split_alexnet.training.optim import OPTIMIZERS, parse_schedule
from split_alexnet.network.model import ACTIVATIONS, INIT_SCHEMES, LRN_CHOICES, POOLS
from split_alexnet.network.placement import parse_device, parse_devices


@dataclass
class TrainConfig:
    """Every setting of a training run. Field names are the flags (``--batch-size``)."""

    data: str | None = None
    """Dataset root with train/<class>/ and val/<class>/ (prepared or not)."""
    out: str = "runs/alexnet"
    """Run folder: checkpoints, metrics.jsonl, curves.png, config.json."""
    gpus: str | None = None
    """GPU indices for the two towers, e.g. '0,1' (the paper) or '0,0' (both on one GPU)."""
    devices: str | None = None
    """Any two torch devices for the towers, e.g. 'cpu,cpu' or 'cuda:0,cpu'."""
    single_device: bool = False
    """Train the collapsed layout (grouped convolutions) on the first device, or the CPU."""
    arch: str = "alexnet"
    """'alexnet' (two towers) or 'half' (the paper's one-device ablation, section 3.2)."""
    epochs: int = 90
    """Passes over the training set (the paper: about 90)."""
    batch_size: int = 128
    """Images per optimizer step (the paper: 128). Global under torchrun unless --per-process-batch."""
    per_process_batch: bool = False
    """Under torchrun: --batch-size is per process instead of global."""
    backend: str = "auto"
    """Under torchrun: the torch.distributed backend, 'auto' (nccl when every device is a GPU,
    gloo otherwise), 'nccl' or 'gloo'."""
    lr: float = 0.01
    """Initial learning rate (the paper: 0.01, the same for every layer)."""
    momentum: float = 0.9
    """Momentum of the paper's update rule."""
    weight_decay: float = 5e-4
    """Weight decay of the paper's update rule (inside the velocity, times lr)."""
    optimizer: str = "paper"
    """'paper' (lr inside the velocity, section 5) or 'torch' (torch.optim.SGD)."""
    lr_schedule: str = "plateau"
    """'plateau': divide by 10 when val error stops improving (the paper); 'step:N': every N epochs."""
    plateau_patience: int = 1
    """Epochs without a new best val top-1 error before the plateau schedule divides the rate."""
    lr_drops: int = 3
    """At most this many divisions by 10 (the paper: three)."""
    init: str = "paper"
    """'paper' (biases 1, std 0.01), 'cuda-convnet2' (std 0.03 in conv3-5), 'caffe' (biases 0.1)."""
    lrn: str = "paper"
    """'paper' (alpha on the sum, as printed), 'alpha-over-n' (Krizhevsky's code), 'off'."""
    activation: str = "relu"
    """'relu' (the paper) or 'tanh' (Figure 1's comparison)."""
    pool: str = "3/2"
    """'3/2' overlapping (the paper) or '2/2'."""
    dropout: float = 0.5
    """Dropout on the outputs of fc6 and fc7."""
    pca: str = "paper"
    """PCA colour noise: 'paper' (alpha_i * lambda_i, lambda of [0,1]-scaled RGB), 'paper-255'
    (lambda of 0-255 RGB, literally: drowns the image), 'sqrt' (Krizhevsky's code), 'off'."""
    workers: int = 4
    """DataLoader worker processes per training process."""
    seed: int = 0
    """Seeds the weights, the dropout masks, the data order and every augmentation."""
    max_steps: int | None = None
    """Stop after this many optimizer steps in total (smoke runs); a checkpoint is saved."""
    resume: str | None = None
    """'auto' (OUT/last.pt, falling back to the newest good epoch checkpoint) or a path."""
    checkpoint_minutes: float = 30.0
    """Also save OUT/last.pt every this many minutes inside an epoch."""
    keep_last: int = 3
    """Keep the last K epoch checkpoints (OUT/epoch_NNN.pt) besides last.pt and best.pt."""
    log_interval: int = 20
    """Steps between lines of progress and metrics.jsonl records."""
    watchdog_steps: int = 500
    """After this many steps, warn once if the training loss is still at chance, ln(classes)
    (docs/experiments.md); 0 disables."""
    ten_crop: bool = True
    """At the end, evaluate with ten crops and averaged softmax (the paper)."""
    eval_every: int = 1
    """Evaluate the centre crop every this many epochs."""
    strict: bool = False
    """Unreadable images are fatal instead of skipped and counted."""
    channels_last: bool = False
    """Fast path: NHWC weights and inputs (the same function; docs/benchmarks.md)."""
    amp: str = "off"
    """Autocast: 'off' (fp32, the faithful default), 'bf16' or 'fp16' (with a GradScaler on CUDA)."""
    compile: bool = False
    """Fast path: torch.compile the model (compiles on the first steps; docs/benchmarks.md)."""
    cudnn_benchmark: bool = False
    """Fast path: let cuDNN time its algorithms per shape (CUDA; not bitwise reproducible)."""
    demo: bool = False
    """Generate the demo dataset under OUT/demo_data and train on it with the demo preset."""
    config: str | None = None
    """A TOML file with any of these fields."""

    # --------------------------------------------------------------------------------
    def validate(self) -> None:
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.epochs < 1:
            raise UsageError(f"--epochs must be at least 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise UsageError(f"--max-steps must be at least 1, got {self.max_steps}")
        if self.lr <= 0 or self.momentum < 0 or self.weight_decay < 0:
            raise UsageError("--lr must be > 0, --momentum and --weight-decay >= 0")
        if self.watchdog_steps < 0:
            raise UsageError(f"--watchdog-steps must be >= 0, got {self.watchdog_steps}")
        if self.workers < 0:
            raise UsageError(f"--workers must be >= 0, got {self.workers}")
        for name, allowed in (("arch", ("alexnet", "half")), ("optimizer", OPTIMIZERS),
                              ("init", INIT_SCHEMES), ("lrn", LRN_CHOICES),
                              ("activation", ACTIVATIONS), ("pool", POOLS),
                              ("pca", ("paper", "paper-255", "sqrt", "off")),
                              ("backend", ("auto", "nccl", "gloo")),
                              ("amp", AMP_CHOICES)):
            if getattr(self, name) not in allowed:
                raise UsageError(f"--{name.replace('_', '-')} must be one of "
                                 f"{', '.join(allowed)}; got {getattr(self, name)!r}")
        try:
            parse_schedule(self.lr_schedule)
        except ValueError as e:
            raise UsageError(str(e)) from None
        if self.gpus is not None and self.devices is not None:
            raise UsageError("give --gpus or --devices, not both")
        if self.arch == "half" and not self.single_device:
            self.single_device = True  # the ablation net is one column on one device

    @property
    def layout(self) -> str:
        return "collapsed" if self.single_device else "split"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: Recipe changes for the tiny generated demo set, each with its reason (docs/training.md).
DEMO_PRESET: dict[str, tuple[Any, str]] = {
    "init": ("caffe", "the paper's biases of 1 sit at chance for hundreds of steps on a small "
                      "set (measured, ../shared/paper.md); Caffe's 0.1 learns within ~60 steps"),
    "batch_size": (32, "a 2-core CPU trains about 40-50 images/s; 32 gives ~30 steps per epoch"),
    "epochs": (14, "the demo set is 1,000 images; 14 epochs (~440 steps) fit in under 10 "
                   "minutes on 2 cores"),
    "lr_schedule": ("step:11", "too few epochs for a plateau to show; one drop late in the run"),
    "workers": (2, "two cores"),
    "log_interval": (10, "short epochs"),
    "watchdog_steps": (150, "the demo's loss leaves chance (ln 10) within ~100 steps; a run "
                            "still there at step 150 is not learning"),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m split_alexnet.train",
        description="Train the 2012 two-tower AlexNet with the paper's recipe.",
        argument_default=argparse.SUPPRESS)
    for f in fields(TrainConfig):
        default = f.default
        help_ = f"{_FIELD_DOCS.get(f.name, '')} (default: {default})"
        if f.type in ("bool",) or isinstance(default, bool):
            p.add_argument(_flag(f.name), action="store_true", help=help_)
            if f.name == "ten_crop":
                p.add_argument("--no-ten-crop", dest="ten_crop", action="store_false",
                               help="skip the final ten-crop evaluation")
        elif f.name == "resume":
            p.add_argument("--resume", nargs="?", const="auto", metavar="PATH", help=help_)
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" |")[0], str)
            p.add_argument(_flag(f.name), type=kind, metavar=f.name.upper(), help=help_)
    return p


def _field_docs() -> dict[str, str]:
    """The attribute docstrings above, read from the source (one place to document a flag)."""
    import ast
    import inspect
    src = inspect.getsource(TrainConfig)
    tree = ast.parse(src)
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and \
                isinstance(getattr(b, "value", None), ast.Constant):
            docs[a.target.id] = " ".join(str(b.value.value).split())  # type: ignore[attr-defined]
    return docs


_FIELD_DOCS = _field_docs()


def load_toml(path: str) -> dict[str, Any]:
    try:
        import tomllib  # Python 3.11+
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise UsageError("--config needs Python 3.11+ or 'pip install tomli'") from None
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"config file {path} is not valid TOML: {e}") from None
    known = {f.name for f in fields(TrainConfig)}
    out = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in known:
            raise UsageError(f"config file {path}: unknown setting {key!r}")
        out[name] = value
    return out


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """defaults <- demo preset <- TOML file <- command line."""
    parser = build_parser()
    try:
        ns = vars(parser.parse_args(argv))
    except SystemExit as e:  # argparse already printed one line of usage error
        if e.code not in (0, None):
            raise SystemExit(2) from None
        raise
    values: dict[str, Any] = {}
    if ns.get("demo"):
        values.update({k: v for k, (v, _) in DEMO_PRESET.items()})
    if ns.get("config"):
        values.update(load_toml(ns["config"]))
    values.update(ns)
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg


def resolve_devices(cfg: TrainConfig) -> tuple[torch.device, ...]:
    """The towers' devices (two), or one device for the single-device layouts."""
    try:
        if cfg.devices is not None:
            specs = [d for d in cfg.devices.split(",") if d.strip()]
        elif cfg.gpus is not None:
            specs = [f"cuda:{g.strip()}" for g in cfg.gpus.split(",") if g.strip()]
            if not all(s[5:].isdigit() for s in specs):
                raise UsageError(f"--gpus takes GPU indices such as 0,1; got {cfg.gpus!r}")
        else:
            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if cfg.single_device:
                specs = ["cuda:0" if n else "cpu"]
            elif cfg.demo:
                specs = ["cpu", "cpu"]
            elif n >= 2:
                specs = ["cuda:0", "cuda:1"]
            elif n == 1:
                raise UsageError("one GPU found; the paper's layout needs two: use --gpus 0,0 "
                                 "to put both towers on it, or --single-device")
            else:
                raise UsageError("no GPU found: use --devices cpu,cpu to train the towers on "
                                 "the CPU (slow), or --demo for the small generated demo")
        if cfg.single_device:
            return (parse_device(specs[0]),)
        if len(specs) == 1 and cfg.gpus is not None:
            raise UsageError(f"--gpus {cfg.gpus} names one GPU but the towers need two: use "
                             f"--gpus {specs[0][5:]},{specs[0][5:]} for both on one GPU, or "
                             "--single-device")
        return parse_devices(specs)
    except ValueError as e:
        raise UsageError(str(e)) from None


def describe_preset() -> str:
    return "\n".join(f"  {_flag(k)} {v}: {why}" for k, (v, why) in DEMO_PRESET.items())


if __name__ == "__main__":  # pragma: no cover
    print(describe_preset(), file=sys.stderr)
