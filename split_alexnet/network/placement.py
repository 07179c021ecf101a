"""Where the networks live: the device flags, their checks, and putting a network there.

``model.py`` never names a device: every network is built on the CPU. Every tool, and every
process under torchrun, gets its devices from :func:`resolve_devices` (the flags ``--gpus``,
``--devices`` and ``--single-device``, which :func:`add_device_flags` adds to a tool's
parser), and :func:`place` / :func:`build_model` put a network on them. Bad flags are refused
up front with one readable line.
"""

from __future__ import annotations

import argparse
from typing import Sequence

import torch
from torch import nn

from split_alexnet.network.model import AlexNet, HalfAlexNet, ModelConfig, SplitAlexNet
from split_alexnet.utils.cli import UsageError

LAYOUTS = ("split", "collapsed")

#: What no device flag means, per tool (the ``default`` of :func:`resolve_devices`).
DEVICE_DEFAULTS = {
    "paper": "GPUs 0 and 1, or an error that says what to type (train, evaluate)",
    "cpu": "both towers on the CPU (the demo, summary)",
    "fit": "two GPUs, else both towers on the one GPU, else on the CPU (bench)",
    "collapse": "two GPUs, else the collapsed layout on the one GPU or the CPU (predict, "
                "visualize)",
}

#: The help of the three device flags: the trainer's config and every tool show these.
DEVICE_HELP = {
    "gpus": "GPU indices for the two towers, e.g. '0,1' (the paper) or '0,0' (both on one "
            "GPU); under torchrun the node's GPUs, a pair per process (e.g. '0,1,2,3').",
    "devices": "Any two torch devices for the towers, e.g. 'cpu,cpu' or 'cuda:0,cpu'.",
    "single_device": "The collapsed layout (grouped convolutions) on the first device, or on "
                     "GPU 0, or on the CPU.",
}


# ----------------------------------------------------------------------------- parsing


def parse_device(spec: str | torch.device) -> torch.device:
    """Parse one device string, with a readable error for nonsense or missing hardware."""
    if isinstance(spec, torch.device):
        dev = spec
    else:
        text = str(spec).strip()
        if text.isdigit():  # a bare GPU index, as in --gpus 0,1
            text = f"cuda:{text}"
        try:
            dev = torch.device(text)
        except (RuntimeError, ValueError):
            raise ValueError(f"unknown device {spec!r}: use e.g. cpu, cuda:0, cuda:1") from None
    if dev.type == "cuda":
        index = 0 if dev.index is None else dev.index
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if index >= count:
            have = "no CUDA device" if count == 0 else f"only {count} CUDA device(s)"
            raise ValueError(f"device {dev} requested but this machine has {have}")
        dev = torch.device("cuda", index)
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise ValueError(f"unsupported device {spec!r}: use cpu or cuda:N")
    return dev


def _split(spec: str) -> list[str]:
    return [s.strip() for s in spec.split(",") if s.strip()]


def parse_devices(devices: Sequence[str | torch.device] | str) -> tuple[torch.device, torch.device]:
    """Two devices, one per tower. Accepts a sequence or a comma-separated string."""
    devices = _split(devices) if isinstance(devices, str) else list(devices)
    if len(devices) != 2:
        raise ValueError(
            f"SplitAlexNet needs exactly two devices, one per tower (got {len(devices)}: "
            f"{', '.join(map(str, devices)) or 'none'}); name one device twice to put both "
            "towers on it, e.g. cpu,cpu or cuda:0,cuda:0")
    d0, d1 = (parse_device(d) for d in devices)
    return d0, d1


def first_device(devices: Sequence[str | torch.device] | str | torch.device) -> torch.device:
    """The first of one or more devices (the single-device layouts live there)."""
    if isinstance(devices, torch.device):
        return parse_device(devices)
    devices = _split(devices) if isinstance(devices, str) else list(devices)
    if not devices:
        raise ValueError("no device given")
    return parse_device(devices[0])


# ----------------------------------------------------------------------------- resolving


