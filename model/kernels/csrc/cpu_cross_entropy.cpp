// Softmax cross-entropy, CPU.
//
// Forward (ce_fwd): one pass over each logits row, in blocks of kBlock columns that stay in L1:
// block max, rescale of the running sum, sum of exp(x - max).  Writes per row only
//   lse[i]  = log(sum_j exp(x_ij))                 (float32, saved for backward)
//   loss[i] = lse[i] - x[i, t_i]  (0 for ignored rows)
//   target_logit[i] = x[i, t_i] if t_i is in this shard, else 0   (optional, vocab parallel)
// Targets are global vocabulary ids; the row holds ids [vocab_start, vocab_start + V).
// Backward (ce_bwd): grad[i, j] = (exp(x_ij - lse_i) - [j == t_i - vocab_start]) * scale[i or 0]
// (one scale for every row: the mean loss; or one per row: per-token losses with an arbitrary
// upstream gradient), zero rows for ignored targets.  `grad` may alias `logits` (in-place
// backward): every element is read before it is written, and the target logit is read before the
// row is overwritten.
//
// Cross-entropy and entropy (ce_ent_fwd / ce_ent_bwd), for policy-gradient losses.  The forward
// keeps, per row, the online state (m, c, r, u) with
//   m = max_j x_j,  c = #{j : x_j = m},  r = sum_{x_j < m} exp(x_j - m),  u = sum_j exp(x_j - m) (x_j - m)
// (a block max first, then one exp per element, as ce_fwd; the row's sum of exps is s = c + r) and
// writes
//   log s = log1p(r) if c == 1 else log(c + r),   lse = m + log s,
//   entropy H = -sum_j p_j log p_j = log s - u / s
// Both terms of H are >= 0 (no cancellation, unlike lse - sum_j p_j x_j for large logits), and the
// maxima are counted apart from the rest so a confident row (s = 1 + r, r << 1) keeps r's
// precision instead of rounding it into 1: H and the loss stay accurate relative to their size.
// With targets also loss = (m - x_t) + log s and the target logit; an ignored row is not read and
// gets lse = H = loss = 0.  Backward, per row with upstream gradients gl (of the loss) and gh (of
// the entropy), d = x_j - lse = log p_j:
//   grad_j = p_j (gl - gh (d + H)) - gl [j == t]      since dH/dx_j = -p_j (log p_j + H)
// A -inf logit has p = 0: d is floored at kDFloor (exp of it is 0 in float32) so p * d stays 0.
#include "cpu_common.h"

namespace llmk::cpu {
namespace {

constexpr int64_t kBlock = 2048;
constexpr float kDFloor = -110.f;  // floor of x - m in the entropy terms: exp() of it is exactly 0 in float32

// For d = x - m: 1 where x is the row max (d == 0), else 0; and e where x is below the max, else 0.
inline float at_max(float d) { return d == 0.f ? 1.f : 0.f; }
inline float below_max(float e, float d) { return d == 0.f ? 0.f : e; }
#ifdef LLMK_AVX2
inline V8 at_max(V8 d) {
  return _mm256_and_ps(_mm256_cmp_ps(d.v, _mm256_setzero_ps(), _CMP_EQ_OQ), _mm256_set1_ps(1.f));
}
inline V8 below_max(V8 e, V8 d) { return _mm256_andnot_ps(_mm256_cmp_ps(d.v, _mm256_setzero_ps(), _CMP_EQ_OQ), e.v); }
#else
inline V8 at_max(V8 d) {
  for (int k = 0; k < W; ++k) d.v[k] = at_max(d.v[k]);
  return d;
}
inline V8 below_max(V8 e, V8 d) {
  for (int k = 0; k < W; ++k) e.v[k] = below_max(e.v[k], d.v[k]);
  return e;
}
#endif

template <typename T>
void ce_fwd_kernel(const T* logits, int64_t sb, int64_t st_, int64_t Tn, int64_t N, int64_t V, const int64_t* tg,
                   int64_t ignore_index, int64_t vocab_start, bool check_range, float* loss, float* lse,
                   float* tlogit) {
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* row = logits + (i / Tn) * sb + (i % Tn) * st_;
      float m = -std::numeric_limits<float>::infinity();
      float s = 0.f;
      bool nan = false;
      for (int64_t c0 = 0; c0 < V; c0 += kBlock) {
        const int64_t n = std::min(kBlock, V - c0);
        const T* p = row + c0;
        V8 mv(-std::numeric_limits<float>::infinity());
        V8 nm(0.f);
        float ms = -std::numeric_limits<float>::infinity();
        bool nan_s = false;
        for_cols(n, [&](auto f, int64_t c) {
          auto v = ld(f, p + c);
          if constexpr (std::is_same_v<decltype(v), V8>) {
            mv = vmax(mv, v);
            nm = mask_or(nm, nan_mask(v));
          } else {
            ms = v > ms ? v : ms;
            nan_s = nan_s || std::isnan(v);
          }
        });
        nan = nan || nan_s || any(nm);
        const float bm = std::max(hmax(mv), ms);
        if (bm > m) {
          s = (m == -std::numeric_limits<float>::infinity()) ? 0.f : s * std::exp(m - bm);
          m = bm;
        }
        if (m == -std::numeric_limits<float>::infinity()) continue;  // everything so far is -inf
        Acc acc;
        for_cols(n, [&](auto f, int64_t c) { acc.add(vexp(ld(f, p + c) - splat(f, m))); });
        s += acc.total();
      }
      float l = m + std::log(s);
      if (nan) l = std::numeric_limits<float>::quiet_NaN();
      lse[i] = l;
      const int64_t t = tg[i];
      float xt = 0.f;
      if (t != ignore_index) {
        const int64_t tl = t - vocab_start;
        if (tl >= 0 && tl < V) {
          xt = to_f(row[tl]);
        } else {
          TORCH_CHECK(!check_range, "cross_entropy: target ", t, " out of bounds for vocabulary size ", V);
        }
      }
      if (tlogit) tlogit[i] = xt;
      loss[i] = (t == ignore_index) ? 0.f : l - xt;
    }
  });
}

