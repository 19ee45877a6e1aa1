// CPU kernels for hf_adanorm.functional: the math of the Triton kernels, one row at a time.
//
// Each row of D elements (a few KiB) stays in L1 between the passes over it, so each
// direction streams through memory once, the minimum for a norm:
//   forward:  read x, write z = y * (C - C k y), mean and 1/sigma;
//   backward: read g, x, mean and 1/sigma, write dL/dx.
// torch's own route (LayerNorm kernel, then an element-wise pass for the AdaNorm factor)
// streams the whole tensor twice. In L1 the forward takes two passes over a row (the sums of
// x - p and (x - p)^2 in one, then z) unless the row needs a third for an exact variance; the
// backward takes two. Outputs of 64 MiB and more are written past the caches (streams()), and
// those of 32 MiB and more into memory reused from earlier outputs (output_pool.h). Notation as in hf_adanorm/functional.py:
//   y  = (x - mean) / sigma,  sigma = sqrt(v + eps) ("torch") or sqrt(v) + eps ("fairseq"),
//   v  = sum((x - mean)^2) / (D - u),  g' = g * (C - C k y),
//   dL/dx = (1 / sigma) * (g' - a * mean(g') - b * y * mean(g' * y)).
// Arithmetic is float32 whatever the input dtype (float32, bfloat16, float16).
#include <ATen/Parallel.h>
#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "float_lanes.h"
#include "output_pool.h"

namespace {

using hf_adanorm::keep_first;
using hf_adanorm::kStep;
using hf_adanorm::load_step;
using hf_adanorm::load_tail;
using hf_adanorm::prefetch_step;
using hf_adanorm::row_sums;
using hf_adanorm::row_sums_of;
using hf_adanorm::put_step;
using hf_adanorm::store_tail;
using hf_adanorm::Vec;

struct Norm {
  float eps, k, C;
  bool centre, fairseq;
  int64_t d;
  // u = 1 for fairseq's unbiased variance of centred norms.
  int64_t dof() const { return std::max<int64_t>(d - (centre && fairseq ? 1 : 0), 1); }
};

// Rows per task: enough elements that a thread's share outweighs waking it.
int64_t grain(int64_t d) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)); }

// Calls step(j) for each whole step of kStep elements (j its first element) and tail(j, count)
// for a last partial one; each loads and stores its own data.
template <typename Step, typename Tail>
inline void for_each_step(int64_t d, Step step, Tail tail) {
  int64_t j = 0;
  for (; j + kStep <= d; j += kStep) step(j);
  if (j < d) tail(j, d - j);
}

// The pivot p of a row's shifted sums: the mean of its first step, near the row's mean for any
// row whose values do not drift along it, so that sums of x - p keep a common offset out.
template <typename T>
float pivot_of(const T* x, int64_t d) {
  if (d >= kStep) {  // one vector sum: a serial sum in double costs ~10 % of a 768-wide bf16 row
    Vec a, b;
    load_step(x, a, b);
    const Vec share(1.f / kStep);  // a power of 2, so exact; summing x / kStep cannot overflow (1e37 rows)
    return at::vec::vec_reduce_all<float>([](Vec& u, Vec& v) { return u + v; }, a * share + b * share);
  }
  double sum = 0.0;
  for (int64_t j = 0; j < d; ++j) sum += static_cast<double>(x[j]);
  return float(sum / d);
}

// Sum of (x - mean)^2 over the row, from a second pass over the cached row.
template <typename T>
double centred_squares(const T* x, int64_t d, float mean) {
  const Vec mean_v(mean);
  return row_sums_of<1>(
      x, d,
      [&](Vec& a, Vec& b) {
        a = a - mean_v;
        b = b - mean_v;
      },
      [](const Vec& a, const Vec& b, auto& lo, auto& hi) {
        lo[0] = at::vec::fmadd(a, a, lo[0]);
        hi[0] = at::vec::fmadd(b, b, hi[0]);
      })[0];
}

