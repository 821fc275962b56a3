// Shared pieces of the CPU kernels (runners/kernels.py builds them into one library):
// AVX2/FMA/F16C vector helpers and the ops' declarations. Everything here is inline, in
// an anonymous namespace, so each translation unit keeps its own copy.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace openllm_clone {

at::Tensor linear_packed(const at::Tensor& x, const at::Tensor& w, int64_t n);
at::Tensor linear_quant(const at::Tensor& x, const at::Tensor& w, int64_t n);
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& idx,
                           const at::Tensor& lens, int64_t window, double scale);
void lora_bgmv_(const at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                const at::Tensor& g, const at::Tensor& c, const at::Tensor& slots, int64_t offset);

namespace {
constexpr int NB = 16;  // output features per packed weight block (two AVX2 vectors)

inline __m256 load8(const uint16_t* p) {  // 8 bfloat16 -> 8 float32 (exact)
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

inline float tofloat(float v) { return v; }
inline float tofloat(uint16_t v) {  // bfloat16 -> float32 (exact)
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Dot products of up to four float32 rows x[j] with one row a (n values); two
// accumulators a row, so that one row is not one chain of dependent FMAs.
template <typename C>
inline void dots(const float* const* x, int nx, const C* a, int64_t n, float* out) {
  __m256 acc[4][2];
  for (int j = 0; j < 4; ++j) acc[j][0] = acc[j][1] = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= n; d += 16) {
    const __m256 a0 = load8(a + d), a1 = load8(a + d + 8);
    for (int j = 0; j < nx; ++j) {
      acc[j][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x[j] + d), a0, acc[j][0]);
      acc[j][1] = _mm256_fmadd_ps(_mm256_loadu_ps(x[j] + d + 8), a1, acc[j][1]);
    }
  }
  for (; d + 8 <= n; d += 8) {
    const __m256 a0 = load8(a + d);
    for (int j = 0; j < nx; ++j)
      acc[j][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x[j] + d), a0, acc[j][0]);
  }
  for (int j = 0; j < nx; ++j) {
    const __m256 v = _mm256_add_ps(acc[j][0], acc[j][1]);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_hadd_ps(h, h);
    h = _mm_hadd_ps(h, h);
    float sum = _mm_cvtss_f32(h);
    for (int64_t e = d; e < n; ++e) sum += x[j][e] * tofloat(a[e]);
    out[j] = sum;
  }
}

// One dot product: dots' sums at one row.
template <typename C>
inline float dot(const float* a, const C* b, int64_t n) {
  float r;
  dots(&a, 1, b, n, &r);
  return r;
}

template <typename C>
inline void axpy(float alpha, const C* x, float* y, int64_t n) {
  const __m256 a = _mm256_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(a, load8(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += alpha * tofloat(x[i]);
}

// Eight dot products of a (float32) with the rows r[0..8), D a multiple of 8: the eight
// sums stay vectors over d and are reduced together at the end (three hadd levels for
// eight results instead of three for each).
template <typename C>
inline __m256 dot8(const float* a, const C* const* r, int64_t D) {
  __m256 s[8];
  for (int p = 0; p < 8; ++p) s[p] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    const __m256 x = _mm256_loadu_ps(a + d);
    for (int p = 0; p < 8; ++p) s[p] = _mm256_fmadd_ps(x, load8(r[p] + d), s[p]);
  }
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(s[0], s[1]), _mm256_hadd_ps(s[2], s[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(s[4], s[5]), _mm256_hadd_ps(s[6], s[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// exp of eight floats (Cephes' expf as in avx_mathfun: range reduction by ln 2 in two
// parts, a degree-5 polynomial; within 2 ulp of expf); inputs below -88.38 give 0.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f));
  const __m256 fx = _mm256_floor_ps(
      _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// In place: s[i] = exp(s[i] - max s); returns the sum.
inline float softmax_exp(float* s, int64_t L) {
  const float m = *std::max_element(s, s + L);
  const __m256 mv = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  int64_t p = 0;
  for (; p + 8 <= L; p += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + p), mv));
    _mm256_storeu_ps(s + p, e);
    acc = _mm256_add_ps(acc, e);
  }
  alignas(32) float part[8];
  _mm256_store_ps(part, acc);
  float sum = 0.f;
  for (int i = 0; i < 8; ++i) sum += part[i];
  for (; p < L; ++p) sum += (s[p] = std::exp(s[p] - m));
  return sum;
}
}  // namespace
}  // namespace openllm_clone