template <typename T>
void ce_bwd_kernel(const T* logits, int64_t sb, int64_t st_, int64_t Tn, int64_t N, int64_t V, const int64_t* tg,
                   const float* lse, const float* scales, int64_t scale_stride, int64_t ignore_index,
                   int64_t vocab_start, T* grad, int64_t gsb, int64_t gst) {
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* row = logits + (i / Tn) * sb + (i % Tn) * st_;
      T* out = grad + (i / Tn) * gsb + (i % Tn) * gst;
      const int64_t t = tg[i];
      if (t == ignore_index) {
        for_cols(V, [&](auto f, int64_t c) { st(out + c, splat(f, 0.f)); });
        continue;
      }
      const float l = lse[i];
      const float scale = scales[i * scale_stride];  // stride 0: one scale for all rows
      const int64_t tl = t - vocab_start;
      const bool in_shard = tl >= 0 && tl < V;
      const float xt = in_shard ? to_f(row[tl]) : 0.f;  // read before the row is overwritten
      for_cols(V, [&](auto f, int64_t c) {
        st(out + c, vexp(ld(f, row + c) - splat(f, l)) * splat(f, scale));
      });
      if (in_shard) st(out + tl, (std::exp(xt - l) - 1.0f) * scale);
    }
  });
}

template <typename T>
void ce_ent_fwd_kernel(const T* logits, int64_t sb, int64_t st_, int64_t Tn, int64_t N, int64_t V, const int64_t* tg,
                       int64_t ignore_index, int64_t vocab_start, bool check_range, float* lse, float* ent,
                       float* loss, float* tlogit) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = tg ? tg[i] : 0;
      if (tg && t == ignore_index) {  // nothing of this row is needed: not even read
        lse[i] = 0.f;
        ent[i] = 0.f;
        if (loss) loss[i] = 0.f;
        if (tlogit) tlogit[i] = 0.f;
        continue;
      }
      const T* row = logits + (i / Tn) * sb + (i % Tn) * st_;
      float m = kNegInf, cnt = 0.f, r = 0.f, u = 0.f;
      bool nan = false;
      for (int64_t c0 = 0; c0 < V; c0 += kBlock) {
        const int64_t n = std::min(kBlock, V - c0);
        const T* p = row + c0;
        V8 mv(kNegInf);
        V8 nm(0.f);
        float ms = kNegInf;
        bool nan_s = false;
        for_cols(n, [&](auto f, int64_t c) {
          auto v = ld(f, p + c);
          if constexpr (std::is_same_v<decltype(v), V8>) {
            mv = vmax(mv, v);
            nm = mask_or(nm, nan_mask(v));
          } else {
            ms = v > ms ? v : ms;
            nan_s = nan_s || std::isnan(v);
          }
        });
        nan = nan || nan_s || any(nm);
        const float bm = std::max(hmax(mv), ms);
        if (bm > m) {
          if (m != kNegInf) {  // m == -inf: the state is empty, nothing to rescale
            // exp(x - bm) = a exp(x - m) and x - bm = (x - m) + dm; the old maxima join the rest
            const float dm = m - bm, a = std::exp(dm);
            u = a * (u + dm * (cnt + r));
            r = a * cnt + a * r;
          }
          cnt = 0.f;
          m = bm;
        }
        if (m == kNegInf) continue;  // everything so far is -inf
        Acc ac, ar, au;
        for_cols(n, [&](auto f, int64_t c) {
          auto d = vmax(splat(f, kDFloor), ld(f, p + c) - splat(f, m));
          auto e = vexp(d);
          ac.add(at_max(d));
          ar.add(below_max(e, d));
          au.add(e * d);
        });
        cnt += ac.total();
        r += ar.total();
        u += au.total();
      }
      const float s = cnt + r;
      const float logs = cnt == 1.f ? std::log1p(r) : std::log(s);
      float l = m + logs;
      float h = logs - u / s;
      if (nan) l = h = std::numeric_limits<float>::quiet_NaN();
      float xt = 0.f;
      if (tg) {
        const int64_t tl = t - vocab_start;
        if (tl >= 0 && tl < V) {
          xt = to_f(row[tl]);
        } else {
          TORCH_CHECK(!check_range, "cross_entropy: target ", t, " out of bounds for vocabulary size ", V);
        }
      }
      lse[i] = l;
      ent[i] = h;
      if (loss) loss[i] = nan ? l : (m - xt) + logs;  // (m - x_t first: exact for the top token)
      if (tlogit) tlogit[i] = xt;
    }
  });
}