def resolve_devices(gpus: str | None = None, devices: str | None = None,
                    single_device: bool = False, *, default: str = "paper",
                    torchrun: tuple[int, int] | None = None) -> tuple[torch.device, ...]:
    """The devices of one process, from the device flags: two (one per tower), or one for the
    single-device layouts. Errors are :class:`UsageError` lines that say what to type.

    ``--devices`` names the devices, ``--gpus`` gives GPU indices; with neither, ``default``
    (a key of :data:`DEVICE_DEFAULTS`) decides. Under torchrun, ``torchrun`` is (local rank,
    processes on this node): ``--devices`` is the same in every process (so only the CPU may
    be shared by several), and the node's GPUs (``--gpus``, default all visible) are dealt
    out, a pair per process or one with ``single_device``.
    """
    if default not in DEVICE_DEFAULTS:
        raise ValueError(f"default must be one of {', '.join(DEVICE_DEFAULTS)}; got {default!r}")
    try:
        if torchrun is not None:
            return _rank_devices(gpus, devices, single_device, *torchrun)
        n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if devices is not None:
            specs = _split(devices)
        elif gpus is not None:
            specs = [f"cuda:{g}" for g in _split(gpus)]
            if not all(s[5:].isdigit() for s in specs):
                raise UsageError(f"--gpus takes GPU indices such as 0,1; got {gpus!r}")
        else:
            single_device = single_device or (default == "collapse" and n_gpu < 2)
            specs = _default_specs(n_gpu, single_device, default)
        if single_device:
            return (first_device(specs),)
        if len(specs) == 1 and gpus is not None:
            raise UsageError(f"--gpus {gpus} names one GPU but the towers need two: use "
                             f"--gpus {specs[0][5:]},{specs[0][5:]} for both on one GPU, or "
                             "--single-device")
        return parse_devices(specs)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _default_specs(n_gpu: int, single_device: bool, default: str) -> list[str]:
    if single_device:
        return ["cuda:0" if n_gpu else "cpu"]
    if default == "cpu":
        return ["cpu", "cpu"]
    if n_gpu >= 2:
        return ["cuda:0", "cuda:1"]
    if default == "fit":
        return ["cuda:0", "cuda:0"] if n_gpu == 1 else ["cpu", "cpu"]
    if n_gpu == 1:
        raise UsageError("one GPU found; the paper's layout needs two: use --gpus 0,0 to put "
                         "both towers on it, or --single-device")
    raise UsageError("no GPU found: use --devices cpu,cpu to run both towers on the CPU "
                     "(slow), or --single-device for the collapsed network on the CPU")


def _rank_devices(gpus: str | None, devices: str | None, single_device: bool,
                  local_rank: int, local_world_size: int) -> tuple[torch.device, ...]:
    """This process's devices under torchrun (see :func:`resolve_devices`)."""
    if devices is not None:
        specs = _split(devices)
        devs = (first_device(specs),) if single_device else parse_devices(specs)
        if local_world_size > 1 and any(d.type != "cpu" for d in devs):
            raise UsageError(
                f"--devices {devices} would put all {local_world_size} processes of this node "
                "on the same GPUs; under torchrun use --gpus (each process takes its own pair) "
                "or --devices cpu,cpu")
        return devs
    if gpus is not None:
        ids = _split(gpus)
        if not all(i.isdigit() for i in ids):
            raise UsageError(f"--gpus takes GPU indices such as 0,1,2,3; got {gpus!r}")
        if len(set(ids)) != len(ids):
            raise UsageError(f"--gpus {gpus} names a GPU twice; under torchrun every process "
                             "needs its own GPUs")
    else:
        n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
        ids = [str(i) for i in range(n_gpu)]
    per = 1 if single_device else 2
    if not single_device and len(ids) % 2:
        raise UsageError(f"an odd number of GPUs ({len(ids)}) cannot form tower pairs; give an "
                         "even count with --gpus, or use --single-device")
    need = local_world_size * per
    if len(ids) < need:
        where = f" (--gpus {gpus})" if gpus is not None else " on this node"
        raise UsageError(
            f"{local_world_size} processes on this node need {need} GPUs "
            f"({'one' if per == 1 else 'a pair'} each) but {len(ids)} are available{where}; "
            f"start {len(ids) // per} processes per node or give more GPUs")
    mine = [f"cuda:{i}" for i in ids[local_rank * per:(local_rank + 1) * per]]
    return (first_device(mine),) if single_device else parse_devices(mine)


