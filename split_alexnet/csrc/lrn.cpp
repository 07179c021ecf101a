// Fused local response normalisation (the paper's section 3.3) for CPU tensors: forward and
// backward kernels, registered as torch.ops.split_alexnet_lrn.forward / backward.
//
// Built on first use by split_alexnet/network/lrn_ext.py (torch.utils.cpp_extension.load);
// the formulas, layouts and measurements are in docs/lrn.md. Autograd and the fake (shape-only)
// versions of both ops are registered from Python in lrn_ext.py.
//
//   forward(x, lo, hi, alpha, beta, k, groups) -> y
//     y_i = x_i * d_i^-beta,  d_i = k + alpha * sum_{j=i-lo}^{i+hi} x_j^2  (window clipped at
//     the ends of each of the `groups` consecutive channel groups)
//   backward(x, g, lo, hi, alpha, beta, k, groups) -> grad_x
//     grad_j = g_j d_j^-beta - 2 alpha beta x_j * sum_{i=j-hi}^{j+lo} g_i x_i d_i^(-beta-1)

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <type_traits>
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
// W = the window length when it is 5 (the paper's n: the sums unroll into one pass over the
// pixels), 0 = any (lo + hi + 1 <= MAXW). Rows outside [0, C) point at a zero row, so every
// channel sums the same number of terms, in ascending channel order like the reference.
constexpr int64_t MAXW = 64;

// rows[w] = channel i - lo + w of the chunk at base (channels `inner` apart), or the zero row.
template <typename scalar_t>
inline void window_rows(const scalar_t** rows, const scalar_t* base, const scalar_t* zero,
                        int64_t i, int64_t lo, int64_t nw, int64_t C, int64_t inner) {
  for (int64_t w = 0; w < nw; ++w) {
    const int64_t j = i - lo + w;
    rows[w] = (j >= 0 && j < C) ? base + j * inner : zero;
  }
}

// For each pixel p < n of a chunk: body(p, f(rows[0][p]) + ... + f(rows[nw-1][p])), the terms
// added in ascending w (in acc_t), in one pass over the pixels.
template <int W, typename acc_t, typename T, typename F, typename Body>
inline void window_pass(const T* const* rows, int64_t nw, int64_t n, F f, Body body) {
  if constexpr (W == 5) {
    const T* __restrict__ r0 = rows[0];
    const T* __restrict__ r1 = rows[1];
    const T* __restrict__ r2 = rows[2];
    const T* __restrict__ r3 = rows[3];
    const T* __restrict__ r4 = rows[4];
    for (int64_t p = 0; p < n; ++p)
      body(p, f(acc_t(r0[p])) + f(acc_t(r1[p])) + f(acc_t(r2[p])) + f(acc_t(r3[p])) +
                  f(acc_t(r4[p])));
  } else {
    for (int64_t p = 0; p < n; ++p) {
      acc_t sum = acc_t(0);
      for (int64_t w = 0; w < nw; ++w) sum += f(acc_t(rows[w][p]));
      body(p, sum);
    }
  }
}

template <typename acc_t>
inline acc_t square(acc_t v) { return v * v; }