template <typename T>
void ce_ent_bwd_kernel(const T* logits, int64_t sb, int64_t st_, int64_t Tn, int64_t N, int64_t V, const int64_t* tg,
                       const float* lse, const float* ent, const float* gloss, const float* gent,
                       int64_t ignore_index, int64_t vocab_start, T* grad, int64_t gsb, int64_t gst) {
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* row = logits + (i / Tn) * sb + (i % Tn) * st_;
      T* out = grad + (i / Tn) * gsb + (i % Tn) * gst;
      if (tg && tg[i] == ignore_index) {
        for_cols(V, [&](auto f, int64_t c) { st(out + c, splat(f, 0.f)); });
        continue;
      }
      const float l = lse[i];
      const float gl = gloss ? gloss[i] : 0.f;
      const float gh = gent ? gent[i] : 0.f;
      const float c1 = gent ? gl - gh * ent[i] : gl;  // grad_j = p_j (c1 - gh d_j)
      const int64_t tl = (tg && gloss) ? tg[i] - vocab_start : -1;
      const bool in_shard = tl >= 0 && tl < V;
      const float xt = in_shard ? to_f(row[tl]) : 0.f;  // read before the row is overwritten
      for_cols(V, [&](auto f, int64_t c) {
        auto d = vmax(splat(f, kDFloor), ld(f, row + c) - splat(f, l));
        st(out + c, vexp(d) * fmadd(splat(f, -gh), d, splat(f, c1)));
      });
      if (in_shard) {
        const float d = vmax(kDFloor, xt - l);  // (NaN stays NaN, unlike std::max)
        st(out + tl, std::exp(d) * (c1 - gh * d) - gl);
      }
    }
  });
}

struct Rows3 {
  int64_t sb, st, Tn, N, V;
};
Rows3 rows3(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 3, name, " must be [B, T, V]");
  TORCH_CHECK(t.size(2) <= 1 || t.stride(2) == 1, name, ": vocabulary dimension must be contiguous");
  return {t.stride(0), t.stride(1), std::max<int64_t>(t.size(1), 1), t.size(0) * t.size(1), t.size(2)};
}

void check_targets(const Tensor& targets, int64_t N) {
  check_cpu(targets, "targets");
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.is_contiguous() && targets.numel() == N,
              "cross_entropy: targets must be contiguous int64 with one entry per logits row");
}

}  // namespace

void ce_fwd(const Tensor& logits, const Tensor& targets, int64_t ignore_index, int64_t vocab_start, bool check_range,
            const Tensor& loss, const Tensor& lse, const OptTensor& target_logit) {
  check_cpu(logits, "logits");
  const auto r = rows3(logits, "logits");
  check_targets(targets, r.N);
  check_vec(loss, r.N, at::kFloat, "loss");
  check_vec(lse, r.N, at::kFloat, "lse");
  check_vec(target_logit, r.N, at::kFloat, "target_logit");
  TORCH_CHECK(r.V > 0, "cross_entropy: empty vocabulary");
  LLMK_CPU_DISPATCH(logits.scalar_type(), "ce_fwd", [&] {
    ce_fwd_kernel<T>(ptr<T>(logits), r.sb, r.st, r.Tn, r.N, r.V, ptr<int64_t>(targets), ignore_index, vocab_start,
                     check_range, mptr<float>(loss), mptr<float>(lse), omptr<float>(target_logit));
  });
}