def tower_rank_device(gpus: str | None, devices: str | None, local_rank: int,
                      local_world_size: int, mode: str = "towers") -> torch.device:
    """--parallel towers or hybrid (``mode``): this process's one device, entry ``local_rank`` of ``--devices``
    or ``--gpus`` (one entry per process of this node), or without either the GPU of its
    local rank. A list of another length is a :class:`UsageError`."""
    try:
        if devices is not None or gpus is not None:
            specs = _split(devices) if devices is not None else \
                [f"cuda:{g}" for g in _split(gpus or "")]
            flag = "--devices" if devices is not None else "--gpus"
            if gpus is not None and not all(s[5:].isdigit() for s in specs):
                raise UsageError(f"--gpus takes GPU indices such as 0,1; got {gpus!r}")
            if len(specs) != local_world_size:
                raise UsageError(
                    f"--parallel {mode}: {flag} {devices if devices is not None else gpus} "
                    f"names {len(specs)} device(s) for the {local_world_size} processes of this "
                    f"node; give one per process (process r runs on entry r)")
            return parse_device(specs[local_rank])
        n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if local_rank >= n_gpu:
            raise UsageError(f"--parallel {mode}: process {local_rank} of this node needs GPU "
                             f"{local_rank} but {n_gpu} are visible; give --devices (e.g. "
                             f"{','.join(['cpu'] * local_world_size)})")
        return torch.device("cuda", local_rank)
    except ValueError as e:
        raise UsageError(str(e)) from None


def add_device_flags(parser: argparse.ArgumentParser, *, default: str,
                     single_device: bool = True) -> None:
    """Add ``--gpus``, ``--devices`` and (unless ``single_device`` is False) ``--single-device``
    to a tool's parser, with the trainer's help; ``default`` is the tool's
    :func:`resolve_devices` default, named in the help."""
    parser.add_argument("--gpus", help=DEVICE_HELP["gpus"])
    parser.add_argument("--devices", help=f"{DEVICE_HELP['devices']} With neither flag: "
                                          f"{DEVICE_DEFAULTS[default]}.")
    if single_device:
        parser.add_argument("--single-device", action="store_true",
                            help=DEVICE_HELP["single_device"])


# ----------------------------------------------------------------------------- placing


def place(model: nn.Module, devices: Sequence[str | torch.device] | str) -> nn.Module:
    """Put ``model`` on ``devices`` and return it: a SplitAlexNet's tower i (and its
    parameters) on ``devices[i]``, fc8 with tower 0; any other network on the first device."""
    if isinstance(model, SplitAlexNet):
        d0, d1 = parse_devices(devices)
        model.towers[0].to(d0)
        model.towers[1].to(d1)
        model.fc8.to(d0)
        return model
    return model.to(first_device(devices))


def layout_of(arch: str, single_device: bool) -> str:
    """The layout a network runs in: 'split' (two towers on two devices) for the paper's
    net, 'collapsed' (one device) with ``single_device``; ``arch`` 'half' is one column, so
    always one device. The one place this rule lives."""
    return "collapsed" if single_device or arch == "half" else "split"


def network_class(arch: str, layout: str) -> type[nn.Module]:
    """The class that computes ``arch`` in ``layout``: SplitAlexNet, AlexNet or HalfAlexNet."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    if arch == "half":
        return HalfAlexNet
    return SplitAlexNet if layout == "split" else AlexNet


def build_model(cfg: ModelConfig, layout: str,
                devices: Sequence[str | torch.device] | str) -> nn.Module:
    """The network ``cfg`` describes, initialised by ``cfg.init`` (None: not initialised), on
    ``devices``: :func:`network_class` of its arch and ``layout`` (a SplitAlexNet has one
    tower per device; the others live on the first device). Initial values are drawn on the
    CPU in the collapsed layout's order, so a seed gives the same weights in every layout and
    on every device."""
    cls = network_class(cfg.arch, layout)
    devs = parse_devices(devices) if cls is SplitAlexNet else (first_device(devices),)
    return place(cls(cfg), devs)  # devices checked before building
