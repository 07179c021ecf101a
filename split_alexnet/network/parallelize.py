"""How a built network runs on its devices: :func:`parallelize` (placement, channels_last,
DDP, compile, always in that order), :func:`unwrap`, and the autocast helpers.

The fast paths are all off by default: the faithful path is fp32 eager, contiguous (NCHW)
tensors. What each one was measured to give is in docs/benchmarks.md; the trainer exposes
them as ``--channels-last``, ``--amp off|bf16|fp16``, ``--compile`` and ``--cudnn-benchmark``.

* ``channels_last``: conv weights (and the inputs, via :func:`to_input_format`) in NHWC. The
  function is the same; CPU results agree within float rounding (tests/test_bench.py).
* autocast: convolutions and matmuls in bf16/fp16 with fp32 weights and fp32 optimizer;
  LRN accumulates in fp32 (``lrn.py``). fp16 on CUDA needs a :func:`grad_scaler`.
* ``compile``: ``nn.Module.compile()``, in place: the module stays itself (same parameters,
  same state-dict keys), only its calls run compiled. The split model records its traffic in
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
from torch.nn.parallel import DistributedDataParallel

from split_alexnet.network.placement import place

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


def parallelize(model: nn.Module, devices: Sequence[str | torch.device] | str, *,
                channels_last: bool = False, ddp: bool = False, compile: bool = False,
                cudnn_benchmark: bool | None = None, compile_kwargs: dict | None = None,
                ddp_group=None) -> nn.Module:
    """Make ``model`` ready to run on ``devices``, always in this order, and return it:

    1. placement: :func:`placement.place` (nothing moves if ``build_model`` placed it);
    2. channels_last: 4-D weights to NHWC, in place (devices are kept);
    3. DDP (``ddp``, under torchrun): ``DistributedDataParallel(model, device_ids=None)``, as
       the PyTorch docs require for a module that spans devices; the input goes to tower 0's
       device, the logits come back there (fc8 lives with tower 0). ``ddp_group``: the
       processes it all-reduces among (default: all; --parallel towers: those holding the
       same tower, the mesh's data dimension). The gradients are views of DDP's all-reduce
       buckets (``gradient_as_bucket_view``): the same values, without a second copy of the
       61 M gradients or the copy between the two at every step;
    4. compile: ``nn.Module.compile()`` of the result, in place (under DDP the wrapper is
       compiled, so the module inside runs eager wherever it is called without DDP).

    ``cudnn_benchmark`` is a global switch, set first. Build the optimizer afterwards, on
    ``unwrap(result)``: the parameters are the same tensors."""
    if cudnn_benchmark is not None:
        torch.backends.cudnn.benchmark = bool(cudnn_benchmark)
    model = place(model, devices)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if ddp:
        model = DistributedDataParallel(model, device_ids=None, process_group=ddp_group,
                                        gradient_as_bucket_view=True)
    if compile:
        model.compile(**(compile_kwargs or {}))
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside :func:`parallelize`'s result: DDP's ``.module``, else ``model``
    itself (compiling is in place, so there is no compile wrapper to remove)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


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
