"""A linear layer for decode steps on CPU: blocked weights, float32 math, bf16 storage.

``torch.ops.openllm_clone.linear_packed(x, w, n)`` computes ``x @ W.T`` for float32 rows
``x [M, K]`` (M is a decode batch: 1 to a few dozen) and a weight packed by
:func:`pack_weight` into blocks of 16 output features, ``[ceil(n / 16), K, 16]``,
stored as bfloat16 or float32. Each block is one sequential stream (the hardware
prefetcher's best case); each k step converts 16 weights to float32 once (a shift for
bfloat16) and multiplies them into up to six rows with fused multiply-adds, so the
weights are read once per step at any batch size.

Why: a decode step at batch 1 reads every weight once, so its speed is the weights'
bytes over the memory bandwidth. Most checkpoints (SmolLM2, Llama, Qwen, Gemma) are
stored in bfloat16; loaded as float32 their weights are exact bfloat16 values, so
keeping them in bfloat16 and computing in float32 gives float32's results from half
the bytes. Inductor's CPU GEMM template has no float32-activation, bfloat16-weight
kernel (its bf16 kernels round the activations to bf16), and its float32 micro-GEMM
reached ~80 GFLOP/s at 16 rows on 2 AVX2 cores where this one reaches 115-135, and
at one row it streams the weights at ~33 GB/s, two blocks per pass (the numbers are in
the README).

``torch.ops.openllm_clone.linear_quant(x, w, n)`` does the same for weights whose float32
values are exactly GGUF Q4_1 or Q8_0 blocks (a checkpoint converted from a GGUF file, as
the embedded SmolLM2 is: Q4_1 projections, a Q8_0 embedding), found by
:func:`pack_quant` and kept as those blocks: 5 or 8.5 bits a weight instead of 32. At
more rows each block is rebuilt once into float32 in cache, each weight exactly (``d *
q + m`` with one rounding, as GGUF's own dequantizer), and the float32 passes read it
there in the float32 kernel's order: the float32 kernel's bits. At one row (bound by
the arithmetic, not by memory: SmolLM2's projections read ~95 MB a step instead of
540 MB) the quants are multiplied into the row and each group's scale and offset are
applied once, ``d * sum(q x) + m * sum(x)`` as llama.cpp does but in float32 (within
float32 rounding of the float32 kernel): one FMA a weight instead of a rebuild and an
FMA, 19 % less time.

The C++ source is built with :func:`torch.utils.cpp_extension.load_inline` into the
compile cache beside the AOTInductor package that calls it (~25 s, once), and loaded
from there by later starts before the package. AVX2, FMA and F16C (x86-64) only: elsewhere
:func:`available` is False and the compiled step keeps ``F.linear``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

__all__ = [
    "KERNEL_SOURCE",
    "QUANT_FORMATS",
    "available",
    "bf16_exact",
    "build",
    "enabled",
    "load",
    "loaded",
    "pack_quant",
    "pack_weight",
]

logger = logging.getLogger(__name__)

BLOCK = 16  # output features per packed block (two AVX2 vectors)

KERNEL_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {
constexpr int NB = 16;

inline __m256 load8(const uint16_t* p) {  // 8 bfloat16 -> 8 float32 (exact)
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

// out[i][0..16) = sum_k X[i, k] * Wb[k][0..16) for MR rows of X; U independent
// accumulator sets over k so that few rows still keep the FMA units busy.
template <typename W, int MR, int U>
inline void micro(const float* X, int64_t ldx, const W* wb, int64_t K, float* out) {
  __m256 acc[U][MR][2];
  for (int u = 0; u < U; ++u)
    for (int i = 0; i < MR; ++i) acc[u][i][0] = acc[u][i][1] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + U <= K; k += U) {
    for (int u = 0; u < U; ++u) {
      const W* p = wb + (k + u) * NB;
      __m256 w0 = load8(p), w1 = load8(p + 8);
      for (int i = 0; i < MR; ++i) {
        __m256 xb = _mm256_broadcast_ss(X + i * ldx + k + u);
        acc[u][i][0] = _mm256_fmadd_ps(w0, xb, acc[u][i][0]);
        acc[u][i][1] = _mm256_fmadd_ps(w1, xb, acc[u][i][1]);
      }
    }
  }
  for (; k < K; ++k) {
    const W* p = wb + k * NB;
    __m256 w0 = load8(p), w1 = load8(p + 8);
    for (int i = 0; i < MR; ++i) {
      __m256 xb = _mm256_broadcast_ss(X + i * ldx + k);
      acc[0][i][0] = _mm256_fmadd_ps(w0, xb, acc[0][i][0]);
      acc[0][i][1] = _mm256_fmadd_ps(w1, xb, acc[0][i][1]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    __m256 s0 = acc[0][i][0], s1 = acc[0][i][1];
    for (int u = 1; u < U; ++u) {
      s0 = _mm256_add_ps(s0, acc[u][i][0]);
      s1 = _mm256_add_ps(s1, acc[u][i][1]);
    }
    _mm256_storeu_ps(out + i * NB, s0);
    _mm256_storeu_ps(out + i * NB + 8, s1);
  }
}

// One row (a batch-1 decode step): two blocks per pass, so that each thread keeps two
// memory streams in flight (one stream reached ~25 GB/s on 2 cores, two ~33).
template <typename W>
inline void fma2(const W* p, const W* q, __m256 x, __m256& a0, __m256& a1, __m256& b0,
                 __m256& b1) {
  a0 = _mm256_fmadd_ps(load8(p), x, a0);
  a1 = _mm256_fmadd_ps(load8(p + 8), x, a1);
  b0 = _mm256_fmadd_ps(load8(q), x, b0);
  b1 = _mm256_fmadd_ps(load8(q + 8), x, b1);
}

template <typename W>
inline void gemv2(const float* X, const W* wa, const W* wb, int64_t K, float* outa, float* outb) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
  int64_t k = 0;
  for (; k + 2 <= K; k += 2) {  // two k at a time: two independent accumulator sets
    fma2(wa + k * NB, wb + k * NB, _mm256_broadcast_ss(X + k), a0, a1, b0, b1);
    fma2(wa + (k + 1) * NB, wb + (k + 1) * NB, _mm256_broadcast_ss(X + k + 1), a2, a3, b2, b3);
  }
  if (k < K) fma2(wa + k * NB, wb + k * NB, _mm256_broadcast_ss(X + k), a0, a1, b0, b1);
  _mm256_storeu_ps(outa, _mm256_add_ps(a0, a2));
  _mm256_storeu_ps(outa + 8, _mm256_add_ps(a1, a3));
  _mm256_storeu_ps(outb, _mm256_add_ps(b0, b2));
  _mm256_storeu_ps(outb + 8, _mm256_add_ps(b1, b3));
}

// Both kernels' parallel loop over blocks of 16 output features: at one row two blocks
// per pass (`pair`: two memory streams a thread), at more rows (and an odd block) the
// block's float32 weights (`block`) against up to 6 rows at a time.
template <typename T, typename Pair, typename Block>
void drive(const float* X, float* Y, int64_t M, int64_t K, int64_t n, Pair pair, Block block) {
  const int64_t blocks = (n + NB - 1) / NB;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    alignas(32) float tile[6 * NB];
    if (M == 1 && b1 - b0 >= 2) {
      const int64_t half = (b1 - b0) / 2;
      for (int64_t j = 0; j < half; ++j) {
        const int64_t ba = b0 + j, bb = b0 + half + j;
        pair(ba, bb, tile, tile + NB);
        std::memcpy(Y + ba * NB, tile, sizeof(float) * std::min<int64_t>(NB, n - ba * NB));
        std::memcpy(Y + bb * NB, tile + NB, sizeof(float) * std::min<int64_t>(NB, n - bb * NB));
      }
      b0 += 2 * half;  // an odd block left: the general path below
    }
    std::vector<float> scratch;
    for (int64_t b = b0; b < b1; ++b) {
      const T* wb = block(b, scratch);
      const int64_t n0 = b * NB;
      const int nr = static_cast<int>(std::min<int64_t>(NB, n - n0));
      // Passes of at most 6 rows (12 accumulators: enough to keep both FMA pipes busy),
      // as even as possible (8 rows: 4 + 4, not 6 + 2).
      for (int64_t m0 = 0, mr = 0; m0 < M; m0 += mr) {
        mr = (M - m0 + (M - m0 + 5) / 6 - 1) / ((M - m0 + 5) / 6);
        const float* xm = X + m0 * K;
        switch (mr) {
          case 1: micro<T, 1, 4>(xm, K, wb, K, tile); break;
          case 2: micro<T, 2, 2>(xm, K, wb, K, tile); break;
          case 3: micro<T, 3, 1>(xm, K, wb, K, tile); break;
          case 4: micro<T, 4, 1>(xm, K, wb, K, tile); break;
          case 5: micro<T, 5, 1>(xm, K, wb, K, tile); break;
          default: micro<T, 6, 1>(xm, K, wb, K, tile); break;
        }
        for (int i = 0; i < mr; ++i)
          std::memcpy(Y + (m0 + i) * n + n0, tile + i * NB, sizeof(float) * nr);
      }
    }
  });
}

// Block-quantized weights, exactly as GGUF's Q4_1 (w = d * q + m, q in 0..15) and Q8_0
// (w = d * q, q in -127..127) store them, with d and m float16 per 32 inputs of one
// output feature. Per 16-feature block and group of 32 k: the quants ([32 k][16
// features]: Q4_1 two per byte, feature j low and j + 8 high; Q8_0 one int8 each), then
// the 16 scales d, then (Q4_1) the 16 offsets m. d * q is exact in float32 (11 + 8 bits
// at most), so a weight is rebuilt with one rounding, as GGUF's own float32 dequantizer
// does, and the sums below are those of the float32 kernel over the same values, in
// the same order: the same bits, from 5 or 8.5 bits a weight instead of 32.
struct Q4_1 {
  static constexpr int64_t BYTES = 32 * 8 + 2 * 32;
  struct S { __m256 d0, d1, m0, m1; };
  static inline S scales(const uint8_t* g) {
    const __m128i* s = reinterpret_cast<const __m128i*>(g + 32 * 8);
    return {_mm256_cvtph_ps(_mm_loadu_si128(s)), _mm256_cvtph_ps(_mm_loadu_si128(s + 1)),
            _mm256_cvtph_ps(_mm_loadu_si128(s + 2)), _mm256_cvtph_ps(_mm_loadu_si128(s + 3))};
  }
  static inline void at(const uint8_t* g, int kk, const S& s, __m256& w0, __m256& w1) {
    const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(g + kk * 8));
    const __m128i low = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(v, low), hi = _mm_and_si128(_mm_srli_epi16(v, 4), low);
    w0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), s.d0, s.m0);
    w1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), s.d1, s.m1);
  }
  static inline void raw(const uint8_t* g, int kk, __m256& q0, __m256& q1) {
    const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(g + kk * 8));
    const __m128i low = _mm_set1_epi8(0x0F);
    q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(v, low)));
    q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v, 4), low)));
  }
  // sum_k (d q_k + m) x_k = d sum_k q_k x_k + m sum_k x_k
  static inline void finish(const S& s, __m256 q0, __m256 q1, __m256 sx, __m256& a0, __m256& a1) {
    a0 = _mm256_fmadd_ps(s.m0, sx, _mm256_fmadd_ps(q0, s.d0, a0));
    a1 = _mm256_fmadd_ps(s.m1, sx, _mm256_fmadd_ps(q1, s.d1, a1));
  }
};
struct Q8_0 {
  static constexpr int64_t BYTES = 32 * 16 + 32;
  struct S { __m256 d0, d1; };
  static inline S scales(const uint8_t* g) {
    const __m128i* s = reinterpret_cast<const __m128i*>(g + 32 * 16);
    return {_mm256_cvtph_ps(_mm_loadu_si128(s)), _mm256_cvtph_ps(_mm_loadu_si128(s + 1))};
  }
  static inline void at(const uint8_t* g, int kk, const S& s, __m256& w0, __m256& w1) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(g + kk * 16));
    w0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), s.d0);
    w1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8))), s.d1);
  }
  static inline void raw(const uint8_t* g, int kk, __m256& q0, __m256& q1) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(g + kk * 16));
    q0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
    q1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)));
  }
  static inline void finish(const S& s, __m256 q0, __m256 q1, __m256, __m256& a0, __m256& a1) {
    a0 = _mm256_fmadd_ps(q0, s.d0, a0);
    a1 = _mm256_fmadd_ps(q1, s.d1, a1);
  }
};

// One row over quantized groups, two blocks per pass: per group of 32 k the quants
// (not the weights) are multiplied into the row, even and odd k in two sets, and the
// group's scale and offset are applied once: d * sum(q x) + m * sum(x) (one FMA a
// weight instead of a rebuild and an FMA; float32 sums in another order than the
// float32 kernel's, so not its bits: within float32 rounding of it).
template <typename F>
inline void gemv2_q(const float* X, const float* xsum, const uint8_t* wa, const uint8_t* wb,
                    int64_t K, float* outa, float* outb) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
  for (int64_t g = 0; g < K / 32; ++g) {
    const uint8_t* ga = wa + g * F::BYTES;
    const uint8_t* gb = wb + g * F::BYTES;
    const float* x = X + g * 32;
    __m256 pa0 = _mm256_setzero_ps(), pa1 = pa0, pa2 = pa0, pa3 = pa0;
    __m256 pb0 = pa0, pb1 = pa0, pb2 = pa0, pb3 = pa0;
    for (int kk = 0; kk < 32; kk += 2) {
      __m256 p0, p1, q0, q1;
      const __m256 x0 = _mm256_broadcast_ss(x + kk), x1 = _mm256_broadcast_ss(x + kk + 1);
      F::raw(ga, kk, p0, p1);
      F::raw(gb, kk, q0, q1);
      pa0 = _mm256_fmadd_ps(p0, x0, pa0);
      pa1 = _mm256_fmadd_ps(p1, x0, pa1);
      pb0 = _mm256_fmadd_ps(q0, x0, pb0);
      pb1 = _mm256_fmadd_ps(q1, x0, pb1);
      F::raw(ga, kk + 1, p0, p1);
      F::raw(gb, kk + 1, q0, q1);
      pa2 = _mm256_fmadd_ps(p0, x1, pa2);
      pa3 = _mm256_fmadd_ps(p1, x1, pa3);
      pb2 = _mm256_fmadd_ps(q0, x1, pb2);
      pb3 = _mm256_fmadd_ps(q1, x1, pb3);
    }
    const __m256 sx = _mm256_broadcast_ss(xsum + g);
    F::finish(F::scales(ga), _mm256_add_ps(pa0, pa2), _mm256_add_ps(pa1, pa3), sx, a0, a1);
    F::finish(F::scales(gb), _mm256_add_ps(pb0, pb2), _mm256_add_ps(pb1, pb3), sx, b0, b1);
  }
  _mm256_storeu_ps(outa, a0);
  _mm256_storeu_ps(outa + 8, a1);
  _mm256_storeu_ps(outb, b0);
  _mm256_storeu_ps(outb + 8, b1);
}

// One block of quantized weights rebuilt in float32, [K][16] as the float32 kernel reads.
template <typename F>
inline void dequant(const uint8_t* wb, int64_t K, float* out) {
  for (int64_t g = 0; g < K / 32; ++g) {
    const uint8_t* gp = wb + g * F::BYTES;
    const typename F::S s = F::scales(gp);
    for (int kk = 0; kk < 32; ++kk) {
      __m256 w0, w1;
      F::at(gp, kk, s, w0, w1);
      _mm256_storeu_ps(out + (g * 32 + kk) * NB, w0);
      _mm256_storeu_ps(out + (g * 32 + kk) * NB + 8, w1);
    }
  }
}

template <typename W>
void run(const float* X, const W* Wp, float* Y, int64_t M, int64_t K, int64_t n) {
  drive<W>(
      X, Y, M, K, n,
      [&](int64_t a, int64_t b, float* oa, float* ob) {
        gemv2(X, Wp + a * K * NB, Wp + b * K * NB, K, oa, ob);
      },
      [&](int64_t b, std::vector<float>&) { return Wp + b * K * NB; });
}

// Quantized: at one row the weights are rebuilt inside the sums (gemv2_q); otherwise
// each block is rebuilt once into float32 (K x 16, in L2) and the float32 passes read
// it there, rather than rebuilding the weights in every pass of 4 rows.
template <typename F>
void run_q(const float* X, const uint8_t* Wq, float* Y, int64_t M, int64_t K, int64_t n) {
  const int64_t stride = (K / 32) * F::BYTES;
  std::vector<float> xsum(M == 1 ? K / 32 : 0);  // the row's sum over each group
  for (size_t g = 0; g < xsum.size(); ++g) {
    float sum = 0.f;
    for (int kk = 0; kk < 32; ++kk) sum += X[g * 32 + kk];
    xsum[g] = sum;
  }
  drive<float>(
      X, Y, M, K, n,
      [&](int64_t a, int64_t b, float* oa, float* ob) {
        gemv2_q<F>(X, xsum.data(), Wq + a * stride, Wq + b * stride, K, oa, ob);
      },
      [&](int64_t b, std::vector<float>& dense) {
        dense.resize(K * NB);
        dequant<F>(Wq + b * stride, K, dense.data());
        return static_cast<const float*>(dense.data());
      });
}

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
    for (int j = 0; j < nx; ++j) acc[j][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x[j] + d), a0, acc[j][0]);
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
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
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

// Attention of token rows over the paged KV cache [slots, 2 (K, V), KV, D]: row t's query
// sits at position lens[t] - 1 and sees positions lo..lens[t]-1 (lo = lens[t] - window
// for a sliding window), whose cache slots are idx[t, p]. Scores, softmax and the
// weighted sum in float32; the context is read in place (no gathered copy), and each
// row costs its own context, so prompt tokens and decode rows share one call.
//
// The work is split by (row, KV group); a thread takes the groups of a row together,
// so a slot's keys (and then its values) for those groups are read as one run of
// memory (explicit prefetching of the next slots measured no faster). With D a multiple of 8, eight
// positions are scored at a time (dot8) and each head's weighted sum stays in registers
// over the positions (64 values at a time); otherwise one dot / axpy a position.
template <typename C>
void attend(const float* Q, const C* cache, const int64_t* idx, const int64_t* lens, float* O,
            int64_t T, int64_t H, int64_t KV, int64_t D, int64_t W, int64_t window, float scale) {
  const int64_t G = H / KV;
  const bool wide = D % 8 == 0;
  const int64_t slot = 2 * KV * D;  // values per cache slot
  const __m256 vscale = _mm256_set1_ps(scale);
  at::parallel_for(0, T * KV, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> s, acc(H * D), inv(H);
    for (int64_t w = w0; w < w1;) {
      const int64_t t = w / KV, g0 = w % KV, g1 = std::min(KV, g0 + (w1 - w));
      w += g1 - g0;
      const int64_t len = lens[t];
      const int64_t lo = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t L = len - lo, NH = (g1 - g0) * G;  // positions; heads of this piece
      s.resize(NH * L);
      const float* q = Q + (t * H + g0 * G) * D;   // [NH, D]
      float* out = O + (t * H + g0 * G) * D;       // [NH, D]
      const int64_t* ix = idx + t * W + lo;
      int64_t p = 0;
      if (wide) {
        for (; p + 8 <= L; p += 8) {
          for (int64_t g = g0; g < g1; ++g) {
            const C* keys[8];
            for (int i = 0; i < 8; ++i) keys[i] = cache + ix[p + i] * slot + g * D;
            for (int64_t j = 0; j < G; ++j) {
              const int64_t h = (g - g0) * G + j;
              _mm256_storeu_ps(s.data() + h * L + p, _mm256_mul_ps(dot8(q + h * D, keys, D), vscale));
            }
          }
        }
      }
      for (; p < L; ++p)
        for (int64_t h = 0; h < NH; ++h)
          s[h * L + p] = dot(q + h * D, cache + ix[p] * slot + (g0 + h / G) * D, D) * scale;
      for (int64_t h = 0; h < NH; ++h) inv[h] = 1.f / softmax_exp(s.data() + h * L, L);
      const C* values = cache + KV * D;  // a slot's values follow its keys
      if (wide) {
        for (int64_t h = 0; h < NH; ++h) {
          const float* sh = s.data() + h * L;
          const int64_t off = (g0 + h / G) * D;
          for (int64_t d0 = 0; d0 < D; d0 += 64) {
            const int nv = static_cast<int>(std::min<int64_t>(64, D - d0) / 8);
            __m256 a[8];
            for (int c = 0; c < 8; ++c) a[c] = _mm256_setzero_ps();
            for (int64_t p = 0; p < L; ++p) {
              const C* v = values + ix[p] * slot + off + d0;
              const __m256 x = _mm256_broadcast_ss(sh + p);
              if (nv == 8) {
                for (int c = 0; c < 8; ++c) a[c] = _mm256_fmadd_ps(x, load8(v + c * 8), a[c]);
              } else {
                for (int c = 0; c < nv; ++c) a[c] = _mm256_fmadd_ps(x, load8(v + c * 8), a[c]);
              }
            }
            const __m256 r = _mm256_set1_ps(inv[h]);
            for (int c = 0; c < nv; ++c) _mm256_storeu_ps(out + h * D + d0 + c * 8, _mm256_mul_ps(a[c], r));
          }
        }
        continue;
      }
      std::fill(acc.begin(), acc.begin() + NH * D, 0.f);
      for (int64_t p = 0; p < L; ++p)
        for (int64_t h = 0; h < NH; ++h)
          axpy(s[h * L + p], values + ix[p] * slot + (g0 + h / G) * D, acc.data() + h * D, D);
      for (int64_t h = 0; h < NH; ++h)
        for (int64_t d = 0; d < D; ++d) out[h * D + d] = acc[h * D + d] * inv[h];
    }
  });
}

// Each token's own adapter (Punica's BGMV), in place: y[t, offset:offset + out] =
// (y[t] + (A[s] x[t]) B[s]) * G[s] + C[s] with s = slots[t], A [S, r, in], B [S, r, out],
// and DoRA's per-slot scale G and offset C [S, out] (1 and 0 for a plain LoRA slot, so
// the rescale rides on the same load and store of y); slot 0 (no adapter) is skipped, so rows without an adapter cost nothing (no parallel region at all when
// no row has one) and no per-row copy of the stacks is made. Y's rows are ldy apart (a
// fused projection's output: q, k and v).
//
// Rows are grouped by slot, up to 8 rows a unit of work: a unit reads its adapter's A
// and B once for all its rows (xa = A x four rows at a time, then each 32 columns of y
// take all r terms in registers: one load and one store of y instead of r).
template <typename C>
void bgmv(float* Y, int64_t ldy, const float* X, const C* A, const C* B, const float* G,
          const float* Cs, const int64_t* slots, int64_t T, int64_t in, int64_t out, int64_t r) {
  std::vector<int64_t> order;
  order.reserve(T);
  for (int64_t t = 0; t < T; ++t)
    if (slots[t] != 0) order.push_back(t);
  if (order.empty()) return;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return slots[a] < slots[b]; });
  std::vector<std::pair<int64_t, int64_t>> units;  // order[begin:end): up to 8 rows of one slot
  for (size_t b = 0; b < order.size();) {
    size_t e = b;
    while (e < order.size() && slots[order[e]] == slots[order[b]]) ++e;
    for (size_t u = b; u < e; u += 8) units.emplace_back(u, std::min(e, u + 8));
    b = e;
  }
  at::parallel_for(0, static_cast<int64_t>(units.size()), 1, [&](int64_t k0, int64_t k1) {
    std::vector<float> xa(8 * r);
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t begin = units[k].first, rows = units[k].second - begin;
      const int64_t s = slots[order[begin]];
      for (int64_t j0 = 0; j0 < rows; j0 += 4) {
        const int nx = static_cast<int>(std::min<int64_t>(4, rows - j0));
        const float* x[4];
        for (int j = 0; j < nx; ++j) x[j] = X + order[begin + j0 + j] * in;
        float part[4];
        for (int64_t i = 0; i < r; ++i) {
          dots(x, nx, A + (s * r + i) * in, in, part);
          for (int j = 0; j < nx; ++j) xa[(j0 + j) * r + i] = part[j];
        }
      }
      const C* b = B + s * r * out;
      const float* g = G + s * out;
      const float* cs = Cs + s * out;
      for (int64_t j = 0; j < rows; ++j) {  // 32 columns at a time: four independent sums
        float* y = Y + order[begin + j] * ldy;
        const float* w = xa.data() + j * r;
        int64_t c = 0;
        for (; c + 32 <= out; c += 32) {
          __m256 acc[4];
          for (int q = 0; q < 4; ++q) acc[q] = _mm256_loadu_ps(y + c + 8 * q);
          for (int64_t i = 0; i < r; ++i) {
            const __m256 wi = _mm256_broadcast_ss(w + i);
            for (int q = 0; q < 4; ++q) acc[q] = _mm256_fmadd_ps(wi, load8(b + i * out + c + 8 * q), acc[q]);
          }
          for (int q = 0; q < 4; ++q)
            _mm256_storeu_ps(y + c + 8 * q, _mm256_fmadd_ps(acc[q], _mm256_loadu_ps(g + c + 8 * q),
                                                            _mm256_loadu_ps(cs + c + 8 * q)));
        }
        for (; c + 8 <= out; c += 8) {
          __m256 acc = _mm256_loadu_ps(y + c);
          for (int64_t i = 0; i < r; ++i)
            acc = _mm256_fmadd_ps(_mm256_broadcast_ss(w + i), load8(b + i * out + c), acc);
          _mm256_storeu_ps(y + c, _mm256_fmadd_ps(acc, _mm256_loadu_ps(g + c), _mm256_loadu_ps(cs + c)));
        }
        for (; c < out; ++c) {
          float acc = y[c];
          for (int64_t i = 0; i < r; ++i) acc += w[i] * tofloat(b[i * out + c]);
          y[c] = acc * g[c] + cs[c];
        }
      }
    }
  });
}
}  // namespace

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& idx,
                           const at::Tensor& lens, int64_t window, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat, "paged_attention: q must be [T, H, D] float32");
  TORCH_CHECK(cache.dim() == 4 && cache.size(1) == 2 && cache.size(3) == q.size(2) &&
                  q.size(1) % cache.size(2) == 0,
              "paged_attention: cache must be [slots, 2, KV, D] with H a multiple of KV");
  TORCH_CHECK(cache.scalar_type() == at::kFloat || cache.scalar_type() == at::kBFloat16,
              "paged_attention: cache must be float32 or bfloat16");
  TORCH_CHECK(idx.dim() == 2 && idx.scalar_type() == at::kLong && idx.size(0) == q.size(0) &&
                  lens.dim() == 1 && lens.scalar_type() == at::kLong && lens.size(0) == q.size(0),
              "paged_attention: idx must be [T, W] and lens [T], int64");
  TORCH_CHECK(cache.is_contiguous(), "paged_attention: cache must be contiguous");
  auto qc = q.contiguous();
  auto ic = idx.contiguous();
  auto lc = lens.contiguous();
  const int64_t T = qc.size(0), H = qc.size(1), D = qc.size(2), KV = cache.size(2), W = ic.size(1);
  const int64_t S = cache.size(0);
  const int64_t* ip = ic.data_ptr<int64_t>();
  const int64_t* lp = lc.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(lp[t] >= 1 && lp[t] <= W, "paged_attention: lens out of range");
    for (int64_t p = 0; p < lp[t]; ++p)
      TORCH_CHECK(ip[t * W + p] >= 0 && ip[t * W + p] < S, "paged_attention: slot out of range");
  }
  auto o = at::empty({T, H, D}, qc.options());
  if (T == 0) return o;
  const float sc = static_cast<float>(scale);
  if (cache.scalar_type() == at::kFloat)
    attend(qc.data_ptr<float>(), cache.data_ptr<float>(), ip, lp, o.data_ptr<float>(), T, H, KV, D, W,
           window, sc);
  else
    attend(qc.data_ptr<float>(), reinterpret_cast<const uint16_t*>(cache.data_ptr<at::BFloat16>()), ip,
           lp, o.data_ptr<float>(), T, H, KV, D, W, window, sc);
  return o;
}

void lora_bgmv_(const at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                const at::Tensor& g, const at::Tensor& c, const at::Tensor& slots, int64_t offset) {
  TORCH_CHECK(y.dim() == 2 && x.dim() == 2 && y.scalar_type() == at::kFloat &&
                  x.scalar_type() == at::kFloat && x.size(0) == y.size(0) && y.is_contiguous(),
              "lora_bgmv_: y [T, N] (contiguous) and x [T, in] must be float32");
  TORCH_CHECK(a.dim() == 3 && b.dim() == 3 && a.size(0) == b.size(0) && a.size(1) == b.size(1) &&
                  a.size(2) == x.size(1) && offset >= 0 && offset + b.size(2) <= y.size(1) &&
                  a.scalar_type() == b.scalar_type(),
              "lora_bgmv_: a must be [S, r, in] and b [S, r, out] with out within y, one dtype");
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kBFloat16,
              "lora_bgmv_: a and b must be float32 or bfloat16");
  TORCH_CHECK(slots.dim() == 1 && slots.scalar_type() == at::kLong && slots.size(0) == x.size(0),
              "lora_bgmv_: slots must be [T] int64");
  TORCH_CHECK(g.dim() == 2 && c.dim() == 2 && g.size(0) == a.size(0) && c.size(0) == a.size(0) &&
                  g.size(1) == b.size(2) && c.size(1) == b.size(2) && g.scalar_type() == at::kFloat &&
                  c.scalar_type() == at::kFloat,
              "lora_bgmv_: g and c must be [S, out] float32");
  auto xc = x.contiguous();
  auto ac = a.contiguous();
  auto bc = b.contiguous();
  auto gc = g.contiguous();
  auto cc = c.contiguous();
  auto sc = slots.contiguous();
  const int64_t T = xc.size(0), S = ac.size(0), r = ac.size(1), out = bc.size(2);
  const int64_t* sp = sc.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(sp[t] >= 0 && sp[t] < S, "lora_bgmv_: slot out of range");
  if (T == 0 || r == 0) return;
  float* yp = y.data_ptr<float>() + offset;
  if (ac.scalar_type() == at::kFloat)
    bgmv(yp, y.size(1), xc.data_ptr<float>(), ac.data_ptr<float>(), bc.data_ptr<float>(),
         gc.data_ptr<float>(), cc.data_ptr<float>(), sp, T, xc.size(1), out, r);
  else
    bgmv(yp, y.size(1), xc.data_ptr<float>(),
         reinterpret_cast<const uint16_t*>(ac.data_ptr<at::BFloat16>()),
         reinterpret_cast<const uint16_t*>(bc.data_ptr<at::BFloat16>()), gc.data_ptr<float>(),
         cc.data_ptr<float>(), sp, T, xc.size(1), out, r);
}

at::Tensor linear_quant(const at::Tensor& x, const at::Tensor& w, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "linear_quant: x must be [M, K] float32");
  TORCH_CHECK(w.dim() == 3 && w.scalar_type() == at::kByte && w.size(1) * 32 == x.size(1) &&
                  w.size(0) * NB >= n && (w.size(2) == Q4_1::BYTES || w.size(2) == Q8_0::BYTES),
              "linear_quant: w must be packed [ceil(n/16), K/32, 320 (Q4_1) or 544 (Q8_0)] bytes");
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1);
  auto y = at::empty({M, n}, xc.options());
  if (M == 0 || n == 0) return y;
  if (wc.size(2) == Q4_1::BYTES)
    run_q<Q4_1>(xc.data_ptr<float>(), wc.data_ptr<uint8_t>(), y.data_ptr<float>(), M, K, n);
  else
    run_q<Q8_0>(xc.data_ptr<float>(), wc.data_ptr<uint8_t>(), y.data_ptr<float>(), M, K, n);
  return y;
}

at::Tensor linear_packed(const at::Tensor& x, const at::Tensor& w, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "linear_packed: x must be [M, K] float32");
  TORCH_CHECK(w.dim() == 3 && w.size(2) == NB && w.size(1) == x.size(1) && w.size(0) * NB >= n,
              "linear_packed: w must be packed [ceil(n/16), K, 16]");
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kFloat,
              "linear_packed: w must be bfloat16 or float32");
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1);
  auto y = at::empty({M, n}, xc.options());
  if (M == 0 || n == 0) return y;
  if (wc.scalar_type() == at::kBFloat16)
    run(xc.data_ptr<float>(), reinterpret_cast<const uint16_t*>(wc.data_ptr<at::BFloat16>()),
        y.data_ptr<float>(), M, K, n);
  else
    run(xc.data_ptr<float>(), wc.data_ptr<float>(), y.data_ptr<float>(), M, K, n);
  return y;
}

TORCH_LIBRARY_IMPL(openllm_clone, CPU, m) {
  m.impl("linear_packed", &linear_packed);
  m.impl("linear_quant", &linear_quant);
  m.impl("paged_attention", &paged_attention);
  m.impl("lora_bgmv_", &lora_bgmv_);
}
"""

