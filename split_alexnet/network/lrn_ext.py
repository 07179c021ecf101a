"""A small C++/OpenMP extension with the fused LRN forward and backward (CPU only).

Built on first use with ``torch.utils.cpp_extension.load_inline`` into a cache directory
(``$SPLIT_ALEXNET_CACHE`` or ``~/.cache/split_alexnet``, keyed by a hash of the source, the
flags, the torch version and the CPU model), so it compiles once per machine (about 10 s
on 2 cores) and loads in well under a second afterwards. :func:`load` returns ``None`` (and
prints ONE line on stderr) where compiling or loading fails; callers then use the reference.

The kernels registered as ``torch.ops.split_alexnet_lrn.forward / backward``:

forward(x, lo, hi, alpha, beta, k, groups) -> y
    y_i = x_i * d_i^-beta,  d_i = k + alpha * sum_{j=i-lo}^{i+hi} x_j^2  (window clipped
    at the ends of each of the ``groups`` consecutive channel groups)
backward(x, g, lo, hi, alpha, beta, k, groups) -> grad_x
    grad_j = g_j d_j^-beta - 2 alpha beta x_j * sum_{i=j-hi}^{j+lo} g_i x_i d_i^(-beta-1)

Each reads its inputs once from memory and writes its output once: the window sums are taken
from rows that are already in L1 (a chunk of <= 512 pixels x the ``size`` channels of the
window, summed in one pass), and the backward recomputes d from x instead of saving it,
keeping a ring of the last ``size`` channels' g x d^(-beta-1) and d^-beta. Accumulation is in float for
float/half/bfloat16 and in double for double. Two layouts are handled without copies:
(N, C, *) with each x[n] contiguous, any batch stride ("planes": the pixels of a channel are
contiguous, vectorised over pixels; this includes ``x.chunk(2, dim=1)`` halves of a contiguous
map, so a per-half call copies nothing) and channels_last 4-d ("rows": the channels of a pixel
are contiguous, vectorised over channels). Other strides are made contiguous first.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
from pathlib import Path

import torch

_SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t CH = 512;  // pixels per chunk in the planes layout

template <typename acc_t, bool B075>
inline acc_t neg_pow(acc_t d, acc_t beta) {
  if constexpr (B075) {
    return std::sqrt(std::sqrt(d)) / d;  // d^-0.75 = d^0.25 / d: vectorises (no pow)
  } else {
    return std::pow(d, -beta);
  }
}

// s = d^-beta and s / d, with one division.
template <typename acc_t, bool B075>
inline void neg_pow2(acc_t d, acc_t beta, acc_t& s, acc_t& s_over_d) {
  const acc_t inv = acc_t(1) / d;
  if constexpr (B075) {
    s = std::sqrt(std::sqrt(d)) * inv;
  } else {
    s = std::pow(d, -beta);
  }
  s_over_d = s * inv;
}

// ---------------------------------------------------------------- planes: (outer, C, inner)
// W = window length when known at compile time (5, 3: the sums unroll into one pass over
// the pixels), 0 = any (lo + hi + 1 <= MAXW). Rows outside [0, C) point at a zero row, so every
// channel sums the same number of terms, in ascending channel order like the reference.
constexpr int64_t MAXW = 64;

template <typename scalar_t, typename acc_t, bool B075, int W>
void fwd_planes(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t outer,
                int64_t C, int64_t inner, int64_t G, int64_t sx, int64_t lo, int64_t hi,
                acc_t alpha, acc_t beta, acc_t k) {
  const int64_t nch = (inner + CH - 1) / CH;
  const int64_t nw = W > 0 ? W : lo + hi + 1;
  at::parallel_for(0, outer * nch, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> zeros(CH, scalar_t(0));
    const scalar_t* rows[MAXW];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t o = t / nch, p0 = (t % nch) * CH, n = std::min(CH, inner - p0);
      const scalar_t* xb = x + (o / G) * sx + (o % G) * C * inner + p0;
      scalar_t* yb = y + o * C * inner + p0;
      for (int64_t i = 0; i < C; ++i) {
        for (int64_t w = 0; w < nw; ++w) {
          const int64_t j = i - lo + w;
          rows[w] = (j >= 0 && j < C) ? xb + j * inner : zeros.data();
        }
        const scalar_t* __restrict__ xi = xb + i * inner;
        scalar_t* __restrict__ yi = yb + i * inner;
        if constexpr (W == 5) {
          const scalar_t* __restrict__ r0 = rows[0];
          const scalar_t* __restrict__ r1 = rows[1];
          const scalar_t* __restrict__ r2 = rows[2];
          const scalar_t* __restrict__ r3 = rows[3];
          const scalar_t* __restrict__ r4 = rows[4];
          for (int64_t p = 0; p < n; ++p) {
            acc_t v0 = acc_t(r0[p]), v1 = acc_t(r1[p]), v2 = acc_t(r2[p]), v3 = acc_t(r3[p]),
                  v4 = acc_t(r4[p]);
            acc_t sum = v0 * v0 + v1 * v1 + v2 * v2 + v3 * v3 + v4 * v4;
            acc_t d = k + alpha * sum;
            yi[p] = scalar_t(acc_t(xi[p]) * neg_pow<acc_t, B075>(d, beta));
          }
        } else {
          for (int64_t p = 0; p < n; ++p) {
            acc_t sum = acc_t(0);
            for (int64_t w = 0; w < nw; ++w) { acc_t v = acc_t(rows[w][p]); sum += v * v; }
            acc_t d = k + alpha * sum;
            yi[p] = scalar_t(acc_t(xi[p]) * neg_pow<acc_t, B075>(d, beta));
          }
        }
      }
    }
  });
}

template <typename scalar_t, typename acc_t, bool B075, int W>
void bwd_planes(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                scalar_t* __restrict__ gx, int64_t outer, int64_t C, int64_t inner, int64_t G,
                int64_t sx, int64_t sg, int64_t lo, int64_t hi, acc_t alpha, acc_t beta,
                acc_t k) {
  const int64_t nch = (inner + CH - 1) / CH;
  const int64_t nw = W > 0 ? W : lo + hi + 1;
  const int64_t R = nw;  // ring of the last R channels' T = g x d^(-beta-1) and S = d^-beta
  const acc_t c2 = acc_t(2) * alpha * beta;
  at::parallel_for(0, outer * nch, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf((2 * R + 1) * CH, acc_t(0));
    acc_t* T = buf.data();
    acc_t* S = T + R * CH;
    const acc_t* zacc = S + R * CH;  // stays zero
    std::vector<scalar_t> zeros(CH, scalar_t(0));
    const scalar_t* rows[MAXW];
    const acc_t* trows[MAXW];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t o = t / nch, p0 = (t % nch) * CH, n = std::min(CH, inner - p0);
      const int64_t goff = (o % G) * C * inner + p0;
      const scalar_t* xb = x + (o / G) * sx + goff;
      const scalar_t* gb = g + (o / G) * sg + goff;
      scalar_t* gxb = gx + o * C * inner + p0;
      for (int64_t i = 0; i < C + lo; ++i) {
        if (i < C) {  // d_i, S_i, T_i for channel i
          for (int64_t w = 0; w < nw; ++w) {
            const int64_t j = i - lo + w;
            rows[w] = (j >= 0 && j < C) ? xb + j * inner : zeros.data();
          }
          const scalar_t* __restrict__ xi = xb + i * inner;
          const scalar_t* __restrict__ gi = gb + i * inner;
          acc_t* __restrict__ Ti = T + (i % R) * CH;
          acc_t* __restrict__ Si = S + (i % R) * CH;
          if constexpr (W == 5) {
            const scalar_t* __restrict__ r0 = rows[0];
            const scalar_t* __restrict__ r1 = rows[1];
            const scalar_t* __restrict__ r2 = rows[2];
            const scalar_t* __restrict__ r3 = rows[3];
            const scalar_t* __restrict__ r4 = rows[4];
            for (int64_t p = 0; p < n; ++p) {
              acc_t v0 = acc_t(r0[p]), v1 = acc_t(r1[p]), v2 = acc_t(r2[p]), v3 = acc_t(r3[p]),
                    v4 = acc_t(r4[p]);
              acc_t d = k + alpha * (v0 * v0 + v1 * v1 + v2 * v2 + v3 * v3 + v4 * v4);
              acc_t s, sd;
              neg_pow2<acc_t, B075>(d, beta, s, sd);
              Si[p] = s;
              Ti[p] = acc_t(gi[p]) * acc_t(xi[p]) * sd;
            }
          } else {
            for (int64_t p = 0; p < n; ++p) {
              acc_t sum = acc_t(0);
              for (int64_t w = 0; w < nw; ++w) { acc_t v = acc_t(rows[w][p]); sum += v * v; }
              acc_t d = k + alpha * sum;
              acc_t s, sd;
              neg_pow2<acc_t, B075>(d, beta, s, sd);
              Si[p] = s;
              Ti[p] = acc_t(gi[p]) * acc_t(xi[p]) * sd;
            }
          }
        }
        const int64_t jj = i - lo;  // its transposed window [jj-hi, jj+lo] is now complete
        if (jj >= 0) {
          for (int64_t w = 0; w < nw; ++w) {
            const int64_t m = jj - hi + w;
            trows[w] = (m >= 0 && m < C) ? T + (m % R) * CH : zacc;
          }
          const acc_t* __restrict__ Sj = S + (jj % R) * CH;
          const scalar_t* __restrict__ xj = xb + jj * inner;
          const scalar_t* __restrict__ gj = gb + jj * inner;
          scalar_t* __restrict__ oj = gxb + jj * inner;
          if constexpr (W == 5) {
            const acc_t* __restrict__ t0 = trows[0];
            const acc_t* __restrict__ t1 = trows[1];
            const acc_t* __restrict__ t2 = trows[2];
            const acc_t* __restrict__ t3 = trows[3];
            const acc_t* __restrict__ t4 = trows[4];
            for (int64_t p = 0; p < n; ++p) {
              acc_t sum = t0[p] + t1[p] + t2[p] + t3[p] + t4[p];
              oj[p] = scalar_t(acc_t(gj[p]) * Sj[p] - c2 * acc_t(xj[p]) * sum);
            }
          } else {
            for (int64_t p = 0; p < n; ++p) {
              acc_t sum = acc_t(0);
              for (int64_t w = 0; w < nw; ++w) sum += trows[w][p];
              oj[p] = scalar_t(acc_t(gj[p]) * Sj[p] - c2 * acc_t(xj[p]) * sum);
            }
          }
        }
      }
    }
  });
}

// ---------------------------------------------------------------- rows: (rows, C) contiguous
template <typename scalar_t, typename acc_t, bool B075>
void fwd_rows(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t rows, int64_t C,
              int64_t lo, int64_t hi, acc_t alpha, acc_t beta, acc_t k) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(2 * C);
    acc_t* __restrict__ sq = buf.data();
    acc_t* __restrict__ acc = sq + C;
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* __restrict__ xr = x + r * C;
      scalar_t* __restrict__ yr = y + r * C;
      for (int64_t c = 0; c < C; ++c) { acc_t v = acc_t(xr[c]); sq[c] = v * v; acc[c] = acc_t(0); }
      for (int64_t o = -lo; o <= hi; ++o) {  // acc[i] += sq[i+o], i+o clipped to [0, C)
        const int64_t i0 = std::max<int64_t>(0, -o), i1 = std::min<int64_t>(C, C - o);
        for (int64_t i = i0; i < i1; ++i) acc[i] += sq[i + o];
      }
      for (int64_t c = 0; c < C; ++c) {
        acc_t d = k + alpha * acc[c];
        yr[c] = scalar_t(acc_t(xr[c]) * neg_pow<acc_t, B075>(d, beta));
      }
    }
  });
}

template <typename scalar_t, typename acc_t, bool B075>
void bwd_rows(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
              scalar_t* __restrict__ gx, int64_t rows, int64_t C, int64_t lo, int64_t hi,
              acc_t alpha, acc_t beta, acc_t k) {
  const acc_t c2 = acc_t(2) * alpha * beta;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(4 * C);
    acc_t* __restrict__ sq = buf.data();
    acc_t* __restrict__ acc = sq + C;
    acc_t* __restrict__ T = acc + C;
    acc_t* __restrict__ S = T + C;
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* __restrict__ xr = x + r * C;
      const scalar_t* __restrict__ gr = g + r * C;
      scalar_t* __restrict__ outr = gx + r * C;
      for (int64_t c = 0; c < C; ++c) { acc_t v = acc_t(xr[c]); sq[c] = v * v; acc[c] = acc_t(0); }
      for (int64_t o = -lo; o <= hi; ++o) {
        const int64_t i0 = std::max<int64_t>(0, -o), i1 = std::min<int64_t>(C, C - o);
        for (int64_t i = i0; i < i1; ++i) acc[i] += sq[i + o];
      }
      for (int64_t c = 0; c < C; ++c) {
        acc_t d = k + alpha * acc[c];
        acc_t s, sd;
        neg_pow2<acc_t, B075>(d, beta, s, sd);
        S[c] = s;
        T[c] = acc_t(gr[c]) * acc_t(xr[c]) * sd;
        acc[c] = acc_t(0);
      }
      for (int64_t o = -hi; o <= lo; ++o) {  // backward window of j: [j-hi, j+lo]
        const int64_t i0 = std::max<int64_t>(0, -o), i1 = std::min<int64_t>(C, C - o);
        for (int64_t i = i0; i < i1; ++i) acc[i] += T[i + o];
      }
      for (int64_t c = 0; c < C; ++c)
        outr[c] = scalar_t(acc_t(gr[c]) * S[c] - c2 * acc_t(xr[c]) * acc[c]);
    }
  });
}

bool is_rows(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// Each x[b] is contiguous (the batch stride may be anything): e.g. x.chunk(2, dim=1)[0] of a
// contiguous tensor, which is what a per-half call on the collapsed layout passes.
bool planes_ok(const at::Tensor& x) {
  int64_t expected = 1;
  for (int64_t d = x.dim() - 1; d >= 1; --d) {
    if (x.size(d) != 1 && x.stride(d) != expected) return false;
    expected *= x.size(d);
  }
  return true;
}

int64_t batch_stride(const at::Tensor& x) {
  int64_t per = 1;
  for (int64_t d = 1; d < x.dim(); ++d) per *= x.size(d);
  return x.size(0) == 1 ? per : x.stride(0);
}

at::Tensor lrn_forward(const at::Tensor& x_, int64_t lo, int64_t hi, double alpha, double beta,
                       double k, int64_t groups) {
  TORCH_CHECK(x_.device().is_cpu(), "split_alexnet_lrn: CPU tensors only");
  TORCH_CHECK(x_.dim() >= 2, "split_alexnet_lrn: need (N, C, ...)");
  TORCH_CHECK(lo >= 0 && hi >= 0 && lo + hi + 1 <= MAXW, "split_alexnet_lrn: window too long");
  const bool rows = is_rows(x_);
  at::Tensor x = (rows || planes_ok(x_)) ? x_ : x_.contiguous();
  at::Tensor y = rows ? at::empty_like(x) : at::empty(x.sizes(), x.options());
  TORCH_CHECK(groups >= 1 && x.size(1) % groups == 0, "split_alexnet_lrn: groups must divide C");
  // G groups of C/G channels each: contiguous (N, C, *) is (N*G, C/G, *) and a channels_last
  // row of C channels is G rows of C/G, so groups only change the loop bounds.
  const int64_t C = x.size(1) / groups, N = x.size(0) * groups;
  const int64_t inner = C ? x.numel() / (N * C) : 0;
  if (x.numel() == 0) return y;
  const bool b075 = beta == 0.75;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lrn_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t sx = batch_stride(x);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    acc_t a = acc_t(alpha), b = acc_t(beta), kk = acc_t(k);
    if (rows) {
      if (b075) fwd_rows<scalar_t, acc_t, true>(xp, yp, N * inner, C, lo, hi, a, b, kk);
      else fwd_rows<scalar_t, acc_t, false>(xp, yp, N * inner, C, lo, hi, a, b, kk);
    } else {
      const bool w5 = lo + hi + 1 == 5;
      if (b075 && w5) fwd_planes<scalar_t, acc_t, true, 5>(xp, yp, N, C, inner, groups, sx, lo, hi, a, b, kk);
      else if (w5) fwd_planes<scalar_t, acc_t, false, 5>(xp, yp, N, C, inner, groups, sx, lo, hi, a, b, kk);
      else if (b075) fwd_planes<scalar_t, acc_t, true, 0>(xp, yp, N, C, inner, groups, sx, lo, hi, a, b, kk);
      else fwd_planes<scalar_t, acc_t, false, 0>(xp, yp, N, C, inner, groups, sx, lo, hi, a, b, kk);
    }
  });
  return y;
}

at::Tensor lrn_backward(const at::Tensor& x_, const at::Tensor& g_, int64_t lo, int64_t hi,
                        double alpha, double beta, double k, int64_t groups) {
  TORCH_CHECK(x_.device().is_cpu() && g_.device().is_cpu(), "split_alexnet_lrn: CPU tensors only");
  TORCH_CHECK(lo >= 0 && hi >= 0 && lo + hi + 1 <= MAXW, "split_alexnet_lrn: window too long");
  TORCH_CHECK(x_.sizes() == g_.sizes() && x_.scalar_type() == g_.scalar_type(),
              "split_alexnet_lrn: x and grad must match");
  const bool rows = is_rows(x_);
  at::Tensor x = (rows || planes_ok(x_)) ? x_ : x_.contiguous();
  at::Tensor g = rows ? g_.contiguous(at::MemoryFormat::ChannelsLast)
                      : (planes_ok(g_) ? g_ : g_.contiguous());
  at::Tensor gx = rows ? at::empty_like(x) : at::empty(x.sizes(), x.options());
  TORCH_CHECK(groups >= 1 && x.size(1) % groups == 0, "split_alexnet_lrn: groups must divide C");
  // G groups of C/G channels each: contiguous (N, C, *) is (N*G, C/G, *) and a channels_last
  // row of C channels is G rows of C/G, so groups only change the loop bounds.
  const int64_t C = x.size(1) / groups, N = x.size(0) * groups;
  const int64_t inner = C ? x.numel() / (N * C) : 0;
  if (x.numel() == 0) return gx;
  const bool b075 = beta == 0.75;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lrn_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t sx = batch_stride(x), sg = batch_stride(g);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* op = gx.mutable_data_ptr<scalar_t>();
    acc_t a = acc_t(alpha), b = acc_t(beta), kk = acc_t(k);
    if (rows) {
      if (b075) bwd_rows<scalar_t, acc_t, true>(xp, gp, op, N * inner, C, lo, hi, a, b, kk);
      else bwd_rows<scalar_t, acc_t, false>(xp, gp, op, N * inner, C, lo, hi, a, b, kk);
    } else {
      const bool w5 = lo + hi + 1 == 5;
      if (b075 && w5) bwd_planes<scalar_t, acc_t, true, 5>(xp, gp, op, N, C, inner, groups, sx, sg, lo, hi, a, b, kk);
      else if (w5) bwd_planes<scalar_t, acc_t, false, 5>(xp, gp, op, N, C, inner, groups, sx, sg, lo, hi, a, b, kk);
      else if (b075) bwd_planes<scalar_t, acc_t, true, 0>(xp, gp, op, N, C, inner, groups, sx, sg, lo, hi, a, b, kk);
      else bwd_planes<scalar_t, acc_t, false, 0>(xp, gp, op, N, C, inner, groups, sx, sg, lo, hi, a, b, kk);
    }
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY(split_alexnet_lrn, m) {
  m.def("forward(Tensor x, int lo, int hi, float alpha, float beta, float k, int groups) -> Tensor");
  m.def("backward(Tensor x, Tensor g, int lo, int hi, float alpha, float beta, float k, int groups) -> Tensor");
}

TORCH_LIBRARY_IMPL(split_alexnet_lrn, CPU, m) {
  m.impl("forward", &lrn_forward);
  m.impl("backward", &lrn_backward);
}
"""

