// Bias + GELU(tanh), SwiGLU and rotary embedding, forward and backward, CPU.
// Intermediate roundings of the PyTorch reference in low precision (x + bias, silu(gate),
// q * cos ...) are reproduced with `rnd<T>` so bf16 results match eager PyTorch closely;
// everything else is computed in float32.
#include "cpu_common.h"

#include <vector>

namespace llmk::cpu {
namespace {

constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2/pi)
constexpr float kGeluA = 0.044715f;

template <class F>
inline F tanh_via_exp(F u) {
  const F one = splat(u, 1.0f), two = splat(u, 2.0f);
  return one - two / (vexp(two * u) + one);
}
template <class F>
inline F gelu_tanh(F x) {
  F u = splat(x, kGeluC) * fmadd(splat(x, kGeluA) * x, x * x, x);
  return splat(x, 0.5f) * x * (splat(x, 1.0f) + tanh_via_exp(u));
}
template <class F>
inline F gelu_tanh_grad(F x) {
  const F one = splat(x, 1.0f), half = splat(x, 0.5f);
  F x2 = x * x;
  F u = splat(x, kGeluC) * fmadd(splat(x, kGeluA) * x, x2, x);
  F t = tanh_via_exp(u);
  F du = splat(x, kGeluC) * fmadd(splat(x, 3.0f * kGeluA), x2, one);
  return fmadd(half, one + t, half * x * (one - t * t) * du);
}
template <class F>
inline F sigmoid(F x) {
  const F one = splat(x, 1.0f);
  return one / (one + vexp(-x));
}

int64_t rows_grain(int64_t D) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)); }

template <typename T>
void bias_gelu_fwd_kernel(const T* x, const float* b, int64_t N, int64_t D, T* y) {
  at::parallel_for(0, N, rows_grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* xr = x + i * D;
      T* yr = y + i * D;
      for_cols(D, [&](auto f, int64_t c) {
        auto v = ld(f, xr + c);
        if (b) v = rnd<T>(v + ld(f, b + c));
        st(yr + c, gelu_tanh(v));
      });
    }
  });
}

template <typename T>
void bias_gelu_bwd_kernel(const T* dy, const T* x, const float* b, int64_t N, int64_t D, T* dx, float* db) {
  auto row = [&](int64_t i, float* acc) {
    const T* xr = x + i * D;
    const T* dyr = dy + i * D;
    T* dxr = dx + i * D;
    for_cols(D, [&](auto f, int64_t c) {
      auto v = ld(f, xr + c);
      if (b) v = rnd<T>(v + ld(f, b + c));
      auto g = ld(f, dyr + c) * gelu_tanh_grad(v);
      st(dxr + c, g);
      if (acc) st(acc + c, ld(f, acc + c) + rnd<T>(g));
    });
  };
  if (!db) {
    at::parallel_for(0, N, rows_grain(D), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) row(i, nullptr);
    });
    return;
  }
  const int64_t chunks = num_chunks(N, at::get_num_threads());
  std::vector<float> part(static_cast<size_t>(chunks * D), 0.f);
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t k = cb; k < ce; ++k) {
      for (int64_t i = N * k / chunks; i < N * (k + 1) / chunks; ++i) row(i, part.data() + k * D);
    }
  });
  for (int64_t c = 0; c < D; ++c) db[c] = 0.f;
  for (int64_t k = 0; k < chunks; ++k) {
    const float* p = part.data() + k * D;
    for_cols(D, [&](auto f, int64_t c) { st(db + c, ld(f, db + c) + ld(f, p + c)); });
  }
}

template <typename T>
void swiglu_fwd_kernel(const T* g, int64_t sg, const T* u, int64_t su, int64_t N, int64_t D, T* y) {
  at::parallel_for(0, N, rows_grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* gr = g + i * sg;
      const T* ur = u + i * su;
      T* yr = y + i * D;
      for_cols(D, [&](auto f, int64_t c) {
        auto gv = ld(f, gr + c);
        st(yr + c, rnd<T>(gv * sigmoid(gv)) * ld(f, ur + c));
      });
    }
  });
}