_NAME = "openllm_clone_kernels_" + hashlib.sha256(KERNEL_SOURCE.encode()).hexdigest()[:12]
_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]

# The op's schema and shape function live here, so export can trace it before any
# build, and the C++ library only registers the CPU kernel.
_lib = torch.library.Library("openllm_clone", "DEF")
_lib.define("linear_packed(Tensor x, Tensor w, int n) -> Tensor")


_lib.define("linear_quant(Tensor x, Tensor w, int n) -> Tensor")
_lib.define(
    "paged_attention(Tensor q, Tensor cache, Tensor idx, Tensor lens, int window, float scale)"
    " -> Tensor"
)
_lib.define(
    "lora_bgmv_(Tensor(a!) y, Tensor x, Tensor a, Tensor b, Tensor g, Tensor c, Tensor slots,"
    " int offset) -> ()"
)


@torch.library.register_fake("openllm_clone::linear_packed")
def _linear_packed_fake(x: torch.Tensor, w: torch.Tensor, n: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], n))


@torch.library.register_fake("openllm_clone::linear_quant")
def _linear_quant_fake(x: torch.Tensor, w: torch.Tensor, n: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], n))


@torch.library.register_fake("openllm_clone::paged_attention")
def _paged_attention_fake(
    q: torch.Tensor,
    cache: torch.Tensor,
    idx: torch.Tensor,
    lens: torch.Tensor,
    window: int,
    scale: float,
) -> torch.Tensor:
    return q.new_empty(q.shape)