// next: the row to prefetch while this one is written (nullptr for none).
template <typename T>
void forward_row(const T* x, const T* next, T* z, float* mean_out, float* rstd_out, const Norm& n, bool stream) {
  float mean = 0.f;
  double squares;
  if (n.centre) {
    // One pass for S1 = sum(x - p) and S2 = sum((x - p)^2); then sum((x - mean)^2) = S2 - S1^2 / d.
    // That difference loses accuracy by the factor S2 / sum((x - mean)^2) = 1 + (mean - p)^2 / var:
    // at most 2 where it is kept (|mean - p| <= sigma, nearly every row with the pivot above);
    // other rows take a second pass over the cached row, exact however far the pivot is.
    const float pivot = pivot_of(x, n.d);
    const Vec shift(pivot);
    const auto [s1, s2] = row_sums_of<2>(
        x, n.d,
        [&](Vec& a, Vec& b) {
          a = a - shift;
          b = b - shift;
        },
        [](const Vec& a, const Vec& b, auto& lo, auto& hi) {
          lo[0] = lo[0] + a;
          hi[0] = hi[0] + b;
          lo[1] = at::vec::fmadd(a, a, lo[1]);
          hi[1] = at::vec::fmadd(b, b, hi[1]);
        });
    const double offset = s1 / n.d;  // mean - p
    mean = float(pivot + offset);
    squares = s2 - s1 * offset;
    if (!(squares >= s2 * 0.5)) squares = centred_squares(x, n.d, mean);  // (mean - p)^2 > var, or NaN
  } else {
    squares = centred_squares(x, n.d, 0.f);
  }
  const Vec mean_v(mean);
  const double v = squares / n.dof();
  const float rstd = float(n.fairseq ? 1.0 / (std::sqrt(v) + n.eps) : 1.0 / std::sqrt(v + n.eps));
  // z = y (C - C k y) with y = (x - mean) rstd
  const Vec rstd_v(rstd), C(n.C), minus_Ck(-n.C * n.k);
  auto normalize = [&](Vec& a) {
    const Vec y = (a - mean_v) * rstd_v;
    a = y * at::vec::fmadd(minus_Ck, y, C);
  };
  for_each_step(
      n.d,
      [&](int64_t j) {
        if (next) prefetch_step(next + j);
        Vec a, b;
        load_step(x + j, a, b);
        normalize(a);
        normalize(b);
        put_step(z + j, a, b, stream);
      },
      [&](int64_t j, int64_t count) {
        Vec a, b;
        load_tail(x + j, count, a, b);
        normalize(a);
        normalize(b);
        store_tail(z + j, count, a, b);
      });
  *mean_out = mean;
  *rstd_out = rstd;
}

