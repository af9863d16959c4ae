// Declarations shared by the CPU kernel translation units (cpu_*.cpp) and their registration
// (cpu_ops.cpp).  Only light ATen headers are included so the JIT build stays fast.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "cpu_vec.h"

namespace llmk::cpu {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Dispatch a storage type T in {float, bfloat16}.
#define LLMK_CPU_DISPATCH(dtype, NAME, ...)                                     \
  [&] {                                                                         \
    switch (dtype) {                                                            \
      case at::kFloat: {                                                        \
        using T = float;                                                        \
        return __VA_ARGS__();                                                   \
      }                                                                         \
      case at::kBFloat16: {                                                     \
        using T = ::llmk::BF16;                                                 \
        return __VA_ARGS__();                                                   \
      }                                                                         \
      default:                                                                  \
        TORCH_CHECK(false, NAME, ": unsupported dtype ", dtype, " (CPU kernels: float32, bfloat16)"); \
    }                                                                           \
  }()

template <typename T>
inline const T* ptr(const Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}
template <typename T>
inline T* mptr(const Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}
template <typename T>
inline const T* optr(const OptTensor& t) {
  return (t.has_value() && t->defined()) ? ptr<T>(*t) : nullptr;
}
template <typename T>
inline T* omptr(const OptTensor& t) {
  return (t.has_value() && t->defined()) ? mptr<T>(*t) : nullptr;
}
inline bool has(const OptTensor& t) { return t.has_value() && t->defined(); }

// checks
void check_cpu(const Tensor& t, const char* name);
void check_rows(const Tensor& t, int64_t N, int64_t D, at::ScalarType dt, const char* name);  // contiguous [N, D]
void check_vec(const OptTensor& t, int64_t n, at::ScalarType dt, const char* name);

// ops (schemas in ops_schema.h)
void layer_norm_fwd(const Tensor& x, const OptTensor& residual, const OptTensor& weight, const OptTensor& bias,
                    double eps, const Tensor& y, const OptTensor& h, const Tensor& mean, const Tensor& rstd);
void layer_norm_bwd(const Tensor& dy, const Tensor& h, const Tensor& mean, const Tensor& rstd,
                    const OptTensor& weight, const OptTensor& dres, const Tensor& dx, const OptTensor& dweight,
                    const OptTensor& dbias);
void rms_norm_fwd(const Tensor& x, const OptTensor& residual, const OptTensor& weight, double eps, const Tensor& y,
                  const OptTensor& h, const Tensor& rstd);
void rms_norm_bwd(const Tensor& dy, const Tensor& h, const Tensor& rstd, const OptTensor& weight,
                  const OptTensor& dres, const Tensor& dx, const OptTensor& dweight);
void bias_gelu_fwd(const Tensor& x, const OptTensor& bias, const Tensor& y);
void bias_gelu_bwd(const Tensor& dy, const Tensor& x, const OptTensor& bias, const Tensor& dx, const OptTensor& dbias);
void swiglu_fwd(const Tensor& gate, const Tensor& up, const Tensor& y);
void swiglu_bwd(const Tensor& dy, const Tensor& gate, const Tensor& up, const Tensor& dgate, const Tensor& dup);
void rope_fwd(const Tensor& x, const Tensor& cos, const Tensor& sin, bool backward, const Tensor& y);
void ce_fwd(const Tensor& logits, const Tensor& targets, int64_t ignore_index, int64_t vocab_start, bool check_range,
            const Tensor& loss, const Tensor& lse, const OptTensor& target_logit);
void ce_bwd(const Tensor& logits, const Tensor& targets, const Tensor& lse, const Tensor& scale,
            int64_t ignore_index, int64_t vocab_start, const Tensor& grad);
void ce_ent_fwd(const Tensor& logits, const OptTensor& targets, int64_t ignore_index, int64_t vocab_start,
                bool check_range, const Tensor& lse, const Tensor& entropy, const OptTensor& loss,
                const OptTensor& target_logit);
void ce_ent_bwd(const Tensor& logits, const OptTensor& targets, const Tensor& lse, const Tensor& entropy,
                const OptTensor& grad_loss, const OptTensor& grad_entropy, int64_t ignore_index, int64_t vocab_start,
                const Tensor& grad);

}  // namespace llmk::cpu
