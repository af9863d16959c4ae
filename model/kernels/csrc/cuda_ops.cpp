// Registration of the CUDA kernels as torch.ops.llmk_cuda.* : argument validation, device guard,
// current stream, dtype mapping; the kernels themselves live in cuda_*.cu (see cuda_launch.h).
// With -DLLMK_CUDA_EMULATION (tests only, see cuda_emu.h) the same code registers
// torch.ops.llmk_cuda_emu.* for CPU tensors: the device checks accept CPU tensors, the device guard
// and stream are no-ops, scratch buffers are NaN-filled (a GPU's are uninitialised); all
// validation is identical.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#ifndef LLMK_CUDA_EMULATION
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif
#include <torch/library.h>

#include <limits>
#include <optional>

#include "cuda_launch.h"
#include "ops_schema.h"

namespace llmk_cuda_ops {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using llmk_cuda::DType;

namespace {

bool has(const OptTensor& t) { return t.has_value() && t->defined(); }

#ifdef LLMK_CUDA_EMULATION
bool on_device(const Tensor& t) { return t.is_cpu(); }
struct Guard {
  explicit Guard(c10::Device) {}
};
cudaStream_t stream() { return nullptr; }
#else
bool on_device(const Tensor& t) { return t.is_cuda(); }
using Guard = c10::cuda::CUDAGuard;
cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
#endif

DType dtype_of(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return llmk_cuda::kF32;
    case at::kHalf:
      return llmk_cuda::kF16;
    case at::kBFloat16:
      return llmk_cuda::kBF16;
    default:
      TORCH_CHECK(false, name, ": unsupported dtype ", t.scalar_type(), " (CUDA kernels: float32, float16, bfloat16)");
  }
}

void check_dev(const Tensor& t, const Tensor& ref, const char* name) {
  TORCH_CHECK(t.defined(), name, ": undefined tensor");
  TORCH_CHECK(on_device(t) && t.device() == ref.device(), name, ": expected a tensor on ", ref.device(), ", got ",
              t.device());
}

void check_rows(const Tensor& t, const Tensor& ref, int64_t N, int64_t D, at::ScalarType dt, const char* name) {
  check_dev(t, ref, name);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == N && t.size(1) == D, name, ": expected shape [", N, ", ", D, "], got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == dt, name, ": expected dtype ", dt, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, ": must be contiguous");
}

void check_strided_rows(const Tensor& t, const Tensor& ref, int64_t N, int64_t D, at::ScalarType dt,
                        const char* name) {
  check_dev(t, ref, name);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == N && t.size(1) == D, name, ": expected shape [", N, ", ", D, "]");
  TORCH_CHECK(t.scalar_type() == dt, name, ": expected dtype ", dt, ", got ", t.scalar_type());
  TORCH_CHECK(D <= 1 || t.stride(1) == 1, name, ": last dimension must be contiguous");
}

void check_vec(const OptTensor& t, const Tensor& ref, int64_t n, at::ScalarType dt, const char* name) {
  if (!has(t)) return;
  check_dev(*t, ref, name);
  TORCH_CHECK(t->numel() == n && t->is_contiguous(), name, ": expected ", n, " contiguous elements, got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == dt, name, ": expected dtype ", dt, ", got ", t->scalar_type());
}

template <typename P>
const P* cp(const OptTensor& t) {
  return has(t) ? reinterpret_cast<const P*>(t->const_data_ptr()) : nullptr;
}
template <typename P>
P* mp(const OptTensor& t) {
  return has(t) ? reinterpret_cast<P*>(t->mutable_data_ptr()) : nullptr;
}
const void* cv(const OptTensor& t) { return has(t) ? t->const_data_ptr() : nullptr; }
void* mv(const OptTensor& t) { return has(t) ? t->mutable_data_ptr() : nullptr; }

void ok(cudaError_t e, const char* op) {
  TORCH_CHECK(e == cudaSuccess, "llmk_cuda::", op, ": CUDA error: ", cudaGetErrorString(e));
}

Tensor f32_buffer(const Tensor& ref, int64_t n) {
  Tensor t = at::empty({n}, ref.options().dtype(at::kFloat));
#ifdef LLMK_CUDA_EMULATION
  t.fill_(std::numeric_limits<float>::quiet_NaN());  // what a kernel reads before writing shows
#endif
  return t;
}

}  // namespace

