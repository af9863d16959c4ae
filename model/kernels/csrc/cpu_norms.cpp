// LayerNorm / RMSNorm (optionally fused with the residual add) forward and backward, CPU.
//
// Forward, per row (one pass over memory; the row is staged in a float scratch buffer):
//   h = x (+ residual, rounded to the storage type and written out), stats in float32,
//   y = (h - mean) * rstd * w + b             (LayerNorm)
//   y = round_T(h * rstd) * w                  (RMSNorm, same rounding as the reference)
// Backward, per row: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ grad of h), g = dy * w;
// weight/bias gradients are accumulated per contiguous chunk of rows (one chunk per thread) in
// float32 and summed at the end, so results do not depend on scheduling.
#include "cpu_common.h"

#include <vector>

namespace llmk::cpu {
namespace {

template <typename T>
void ln_fwd_kernel(const T* x, const T* r, const float* w, const float* b, float eps, int64_t N, int64_t D,
                   T* y, T* h, float* mean, float* rstd) {
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(D, 1));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(D);
    float* bp = buf.data();
    for (int64_t i = begin; i < end; ++i) {
      const T* xr = x + i * D;
      const T* rr = r ? r + i * D : nullptr;
      T* hr = h ? h + i * D : nullptr;
      Acc s;
      for_cols(D, [&](auto f, int64_t c) {
        auto v = ld(f, xr + c);
        if (rr) {
          v = rnd<T>(v + ld(f, rr + c));
          st(hr + c, v);
        }
        st(bp + c, v);
        s.add(v);
      });
      const float mu = s.total() / static_cast<float>(D);
      Acc q;
      for_cols(D, [&](auto f, int64_t c) {
        auto d = ld(f, bp + c) - splat(f, mu);
        q.add(d * d);
      });
      const float rs = 1.0f / std::sqrt(q.total() / static_cast<float>(D) + eps);
      mean[i] = mu;
      rstd[i] = rs;
      T* yr = y + i * D;
      for_cols(D, [&](auto f, int64_t c) {
        auto v = (ld(f, bp + c) - splat(f, mu)) * splat(f, rs);
        if (w) v = v * ld(f, w + c);
        if (b) v = v + ld(f, b + c);
        st(yr + c, v);
      });
    }
  });
}

template <typename T, typename O>
void rms_fwd_kernel(const T* x, const T* r, const float* w, float eps, int64_t N, int64_t D, O* y, T* h,
                    float* rstd) {
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(D, 1));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(D);
    float* bp = buf.data();
    for (int64_t i = begin; i < end; ++i) {
      const T* xr = x + i * D;
      const T* rr = r ? r + i * D : nullptr;
      T* hr = h ? h + i * D : nullptr;
      Acc q;
      for_cols(D, [&](auto f, int64_t c) {
        auto v = ld(f, xr + c);
        if (rr) {
          v = rnd<T>(v + ld(f, rr + c));
          st(hr + c, v);
        }
        st(bp + c, v);
        q.add(v * v);
      });
      const float rs = 1.0f / std::sqrt(q.total() / static_cast<float>(D) + eps);
      rstd[i] = rs;
      O* yr = y + i * D;
      for_cols(D, [&](auto f, int64_t c) {
        auto n = rnd<T>(ld(f, bp + c) * splat(f, rs));
        if (w) n = n * ld(f, w + c);
        st(yr + c, n);
      });
    }
  });
}

// Shared backward driver: `row(i, dw_acc, db_acc, scratch)` handles one row; weight/bias partials
// are per chunk.
template <typename RowFn>
void rows_with_partials(int64_t N, int64_t D, int nacc, float* out0, float* out1, RowFn&& row) {
  const bool need = out0 != nullptr || out1 != nullptr;
  if (!need) {
    const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(D, 1));
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(2 * D);
      for (int64_t i = begin; i < end; ++i) row(i, nullptr, nullptr, scratch.data());
    });
    return;
  }
  const int64_t chunks = num_chunks(N, at::get_num_threads());
  std::vector<float> part(static_cast<size_t>(chunks * nacc * D), 0.f);
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<float> scratch(2 * D);
    for (int64_t k = cb; k < ce; ++k) {
      const int64_t r0 = N * k / chunks, r1 = N * (k + 1) / chunks;
      float* a0 = part.data() + k * nacc * D;
      float* a1 = nacc > 1 ? a0 + D : nullptr;
      for (int64_t i = r0; i < r1; ++i) row(i, a0, a1, scratch.data());
    }
  });
  for (int a = 0; a < nacc; ++a) {
    float* out = a == 0 ? out0 : out1;
    if (!out) continue;
    for (int64_t c = 0; c < D; ++c) out[c] = 0.f;
    for (int64_t k = 0; k < chunks; ++k) {
      const float* p = part.data() + (k * nacc + a) * D;
      for_cols(D, [&](auto f, int64_t c) { st(out + c, ld(f, out + c) + ld(f, p + c)); });
    }
  }
}

