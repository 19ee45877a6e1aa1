// CPU kernels for hf_adanorm.functional: the math of the Triton kernels, one row at a time.
//
// Each row of D elements (a few KiB) stays in L1 between the passes over it, so each
// direction streams through memory once, the minimum for a norm:
//   forward:  read x, write z = y * (C - C k y), mean and 1/sigma;
//   backward: read g, x, mean and 1/sigma, write dL/dx.
// torch's own route (LayerNorm kernel, then an element-wise pass for the AdaNorm factor)
// streams the whole tensor twice. Notation as in hf_adanorm/functional.py:
//   y  = (x - mean) / sigma,  sigma = sqrt(v + eps) ("torch") or sqrt(v) + eps ("fairseq"),
//   v  = sum((x - mean)^2) / (D - u),  g' = g * (C - C k y),
//   dL/dx = (1 / sigma) * (g' - a * mean(g') - b * y * mean(g' * y)).
// Arithmetic is float32 whatever the input dtype (float32, bfloat16, float16).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__F16C__) && defined(__AVX__)
#include <immintrin.h>
#endif

namespace {

// Element conversions written as plain bit arithmetic, so the compiler vectorizes the row
// loops for half-precision inputs too (c10's conversions branch, which keeps them scalar).
inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) {
  const uint32_t bits = uint32_t(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline void store(float* out, float v) { *out = v; }
inline void store(c10::BFloat16* out, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  const uint32_t nearest_even = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  out->x = v != v ? uint16_t(0x7FC0) : uint16_t(nearest_even);  // NaN stays NaN
}

struct Norm {
  float eps, k, C;
  bool centre, fairseq;
  int64_t d;
  // u = 1 for fairseq's unbiased variance of centred norms.
  int64_t dof() const { return std::max<int64_t>(d - (centre && fairseq ? 1 : 0), 1); }
};

// Rows per task: enough elements that a thread's share outweighs waking it.
int64_t grain(int64_t d) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)); }

// Row sums: float partial sums over blocks of kBlock elements (vectorized), added up in double,
// so the rounding error does not grow with the row length as one float accumulator's would.
constexpr int64_t kBlock = 256;

// sum over j < d of term(j), blocked as above.
template <typename Term>
double row_sum(int64_t d, Term term) {
  double total = 0.0;
  for (int64_t lo = 0; lo < d; lo += kBlock) {
    const int64_t hi = std::min(d, lo + kBlock);
    float part = 0.f;
#pragma omp simd reduction(+ : part)
    for (int64_t j = lo; j < hi; ++j) part += term(j);
    total += part;
  }
  return total;
}

template <typename T>
void forward_row(const T* x, T* z, float* mean_out, float* rstd_out, const Norm& n) {
  float mean = 0.f;
  if (n.centre) {
    // Summing x - x[0] keeps a large common offset out of the float partial sums.
    const float pivot = to_float(x[0]);
    mean = float(pivot + row_sum(n.d, [&](int64_t j) { return to_float(x[j]) - pivot; }) / n.d);
  }
  // Second pass over the cached row: exact for rows far from zero mean, unlike E[x^2] - E[x]^2.
  const double squares = row_sum(n.d, [&](int64_t j) {
    const float c = to_float(x[j]) - mean;
    return c * c;
  });
  const double v = squares / n.dof();
  const float rstd = float(n.fairseq ? 1.0 / (std::sqrt(v) + n.eps) : 1.0 / std::sqrt(v + n.eps));
  const float C = n.C, Ck = n.C * n.k;
#pragma omp simd
  for (int64_t j = 0; j < n.d; ++j) {
    const float y = (to_float(x[j]) - mean) * rstd;
    store(z + j, y * (C - Ck * y));
  }
  *mean_out = mean;
  *rstd_out = rstd;
}

