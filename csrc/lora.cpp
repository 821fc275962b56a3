// lora_bgmv_: each row's own LoRA adapter (Punica's BGMV) added in place, with DoRA's
// per-output rescale.
#include "vec.h"

namespace openllm_clone {
namespace {
// Each token's own adapter (Punica's BGMV), in place: y[t, offset:offset + out] =
// (y[t] + (A[s] x[t]) B[s]) * G[s] + C[s] with s = slots[t], A [S, r, in], B [S, r, out],
// and DoRA's per-slot scale G and offset C [S, out] (1 and 0 for a plain LoRA slot, so
// the rescale rides on the same load and store of y); slot 0 (no adapter) is skipped, so rows
// without an adapter cost nothing (no parallel region at all when no row has one) and no per-row
// copy of the stacks is made. Y's rows are ldy apart (a fused projection's output: q, k and v).
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
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return slots[a] < slots[b]; });
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
            for (int q = 0; q < 4; ++q)
              acc[q] = _mm256_fmadd_ps(wi, load8(b + i * out + c + 8 * q), acc[q]);
          }
          for (int q = 0; q < 4; ++q)
            _mm256_storeu_ps(y + c + 8 * q, _mm256_fmadd_ps(acc[q], _mm256_loadu_ps(g + c + 8 * q),
                                                            _mm256_loadu_ps(cs + c + 8 * q)));
        }
        for (; c + 8 <= out; c += 8) {
          __m256 acc = _mm256_loadu_ps(y + c);
          for (int64_t i = 0; i < r; ++i)
            acc = _mm256_fmadd_ps(_mm256_broadcast_ss(w + i), load8(b + i * out + c), acc);
          _mm256_storeu_ps(y + c,
                           _mm256_fmadd_ps(acc, _mm256_loadu_ps(g + c), _mm256_loadu_ps(cs + c)));
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
                  g.size(1) == b.size(2) && c.size(1) == b.size(2) &&
                  g.scalar_type() == at::kFloat && c.scalar_type() == at::kFloat,
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
}  // namespace openllm_clone