template <typename T>
void swiglu_bwd_kernel(const T* dy, const T* g, int64_t sg, const T* u, int64_t su, int64_t N, int64_t D,
                       T* dg, T* du) {
  at::parallel_for(0, N, rows_grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* gr = g + i * sg;
      const T* ur = u + i * su;
      const T* dyr = dy + i * D;
      T* dgr = dg + i * D;
      T* dur = du + i * D;
      for_cols(D, [&](auto f, int64_t c) {
        auto gv = ld(f, gr + c);
        auto d = ld(f, dyr + c);
        auto s = sigmoid(gv);
        auto one = splat(f, 1.0f);
        st(dur + c, d * rnd<T>(gv * s));
        // d silu(g)/dg = s * (1 + g * (1 - s)); the reference rounds dy * up first.
        st(dgr + c, rnd<T>(d * ld(f, ur + c)) * s * fmadd(gv, one - s, one));
      });
    }
  });
}

// y = x * cos + rotate_half(x) * sin        (forward)
// dx = dy * cos + rotate_half^T(dy * sin)   (backward; rotate_half^T(z) = cat(z2, -z1))
template <typename T>
void rope_kernel(const T* x, int64_t sb, int64_t sh, int64_t st_, const float* cs, const float* sn, int64_t Bc,
                 int64_t B, int64_t H, int64_t Tn, int64_t D, bool backward, T* y) {
  const int64_t half = D / 2;
  const int64_t rows = B * H * Tn;
  at::parallel_for(0, rows, rows_grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = r % Tn, bh = r / Tn, hh = bh % H, b = bh / H;
      const T* xr = x + b * sb + hh * sh + t * st_;
      const int64_t coff = ((Bc == 1 ? 0 : b) * Tn + t) * D;
      const float* c1 = cs + coff;
      const float* s1 = sn + coff;
      T* yr = y + r * D;
      for_cols(half, [&](auto f, int64_t d) {
        auto x1 = ld(f, xr + d), x2 = ld(f, xr + half + d);
        auto ca = ld(f, c1 + d), cb = ld(f, c1 + half + d);
        auto sa = ld(f, s1 + d), sb2 = ld(f, s1 + half + d);
        if (!backward) {
          st(yr + d, rnd<T>(x1 * ca) + rnd<T>(-(x2 * sa)));
          st(yr + half + d, rnd<T>(x2 * cb) + rnd<T>(x1 * sb2));
        } else {
          st(yr + d, rnd<T>(x1 * ca) + rnd<T>(x2 * sb2));
          st(yr + half + d, rnd<T>(x2 * cb) + rnd<T>(-(x1 * sa)));
        }
      });
    }
  });
}

}  // namespace

void bias_gelu_fwd(const Tensor& x, const OptTensor& bias, const Tensor& y) {
  TORCH_CHECK(x.dim() == 2, "bias_gelu_fwd: x must be [N, D]");
  const int64_t N = x.size(0), D = x.size(1);
  const auto dt = x.scalar_type();
  check_rows(x, N, D, dt, "x");
  check_rows(y, N, D, dt, "y");
  check_vec(bias, D, at::kFloat, "bias");
  LLMK_CPU_DISPATCH(dt, "bias_gelu_fwd",
                    [&] { bias_gelu_fwd_kernel<T>(ptr<T>(x), optr<float>(bias), N, D, mptr<T>(y)); });
}

void bias_gelu_bwd(const Tensor& dy, const Tensor& x, const OptTensor& bias, const Tensor& dx,
                   const OptTensor& dbias) {
  TORCH_CHECK(x.dim() == 2, "bias_gelu_bwd: x must be [N, D]");
  const int64_t N = x.size(0), D = x.size(1);
  const auto dt = x.scalar_type();
  check_rows(x, N, D, dt, "x");
  check_rows(dy, N, D, dt, "dy");
  check_rows(dx, N, D, dt, "dx");
  check_vec(bias, D, at::kFloat, "bias");
  check_vec(dbias, D, at::kFloat, "dbias");
  LLMK_CPU_DISPATCH(dt, "bias_gelu_bwd", [&] {
    bias_gelu_bwd_kernel<T>(ptr<T>(dy), ptr<T>(x), optr<float>(bias), N, D, mptr<T>(dx), omptr<float>(dbias));
  });
}

