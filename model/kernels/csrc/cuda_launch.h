// Host launchers of the CUDA kernels (implemented in cuda_*.cu).  Deliberately free of torch
// headers: the .cu files only need the CUDA toolkit, so `nvcc -c` can compile-check them on a
// machine whose torch is a CPU build.  All pointers are device pointers; the caller
// (cuda_ops.cpp) validates shapes/dtypes, sets the device and passes the current stream.
// Every launcher returns the launch status (cudaGetLastError()).
#pragma once

#ifdef LLMK_CUDA_EMULATION
#include "cuda_emu.h"  // host-compiler emulation of the runtime and device (tests only)
#else
#include <cuda_runtime_api.h>
#endif

#include <cstdint>

namespace llmk_cuda {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// Blocks used by the norm / bias-gelu backward kernels (the size of the float32 partial buffers).
int64_t norm_bwd_grid(int64_t N);
int64_t bias_grad_grid_y(int64_t N);

// Norms.  x, residual, h, dx, dres: [N, D] of `dt`; y: `dt` (or float32 when out_f32); weight/bias
// float32 [D] or null; mean/rstd float32 [N].  partial: float32 [norm_bwd_grid(N), 2, D] (LayerNorm)
// or [.., 1, D] (RMSNorm) when any of dw/db is wanted, else null.
cudaError_t layer_norm_fwd(DType dt, const void* x, const void* residual, const float* w, const float* b, float eps,
                           int64_t N, int64_t D, void* y, void* h, float* mean, float* rstd, cudaStream_t s);
cudaError_t layer_norm_bwd(DType dt, const void* dy, const void* h, const float* mean, const float* rstd,
                           const float* w, const void* dres, int64_t N, int64_t D, void* dx, float* dw, float* db,
                           float* partial, cudaStream_t s);
cudaError_t rms_norm_fwd(DType dt, bool out_f32, const void* x, const void* residual, const float* w, float eps,
                         int64_t N, int64_t D, void* y, void* h, float* rstd, cudaStream_t s);
cudaError_t rms_norm_bwd(DType dt, bool dy_f32, const void* dy, const void* h, const float* rstd, const float* w,
                         const void* dres, int64_t N, int64_t D, void* dx, float* dw, float* partial,
                         cudaStream_t s);

// Pointwise.  bias float32 [D] or null; partial float32 [bias_grad_grid_y(N), D] when db is wanted.
cudaError_t bias_gelu_fwd(DType dt, const void* x, const float* bias, int64_t N, int64_t D, void* y, cudaStream_t s);
cudaError_t bias_gelu_bwd(DType dt, const void* dy, const void* x, const float* bias, int64_t N, int64_t D, void* dx,
                          float* db, float* partial, cudaStream_t s);
// gate/up: [N, D] with row strides sg/su (elements), unit column stride; y/dy/dg/du contiguous.
cudaError_t swiglu_fwd(DType dt, const void* gate, int64_t sg, const void* up, int64_t su, int64_t N, int64_t D,
                       void* y, cudaStream_t s);
cudaError_t swiglu_bwd(DType dt, const void* dy, const void* gate, int64_t sg, const void* up, int64_t su, int64_t N,
                       int64_t D, void* dg, void* du, cudaStream_t s);
// x: [B, H, T, D] with element strides sb/sh/st (unit last stride); cos/sin float32 [Bc, T, D];
// y contiguous [B, H, T, D].  backward applies the transposed rotation.
cudaError_t rope(DType dt, const void* x, int64_t sb, int64_t sh, int64_t st, const float* cos, const float* sin,
                 int64_t Bc, int64_t B, int64_t H, int64_t Tn, int64_t D, bool backward, void* y, cudaStream_t s);

// Cross-entropy.  logits rows: row i at (i / Tn) * sb + (i % Tn) * st, V contiguous columns
// holding vocabulary ids [vocab_start, vocab_start + V).  targets int64 [N].
// check_range: a non-ignored target outside the row makes that row's loss and lse NaN.
cudaError_t ce_fwd(DType dt, const void* logits, int64_t sb, int64_t st, int64_t Tn, int64_t N, int64_t V,
                   const int64_t* targets, int64_t ignore_index, int64_t vocab_start, bool check_range, float* loss,
                   float* lse, float* target_logit, cudaStream_t s);
// grad may alias logits (each element is read, then written, by the same thread).  scale: float32 on
// the device, row i uses scale[i * scale_stride] (stride 0: grad_output / count for every row; 1:
// a per-token upstream gradient).
cudaError_t ce_bwd(DType dt, const void* logits, int64_t sb, int64_t st, int64_t Tn, int64_t N, int64_t V,
                   const int64_t* targets, const float* lse, const float* scale, int64_t scale_stride,
                   int64_t ignore_index, int64_t vocab_start, void* grad, int64_t gsb, int64_t gst, cudaStream_t s);
// Cross-entropy and entropy per row.  targets may be null (entropy only, no ignored rows); loss and
// target_logit need targets and may be null.  lse, ent float32 [N].
cudaError_t ce_ent_fwd(DType dt, const void* logits, int64_t sb, int64_t st, int64_t Tn, int64_t N, int64_t V,
                       const int64_t* targets, int64_t ignore_index, int64_t vocab_start, bool check_range,
                       float* lse, float* ent, float* loss, float* target_logit, cudaStream_t s);
// grad = p (gl - gh (log p + H)) - gl [target]; grad_loss (gl, needs targets) and grad_ent (gh) are
// float32 [N] or null.  grad may alias logits.
cudaError_t ce_ent_bwd(DType dt, const void* logits, int64_t sb, int64_t st, int64_t Tn, int64_t N, int64_t V,
                       const int64_t* targets, const float* lse, const float* ent, const float* grad_loss,
                       const float* grad_ent, int64_t ignore_index, int64_t vocab_start, void* grad, int64_t gsb,
                       int64_t gst, cudaStream_t s);

}  // namespace llmk_cuda
