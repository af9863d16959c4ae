// Small SIMD layer for the CPU kernels: an 8-lane float vector `V8` (AVX2+FMA when the build
// enables it, a plain array the compiler may auto-vectorise otherwise) plus tag-dispatched
// load/store/round helpers so every kernel body is written once as a generic lambda over
// `F in {V8, float}` (vector main loop, scalar tail).  Storage types: float and c10::BFloat16;
// arithmetic is always float32.
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LLMK_AVX2 1
#endif

namespace llmk {

using BF16 = c10::BFloat16;
constexpr int64_t W = 8;  // lanes of V8

// ---------------------------------------------------------------- scalar conversions
inline float to_f(float v) { return v; }
inline float to_f(BF16 v) { return static_cast<float>(v); }
template <typename T>
inline T from_f(float v) {
  return static_cast<T>(v);  // BFloat16(float) rounds to nearest even, NaN stays NaN
}
template <typename T>
inline float rnd(float v) {  // round to T's precision, back to float
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return to_f(from_f<T>(v));
  }
}
inline float ld(float, const float* p) { return *p; }
inline float ld(float, const BF16* p) { return to_f(*p); }
inline void st(float* p, float v) { *p = v; }
inline void st(BF16* p, float v) { *p = from_f<BF16>(v); }
inline float splat(float, float s) { return s; }
inline float vexp(float x) { return std::exp(x); }
inline float vmax(float a, float b) { return a > b ? a : b; }
inline float fmadd(float a, float b, float c) { return a * b + c; }

