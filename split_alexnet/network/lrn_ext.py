"""Builds, loads and registers the fused C++/OpenMP LRN kernels of ``split_alexnet/csrc/lrn.cpp``.

The source ships inside the package (``split_alexnet/csrc/lrn.cpp``, package data). It is
compiled on first use with ``torch.utils.cpp_extension.load`` into a cache directory
(``$SPLIT_ALEXNET_CACHE`` or ``~/.cache/split_alexnet``, one folder per :func:`build_key`), so
it compiles once per machine (about 10 s on 2 cores) and loads in well under a second
afterwards. :func:`load` returns ``None`` (and prints ONE line on stderr) where compiling,
loading or registering fails; callers then use the reference.

The build key hashes the source, the compiler and linker flags, the torch and Python versions
and :func:`cpu_description` (the CPU's model name and instruction-set flags). The binary is
built with ``-march=native``, so a cache shared between machines (a home directory on a
cluster) must never hand a CPU a binary that uses instructions it lacks: two CPUs with the
same model name but different flags (a virtual machine masking AVX-512, say) get different
folders.

The kernels, registered in C++ as ``torch.ops.split_alexnet_lrn.forward / backward``:

forward(x, lo, hi, alpha, beta, k, groups) -> y
    y_i = x_i * d_i^-beta,  d_i = k + alpha * sum_{j=i-lo}^{i+hi} x_j^2  (window clipped
    at the ends of each of the ``groups`` consecutive channel groups)
backward(x, g, lo, hi, alpha, beta, k, groups) -> grad_x
    grad_j = g_j d_j^-beta - 2 alpha beta x_j * sum_{i=j-hi}^{j+lo} g_i x_i d_i^(-beta-1)

On top of them this module registers, with ``torch.library`` (torch 2.4 has both calls; the
package's floor is 2.4.1):

* ``register_autograd`` for ``forward``: saves x only, its backward is the ``backward`` op
  (d is recomputed from x). ``backward`` is first-order only: differentiating it raises.
* ``register_fake`` for both: shape-only versions, so ``torch.compile`` / FakeTensor can trace
  a model that calls them.

Each kernel reads its inputs once from memory and writes its output once: the window sums are
taken from rows that are already in L1 (a chunk of <= 512 pixels x the ``size`` channels of
the window, summed in one pass), and the backward recomputes d from x instead of saving it,
keeping a ring of the last ``size`` channels' g x d^(-beta-1) and d^-beta. Accumulation is in
float for float/half/bfloat16 and in double for double. Two layouts are handled without
copies: (N, C, *) with each x[n] contiguous, any batch stride ("planes": the pixels of a
channel are contiguous, vectorised over pixels; this includes ``x.chunk(2, dim=1)`` halves of
a contiguous map, so a per-half call copies nothing) and channels_last 4-d ("rows": the
channels of a pixel are contiguous, vectorised over channels). Other strides are made
contiguous first.

``torch.utils.cpp_extension`` is imported only when a build is needed (the one deferred
import): it imports setuptools and logs a CUDA warning, neither of which a run that finds the
kernel already registered needs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "lrn.cpp"
NAMESPACE = "split_alexnet_lrn"

_CFLAGS = ["-O3", "-fopenmp", "-march=native", "-fno-math-errno", "-DNDEBUG"]
_LDFLAGS = ["-fopenmp"]
# The /proc/cpuinfo keys that name the CPU and its instruction set (x86: model name, flags;
# ARM: Features and the implementer/part numbers).
_CPUINFO_KEYS = ("model name", "flags", "Features", "CPU implementer", "CPU architecture",
                 "CPU variant", "CPU part")

_lock = threading.Lock()
_state: dict = {}  # "ops" -> loaded op namespace, or "error" -> message
_python_parts: list = []  # [True] once autograd and fakes are registered in this process


def cache_root() -> Path:
    root = os.environ.get("SPLIT_ALEXNET_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "split_alexnet"


def cpu_description() -> str:
    """The first CPU's model name and instruction-set flags, one ``key: value`` line each.

    From ``/proc/cpuinfo`` (Linux, x86 and ARM); elsewhere, or if it lists none of those
    keys, the machine and processor names that :mod:`platform` reports.
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    lines = []
    for line in text.splitlines():
        if not line.strip():
            if lines:
                break  # end of the first processor's block
            continue
        key, _, value = line.partition(":")
        if key.strip() in _CPUINFO_KEYS:
            lines.append(f"{key.strip()}: {' '.join(value.split())}")
    if lines:
        return "\n".join(lines)
    return f"machine: {platform.machine()}\nprocessor: {platform.processor()}"


