"""Optional fast paths: channels_last, autocast (bf16/fp16), torch.compile, cudnn.benchmark.

All are off by default: the faithful path is fp32 eager, contiguous (NCHW) tensors. What each
one was measured to give is in docs/benchmarks.md; the trainer exposes them as
``--channels-last``, ``--amp off|bf16|fp16``, ``--compile`` and ``--cudnn-benchmark``.

* ``channels_last``: conv weights (and the inputs, via :func:`to_input_format`) in NHWC. The
  function is the same; CPU results agree within float rounding (tests/test_bench.py).
* autocast: convolutions and matmuls in bf16/fp16 with fp32 weights and fp32 optimizer;
  LRN accumulates in fp32 (``lrn.py``). fp16 on CUDA needs a :func:`grad_scaler`.
* ``compile``: ``torch.compile`` of the whole model. The split model records its traffic in
  Python, which Dynamo handles with graph breaks at the four transfers; a tower pair across
  two devices compiles as several graphs.
* ``cudnn_benchmark``: let cuDNN time its algorithms for each new shape (CUDA only; fixed
  shapes, so it pays off after the first step). ``None`` leaves the global setting alone.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Sequence

import torch
from torch import nn

AMP_CHOICES = ("off", "bf16", "fp16")
_AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(amp: str | torch.dtype | None) -> torch.dtype | None:
    """'off' | 'bf16' | 'fp16' (or a dtype, or None) -> the autocast dtype, or None for fp32."""
    if amp is None or isinstance(amp, torch.dtype):
        return amp
    try:
        return _AMP_DTYPES[str(amp)]
    except KeyError:
        raise ValueError(f"amp must be one of {', '.join(AMP_CHOICES)}; got {amp!r}") from None


def model_devices(model: nn.Module) -> list[torch.device]:
    """The distinct devices of ``model``'s parameters, in order of first appearance."""
    seen: list[torch.device] = []
    for p in model.parameters():
        if p.device not in seen:
            seen.append(p.device)
    return seen or [torch.device("cpu")]


def apply_fast_paths(model: nn.Module, *, channels_last: bool = False, compile: bool = False,
                     cudnn_benchmark: bool | None = None, compile_kwargs: dict | None = None
                     ) -> nn.Module:
    """Apply the chosen fast paths to ``model`` and return it (or its compiled wrapper).

    Call after placement and before building the optimizer (parameters keep their identity,
    so building it after is not required, only tidy). ``channels_last`` converts the 4-D
    weights in place (devices are kept). ``compile`` returns ``torch.compile(model)``; the
    original module stays reachable as ``._orig_mod`` and shares its parameters."""
    if cudnn_benchmark is not None:
        torch.backends.cudnn.benchmark = bool(cudnn_benchmark)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        model = torch.compile(model, **(compile_kwargs or {}))
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The module under a torch.compile (and/or DDP) wrapper."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def to_input_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """The input batch in the memory format the model was converted to."""
    if channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def autocast_context(device: torch.device | str | Sequence[torch.device | str] | None,
                     dtype: torch.dtype | str | None):
    """A context manager running the forward (and loss) under autocast with ``dtype`` on every
    device type in ``device`` (one device or several: a split model may use cuda and cpu).
    ``dtype`` None / 'off' gives a no-op context: the faithful fp32 path."""
    dtype = amp_dtype(dtype)
    if dtype is None or device is None:
        return contextlib.nullcontext()
    devices: Iterable = [device] if isinstance(device, (str, torch.device)) else device
    types = list(dict.fromkeys(torch.device(d).type for d in devices))
    stack = contextlib.ExitStack()
    for t in types:
        stack.enter_context(torch.autocast(device_type=t, dtype=dtype))
    return stack


def grad_scaler(device: torch.device | str, dtype: torch.dtype | str | None):
    """A GradScaler, enabled only for fp16 on CUDA (bf16 has fp32's range and needs none)."""
    dev = torch.device(device)
    enabled = amp_dtype(dtype) == torch.float16 and dev.type == "cuda"
    return torch.amp.GradScaler(dev.type if dev.type == "cuda" else "cpu", enabled=enabled)
