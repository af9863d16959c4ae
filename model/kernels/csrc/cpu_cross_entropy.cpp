// Softmax cross-entropy, CPU.
//
// Forward (ce_fwd): one pass over each logits row, in blocks of kBlock columns that stay in L1:
// block max, rescale of the running sum, sum of exp(x - max).  Writes per row only
//   lse[i]  = log(sum_j exp(x_ij))                 (float32, saved for backward)
//   loss[i] = lse[i] - x[i, t_i]  (0 for ignored rows)
//   target_logit[i] = x[i, t_i] if t_i is in this shard, else 0   (optional, vocab parallel)
// Targets are global vocabulary ids; the row holds ids [vocab_start, vocab_start + V).
// Backward (ce_bwd): grad[i, j] = (exp(x_ij - lse_i) - [j == t_i - vocab_start]) * scale,
// zero rows for ignored targets.  `grad` may alias `logits` (in-place backward): every element is
// read before it is written, and the target logit is read before the row is overwritten.
#include "cpu_common.h"

namespace llmk::cpu {
namespace {

constexpr int64_t kBlock = 2048;

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
                   const float* lse, float scale, int64_t ignore_index, int64_t vocab_start, T* grad, int64_t gsb,
                   int64_t gst) {
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
  TORCH_CHECK(scale.numel() == 1 && scale.scalar_type() == at::kFloat, "ce_bwd: scale must be one float32 value");
  const float sc = *ptr<float>(scale);
  LLMK_CPU_DISPATCH(logits.scalar_type(), "ce_bwd", [&] {
    ce_bwd_kernel<T>(ptr<T>(logits), r.sb, r.st, r.Tn, r.N, r.V, ptr<int64_t>(targets), ptr<float>(lse), sc,
                     ignore_index, vocab_start, mptr<T>(grad), g.sb, g.st);
  });
}

}  // namespace llmk::cpu
