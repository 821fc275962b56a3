// linear_packed and linear_quant: x @ W.T for float32 rows over weights packed in blocks
// of 16 output features (bfloat16 or float32), or kept as GGUF Q4_1 / Q8_0 blocks.
// See runners/kernels.py for the layouts and the measurements behind the choices.
#include "vec.h"

namespace openllm_clone {
namespace {
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
inline void fma2(const W* p, const W* q, __m256 x, __m256& a0, __m256& a1, __m256& b0, __m256& b1) {
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
  struct S {
    __m256 d0, d1, m0, m1;
  };
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
  struct S {
    __m256 d0, d1;
  };
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
}  // namespace

at::Tensor linear_quant(const at::Tensor& x, const at::Tensor& w, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat,
              "linear_quant: x must be [M, K] float32");
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
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat,
              "linear_packed: x must be [M, K] float32");
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
}  // namespace openllm_clone
