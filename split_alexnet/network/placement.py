"""Where the towers live: device parsing and validation, kept apart from the model's math.

The model file never names a device. It receives a pair of devices from here, and the
checks below reject bad pairs up front with a readable ``ValueError``.
"""

from __future__ import annotations

from typing import Sequence

import torch

#: The paper's layout: tower 0 on the first GPU, tower 1 on the second.
DEFAULT_DEVICES: tuple[str, str] = ("cuda:0", "cuda:1")


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


def parse_devices(devices: Sequence[str | torch.device] | str) -> tuple[torch.device, torch.device]:
    """Two devices, one per tower. Accepts a sequence or a comma-separated string."""
    if isinstance(devices, str):
        devices = [d for d in devices.split(",") if d.strip()]
    devices = list(devices)
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
    if isinstance(devices, str):
        devices = [d for d in devices.split(",") if d.strip()]
    devices = list(devices)
    if not devices:
        raise ValueError("no device given")
    return parse_device(devices[0])