void layer_norm_fwd(const Tensor& x, const OptTensor& residual, const OptTensor& weight, const OptTensor& bias,
                    double eps, const Tensor& y, const OptTensor& h, const Tensor& mean, const Tensor& rstd) {
  TORCH_CHECK(on_device(x) && x.dim() == 2, "layer_norm_fwd: x must be a CUDA [N, D] tensor");
  const int64_t N = x.size(0), D = x.size(1);
  const auto dt = x.scalar_type();
  check_rows(x, x, N, D, dt, "x");
  check_rows(y, x, N, D, dt, "y");
  if (has(residual)) {
    check_rows(*residual, x, N, D, dt, "residual");
    TORCH_CHECK(has(h), "layer_norm_fwd: residual given but no output h");
    check_rows(*h, x, N, D, dt, "h");
  }
  check_vec(weight, x, D, at::kFloat, "weight");
  check_vec(bias, x, D, at::kFloat, "bias");
  check_vec(mean, x, N, at::kFloat, "mean");
  check_vec(rstd, x, N, at::kFloat, "rstd");
  Guard guard(x.device());
  ok(llmk_cuda::layer_norm_fwd(dtype_of(x, "x"), x.const_data_ptr(), cv(residual), cp<float>(weight),
                               cp<float>(bias), static_cast<float>(eps), N, D, y.mutable_data_ptr(),
                               has(residual) ? mv(h) : nullptr, mp<float>(mean), mp<float>(rstd), stream()),
     "layer_norm_fwd");
}

void layer_norm_bwd(const Tensor& dy, const Tensor& h, const Tensor& mean, const Tensor& rstd,
                    const OptTensor& weight, const OptTensor& dres, const Tensor& dx, const OptTensor& dweight,
                    const OptTensor& dbias) {
  TORCH_CHECK(on_device(h) && h.dim() == 2, "layer_norm_bwd: h must be a CUDA [N, D] tensor");
  const int64_t N = h.size(0), D = h.size(1);
  const auto dt = h.scalar_type();
  check_rows(h, h, N, D, dt, "h");
  check_rows(dy, h, N, D, dt, "dy");
  check_rows(dx, h, N, D, dt, "dx");
  if (has(dres)) check_rows(*dres, h, N, D, dt, "dres");
  check_vec(mean, h, N, at::kFloat, "mean");
  check_vec(rstd, h, N, at::kFloat, "rstd");
  check_vec(weight, h, D, at::kFloat, "weight");
  check_vec(dweight, h, D, at::kFloat, "dweight");
  check_vec(dbias, h, D, at::kFloat, "dbias");
  Guard guard(h.device());
  const bool need = has(dweight) || has(dbias);
  if (N == 0) {
    if (has(dweight)) dweight->zero_();
    if (has(dbias)) dbias->zero_();
    return;
  }
  Tensor partial = need ? f32_buffer(h, llmk_cuda::norm_bwd_grid(N) * 2 * D) : Tensor();
  ok(llmk_cuda::layer_norm_bwd(dtype_of(h, "h"), dy.const_data_ptr(), h.const_data_ptr(), cp<float>(mean),
                               cp<float>(rstd), cp<float>(weight), cv(dres), N, D, dx.mutable_data_ptr(),
                               mp<float>(dweight), mp<float>(dbias),
                               need ? partial.mutable_data_ptr<float>() : nullptr, stream()),
     "layer_norm_bwd");
}