@torch.library.register_fake("openllm_clone::lora_bgmv_")
def _lora_bgmv_fake(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    g: torch.Tensor,
    c: torch.Tensor,
    slots: torch.Tensor,
    offset: int,
) -> None:
    return None


_loaded: Path | None = None


def available() -> bool:
    """True on an x86-64 CPU with AVX2 and FMA (what the kernel is written for), with
    ninja to build it (a dependency of the package)."""
    from torch.utils.cpp_extension import is_ninja_available

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return False
    _ninja_on_path()
    return bool(is_ninja_available())


def enabled() -> bool:
    """:func:`available`, unless ``OPENLLM_CLONE_PACKED_LINEAR=0`` turns the kernel off
    (the compiled step then runs ``F.linear``). Part of the compile cache's key."""
    return os.environ.get("OPENLLM_CLONE_PACKED_LINEAR", "1") != "0" and available()


def _ninja_on_path() -> None:
    """torch looks for ``ninja`` on PATH; the pip package's binary sits in the
    environment's bin folder, which is not on PATH when the server was started by the
    full path of its script (``.venv/bin/openllm-clone``)."""
    try:
        import ninja  # type: ignore[import-untyped]

        folder = str(ninja.BIN_DIR)
    except (ImportError, AttributeError):
        folder = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if folder not in path.split(os.pathsep):
        os.environ["PATH"] = folder + (os.pathsep + path if path else "")