_CFLAGS = ["-O3", "-fopenmp", "-march=native", "-fno-math-errno", "-DNDEBUG"]
_LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_state: dict = {}  # "ops" -> loaded op namespace, or "error" -> message


def cache_root() -> Path:
    root = os.environ.get("SPLIT_ALEXNET_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "split_alexnet"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") or line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_key() -> str:
    h = hashlib.sha256()
    for part in (_SOURCE, " ".join(_CFLAGS), torch.__version__, sys.version, _cpu_model()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def _compile():
    """Compile (or reuse the cached build of) the extension; returns torch.ops.split_alexnet_lrn."""
    import logging
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)  # its import warns "No CUDA runtime is found": irrelevant here
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)

    build_dir = cache_root() / f"lrn_ext_{build_key()}"
    build_dir.mkdir(parents=True, exist_ok=True)
    kwargs = dict(name="split_alexnet_lrn_ext", cpp_sources=[_SOURCE], extra_cflags=_CFLAGS,
                  extra_ldflags=_LDFLAGS, build_directory=str(build_dir), is_python_module=False,
                  verbose=False)
    import inspect
    if "no_implicit_headers" in inspect.signature(cpp_extension.load_inline).parameters:
        kwargs["no_implicit_headers"] = True  # torch/extension.h (pybind11) is not needed: faster build
    cpp_extension.load_inline(**kwargs)
    return torch.ops.split_alexnet_lrn