void rms_norm_fwd(const Tensor& x, const OptTensor& residual, const OptTensor& weight, double eps, const Tensor& y,
                  const OptTensor& h, const Tensor& rstd) {
  TORCH_CHECK(on_device(x) && x.dim() == 2, "rms_norm_fwd: x must be a CUDA [N, D] tensor");
  const int64_t N = x.size(0), D = x.size(1);
  const auto dt = x.scalar_type();
  const auto odt = y.scalar_type();
  TORCH_CHECK(odt == dt || odt == at::kFloat, "rms_norm_fwd: y must have x's dtype or float32");
  check_rows(x, x, N, D, dt, "x");
  check_rows(y, x, N, D, odt, "y");
  if (has(residual)) {
    check_rows(*residual, x, N, D, dt, "residual");
    TORCH_CHECK(has(h), "rms_norm_fwd: residual given but no output h");
    check_rows(*h, x, N, D, dt, "h");
  }
  check_vec(weight, x, D, at::kFloat, "weight");
  check_vec(rstd, x, N, at::kFloat, "rstd");
  Guard guard(x.device());
  ok(llmk_cuda::rms_norm_fwd(dtype_of(x, "x"), odt != dt, x.const_data_ptr(), cv(residual), cp<float>(weight),
                             static_cast<float>(eps), N, D, y.mutable_data_ptr(), has(residual) ? mv(h) : nullptr,
                             mp<float>(rstd), stream()),
     "rms_norm_fwd");
}

void rms_norm_bwd(const Tensor& dy, const Tensor& h, const Tensor& rstd, const OptTensor& weight,
                  const OptTensor& dres, const Tensor& dx, const OptTensor& dweight) {
  TORCH_CHECK(on_device(h) && h.dim() == 2, "rms_norm_bwd: h must be a CUDA [N, D] tensor");
  const int64_t N = h.size(0), D = h.size(1);
  const auto dt = h.scalar_type();
  const auto odt = dy.scalar_type();
  TORCH_CHECK(odt == dt || odt == at::kFloat, "rms_norm_bwd: dy must have h's dtype or float32");
  check_rows(h, h, N, D, dt, "h");
  check_rows(dy, h, N, D, odt, "dy");
  check_rows(dx, h, N, D, dt, "dx");
  if (has(dres)) check_rows(*dres, h, N, D, dt, "dres");
  check_vec(rstd, h, N, at::kFloat, "rstd");
  check_vec(weight, h, D, at::kFloat, "weight");
  check_vec(dweight, h, D, at::kFloat, "dweight");
  Guard guard(h.device());
  if (N == 0) {
    if (has(dweight)) dweight->zero_();
    return;
  }
  const bool need = has(dweight);
  Tensor partial = need ? f32_buffer(h, llmk_cuda::norm_bwd_grid(N) * D) : Tensor();
  ok(llmk_cuda::rms_norm_bwd(dtype_of(h, "h"), odt != dt, dy.const_data_ptr(), h.const_data_ptr(), cp<float>(rstd),
                             cp<float>(weight), cv(dres), N, D, dx.mutable_data_ptr(), mp<float>(dweight),
                             need ? partial.mutable_data_ptr<float>() : nullptr, stream()),
     "rms_norm_bwd");
}

void bias_gelu_fwd(const Tensor& x, const OptTensor& bias, const Tensor& y) {
  TORCH_CHECK(on_device(x) && x.dim() == 2, "bias_gelu_fwd: x must be a CUDA [N, D] tensor");
  const int64_t N = x.size(0), D = x.size(1);
  const auto dt = x.scalar_type();
  check_rows(x, x, N, D, dt, "x");
  check_rows(y, x, N, D, dt, "y");
  check_vec(bias, x, D, at::kFloat, "bias");
  Guard guard(x.device());
  ok(llmk_cuda::bias_gelu_fwd(dtype_of(x, "x"), x.const_data_ptr(), cp<float>(bias), N, D, y.mutable_data_ptr(),
                              stream()),
     "bias_gelu_fwd");
}