// g_next, x_next: the rows to prefetch while this one is written (nullptr for none).
template <typename T>
void input_grad_row(const T* g, const T* x, const T* g_next, const T* x_next, float mean, float rstd, T* dx,
                    const Norm& n, bool subtract_mean, bool rescale, bool stream) {
  float b_factor = rescale ? 1.f : 0.f;
  if (rescale && n.fairseq) {
    // d sigma / d v differs from torch mode: b = sigma D / ((D - u) sqrt(v)); a constant row
    // (sqrt(v) == 0) has y == 0, so the term vanishes there.
    const float sigma = 1.f / rstd, root_v = sigma - n.eps;
    b_factor = root_v > 0.f ? sigma * n.d / (n.dof() * root_v) : 0.f;
  }
  const Vec mean_v(mean), rstd_v(rstd), C(n.C), minus_Ck(-n.C * n.k);
  // y and g' = g (C - C k y) of two vectors of x and g, in place
  auto y_and_gp = [&](Vec& xa, Vec& ga) {
    xa = (xa - mean_v) * rstd_v;
    ga = ga * at::vec::fmadd(minus_Ck, xa, C);
  };
  auto add_terms = [&](const Vec& ya, const Vec& gpa, Vec& sum_gp, Vec& sum_gpy) {
    sum_gp = sum_gp + gpa;
    sum_gpy = at::vec::fmadd(gpa, ya, sum_gpy);
  };
  const auto [sum_gp, sum_gpy] = row_sums<2>(
      n.d,
      [&](int64_t j, auto& lo, auto& hi) {
        Vec xa, xb, ga, gb;
        load_step(x + j, xa, xb);
        load_step(g + j, ga, gb);
        y_and_gp(xa, ga);
        y_and_gp(xb, gb);
        add_terms(xa, ga, lo[0], lo[1]);
        add_terms(xb, gb, hi[0], hi[1]);
      },
      [&](int64_t j, int64_t count, auto& lo, auto& hi) {
        Vec xa, xb, ga, gb;
        load_tail(x + j, count, xa, xb);
        load_tail(g + j, count, ga, gb);
        y_and_gp(xa, ga);
        y_and_gp(xb, gb);
        keep_first(count, ga, gb);  // g' = 0 past the row: both terms vanish there
        add_terms(xa, ga, lo[0], lo[1]);
        add_terms(xb, gb, hi[0], hi[1]);
      });
  // dL/dx = rstd (g' - shift - tilt y)
  const Vec shift(subtract_mean ? float(sum_gp / n.d) : 0.f);
  const Vec minus_tilt(-float(b_factor * sum_gpy / n.d));
  auto input_grad = [&](Vec& xa, Vec& ga) {
    y_and_gp(xa, ga);
    ga = rstd_v * at::vec::fmadd(minus_tilt, xa, ga - shift);
  };
  for_each_step(
      n.d,
      [&](int64_t j) {
        if (x_next) {
          prefetch_step(x_next + j);
          prefetch_step(g_next + j);
        }
        Vec xa, xb, ga, gb;
        load_step(x + j, xa, xb);
        load_step(g + j, ga, gb);
        input_grad(xa, ga);
        input_grad(xb, gb);
        put_step(dx + j, ga, gb, stream);
      },
      [&](int64_t j, int64_t count) {
        Vec xa, xb, ga, gb;
        load_tail(x + j, count, xa, xb);
        load_tail(g + j, count, ga, gb);
        input_grad(xa, ga);
        input_grad(xb, gb);
        store_tail(dx + j, count, ga, gb);
      });
}

// An uninitialised tensor shaped like the contiguous x, from the pool of freed outputs (output_pool.h).
at::Tensor pooled_empty_like(const at::Tensor& x) {
  return at::detail::empty_generic(x.sizes(), &hf_adanorm::OutputPool::instance(),
                                   c10::DispatchKeySet(c10::DispatchKey::CPU), x.scalar_type(),
                                   c10::MemoryFormat::Contiguous);
}

// Whether the rows of `out` are written with non-temporal stores (float_lanes.h: stream_step): for
// outputs of 64 MiB and more, which outgrow the caches, so writing them through the caches only
// reads every line from memory before overwriting it. Measured on one thread, forward and then a
// read of the output (z.sum()), against plain stores: 0.91x the time at 64 MiB, 0.82-0.85x at
// 128-256 MiB, but 1.4-1.8x at 32 MiB, where the output would still have been in the caches for its reader.
bool streams(const at::Tensor& out) { return out.nbytes() >= (size_t(64) << 20); }

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous() && t.device().is_cpu(),
              "hf_adanorm CPU kernel: ", name, " must be a contiguous 2-D CPU tensor");
}