template <typename acc_t>
inline acc_t same(acc_t v) { return v; }

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
        window_rows(rows, xb, zeros.data(), i, lo, nw, C, inner);
        const scalar_t* __restrict__ xi = xb + i * inner;
        scalar_t* __restrict__ yi = yb + i * inner;
        window_pass<W, acc_t>(rows, nw, n, square<acc_t>, [&](int64_t p, acc_t sum) {
          acc_t d = k + alpha * sum;
          yi[p] = scalar_t(acc_t(xi[p]) * neg_pow<acc_t, B075>(d, beta));
        });
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
          window_rows(rows, xb, zeros.data(), i, lo, nw, C, inner);
          const scalar_t* __restrict__ xi = xb + i * inner;
          const scalar_t* __restrict__ gi = gb + i * inner;
          acc_t* __restrict__ Ti = T + (i % R) * CH;
          acc_t* __restrict__ Si = S + (i % R) * CH;
          window_pass<W, acc_t>(rows, nw, n, square<acc_t>, [&](int64_t p, acc_t sum) {
            acc_t d = k + alpha * sum;
            acc_t s, sd;
            neg_pow2<acc_t, B075>(d, beta, s, sd);
            Si[p] = s;
            Ti[p] = acc_t(gi[p]) * acc_t(xi[p]) * sd;
          });
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
          window_pass<W, acc_t>(trows, nw, n, same<acc_t>, [&](int64_t p, acc_t sum) {
            oj[p] = scalar_t(acc_t(gj[p]) * Sj[p] - c2 * acc_t(xj[p]) * sum);
          });
        }
      }
    }
  });
}

// ---------------------------------------------------------------- rows: (rows, C) contiguous
// acc[i] = sum_{o=-lo}^{hi} src[i + o] for i in [0, C), the terms outside [0, C) left out.
template <typename acc_t>
inline void window_sum(const acc_t* __restrict__ src, acc_t* __restrict__ acc, int64_t C,
                       int64_t lo, int64_t hi) {
  for (int64_t c = 0; c < C; ++c) acc[c] = acc_t(0);
  for (int64_t o = -lo; o <= hi; ++o) {
    const int64_t i0 = std::max<int64_t>(0, -o), i1 = std::min<int64_t>(C, C - o);
    for (int64_t i = i0; i < i1; ++i) acc[i] += src[i + o];
  }
}

// acc[c] = the sum of x^2 over the window of channel c, x one row of C channels (sq: scratch).
template <typename scalar_t, typename acc_t>
inline void window_sq_sum(const scalar_t* __restrict__ x, acc_t* __restrict__ sq,
                          acc_t* __restrict__ acc, int64_t C, int64_t lo, int64_t hi) {
  for (int64_t c = 0; c < C; ++c) { acc_t v = acc_t(x[c]); sq[c] = v * v; }
  window_sum(sq, acc, C, lo, hi);
}

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
      window_sq_sum(xr, sq, acc, C, lo, hi);
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
      window_sq_sum(xr, sq, acc, C, lo, hi);
      for (int64_t c = 0; c < C; ++c) {
        acc_t d = k + alpha * acc[c];
        acc_t s, sd;
        neg_pow2<acc_t, B075>(d, beta, s, sd);
        S[c] = s;
        T[c] = acc_t(gr[c]) * acc_t(xr[c]) * sd;
      }
      window_sum(T, acc, C, hi, lo);  // backward window of j: [j-hi, j+lo]
      for (int64_t c = 0; c < C; ++c)
        outr[c] = scalar_t(acc_t(gr[c]) * S[c] - c2 * acc_t(xr[c]) * acc[c]);
    }
  });
}

// ---------------------------------------------------------------- the ops
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

// What both ops need to know about their input x.
struct Geometry {
  at::Tensor x;        // the input, or a contiguous copy where neither layout fits its strides
  bool rows;           // channels_last 4-d: the "rows" kernels, else the "planes" kernels
  int64_t C, N, inner; // channels per group, images x groups, pixels per channel
  at::Tensor empty_output() const {  // laid out like x, any batch stride made dense
    return rows ? at::empty_like(x) : at::empty(x.sizes(), x.options());
  }
};

Geometry geometry(const at::Tensor& x_, int64_t lo, int64_t hi, int64_t groups) {
  TORCH_CHECK(x_.dim() >= 2, "split_alexnet_lrn: need (N, C, ...)");
  TORCH_CHECK(lo >= 0 && hi >= 0 && lo + hi + 1 <= MAXW, "split_alexnet_lrn: window too long");
  Geometry geo;
  geo.rows = is_rows(x_);
  geo.x = (geo.rows || planes_ok(x_)) ? x_ : x_.contiguous();
  TORCH_CHECK(groups >= 1 && geo.x.size(1) % groups == 0, "split_alexnet_lrn: groups must divide C");
  // G groups of C/G channels each: contiguous (N, C, *) is (N*G, C/G, *) and a channels_last
  // row of C channels is G rows of C/G, so groups only change the loop bounds.
  geo.C = geo.x.size(1) / groups;
  geo.N = geo.x.size(0) * groups;
  geo.inner = geo.C ? geo.x.numel() / (geo.N * geo.C) : 0;
  return geo;
}