def loaded() -> bool:
    return _loaded is not None


def _library(folder: Path) -> Path:
    return folder / f"{_NAME}.so"


def build(folder: Path) -> Path:
    """Compile the kernel into ``folder`` (reused when already there) and load it."""
    global _loaded
    from torch.utils.cpp_extension import load_inline

    library = _library(folder)
    if not library.exists():
        _ninja_on_path()
        folder.mkdir(parents=True, exist_ok=True)
        if _loaded is not None:  # built for another package in this process: same code
            shutil.copyfile(_loaded, library)
        else:
            logger.info("building the packed linear kernel in %s", folder)
            load_inline(
                name=_NAME,
                cpp_sources=[KERNEL_SOURCE],
                extra_cflags=_FLAGS,
                extra_ldflags=["-fopenmp"],
                build_directory=str(folder),
                is_python_module=False,
                verbose=False,
            )
            _loaded = library  # load_inline loaded it
    return load(folder)


def load(folder: Path) -> Path:
    """Load the kernel built by :func:`build` in ``folder`` (once per process: every
    build of the same source registers the same kernel)."""
    global _loaded
    library = _library(folder)
    if _loaded is None:
        if not library.exists():
            raise FileNotFoundError(f"no packed linear kernel in {folder}")
        torch.ops.load_library(str(library))
        _loaded = library
    return _loaded