void bias_gelu_bwd(const Tensor& dy, const Tensor& x, const OptTensor& bias, const Tensor& dx,
                   const OptTensor& dbias) {
  TORCH_CHECK(on_device(x) && x.dim() == 2, "bias_gelu_bwd: x must be a CUDA [N, D] tensor");
  const int64_t N = x.size(0), D = x.size(1);
  const auto dt = x.scalar_type();
  check_rows(x, x, N, D, dt, "x");
  check_rows(dy, x, N, D, dt, "dy");
  check_rows(dx, x, N, D, dt, "dx");
  check_vec(bias, x, D, at::kFloat, "bias");
  check_vec(dbias, x, D, at::kFloat, "dbias");
  Guard guard(x.device());
  if (N == 0) {
    if (has(dbias)) dbias->zero_();
    return;
  }
  Tensor partial = has(dbias) ? f32_buffer(x, llmk_cuda::bias_grad_grid_y(N) * D) : Tensor();
  ok(llmk_cuda::bias_gelu_bwd(dtype_of(x, "x"), dy.const_data_ptr(), x.const_data_ptr(), cp<float>(bias), N, D,
                              dx.mutable_data_ptr(), mp<float>(dbias),
                              has(dbias) ? partial.mutable_data_ptr<float>() : nullptr, stream()),
     "bias_gelu_bwd");
}

void swiglu_fwd(const Tensor& gate, const Tensor& up, const Tensor& y) {
  TORCH_CHECK(on_device(gate) && gate.dim() == 2, "swiglu_fwd: gate must be a CUDA [N, D] tensor");
  const int64_t N = gate.size(0), D = gate.size(1);
  const auto dt = gate.scalar_type();
  check_strided_rows(gate, gate, N, D, dt, "gate");
  check_strided_rows(up, gate, N, D, dt, "up");
  check_rows(y, gate, N, D, dt, "y");
  Guard guard(gate.device());
  ok(llmk_cuda::swiglu_fwd(dtype_of(gate, "gate"), gate.const_data_ptr(), gate.stride(0), up.const_data_ptr(),
                           up.stride(0), N, D, y.mutable_data_ptr(), stream()),
     "swiglu_fwd");
}

void swiglu_bwd(const Tensor& dy, const Tensor& gate, const Tensor& up, const Tensor& dgate, const Tensor& dup) {
  TORCH_CHECK(on_device(gate) && gate.dim() == 2, "swiglu_bwd: gate must be a CUDA [N, D] tensor");
  const int64_t N = gate.size(0), D = gate.size(1);
  const auto dt = gate.scalar_type();
  check_strided_rows(gate, gate, N, D, dt, "gate");
  check_strided_rows(up, gate, N, D, dt, "up");
  check_rows(dy, gate, N, D, dt, "dy");
  check_rows(dgate, gate, N, D, dt, "dgate");
  check_rows(dup, gate, N, D, dt, "dup");
  Guard guard(gate.device());
  ok(llmk_cuda::swiglu_bwd(dtype_of(gate, "gate"), dy.const_data_ptr(), gate.const_data_ptr(), gate.stride(0),
                           up.const_data_ptr(), up.stride(0), N, D, dgate.mutable_data_ptr(), dup.mutable_data_ptr(),
                           stream()),
     "swiglu_bwd");
}

void rope_fwd(const Tensor& x, const Tensor& cos, const Tensor& sin, bool backward, const Tensor& y) {
  TORCH_CHECK(on_device(x) && x.dim() == 4, "rope_fwd: x must be a CUDA [B, H, T, D] tensor");
  const int64_t B = x.size(0), H = x.size(1), Tn = x.size(2), D = x.size(3);
  TORCH_CHECK(D % 2 == 0, "rope_fwd: head dim must be even");
  TORCH_CHECK(D <= 1 || x.stride(3) == 1, "rope_fwd: x's last dimension must be contiguous");
  for (const Tensor* t : {&cos, &sin}) {
    check_dev(*t, x, "cos/sin");
    TORCH_CHECK(t->dim() == 3 && (t->size(0) == 1 || t->size(0) == B) && t->size(1) == Tn && t->size(2) == D,
                "rope_fwd: cos/sin must be [1 or B, T, D]");
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), "rope_fwd: cos/sin must be contiguous float32");
  }
  TORCH_CHECK(cos.size(0) == sin.size(0), "rope_fwd: cos and sin batch sizes differ");
  check_dev(y, x, "y");
  TORCH_CHECK(y.sizes() == x.sizes() && y.is_contiguous() && y.scalar_type() == x.scalar_type(),
              "rope_fwd: y must be contiguous with x's shape and dtype");
  Guard guard(x.device());
  ok(llmk_cuda::rope(dtype_of(x, "x"), x.const_data_ptr(), x.stride(0), x.stride(1), x.stride(2),
                     cos.const_data_ptr<float>(), sin.const_data_ptr<float>(), cos.size(0), B, H, Tn, D, backward,
                     y.mutable_data_ptr(), stream()),
     "rope_fwd");
}