// ---------------------------------------------------------------- 8-lane vector
#ifdef LLMK_AVX2
struct V8 {
  __m256 v;
  V8() : v(_mm256_setzero_ps()) {}
  V8(__m256 x) : v(x) {}  // NOLINT
  explicit V8(float s) : v(_mm256_set1_ps(s)) {}
};
inline V8 operator+(V8 a, V8 b) { return _mm256_add_ps(a.v, b.v); }
inline V8 operator-(V8 a, V8 b) { return _mm256_sub_ps(a.v, b.v); }
inline V8 operator*(V8 a, V8 b) { return _mm256_mul_ps(a.v, b.v); }
inline V8 operator/(V8 a, V8 b) { return _mm256_div_ps(a.v, b.v); }
inline V8 operator-(V8 a) { return _mm256_xor_ps(a.v, _mm256_set1_ps(-0.0f)); }
inline V8 fmadd(V8 a, V8 b, V8 c) { return _mm256_fmadd_ps(a.v, b.v, c.v); }
// max that propagates a NaN in `b` (the new data) into the accumulator
inline V8 vmax(V8 a, V8 b) { return _mm256_max_ps(a.v, b.v); }
inline V8 splat(V8, float s) { return V8(s); }
inline V8 ld(V8, const float* p) { return _mm256_loadu_ps(p); }
inline V8 ld(V8, const BF16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
// float -> bf16 bits (round to nearest even, NaN -> quiet NaN), as 8 x int32 in [0, 0xffff]
inline __m256i bf16_bits(V8 a) {
  __m256i u = _mm256_castps_si256(a.v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  __m256 isnan = _mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q);
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(isnan));
}
inline void st(float* p, V8 a) { _mm256_storeu_ps(p, a.v); }
inline void st(BF16* p, V8 a) {
  __m256i r = bf16_bits(a);
  __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
// Round to T's precision and back.  No NaN special case: quiet NaNs (everything arithmetic
// produces, and every bf16 value) keep their top bits, so they stay NaN.
template <typename T>
inline V8 rnd(V8 a) {
  if constexpr (std::is_same_v<T, float>) {
    return a;
  } else {
    __m256i u = _mm256_castps_si256(a.v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    return _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
  }
}
inline float hsum(V8 a) {
  __m128 lo = _mm256_castps256_ps128(a.v), hi = _mm256_extractf128_ps(a.v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}
inline float hmax(V8 a) {
  __m128 lo = _mm256_castps256_ps128(a.v), hi = _mm256_extractf128_ps(a.v, 1);
  lo = _mm_max_ps(lo, hi);
  lo = _mm_max_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_max_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}
inline V8 nan_mask(V8 a) { return _mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q); }
inline V8 mask_or(V8 a, V8 b) { return _mm256_or_ps(a.v, b.v); }
inline bool any(V8 m) { return _mm256_movemask_ps(m.v) != 0; }
// exp(x), Cephes-style range reduction + degree-5 polynomial (~2 ulp).  NaN propagates,
// x < -88.37 gives 0, x > 88.37 saturates at ~2.4e38 (callers only feed x <= ~88).
inline V8 vexp(V8 xv) {
  __m256 x = _mm256_min_ps(_mm256_set1_ps(88.3762626647949f), xv.v);  // operand order keeps NaN
  x = _mm256_max_ps(_mm256_set1_ps(-88.3762626647949f), x);
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x);
  y = _mm256_add_ps(y, _mm256_set1_ps(1.0f));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#else
struct V8 {
  float v[W];
  V8() { for (int i = 0; i < W; ++i) v[i] = 0.f; }
  explicit V8(float s) { for (int i = 0; i < W; ++i) v[i] = s; }
};
#define LLMK_V8_BINOP(op)                                   \
  inline V8 operator op(V8 a, V8 b) {                       \
    V8 r;                                                   \
    for (int i = 0; i < W; ++i) r.v[i] = a.v[i] op b.v[i];  \
    return r;                                               \
  }
LLMK_V8_BINOP(+)
LLMK_V8_BINOP(-)
LLMK_V8_BINOP(*)
LLMK_V8_BINOP(/)
#undef LLMK_V8_BINOP
inline V8 operator-(V8 a) { for (int i = 0; i < W; ++i) a.v[i] = -a.v[i]; return a; }
inline V8 fmadd(V8 a, V8 b, V8 c) { for (int i = 0; i < W; ++i) c.v[i] = a.v[i] * b.v[i] + c.v[i]; return c; }
inline V8 vmax(V8 a, V8 b) { for (int i = 0; i < W; ++i) a.v[i] = (a.v[i] > b.v[i] || std::isnan(a.v[i])) ? a.v[i] : b.v[i]; return a; }
inline V8 splat(V8, float s) { return V8(s); }
template <typename T>
inline V8 ld(V8, const T* p) { V8 r; for (int i = 0; i < W; ++i) r.v[i] = to_f(p[i]); return r; }
template <typename T>
inline void st(T* p, V8 a) { for (int i = 0; i < W; ++i) p[i] = from_f<T>(a.v[i]); }
template <typename T>
inline V8 rnd(V8 a) { for (int i = 0; i < W; ++i) a.v[i] = rnd<T>(a.v[i]); return a; }
inline float hsum(V8 a) { float s = 0.f; for (int i = 0; i < W; ++i) s += a.v[i]; return s; }
inline float hmax(V8 a) { float m = a.v[0]; for (int i = 1; i < W; ++i) m = vmax(m, a.v[i]); return m; }
inline V8 nan_mask(V8 a) { V8 r; for (int i = 0; i < W; ++i) r.v[i] = std::isnan(a.v[i]) ? 1.f : 0.f; return r; }
inline V8 mask_or(V8 a, V8 b) { for (int i = 0; i < W; ++i) a.v[i] = (a.v[i] != 0.f || b.v[i] != 0.f) ? 1.f : 0.f; return a; }
inline bool any(V8 m) { for (int i = 0; i < W; ++i) if (m.v[i] != 0.f) return true; return false; }
inline V8 vexp(V8 a) { for (int i = 0; i < W; ++i) a.v[i] = std::exp(a.v[i]); return a; }
#endif

// Accumulator usable from generic (V8 / float) loop bodies.
struct Acc {
  V8 v{};
  float s = 0.f;
  void add(V8 x) { v = v + x; }
  void add(float x) { s += x; }
  float total() const { return hsum(v) + s; }
};

// Run `body(tag, c)` over [0, n): vector steps of W with tag V8, then a scalar tail with tag float.
template <typename Body>
inline void for_cols(int64_t n, Body&& body) {
  int64_t c = 0;
  for (; c + W <= n; c += W) body(V8(), c);
  for (; c < n; ++c) body(0.f, c);
}

// Contiguous row ranges used for deterministic per-chunk partial sums (weight/bias grads).
inline int64_t num_chunks(int64_t rows, int64_t max_chunks) {
  return std::max<int64_t>(1, std::min(rows, max_chunks));
}

}  // namespace llmk