def pack_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[n, K]`` -> ``[ceil(n / 16), K, 16]`` in ``dtype`` (rows past n are zeros)."""
    n, k = weight.shape
    blocks = -(-n // BLOCK)
    padded = torch.zeros(blocks * BLOCK, k, dtype=dtype)
    padded[:n] = weight.detach().to(dtype)
    return padded.view(blocks, BLOCK, k).transpose(1, 2).contiguous()


def bf16_exact(weights: list[torch.Tensor]) -> bool:
    """True when every weight is a bfloat16 value (a bf16 checkpoint loaded as float32):
    stored in bfloat16 they give float32's results exactly."""
    for w in weights:
        w = w.detach()
        if w.dtype == torch.bfloat16:
            continue
        if not torch.equal(w.to(torch.bfloat16).to(w.dtype), w):
            return False
    return True


QUANT_FORMATS = {320: "q4_1", 544: "q8_0"}  # bytes per (16 features, 32 k) -> format
_GROUP = 32


def pack_quant(weight: torch.Tensor) -> torch.Tensor | None:
    """``[n, K]`` weights whose values are exactly GGUF Q4_1 or Q8_0 blocks (a
    checkpoint dequantized from such a GGUF, as the embedded SmolLM2 is) packed for
    ``linear_quant`` (see the kernel source for the layout); None when they are not,
    or K is not a multiple of 32. Q4_1 is tried first (5 bits a weight, 8.5 for Q8_0)."""
    w = weight.detach()
    if w.dim() != 2 or w.shape[1] % _GROUP or not w.is_floating_point():
        return None
    w = w.float()
    found = _find_q4_1(w)
    if found is not None:
        return _pack_groups(found[0], [found[1], found[2]], nibbles=True)
    found8 = _find_q8_0(w)
    if found8 is not None:
        return _pack_groups(found8[0], [found8[1]], nibbles=False)
    return None