template <typename T>
void ln_bwd_kernel(const T* dy, const T* h, const float* mean, const float* rstd, const float* w, const T* dres,
                   int64_t N, int64_t D, T* dx, float* dw, float* db) {
  rows_with_partials(N, D, 2, dw, db, [&](int64_t i, float* aw, float* ab, float* scratch) {
    const T* dyr = dy + i * D;
    const T* hr = h + i * D;
    float* xh = scratch;
    float* g = scratch + D;
    const float mu = mean[i], rs = rstd[i];
    Acc s1, s2;
    for_cols(D, [&](auto f, int64_t c) {
      auto d = ld(f, dyr + c);
      auto xhat = (ld(f, hr + c) - splat(f, mu)) * splat(f, rs);
      auto gg = w ? d * ld(f, w + c) : d;
      st(xh + c, xhat);
      st(g + c, gg);
      s1.add(gg * xhat);
      s2.add(gg);
      if (aw) st(aw + c, fmadd(d, xhat, ld(f, aw + c)));
      if (ab) st(ab + c, ld(f, ab + c) + d);
    });
    const float c1 = s1.total() / static_cast<float>(D), c2 = s2.total() / static_cast<float>(D);
    T* dxr = dx + i * D;
    const T* drr = dres ? dres + i * D : nullptr;
    for_cols(D, [&](auto f, int64_t c) {
      auto v = splat(f, rs) * (ld(f, g + c) - splat(f, c2) - ld(f, xh + c) * splat(f, c1));
      if (drr) v = v + ld(f, drr + c);
      st(dxr + c, v);
    });
  });
}

template <typename T, typename O>
void rms_bwd_kernel(const O* dy, const T* h, const float* rstd, const float* w, const T* dres, int64_t N,
                    int64_t D, T* dx, float* dw) {
  rows_with_partials(N, D, 1, dw, nullptr, [&](int64_t i, float* aw, float*, float* scratch) {
    const O* dyr = dy + i * D;
    const T* hr = h + i * D;
    float* xh = scratch;
    float* g = scratch + D;
    const float rs = rstd[i];
    Acc s1;
    for_cols(D, [&](auto f, int64_t c) {
      auto d = ld(f, dyr + c);
      auto xhat = ld(f, hr + c) * splat(f, rs);
      auto gg = w ? d * ld(f, w + c) : d;
      st(xh + c, xhat);
      st(g + c, gg);
      s1.add(gg * xhat);
      if (aw) st(aw + c, fmadd(d, rnd<T>(xhat), ld(f, aw + c)));
    });
    const float c1 = s1.total() / static_cast<float>(D);
    T* dxr = dx + i * D;
    const T* drr = dres ? dres + i * D : nullptr;
    for_cols(D, [&](auto f, int64_t c) {
      auto v = splat(f, rs) * (ld(f, g + c) - ld(f, xh + c) * splat(f, c1));
      if (drr) v = v + ld(f, drr + c);
      st(dxr + c, v);
    });
  });
}

}  // namespace

void layer_norm_fwd(const Tensor& x, const OptTensor& residual, const OptTensor& weight, const OptTensor& bias,
                    double eps, const Tensor& y, const OptTensor& h, const Tensor& mean, const Tensor& rstd) {
  TORCH_CHECK(x.dim() == 2, "layer_norm_fwd: x must be [N, D]");
  const int64_t N = x.size(0), D = x.size(1);
  const auto dt = x.scalar_type();
  check_rows(x, N, D, dt, "x");
  check_rows(y, N, D, dt, "y");
  if (has(residual)) {
    check_rows(*residual, N, D, dt, "residual");
    TORCH_CHECK(has(h), "layer_norm_fwd: residual given but no output h");
    check_rows(*h, N, D, dt, "h");
  }
  check_vec(weight, D, at::kFloat, "weight");
  check_vec(bias, D, at::kFloat, "bias");
  check_vec(mean, N, at::kFloat, "mean");
  check_vec(rstd, N, at::kFloat, "rstd");
  LLMK_CPU_DISPATCH(dt, "layer_norm_fwd", [&] {
    ln_fwd_kernel<T>(ptr<T>(x), has(residual) ? ptr<T>(*residual) : nullptr, optr<float>(weight),
                     optr<float>(bias), static_cast<float>(eps), N, D, mptr<T>(y),
                     has(residual) ? mptr<T>(*h) : nullptr, mptr<float>(mean), mptr<float>(rstd));
  });
}