namespace {
struct Rows3 {
  int64_t sb, st, Tn, N, V;
};
Rows3 rows3(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 3, name, " must be [B, T, V]");
  TORCH_CHECK(t.size(2) <= 1 || t.stride(2) == 1, name, ": vocabulary dimension must be contiguous");
  return {t.stride(0), t.stride(1), std::max<int64_t>(t.size(1), 1), t.size(0) * t.size(1), t.size(2)};
}
void check_targets(const Tensor& targets, const Tensor& ref, int64_t N) {
  check_dev(targets, ref, "targets");
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.is_contiguous() && targets.numel() == N,
              "cross_entropy: targets must be contiguous int64 with one entry per logits row");
}
}  // namespace

void ce_fwd(const Tensor& logits, const Tensor& targets, int64_t ignore_index, int64_t vocab_start, bool check_range,
            const Tensor& loss, const Tensor& lse, const OptTensor& target_logit) {
  TORCH_CHECK(on_device(logits), "ce_fwd: logits must be a CUDA tensor");
  const auto r = rows3(logits, "logits");
  TORCH_CHECK(r.V > 0, "cross_entropy: empty vocabulary");
  check_targets(targets, logits, r.N);
  check_vec(loss, logits, r.N, at::kFloat, "loss");
  check_vec(lse, logits, r.N, at::kFloat, "lse");
  check_vec(target_logit, logits, r.N, at::kFloat, "target_logit");
  Guard guard(logits.device());
  ok(llmk_cuda::ce_fwd(dtype_of(logits, "logits"), logits.const_data_ptr(), r.sb, r.st, r.Tn, r.N, r.V,
                       targets.const_data_ptr<int64_t>(), ignore_index, vocab_start, check_range,
                       loss.mutable_data_ptr<float>(), lse.mutable_data_ptr<float>(), mp<float>(target_logit),
                       stream()),
     "ce_fwd");
}

void ce_bwd(const Tensor& logits, const Tensor& targets, const Tensor& lse, const Tensor& scale,
            int64_t ignore_index, int64_t vocab_start, const Tensor& grad) {
  TORCH_CHECK(on_device(logits), "ce_bwd: logits must be a CUDA tensor");
  const auto r = rows3(logits, "logits");
  const auto g = rows3(grad, "grad");
  check_dev(grad, logits, "grad");
  TORCH_CHECK(grad.sizes() == logits.sizes() && grad.scalar_type() == logits.scalar_type(),
              "ce_bwd: grad must match logits' shape and dtype");
  check_targets(targets, logits, r.N);
  check_vec(lse, logits, r.N, at::kFloat, "lse");
  // one scale for every row (the mean loss) or one per row (per-token losses)
  check_vec(scale, logits, scale.numel() == 1 ? 1 : r.N, at::kFloat, "scale");
  const int64_t scale_stride = scale.numel() == 1 ? 0 : 1;
  Guard guard(logits.device());
  ok(llmk_cuda::ce_bwd(dtype_of(logits, "logits"), logits.const_data_ptr(), r.sb, r.st, r.Tn, r.N, r.V,
                       targets.const_data_ptr<int64_t>(), lse.const_data_ptr<float>(), scale.const_data_ptr<float>(),
                       scale_stride, ignore_index, vocab_start, grad.mutable_data_ptr(), g.sb, g.st, stream()),
     "ce_bwd");
}