def _fp16_exact(t: torch.Tensor) -> bool:
    return bool(torch.equal(t.half().float(), t))


def _find_q4_1(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(q uint8 [n, K], d fp16 [n, G], m fp16 [n, G]) with ``d * q + m == w`` in float32
    for every weight, or None. m is each group's minimum (its q is 0); d is found from
    the maximum (q 15, as GGUF's quantizer makes it), or a float16 step either side."""
    g = w.view(w.shape[0], -1, _GROUP)
    m = g.amin(-1)
    if not _fp16_exact(m):
        return None
    span = g.amax(-1) - m
    base = (span / 15).half()
    bits = base.view(torch.int16)
    q_found = torch.zeros(g.shape, dtype=torch.uint8)
    d_found = torch.zeros_like(base)
    done = span == 0  # constant groups: q 0, d 0, m the value
    for step in (0, 1, -1):
        d16 = (bits + step).clamp(min=0).view(torch.float16)
        d = d16.float().unsqueeze(-1)
        q = torch.where(d > 0, (g - m.unsqueeze(-1)) / d, 0.0).round_().clamp_(0, 15)
        ok = ((q * d + m.unsqueeze(-1)) == g).all(-1) & ~done
        q_found[ok] = q[ok].to(torch.uint8)
        d_found[ok] = d16[ok]
        done |= ok
        if bool(done.all()):
            return q_found.view(w.shape), d_found, m.half()
    return None


def _find_q8_0(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(q int8 [n, K], d fp16 [n, G]) with ``d * q == w`` in float32, or None; d is each
    group's largest magnitude over 127 (as GGUF's quantizer makes it)."""
    g = w.view(w.shape[0], -1, _GROUP)
    d = g.abs().amax(-1) / 127
    if not _fp16_exact(d):
        return None
    dd = d.unsqueeze(-1)
    q = torch.where(dd > 0, g / dd, 0.0).round_()
    if bool((q.abs() > 127).any()) or not torch.equal(q * dd, g):
        return None
    return q.to(torch.int8).view(w.shape), d.half()


def _pack_groups(q: torch.Tensor, scales: list[torch.Tensor], *, nibbles: bool) -> torch.Tensor:
    """q [n, K] and float16 scales [n, G] -> uint8 [ceil(n / 16), G, bytes]: per block of
    16 features and group of 32 k, the quants as [32 k][16 features] (two per byte, low
    nibble feature j and high j + 8, when ``nibbles``), then each scale's 16 values."""
    n, k = q.shape
    blocks, groups = -(-n // BLOCK), k // _GROUP
    pad = blocks * BLOCK - n
    qp = torch.cat([q, q.new_zeros(pad, k)]) if pad else q
    qp = qp.view(blocks, BLOCK, groups, _GROUP).permute(0, 2, 3, 1)  # [b, G, 32, 16]
    if nibbles:
        body = (qp[..., :8] | (qp[..., 8:] << 4)).contiguous().view(torch.uint8)
    else:
        body = qp.contiguous().view(torch.uint8)
    parts = [body.reshape(blocks, groups, -1)]
    for s in scales:
        sp = torch.cat([s, s.new_zeros(pad, groups)]) if pad else s
        sp = sp.view(blocks, BLOCK, groups).permute(0, 2, 1).contiguous()  # [b, G, 16]
        parts.append(sp.view(torch.uint8).reshape(blocks, groups, 2 * BLOCK))
    return torch.cat(parts, dim=-1).contiguous()