def build_key() -> str:
    """16 hex digits naming the build: source (its text and where it lives, so two checkouts
    never rebuild over each other's cache), flags, torch, Python and :func:`cpu_description`."""
    h = hashlib.sha256()
    h.update(SOURCE.read_bytes())
    for part in (str(SOURCE.resolve()), " ".join(_CFLAGS), " ".join(_LDFLAGS),
                 torch.__version__, sys.version, cpu_description()):
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:16]


def _compile():
    """Compile (or reuse the cached build of) the extension; returns torch.ops.split_alexnet_lrn."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)  # its import warns "No CUDA runtime is found": irrelevant here
    try:
        from torch.utils import cpp_extension  # deferred: see the module docstring
    finally:
        log.setLevel(level)

    build_dir = cache_root() / f"lrn_ext_{build_key()}"
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(name="split_alexnet_lrn_ext", sources=[str(SOURCE)], extra_cflags=_CFLAGS,
                       extra_ldflags=_LDFLAGS, build_directory=str(build_dir),
                       is_python_module=False, verbose=False)
    return getattr(torch.ops, NAMESPACE)


def _registered():
    """The op namespace if the kernels are already registered in this process, else None."""
    try:
        ns = getattr(torch.ops, NAMESPACE)
        ns.forward  # noqa: B018  (raises if not registered)
        return ns
    except (AttributeError, RuntimeError):
        return None


# --------------------------------------------------------------------------- torch.library parts
def _like(x):
    """An empty tensor shaped and laid out as the kernels' output for input ``x``."""
    rows = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.empty_like(x, memory_format=torch.channels_last if rows else torch.contiguous_format)


def _fake_forward(x, lo, hi, alpha, beta, k, groups):
    return _like(x)


def _fake_backward(x, g, lo, hi, alpha, beta, k, groups):
    return _like(x)


def _setup_forward(ctx, inputs, output):
    x, *args = inputs  # lo, hi, alpha, beta, k, groups
    ctx.save_for_backward(x)
    ctx.args = tuple(args)


def _backward_of_forward(ctx, g):
    (x,) = ctx.saved_tensors
    gx = getattr(torch.ops, NAMESPACE).backward(x, g.to(x.dtype), *ctx.args)
    return (gx,) + (None,) * len(ctx.args)


def _setup_backward(ctx, inputs, output):
    pass


def _backward_of_backward(ctx, gg):
    raise RuntimeError("split_alexnet_lrn: the C++ LRN kernel is first-order only (no double "
                       "backward); use LocalResponseNorm(impl='function') or impl='reference'")


def _register_python_parts() -> None:
    """Autograd and fake (shape-only) registrations of both ops; once per process."""
    if _python_parts:
        return
    fwd, bwd = f"{NAMESPACE}::forward", f"{NAMESPACE}::backward"
    torch.library.register_fake(fwd)(_fake_forward)
    torch.library.register_fake(bwd)(_fake_backward)
    torch.library.register_autograd(fwd, _backward_of_forward, setup_context=_setup_forward)
    torch.library.register_autograd(bwd, _backward_of_backward, setup_context=_setup_backward)
    _python_parts.append(True)


def load(quiet: bool = False):
    """The op namespace with ``forward``/``backward``, or ``None`` (one-line notice) if unavailable."""
    with _lock:
        if "ops" in _state:
            return _state["ops"]
        if "error" in _state:
            return None
        try:
            ops = _registered() or _compile()
            _register_python_parts()
            _state["ops"] = ops
            return ops
        except Exception as exc:  # compiler, headers, ninja or the source missing; old torch; ...
            msg = str(exc).strip().splitlines()
            _state["error"] = f"{type(exc).__name__}: {msg[0] if msg else ''}"[:200]
            if not quiet:
                print(f"split_alexnet.network.lrn: C++ LRN kernel unavailable ({_state['error']}); "
                      "using the eager reference", file=sys.stderr)
            return None


def available() -> bool:
    return load(quiet=True) is not None
