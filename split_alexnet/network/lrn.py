"""Local response normalisation as printed in the paper (section 3.3).

    b_i = a_i / (k + alpha * sum_{j=max(0, i-n/2)}^{min(N-1, i+n/2)} a_j^2) ** beta

with k=2, n=5, alpha=1e-4, beta=0.75. As printed, alpha multiplies the SUM of squares.
``torch.nn.LocalResponseNorm`` divides alpha by n (so the paper's formula would be
``LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2)``), and Krizhevsky's own cuda-convnet code
also divides by n; that reading is ``reading="alpha-over-n"`` (see docs/fidelity.md).

The window runs over channels only and is clipped at the first and last channel (no wrap).
On two towers each tower normalises its own maps, so the collapsed layout calls this once per
half, or once on both halves with ``groups=2`` (see ``model.py``). Caffe's LRN layer is
``reading="alpha-over-n"`` with ``k=1`` and one window over all channels (``groups=1``):
``ModelConfig(lrn="caffe", lrn_span="all")`` in ``model.py``.

Implementations (``impl=`` on :class:`LocalResponseNorm` and :func:`lrn`; docs/lrn.md has the
derivation of the backward and the measurements):

``"reference"``  :func:`lrn_reference`, the formula term by term, autograd for the backward.
                 What the tests compare against. ~9 passes over the maps forward + backward.
``"function"``   a custom autograd Function in plain torch ops with the hand-derived backward
                 (saves x and d); any device, deterministic (pad/slice/add/pow only).
``"cpp"``        C++/OpenMP kernels (``split_alexnet/csrc/lrn.cpp``, built and registered by
                 :mod:`split_alexnet.network.lrn_ext`), CPU tensors only: forward reads x
                 once and writes y once, backward reads x and dy once and writes dx once (d is
                 recomputed; first-order only). Compiled on first use (~10 s, cached in
                 ``~/.cache/split_alexnet``); if compiling fails, one line on stderr and the
                 reference is used. On a CUDA tensor it runs ``"function"``.
``"compile"``    ``torch.compile`` of the reference (Inductor: C++ on CPU, Triton on GPU);
                 opt-in, compile time per shape; falls back to the reference with one line.
``"fused"``      the fused path for the tensor's device: ``"cpp"`` on CPU, ``"function"`` on CUDA.
``"auto"``       (default) what measured fastest: ``"cpp"`` on CPU (reference if the kernel
                 cannot be built), ``"function"`` on CUDA (not measured here: no GPU; chosen
                 because it is deterministic and makes fewer passes than autograd), else
                 ``"reference"``.

Half/bfloat16 inputs (e.g. under autocast) are computed with float32 accumulation and returned
in the input dtype. Channels_last inputs keep their layout.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from split_alexnet.network import lrn_ext

LRN_IMPLS = ("auto", "reference", "function", "cpp", "compile", "fused")

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def lrn_reference(x: Tensor, size: int = 5, alpha: float = 1e-4, beta: float = 0.75,
                  k: float = 2.0) -> Tensor:
    """Eager reference: the formula term by term, autograd for the backward.

    ``alpha`` here multiplies the sum of squares (the paper's reading). Channel ``i``'s window
    is ``[i - size//2, i - size//2 + size - 1]`` clipped to ``[0, C-1]`` (symmetric for odd
    ``size``; the same window as ``torch.nn.LocalResponseNorm`` for even ``size``).
    """
    half = size // 2
    sq = x * x  # (B, C, H, W)
    pad = [0, 0] * (x.dim() - 2) + [half, size - 1 - half]
    padded = F.pad(sq, pad)  # zero channels at both ends: the clipped window
    c = x.shape[1]
    window = padded[:, 0:c]
    for j in range(1, size):
        window = window + padded[:, j:j + c]
    return x * (k + alpha * window).pow(-beta)


# --------------------------------------------------------------------------- helpers
def _window(size: int) -> tuple[int, int]:
    lo = size // 2
    return lo, size - 1 - lo


def _window_sum(t: Tensor, lo: int, hi: int) -> Tensor:
    """sum_{j=i-lo}^{i+hi} t_j over channels, clipped at the channel ends."""
    c = t.shape[1]
    padded = F.pad(t, [0, 0] * (t.dim() - 2) + [lo, hi])
    out = padded[:, 0:c]
    for j in range(1, lo + hi + 1):
        out = out + padded[:, j:j + c]
    return out


def _grouped(fn, x: Tensor, groups: int) -> Tensor:
    """Apply a per-channel-window function to each of ``groups`` channel groups."""
    if groups == 1:
        return fn(x)
    b, c = x.shape[:2]
    if c % groups:
        raise ValueError(f"LRN groups={groups} must divide the {c} channels")
    if x.is_contiguous():
        return fn(x.view(b * groups, c // groups, *x.shape[2:])).view(x.shape)
    return torch.cat([fn(part) for part in x.chunk(groups, dim=1)], dim=1)


class _LRNFunction(torch.autograd.Function):
    """Plain torch ops, hand-derived backward (docs/lrn.md): saves x and d."""

    @staticmethod
    def forward(ctx, x, lo, hi, alpha, beta, k):
        d = _window_sum(x * x, lo, hi).mul_(alpha).add_(k)
        ctx.save_for_backward(x, d)
        ctx.args = (lo, hi, alpha, beta)
        return x * d.pow(-beta)

    @staticmethod
    def backward(ctx, g):
        x, d = ctx.saved_tensors
        lo, hi, alpha, beta = ctx.args
        s = d.pow(-beta)
        t = g * x * s / d
        # j is in i's window [i-lo, i+hi] iff i is in [j-hi, j+lo]: the transposed window.
        gx = g * s - (2.0 * alpha * beta) * x * _window_sum(t, hi, lo)
        return gx, None, None, None, None, None


_compiled = {}
_compile_failed = []


def _compiled_reference():
    if "fn" not in _compiled:
        def core(x, size: int, alpha: float, beta: float, k: float):
            if x.dtype in _LOW_PRECISION:  # float32 accumulation, back to the input dtype
                return lrn_reference(x.float(), size, alpha, beta, k).to(x.dtype)
            return lrn_reference(x, size, alpha, beta, k)
        _compiled["fn"] = torch.compile(core, dynamic=False)
    return _compiled["fn"]


_CPP_OPS: list = []  # [ops] once the C++ kernels are loaded (a constant for torch.compile)


def _load_cpp_now():
    ops = lrn_ext.load()  # one-line notice on failure
    if ops is not None:
        _CPP_OPS[:] = [ops]
    return ops


def _load_cpp():
    """Load the C++ kernels (once). Where torch.compile may be tracing this call (its
    compiler is imported), the loader runs outside the graph (``torch.compiler.disable``);
    elsewhere directly, without importing the compiler (about a second of start-up)."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.disable(_load_cpp_now)()
    return _load_cpp_now()


def _notice(msg: str) -> None:
    print(f"split_alexnet.network.lrn: {msg}", file=sys.stderr)


def resolve_impl(impl: str, device_type: str) -> str:
    """The implementation ``impl`` stands for on ``device_type`` (before any build fallback)."""
    if impl not in LRN_IMPLS:
        raise ValueError(f"LRN impl must be one of {LRN_IMPLS}, got {impl!r}")
    if impl in ("auto", "fused"):
        if device_type == "cpu":
            return "cpp"
        return "function" if device_type == "cuda" or impl == "fused" else "reference"
    if impl == "cpp" and device_type != "cpu":
        return "function"
    return impl


def lrn(x: Tensor, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0,
        *, impl: str = "auto", groups: int = 1) -> Tensor:
    """LRN with ``alpha`` on the SUM of squares (paper reading), over each of ``groups`` groups
    of consecutive channels, by implementation ``impl`` (see the module docstring)."""
    which = resolve_impl(impl, x.device.type)
    if x.dim() < 2 or groups < 1 or x.shape[1] % groups:
        raise ValueError(f"LRN needs (N, C, ...) input with C divisible by groups={groups}, "
                         f"got shape {tuple(x.shape)}")
    lo, hi = _window(size)
    if which == "cpp" and size > 64:  # the kernel's window limit
        which = "reference"
    if which == "cpp":
        ops = _CPP_OPS[0] if _CPP_OPS else _load_cpp()
        if ops is not None:
            # Autograd and the fake (shape) version are registered with torch.library (lrn_ext).
            return ops.forward(x, lo, hi, float(alpha), float(beta), float(k), int(groups))
        which = "reference"
    if which == "compile":
        if not _compile_failed:
            try:
                fn = _compiled_reference()
                return _grouped(lambda t: fn(t, size, float(alpha), float(beta), float(k)), x, groups)
            except Exception as exc:  # no compiler / Triton / backend failure
                _compile_failed.append(exc)
                _notice(f"torch.compile LRN failed ({type(exc).__name__}); using the eager reference")
        which = "reference"
    low = x.dtype in _LOW_PRECISION
    xin = x.float() if low else x
    if which == "function":
        out = _grouped(lambda t: _LRNFunction.apply(t, lo, hi, float(alpha), float(beta), float(k)),
                       xin, groups)
    else:
        out = _grouped(lambda t: lrn_reference(t, size, alpha, beta, k), xin, groups)
    return out.to(x.dtype) if low else out


class LocalResponseNorm(nn.Module):
    """The paper's LRN over the channels of its input (one tower's maps, or ``groups`` towers').

    ``reading="paper"``: alpha multiplies the sum of squares; ``"alpha-over-n"``: alpha/size
    does (torch / cuda-convnet). ``impl``: see the module docstring (default ``"auto"``).
    ``groups=G`` normalises G consecutive channel groups separately (G towers in one tensor).
    """

    def __init__(self, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0,
                 *, reading: str = "paper", impl: str = "auto", groups: int = 1) -> None:
        super().__init__()
        if reading not in ("paper", "alpha-over-n"):
            raise ValueError(f"LRN reading must be 'paper' or 'alpha-over-n', got {reading!r}")
        if impl not in LRN_IMPLS:
            raise ValueError(f"LRN impl must be one of {LRN_IMPLS}, got {impl!r}")
        if groups < 1:
            raise ValueError(f"LRN groups must be >= 1, got {groups}")
        self.size, self.beta, self.k, self.reading = size, beta, k, reading
        self.impl, self.groups = impl, groups
        # The coefficient actually applied to the window's sum of squares.
        self.alpha = alpha if reading == "paper" else alpha / size

    def forward(self, x: Tensor) -> Tensor:
        return lrn(x, self.size, self.alpha, self.beta, self.k, impl=self.impl, groups=self.groups)

    def extra_repr(self) -> str:
        return (f"size={self.size}, alpha_on_sum={self.alpha:g}, beta={self.beta}, k={self.k}, "
                f"reading={self.reading}, impl={self.impl}, groups={self.groups}")