template <typename Body>
void dispatch_dtype(at::ScalarType dtype, Body body) {
  switch (dtype) {
    case at::kFloat: return body(float{});
    case at::kBFloat16: return body(c10::BFloat16{});
    case at::kHalf: return body(c10::Half{});
    default: TORCH_CHECK(false, "hf_adanorm CPU kernel: unsupported dtype ", dtype);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& x, double eps, bool centre,
                                                       bool fairseq, double k, double C) {
  check_rows(x, "x");
  const int64_t rows = x.size(0);
  const Norm n{float(eps), float(k), float(C), centre, fairseq, x.size(1)};
  at::Tensor z = pooled_empty_like(x);
  const bool stream = streams(z);
  at::Tensor mean = at::empty({rows, 1}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({rows, 1}, x.options().dtype(at::kFloat));
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.const_data_ptr<T>();
    T* zp = z.mutable_data_ptr<T>();
    float *mp = mean.mutable_data_ptr<float>(), *rp = rstd.mutable_data_ptr<float>();
    at::parallel_for(0, rows, grain(n.d), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const T* next = i + 1 < end ? xp + (i + 1) * n.d : nullptr;
        forward_row(xp + i * n.d, next, zp + i * n.d, mp + i, rp + i, n, stream);
      }
      if (stream) hf_adanorm::stream_fence();
    });
  });
  return {z, mean, rstd};
}

at::Tensor input_grad(const at::Tensor& g, const at::Tensor& x, const at::Tensor& mean,
                      const at::Tensor& rstd, double eps, bool centre, bool fairseq,
                      bool subtract_mean, bool rescale, double k, double C) {
  check_rows(g, "g");
  check_rows(x, "x");
  TORCH_CHECK(g.sizes() == x.sizes() && g.scalar_type() == x.scalar_type(),
              "hf_adanorm CPU kernel: g and x must match in shape and dtype");
  TORCH_CHECK(mean.scalar_type() == at::kFloat && rstd.scalar_type() == at::kFloat &&
                  mean.is_contiguous() && rstd.is_contiguous() &&
                  mean.numel() == x.size(0) && rstd.numel() == x.size(0),
              "hf_adanorm CPU kernel: mean and rstd must be contiguous float32, one per row");
  const Norm n{float(eps), float(k), float(C), centre, fairseq, x.size(1)};
  at::Tensor dx = pooled_empty_like(x);
  const bool stream = streams(dx);
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T *gp = g.const_data_ptr<T>(), *xp = x.const_data_ptr<T>();
    const float *mp = mean.const_data_ptr<float>(), *rp = rstd.const_data_ptr<float>();
    T* dxp = dx.mutable_data_ptr<T>();
    at::parallel_for(0, x.size(0), grain(n.d), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const bool more = i + 1 < end;
        input_grad_row(gp + i * n.d, xp + i * n.d, more ? gp + (i + 1) * n.d : nullptr,
                       more ? xp + (i + 1) * n.d : nullptr, mp[i], rp[i], dxp + i * n.d, n, subtract_mean, rescale,
                       stream);
      }
      if (stream) hf_adanorm::stream_fence();
    });
  });
  return dx;
}

std::vector<int64_t> cache_info() {
  auto [cached, limit] = hf_adanorm::OutputPool::instance().info();
  return {int64_t(cached), int64_t(limit)};
}

void set_cache_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "hf_adanorm CPU kernel: the cache limit must be >= 0 bytes, got ", bytes);
  hf_adanorm::OutputPool::instance().set_limit(size_t(bytes));
}

void empty_cache() { hf_adanorm::OutputPool::instance().empty(); }

}  // namespace

TORCH_LIBRARY(hf_adanorm_cpu, m) {
  m.def("forward(Tensor x, float eps, bool centre, bool fairseq, float k, float C) -> (Tensor, Tensor, Tensor)");
  m.def("input_grad(Tensor g, Tensor x, Tensor mean, Tensor rstd, float eps, bool centre, bool fairseq, "
        "bool subtract_mean, bool rescale, float k, float C) -> Tensor");
  // The pool of freed outputs (output_pool.h): [bytes cached, limit], the limit, emptying it.
  m.def("cache_info() -> int[]", &cache_info);
  m.def("set_cache_limit(int bytes) -> ()", &set_cache_limit);
  m.def("empty_cache() -> ()", &empty_cache);
}

TORCH_LIBRARY_IMPL(hf_adanorm_cpu, CPU, m) {
  m.impl("forward", &forward);
  m.impl("input_grad", &input_grad);
}