def _registered():
    """The op namespace if the kernels are already registered in this process, else None."""
    try:
        ns = torch.ops.split_alexnet_lrn
        ns.forward  # noqa: B018  (raises if not registered)
        return ns
    except (AttributeError, RuntimeError):
        return None


def _register_fakes() -> None:
    """Shape-only versions, so that torch.compile / FakeTensor can trace through the ops."""
    if _state.get("fakes") or not hasattr(torch, "library") or not hasattr(torch.library, "register_fake"):
        return

    def like(x):
        rows = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        return torch.empty_like(x, memory_format=torch.channels_last if rows else torch.contiguous_format)

    try:
        torch.library.register_fake("split_alexnet_lrn::forward")(
            lambda x, lo, hi, alpha, beta, k, groups: like(x))
        torch.library.register_fake("split_alexnet_lrn::backward")(
            lambda x, g, lo, hi, alpha, beta, k, groups: like(x))
    except Exception:  # already registered (e.g. module reloaded) or an older torch: not needed
        pass
    _state["fakes"] = True


def load(quiet: bool = False):
    """The op namespace with ``forward``/``backward``, or ``None`` (one-line notice) if unavailable."""
    with _lock:
        if "ops" in _state:
            return _state["ops"]
        if "error" in _state:
            return None
        try:
            ops = _registered() or _compile()
            _register_fakes()
            _state["ops"] = ops
            return ops
        except Exception as exc:  # compiler missing, headers missing, ninja missing, ...
            msg = str(exc).strip().splitlines()
            _state["error"] = f"{type(exc).__name__}: {msg[0] if msg else ''}"[:200]
            if not quiet:
                print(f"split_alexnet.network.lrn: C++ LRN kernel unavailable ({_state['error']}); "
                      "using the eager reference", file=sys.stderr)
            return None


def reset() -> None:
    """Forget a previous failure (tests use it)."""
    with _lock:
        _state.pop("error", None)


def available() -> bool:
    return load(quiet=True) is not None