void ce_ent_fwd(const Tensor& logits, const OptTensor& targets, int64_t ignore_index, int64_t vocab_start,
                bool check_range, const Tensor& lse, const Tensor& entropy, const OptTensor& loss,
                const OptTensor& target_logit) {
  TORCH_CHECK(on_device(logits), "ce_ent_fwd: logits must be a CUDA tensor");
  const auto r = rows3(logits, "logits");
  TORCH_CHECK(r.V > 0, "cross_entropy: empty vocabulary");
  if (has(targets)) check_targets(*targets, logits, r.N);
  TORCH_CHECK(has(targets) || (!has(loss) && !has(target_logit)), "ce_ent_fwd: loss/target_logit need targets");
  check_vec(lse, logits, r.N, at::kFloat, "lse");
  check_vec(entropy, logits, r.N, at::kFloat, "entropy");
  check_vec(loss, logits, r.N, at::kFloat, "loss");
  check_vec(target_logit, logits, r.N, at::kFloat, "target_logit");
  Guard guard(logits.device());
  ok(llmk_cuda::ce_ent_fwd(dtype_of(logits, "logits"), logits.const_data_ptr(), r.sb, r.st, r.Tn, r.N, r.V,
                           cp<int64_t>(targets), ignore_index, vocab_start, check_range,
                           lse.mutable_data_ptr<float>(), entropy.mutable_data_ptr<float>(), mp<float>(loss),
                           mp<float>(target_logit), stream()),
     "ce_ent_fwd");
}

void ce_ent_bwd(const Tensor& logits, const OptTensor& targets, const Tensor& lse, const Tensor& entropy,
                const OptTensor& grad_loss, const OptTensor& grad_entropy, int64_t ignore_index, int64_t vocab_start,
                const Tensor& grad) {
  TORCH_CHECK(on_device(logits), "ce_ent_bwd: logits must be a CUDA tensor");
  const auto r = rows3(logits, "logits");
  const auto g = rows3(grad, "grad");
  check_dev(grad, logits, "grad");
  TORCH_CHECK(grad.sizes() == logits.sizes() && grad.scalar_type() == logits.scalar_type(),
              "ce_ent_bwd: grad must match logits' shape and dtype");
  if (has(targets)) check_targets(*targets, logits, r.N);
  TORCH_CHECK(has(targets) || !has(grad_loss), "ce_ent_bwd: grad_loss needs targets");
  check_vec(lse, logits, r.N, at::kFloat, "lse");
  check_vec(entropy, logits, r.N, at::kFloat, "entropy");
  check_vec(grad_loss, logits, r.N, at::kFloat, "grad_loss");
  check_vec(grad_entropy, logits, r.N, at::kFloat, "grad_entropy");
  Guard guard(logits.device());
  ok(llmk_cuda::ce_ent_bwd(dtype_of(logits, "logits"), logits.const_data_ptr(), r.sb, r.st, r.Tn, r.N, r.V,
                           cp<int64_t>(targets), lse.const_data_ptr<float>(), entropy.const_data_ptr<float>(),
                           cp<float>(grad_loss), cp<float>(grad_entropy), ignore_index, vocab_start,
                           grad.mutable_data_ptr(), g.sb, g.st, stream()),
     "ce_ent_bwd");
}

}  // namespace llmk_cuda_ops

#ifdef LLMK_CUDA_EMULATION
TORCH_LIBRARY(llmk_cuda_emu, m) {
  LLMK_SCHEMAS(m)
}

TORCH_LIBRARY_IMPL(llmk_cuda_emu, CPU, m) {
  LLMK_IMPLS(m, llmk_cuda_ops)
}
#else
TORCH_LIBRARY(llmk_cuda, m) {
  LLMK_SCHEMAS(m)
}

TORCH_LIBRARY_IMPL(llmk_cuda, CUDA, m) {
  LLMK_IMPLS(m, llmk_cuda_ops)
}
#endif