// Calls f(B075, W) with std::integral_constant values for the kernel variant: beta == 0.75
// (d^-beta without pow) and the window length 5 (unrolled) or any (0).
template <typename F>
void with_variant(double beta, int64_t window, F&& f) {
  using b_yes = std::true_type;
  using b_no = std::false_type;
  using w5 = std::integral_constant<int, 5>;
  using w_any = std::integral_constant<int, 0>;
  const bool b075 = beta == 0.75;
  if (b075 && window == 5) f(b_yes{}, w5{});
  else if (window == 5) f(b_no{}, w5{});
  else if (b075) f(b_yes{}, w_any{});
  else f(b_no{}, w_any{});
}

at::Tensor lrn_forward(const at::Tensor& x_, int64_t lo, int64_t hi, double alpha, double beta,
                       double k, int64_t groups) {
  TORCH_CHECK(x_.device().is_cpu(), "split_alexnet_lrn: CPU tensors only");
  const Geometry geo = geometry(x_, lo, hi, groups);
  const at::Tensor& x = geo.x;
  at::Tensor y = geo.empty_output();
  if (x.numel() == 0) return y;
  const int64_t C = geo.C, N = geo.N, inner = geo.inner;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lrn_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t sx = batch_stride(x);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    acc_t a = acc_t(alpha), b = acc_t(beta), kk = acc_t(k);
    with_variant(beta, lo + hi + 1, [&](auto B075, auto W) {
      if (geo.rows)
        fwd_rows<scalar_t, acc_t, B075.value>(xp, yp, N * inner, C, lo, hi, a, b, kk);
      else
        fwd_planes<scalar_t, acc_t, B075.value, W.value>(xp, yp, N, C, inner, groups, sx, lo, hi,
                                                         a, b, kk);
    });
  });
  return y;
}

at::Tensor lrn_backward(const at::Tensor& x_, const at::Tensor& g_, int64_t lo, int64_t hi,
                        double alpha, double beta, double k, int64_t groups) {
  TORCH_CHECK(x_.device().is_cpu() && g_.device().is_cpu(), "split_alexnet_lrn: CPU tensors only");
  TORCH_CHECK(x_.sizes() == g_.sizes() && x_.scalar_type() == g_.scalar_type(),
              "split_alexnet_lrn: x and grad must match");
  const Geometry geo = geometry(x_, lo, hi, groups);
  const at::Tensor& x = geo.x;
  at::Tensor g = geo.rows ? g_.contiguous(at::MemoryFormat::ChannelsLast)
                          : (planes_ok(g_) ? g_ : g_.contiguous());
  at::Tensor gx = geo.empty_output();
  if (x.numel() == 0) return gx;
  const int64_t C = geo.C, N = geo.N, inner = geo.inner;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lrn_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t sx = batch_stride(x), sg = batch_stride(g);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* op = gx.mutable_data_ptr<scalar_t>();
    acc_t a = acc_t(alpha), b = acc_t(beta), kk = acc_t(k);
    with_variant(beta, lo + hi + 1, [&](auto B075, auto W) {
      if (geo.rows)
        bwd_rows<scalar_t, acc_t, B075.value>(xp, gp, op, N * inner, C, lo, hi, a, b, kk);
      else
        bwd_planes<scalar_t, acc_t, B075.value, W.value>(xp, gp, op, N, C, inner, groups, sx, sg,
                                                         lo, hi, a, b, kk);
    });
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