void layer_norm_bwd(const Tensor& dy, const Tensor& h, const Tensor& mean, const Tensor& rstd,
                    const OptTensor& weight, const OptTensor& dres, const Tensor& dx, const OptTensor& dweight,
                    const OptTensor& dbias) {
  TORCH_CHECK(h.dim() == 2, "layer_norm_bwd: h must be [N, D]");
  const int64_t N = h.size(0), D = h.size(1);
  const auto dt = h.scalar_type();
  check_rows(h, N, D, dt, "h");
  check_rows(dy, N, D, dt, "dy");
  check_rows(dx, N, D, dt, "dx");
  if (has(dres)) check_rows(*dres, N, D, dt, "dres");
  check_vec(mean, N, at::kFloat, "mean");
  check_vec(rstd, N, at::kFloat, "rstd");
  check_vec(weight, D, at::kFloat, "weight");
  check_vec(dweight, D, at::kFloat, "dweight");
  check_vec(dbias, D, at::kFloat, "dbias");
  LLMK_CPU_DISPATCH(dt, "layer_norm_bwd", [&] {
    ln_bwd_kernel<T>(ptr<T>(dy), ptr<T>(h), ptr<float>(mean), ptr<float>(rstd), optr<float>(weight),
                     optr<T>(dres), N, D, mptr<T>(dx), omptr<float>(dweight), omptr<float>(dbias));
  });
}

void rms_norm_fwd(const Tensor& x, const OptTensor& residual, const OptTensor& weight, double eps, const Tensor& y,
                  const OptTensor& h, const Tensor& rstd) {
  TORCH_CHECK(x.dim() == 2, "rms_norm_fwd: x must be [N, D]");
  const int64_t N = x.size(0), D = x.size(1);
  const auto dt = x.scalar_type();
  const auto odt = y.scalar_type();
  TORCH_CHECK(odt == dt || odt == at::kFloat, "rms_norm_fwd: y must have x's dtype or float32");
  check_rows(x, N, D, dt, "x");
  check_rows(y, N, D, odt, "y");
  if (has(residual)) {
    check_rows(*residual, N, D, dt, "residual");
    TORCH_CHECK(has(h), "rms_norm_fwd: residual given but no output h");
    check_rows(*h, N, D, dt, "h");
  }
  check_vec(weight, D, at::kFloat, "weight");
  check_vec(rstd, N, at::kFloat, "rstd");
  LLMK_CPU_DISPATCH(dt, "rms_norm_fwd", [&] {
    const T* r = has(residual) ? ptr<T>(*residual) : nullptr;
    T* hp = has(residual) ? mptr<T>(*h) : nullptr;
    if (odt == dt) {
      rms_fwd_kernel<T, T>(ptr<T>(x), r, optr<float>(weight), static_cast<float>(eps), N, D, mptr<T>(y), hp,
                           mptr<float>(rstd));
    } else {
      rms_fwd_kernel<T, float>(ptr<T>(x), r, optr<float>(weight), static_cast<float>(eps), N, D,
                               mptr<float>(y), hp, mptr<float>(rstd));
    }
  });
}

void rms_norm_bwd(const Tensor& dy, const Tensor& h, const Tensor& rstd, const OptTensor& weight,
                  const OptTensor& dres, const Tensor& dx, const OptTensor& dweight) {
  TORCH_CHECK(h.dim() == 2, "rms_norm_bwd: h must be [N, D]");
  const int64_t N = h.size(0), D = h.size(1);
  const auto dt = h.scalar_type();
  const auto odt = dy.scalar_type();
  TORCH_CHECK(odt == dt || odt == at::kFloat, "rms_norm_bwd: dy must have h's dtype or float32");
  check_rows(h, N, D, dt, "h");
  check_rows(dy, N, D, odt, "dy");
  check_rows(dx, N, D, dt, "dx");
  if (has(dres)) check_rows(*dres, N, D, dt, "dres");
  check_vec(rstd, N, at::kFloat, "rstd");
  check_vec(weight, D, at::kFloat, "weight");
  check_vec(dweight, D, at::kFloat, "dweight");
  LLMK_CPU_DISPATCH(dt, "rms_norm_bwd", [&] {
    if (odt == dt) {
      rms_bwd_kernel<T, T>(ptr<T>(dy), ptr<T>(h), ptr<float>(rstd), optr<float>(weight), optr<T>(dres), N, D,
                           mptr<T>(dx), omptr<float>(dweight));
    } else {
      rms_bwd_kernel<T, float>(ptr<float>(dy), ptr<T>(h), ptr<float>(rstd), optr<float>(weight), optr<T>(dres),
                               N, D, mptr<T>(dx), omptr<float>(dweight));
    }
  });
}

}  // namespace llmk::cpu