void ce_bwd(const Tensor& logits, const Tensor& targets, const Tensor& lse, const Tensor& scale,
            int64_t ignore_index, int64_t vocab_start, const Tensor& grad) {
  check_cpu(logits, "logits");
  const auto r = rows3(logits, "logits");
  const auto g = rows3(grad, "grad");
  TORCH_CHECK(grad.sizes() == logits.sizes() && grad.scalar_type() == logits.scalar_type(),
              "ce_bwd: grad must match logits' shape and dtype");
  check_cpu(grad, "grad");
  check_targets(targets, r.N);
  check_vec(lse, r.N, at::kFloat, "lse");
  check_cpu(scale, "scale");
  TORCH_CHECK((scale.numel() == 1 || scale.numel() == r.N) && scale.is_contiguous() &&
                  scale.scalar_type() == at::kFloat,
              "ce_bwd: scale must be one float32 value or one per logits row (contiguous)");
  const int64_t scale_stride = scale.numel() == 1 ? 0 : 1;
  LLMK_CPU_DISPATCH(logits.scalar_type(), "ce_bwd", [&] {
    ce_bwd_kernel<T>(ptr<T>(logits), r.sb, r.st, r.Tn, r.N, r.V, ptr<int64_t>(targets), ptr<float>(lse),
                     ptr<float>(scale), scale_stride, ignore_index, vocab_start, mptr<T>(grad), g.sb, g.st);
  });
}

void ce_ent_fwd(const Tensor& logits, const OptTensor& targets, int64_t ignore_index, int64_t vocab_start,
                bool check_range, const Tensor& lse, const Tensor& entropy, const OptTensor& loss,
                const OptTensor& target_logit) {
  check_cpu(logits, "logits");
  const auto r = rows3(logits, "logits");
  if (has(targets)) check_targets(*targets, r.N);
  TORCH_CHECK(has(targets) || (!has(loss) && !has(target_logit)), "ce_ent_fwd: loss/target_logit need targets");
  check_vec(lse, r.N, at::kFloat, "lse");
  check_vec(entropy, r.N, at::kFloat, "entropy");
  check_vec(loss, r.N, at::kFloat, "loss");
  check_vec(target_logit, r.N, at::kFloat, "target_logit");
  TORCH_CHECK(r.V > 0, "cross_entropy: empty vocabulary");
  LLMK_CPU_DISPATCH(logits.scalar_type(), "ce_ent_fwd", [&] {
    ce_ent_fwd_kernel<T>(ptr<T>(logits), r.sb, r.st, r.Tn, r.N, r.V, optr<int64_t>(targets), ignore_index,
                         vocab_start, check_range, mptr<float>(lse), mptr<float>(entropy), omptr<float>(loss),
                         omptr<float>(target_logit));
  });
}

void ce_ent_bwd(const Tensor& logits, const OptTensor& targets, const Tensor& lse, const Tensor& entropy,
                const OptTensor& grad_loss, const OptTensor& grad_entropy, int64_t ignore_index, int64_t vocab_start,
                const Tensor& grad) {
  check_cpu(logits, "logits");
  const auto r = rows3(logits, "logits");
  const auto g = rows3(grad, "grad");
  TORCH_CHECK(grad.sizes() == logits.sizes() && grad.scalar_type() == logits.scalar_type(),
              "ce_ent_bwd: grad must match logits' shape and dtype");
  check_cpu(grad, "grad");
  if (has(targets)) check_targets(*targets, r.N);
  TORCH_CHECK(has(targets) || !has(grad_loss), "ce_ent_bwd: grad_loss needs targets");
  check_vec(lse, r.N, at::kFloat, "lse");
  check_vec(entropy, r.N, at::kFloat, "entropy");
  check_vec(grad_loss, r.N, at::kFloat, "grad_loss");
  check_vec(grad_entropy, r.N, at::kFloat, "grad_entropy");
  LLMK_CPU_DISPATCH(logits.scalar_type(), "ce_ent_bwd", [&] {
    ce_ent_bwd_kernel<T>(ptr<T>(logits), r.sb, r.st, r.Tn, r.N, r.V, optr<int64_t>(targets), ptr<float>(lse),
                         ptr<float>(entropy), optr<float>(grad_loss), optr<float>(grad_entropy), ignore_index,
                         vocab_start, mptr<T>(grad), g.sb, g.st);
  });
}

}  // namespace llmk::cpu
