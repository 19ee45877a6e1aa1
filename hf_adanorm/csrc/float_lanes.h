// Rows of float32, bfloat16 or float16 elements seen as float32 vectors (at::vec::Vectorized<float>),
// for the row kernels of norm_cpu.cpp.
//
// The vector width is the one torch's own kernels use on this CPU: cpu_kernels.py builds this
// file with -DCPU_CAPABILITY_AVX512 (16 lanes) or _AVX2 (8 lanes) only when
// torch.backends.cpu.get_cpu_capability() reports that the CPU runs them, else with the
// portable Vectorized (plain arrays the compiler may vectorize).
//
// A row is walked in steps of kStep = two float vectors, the unit a Vectorized<BFloat16> or
// Vectorized<Half> converts to and from. The last, partial step goes through a zero-padded
// buffer, and its lanes past the row's end are masked out of every sum.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>

namespace hf_adanorm {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
constexpr int64_t kStep = 2 * kLanes;

// Two float vectors from kStep elements at p.
inline void load_step(const float* p, Vec& lo, Vec& hi) {
  lo = Vec::loadu(p);
  hi = Vec::loadu(p + kLanes);
}
inline void load_step(const c10::BFloat16* p, Vec& lo, Vec& hi) { at::vec::load_fp32_from_bf16(p, lo, hi); }
inline void load_step(const c10::Half* p, Vec& lo, Vec& hi) { at::vec::load_fp32_from_fp16(p, lo, hi); }

// The same for the row's last count < kStep elements; lanes past them read 0.
template <typename T>
inline void load_tail(const T* p, int64_t count, Vec& lo, Vec& hi) {
  alignas(64) T padded[kStep];
  std::memset(padded, 0, sizeof padded);
  std::memcpy(padded, p, count * sizeof(T));
  load_step(padded, lo, hi);
}

// Two float vectors as one vector of kStep bfloat16, rounded to nearest even, bit for bit as
// at::vec's conversion. cpu_kernels.py defines HF_ADANORM_AVX512_BF16 (and -mavx512bf16) only for
// a CPU that has AVX512-BF16, whose one instruction converts both vectors; it reads denormals as 0
// and writes NaNs with other bits, so a step holding either goes through at::vec instead.
inline at::vec::Vectorized<c10::BFloat16> to_bfloat16(const Vec& lo, const Vec& hi) {
#if defined(CPU_CAPABILITY_AVX512) && defined(HF_ADANORM_AVX512_BF16)
  constexpr int kNanOrDenormal = 0x01 | 0x20 | 0x80;  // vfpclassps: quiet NaN, denormal, signalling NaN
  if (!(_mm512_fpclass_ps_mask(lo, kNanOrDenormal) | _mm512_fpclass_ps_mask(hi, kNanOrDenormal)))
    return at::vec::Vectorized<c10::BFloat16>(reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
#endif
  return at::vec::convert_float_bfloat16(lo, hi);
}

// kStep elements at p from two float vectors; bfloat16 and float16 round to nearest even.
inline void store_step(float* p, const Vec& lo, const Vec& hi) {
  lo.store(p);
  hi.store(p + kLanes);
}
inline void store_step(c10::BFloat16* p, const Vec& lo, const Vec& hi) { to_bfloat16(lo, hi).store(p); }
inline void store_step(c10::Half* p, const Vec& lo, const Vec& hi) { at::vec::convert_float_half(lo, hi).store(p); }

// store_step with non-temporal stores where the CPU has them and p is aligned to the vector:
// written past the caches, so a large output does not first read each line it overwrites.
// The caller issues stream_fence() before its stores may be read by another thread.
inline void stream_step(float* p, const Vec& lo, const Vec& hi) {
#if defined(CPU_CAPABILITY_AVX512)
  if ((reinterpret_cast<uintptr_t>(p) & 63) == 0) {
    _mm512_stream_ps(p, lo);
    _mm512_stream_ps(p + kLanes, hi);
    return;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if ((reinterpret_cast<uintptr_t>(p) & 31) == 0) {
    _mm256_stream_ps(p, lo);
    _mm256_stream_ps(p + kLanes, hi);
    return;
  }
#endif
  store_step(p, lo, hi);
}
// The 16-bit types: kStep elements are one whole vector once packed.
template <typename Half16, typename Pack>
inline void stream_packed(Half16* p, const Vec& lo, const Vec& hi, Pack pack) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if ((reinterpret_cast<uintptr_t>(p) & (kStep * sizeof(Half16) - 1)) == 0) {
#if defined(CPU_CAPABILITY_AVX512)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(p), pack(lo, hi));
#else
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), pack(lo, hi));
#endif
    return;
  }
#endif
  store_step(p, lo, hi);
}
inline void stream_step(c10::BFloat16* p, const Vec& lo, const Vec& hi) {
  stream_packed(p, lo, hi, to_bfloat16);
}
inline void stream_step(c10::Half* p, const Vec& lo, const Vec& hi) {
  stream_packed(p, lo, hi, [](const Vec& a, const Vec& b) { return at::vec::convert_float_half(a, b); });
}
// store_step, or stream_step where the caller chose non-temporal stores for its output.
template <typename T>
inline void put_step(T* p, const Vec& lo, const Vec& hi, bool stream) {
  if (stream) stream_step(p, lo, hi); else store_step(p, lo, hi);
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

template <typename T>
inline void store_tail(T* p, int64_t count, const Vec& lo, const Vec& hi) {
  alignas(64) T padded[kStep];
  store_step(padded, lo, hi);
  std::memcpy(p, padded, count * sizeof(T));
}

// Asks for the cache lines of one step at p to be brought into L2, without waiting for them.
// Used on the next row while the current one is computed from L1, so that memory keeps streaming.
template <typename T>
inline void prefetch_step(const T* p) {
#if defined(__GNUC__) || defined(__clang__)
  for (int64_t byte = 0; byte < kStep * int64_t(sizeof(T)); byte += 64)
    __builtin_prefetch(reinterpret_cast<const char*>(p) + byte, /*read*/ 0, /*L2*/ 2);
#endif
}

// Zero in the lanes at and past count of a step (0 <= count <= kStep), so that a partial step's
// padding adds nothing to a sum.
inline void keep_first(int64_t count, Vec& lo, Vec& hi) {
  const Vec zero(0.f);
  hi = Vec::set(zero, hi, std::max<int64_t>(count - kLanes, 0));
  lo = Vec::set(zero, lo, std::min(count, kLanes));
}

// Row sums of N terms at once without double arithmetic in the loop: each lane adds its terms
// in float over a block of kBlock elements (kBlock / kStep additions per lane), and the block's
// lanes go into per-lane Kahan-compensated totals, so the rounding error does not grow with the
// row length. The lanes are added up in double once per row.
constexpr int64_t kBlock = 64 * kStep;

// terms(j, lo, hi) adds step j's terms (elements j .. j + kStep) into the float vectors lo[i] and
// hi[i] of sum i; tail(j, count, lo, hi) does the same for the last count < kStep elements and
// must leave lanes at and past count unchanged (keep_first). Returns the N sums.
template <int N, typename Terms, typename Tail>
std::array<double, N> row_sums(int64_t d, Terms terms, Tail tail) {
  std::array<Vec, N> total, carry;
  total.fill(Vec(0.f));
  carry.fill(Vec(0.f));
  for (int64_t start = 0; start < d; start += kBlock) {
    const int64_t end = std::min(d, start + kBlock);
    std::array<Vec, N> lo, hi;  // two accumulators per sum: half the add latency per step
    lo.fill(Vec(0.f));
    hi.fill(Vec(0.f));
    int64_t j = start;
    for (; j + kStep <= end; j += kStep) terms(j, lo, hi);
    if (j < end) tail(j, end - j, lo, hi);
    for (int i = 0; i < N; ++i) {  // Kahan: carry holds what the last addition to total lost
      const Vec block = (lo[i] + hi[i]) - carry[i];
      const Vec sum = total[i] + block;
      carry[i] = (sum - total[i]) - block;
      total[i] = sum;
    }
  }
  std::array<double, N> out;
  for (int i = 0; i < N; ++i) {
    alignas(64) float t[kLanes], c[kLanes];
    total[i].store(t);
    carry[i].store(c);
    // The lanes in a tree of halves, not one after another: a serial sum of kLanes doubles is a
    // chain of 4-cycle additions, ~10 % of a 768-wide bfloat16 row.
    alignas(64) double lanes[kLanes];
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] = double(t[l]) - double(c[l]);
    for (int64_t width = kLanes / 2; width > 0; width /= 2)
      for (int64_t l = 0; l < width; ++l) lanes[l] += lanes[l + width];
    out[i] = lanes[0];
  }
  return out;
}

// row_sums over one row x: each step's two vectors go through prepare(a, b), the lanes past the
// row's end are then zeroed, and add(a, b, lo, hi) adds them into the sums.
template <int N, typename T, typename Prepare, typename Add>
std::array<double, N> row_sums_of(const T* x, int64_t d, Prepare prepare, Add add) {
  return row_sums<N>(
      d,
      [&](int64_t j, auto& lo, auto& hi) {
        Vec a, b;
        load_step(x + j, a, b);
        prepare(a, b);
        add(a, b, lo, hi);
      },
      [&](int64_t j, int64_t count, auto& lo, auto& hi) {
        Vec a, b;
        load_tail(x + j, count, a, b);
        prepare(a, b);
        keep_first(count, a, b);
        add(a, b, lo, hi);
      });
}

}  // namespace hf_adanorm