template <typename T>
void input_grad_row(const T* g, const T* x, float mean, float rstd, T* dx, const Norm& n,
                    bool subtract_mean, bool rescale) {
  float b = rescale ? 1.f : 0.f;
  if (rescale && n.fairseq) {
    // d sigma / d v differs from torch mode: b = sigma D / ((D - u) sqrt(v)); a constant row
    // (sqrt(v) == 0) has y == 0, so the term vanishes there.
    const float sigma = 1.f / rstd, root_v = sigma - n.eps;
    b = root_v > 0.f ? sigma * n.d / (n.dof() * root_v) : 0.f;
  }
  const float C = n.C, Ck = n.C * n.k;
  double sum_gp = 0.0, sum_gpy = 0.0;
  for (int64_t lo = 0; lo < n.d; lo += kBlock) {
    const int64_t hi = std::min(n.d, lo + kBlock);
    float part_gp = 0.f, part_gpy = 0.f;
#pragma omp simd reduction(+ : part_gp, part_gpy)
    for (int64_t j = lo; j < hi; ++j) {
      const float y = (to_float(x[j]) - mean) * rstd;
      const float gp = to_float(g[j]) * (C - Ck * y);
      part_gp += gp;
      part_gpy += gp * y;
    }
    sum_gp += part_gp;
    sum_gpy += part_gpy;
  }
  const float shift = subtract_mean ? float(sum_gp / n.d) : 0.f;
  const float tilt = float(b * sum_gpy / n.d);
#pragma omp simd
  for (int64_t j = 0; j < n.d; ++j) {
    const float y = (to_float(x[j]) - mean) * rstd;
    const float gp = to_float(g[j]) * (C - Ck * y);
    store(dx + j, rstd * (gp - shift - tilt * y));
  }
}

// float16: compilers do not vectorize its conversions inside the loops above, so each row is
// converted into a float32 scratch row (8 lanes at a time with F16C), normalized, converted back.
void half_to_float(const c10::Half* src, float* dst, int64_t n) {
  int64_t j = 0;
#if defined(__F16C__) && defined(__AVX__)
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j))));
#endif
  for (; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

void float_to_half(const float* src, c10::Half* dst, int64_t n) {
  int64_t j = 0;
#if defined(__F16C__) && defined(__AVX__)
  for (; j + 8 <= n; j += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; j < n; ++j) dst[j] = c10::Half(src[j]);
}

float* scratch(int slot, int64_t n) {
  thread_local std::vector<float> rows[2];
  if (int64_t(rows[slot].size()) < n) rows[slot].resize(n);
  return rows[slot].data();
}

template <>
void forward_row(const c10::Half* x, c10::Half* z, float* mean_out, float* rstd_out, const Norm& n) {
  float* row = scratch(0, n.d);
  half_to_float(x, row, n.d);
  forward_row(row, row, mean_out, rstd_out, n);  // z[j] is written after x[j]'s last read
  float_to_half(row, z, n.d);
}

template <>
void input_grad_row(const c10::Half* g, const c10::Half* x, float mean, float rstd, c10::Half* dx,
                    const Norm& n, bool subtract_mean, bool rescale) {
  float *g_row = scratch(0, n.d), *x_row = scratch(1, n.d);
  half_to_float(g, g_row, n.d);
  half_to_float(x, x_row, n.d);
  input_grad_row(g_row, x_row, mean, rstd, g_row, n, subtract_mean, rescale);
  float_to_half(g_row, dx, n.d);
}

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
  at::Tensor z = at::empty_like(x);
  at::Tensor mean = at::empty({rows, 1}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({rows, 1}, x.options().dtype(at::kFloat));
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.const_data_ptr<T>();
    T* zp = z.mutable_data_ptr<T>();
    float *mp = mean.mutable_data_ptr<float>(), *rp = rstd.mutable_data_ptr<float>();
    at::parallel_for(0, rows, grain(n.d), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) forward_row(xp + i * n.d, zp + i * n.d, mp + i, rp + i, n);
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
  at::Tensor dx = at::empty_like(x);
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T *gp = g.const_data_ptr<T>(), *xp = x.const_data_ptr<T>();
    const float *mp = mean.const_data_ptr<float>(), *rp = rstd.const_data_ptr<float>();
    T* dxp = dx.mutable_data_ptr<T>();
    at::parallel_for(0, x.size(0), grain(n.d), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        input_grad_row(gp + i * n.d, xp + i * n.d, mp[i], rp[i], dxp + i * n.d, n, subtract_mean, rescale);
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY(hf_adanorm_cpu, m) {
  m.def("forward(Tensor x, float eps, bool centre, bool fairseq, float k, float C) -> (Tensor, Tensor, Tensor)");
  m.def("input_grad(Tensor g, Tensor x, Tensor mean, Tensor rstd, float eps, bool centre, bool fairseq, "
        "bool subtract_mean, bool rescale, float k, float C) -> Tensor");
}

TORCH_LIBRARY_IMPL(hf_adanorm_cpu, CPU, m) {
  m.impl("forward", &forward);
  m.impl("input_grad", &input_grad);
}