static void check_strided_rows(const Tensor& t, int64_t N, int64_t D, at::ScalarType dt, const char* name) {
  check_cpu(t, name);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == N && t.size(1) == D, name, ": expected shape [", N, ", ", D, "]");
  TORCH_CHECK(t.scalar_type() == dt, name, ": expected dtype ", dt, ", got ", t.scalar_type());
  TORCH_CHECK(D <= 1 || t.stride(1) == 1, name, ": last dimension must be contiguous");
}

void swiglu_fwd(const Tensor& gate, const Tensor& up, const Tensor& y) {
  TORCH_CHECK(gate.dim() == 2, "swiglu_fwd: gate must be [N, D]");
  const int64_t N = gate.size(0), D = gate.size(1);
  const auto dt = gate.scalar_type();
  check_strided_rows(gate, N, D, dt, "gate");
  check_strided_rows(up, N, D, dt, "up");
  check_rows(y, N, D, dt, "y");
  LLMK_CPU_DISPATCH(dt, "swiglu_fwd", [&] {
    swiglu_fwd_kernel<T>(ptr<T>(gate), gate.stride(0), ptr<T>(up), up.stride(0), N, D, mptr<T>(y));
  });
}

void swiglu_bwd(const Tensor& dy, const Tensor& gate, const Tensor& up, const Tensor& dgate, const Tensor& dup) {
  TORCH_CHECK(gate.dim() == 2, "swiglu_bwd: gate must be [N, D]");
  const int64_t N = gate.size(0), D = gate.size(1);
  const auto dt = gate.scalar_type();
  check_strided_rows(gate, N, D, dt, "gate");
  check_strided_rows(up, N, D, dt, "up");
  check_rows(dy, N, D, dt, "dy");
  check_rows(dgate, N, D, dt, "dgate");
  check_rows(dup, N, D, dt, "dup");
  LLMK_CPU_DISPATCH(dt, "swiglu_bwd", [&] {
    swiglu_bwd_kernel<T>(ptr<T>(dy), ptr<T>(gate), gate.stride(0), ptr<T>(up), up.stride(0), N, D,
                         mptr<T>(dgate), mptr<T>(dup));
  });
}

void rope_fwd(const Tensor& x, const Tensor& cos, const Tensor& sin, bool backward, const Tensor& y) {
  check_cpu(x, "x");
  TORCH_CHECK(x.dim() == 4, "rope_fwd: x must be [B, H, T, D]");
  const int64_t B = x.size(0), H = x.size(1), Tn = x.size(2), D = x.size(3);
  TORCH_CHECK(D % 2 == 0, "rope_fwd: head dim must be even");
  TORCH_CHECK(D <= 1 || x.stride(3) == 1, "rope_fwd: x's last dimension must be contiguous");
  const auto dt = x.scalar_type();
  for (const Tensor* t : {&cos, &sin}) {
    check_cpu(*t, "cos/sin");
    TORCH_CHECK(t->dim() == 3 && (t->size(0) == 1 || t->size(0) == B) && t->size(1) == Tn && t->size(2) == D,
                "rope_fwd: cos/sin must be [1 or B, T, D]");
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), "rope_fwd: cos/sin must be contiguous float32");
  }
  TORCH_CHECK(cos.size(0) == sin.size(0), "rope_fwd: cos and sin batch sizes differ");
  check_cpu(y, "y");
  TORCH_CHECK(y.sizes() == x.sizes() && y.is_contiguous() && y.scalar_type() == dt,
              "rope_fwd: y must be contiguous with x's shape and dtype");
  LLMK_CPU_DISPATCH(dt, "rope_fwd", [&] {
    rope_kernel<T>(ptr<T>(x), x.stride(0), x.stride(1), x.stride(2), ptr<float>(cos), ptr<float>(sin),
                   cos.size(0), B, H, Tn, D, backward, mptr<T>(y));
  });
}

}  // namespace llmk::cpu
