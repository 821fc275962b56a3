// paged_attention: each token row attends over its own context in the paged KV cache,
// read in place (no gathered copy).
#include "vec.h"

namespace openllm_clone {
namespace {
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
      const float* q = Q + (t * H + g0 * G) * D;  // [NH, D]
      float* out = O + (t * H + g0 * G) * D;      // [NH, D]
      const int64_t* ix = idx + t * W + lo;
      int64_t p = 0;
      if (wide) {
        for (; p + 8 <= L; p += 8) {
          for (int64_t g = g0; g < g1; ++g) {
            const C* keys[8];
            for (int i = 0; i < 8; ++i) keys[i] = cache + ix[p + i] * slot + g * D;
            for (int64_t j = 0; j < G; ++j) {
              const int64_t h = (g - g0) * G + j;
              _mm256_storeu_ps(s.data() + h * L + p,
                               _mm256_mul_ps(dot8(q + h * D, keys, D), vscale));
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
            for (int c = 0; c < nv; ++c)
              _mm256_storeu_ps(out + h * D + d0 + c * 8, _mm256_mul_ps(a[c], r));
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
}  // namespace

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& idx,
                           const at::Tensor& lens, int64_t window, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat,
              "paged_attention: q must be [T, H, D] float32");
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
    attend(qc.data_ptr<float>(), cache.data_ptr<float>(), ip, lp, o.data_ptr<float>(), T, H, KV, D,
           W, window, sc);
  else
    attend(qc.data_ptr<float>(), reinterpret_cast<const uint16_t*>(cache.data_ptr<at::BFloat16>()),
           ip, lp, o.data_ptr<float>(), T, H, KV, D, W, window, sc);
  return o;
}
}  // namespace openllm_clone
