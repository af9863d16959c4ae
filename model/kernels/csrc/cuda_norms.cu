// LayerNorm / RMSNorm (+ fused residual add) forward and backward, CUDA.
// Forward: one block per row, block reductions for the row statistics (two-pass variance, the
// row is re-read from L1/L2).  Backward: a persistent grid of norm_bwd_grid(N) blocks walks the
// rows; each block keeps its weight/bias gradient partial sums in shared memory (in its slice of
// the global `partial` buffer when D is too large for shared memory), then a column reduction
// sums the per-block partials.  Each thread owns the same columns in every loop, so the
// accumulators need no atomics.
#include "cuda_common.cuh"

namespace llmk_cuda {
namespace {

template <typename T, typename O, bool RMS>
__global__ void norm_fwd_kernel(const T* x, const T* r, const float* w, const float* b, float eps, int64_t D, O* y,
                                T* h, float* mean_out, float* rstd_out) {
  __shared__ float sh[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * D;
  const T* rr = r ? r + row * D : nullptr;
  T* hr = h ? h + row * D : nullptr;
  const T* src = rr ? hr : xr;  // the (rounded) normalised input after the first pass
  const float inv_d = 1.0f / static_cast<float>(D);
  float s1 = 0.f;
  for (int64_t c = threadIdx.x; c < D; c += blockDim.x) {
    float v = to_f(xr[c]);
    if (rr) {
      const T hv = from_f<T>(v + to_f(rr[c]));
      hr[c] = hv;
      v = to_f(hv);
    }
    s1 += RMS ? v * v : v;
  }
  s1 = block_sum(s1, sh);
  float mu = 0.f, rs;
  if (RMS) {
    rs = 1.0f / sqrtf(s1 * inv_d + eps);
  } else {
    mu = s1 * inv_d;
    float s2 = 0.f;
    for (int64_t c = threadIdx.x; c < D; c += blockDim.x) {
      const float d = to_f(src[c]) - mu;
      s2 += d * d;
    }
    s2 = block_sum(s2, sh);
    rs = 1.0f / sqrtf(s2 * inv_d + eps);
  }
  if (threadIdx.x == 0) {
    if (!RMS) mean_out[row] = mu;
    rstd_out[row] = rs;
  }
  O* yr = y + row * D;
  for (int64_t c = threadIdx.x; c < D; c += blockDim.x) {
    const float v = to_f(src[c]);
    float n;
    if (RMS) {
      n = rnd<T>(v * rs);
      if (w) n *= w[c];
    } else {
      n = (v - mu) * rs;
      if (w) n *= w[c];
      if (b) n += b[c];
    }
    yr[c] = from_f<O>(n);
  }
}

template <typename T, typename O, bool RMS>
__global__ void norm_bwd_kernel(const O* dy, const T* hx, const float* mean, const float* rstd, const float* w,
                                const T* dres, int64_t N, int64_t D, T* dx, float* partial, bool use_smem) {
  LLMK_EXTERN_SHARED(float, smem);  // [32] reduction scratch, then (use_smem) the accumulators
  constexpr int kAcc = RMS ? 1 : 2;
  float* red = smem;
  float* acc = nullptr;
  if (partial) {
    acc = use_smem ? smem + 32 : partial + static_cast<int64_t>(blockIdx.x) * kAcc * D;
    for (int64_t j = threadIdx.x; j < kAcc * D; j += blockDim.x) acc[j] = 0.f;
    __syncthreads();
  }
  const float inv_d = 1.0f / static_cast<float>(D);
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const float mu = RMS ? 0.f : mean[row];
    const float rs = rstd[row];
    const O* dyr = dy + row * D;
    const T* hr = hx + row * D;
    float a1 = 0.f, a2 = 0.f;
    for (int64_t c = threadIdx.x; c < D; c += blockDim.x) {
      const float d = to_f(dyr[c]);
      const float xh = (to_f(hr[c]) - mu) * rs;
      const float g = w ? d * w[c] : d;
      a1 += g * xh;
      a2 += g;
      if (acc) {
        if (RMS) {
          acc[c] += d * rnd<T>(xh);
        } else {
          acc[c] += d * xh;
          acc[D + c] += d;
        }
      }
    }
    a1 = block_sum(a1, red) * inv_d;
    if (!RMS) a2 = block_sum(a2, red) * inv_d;
    T* dxr = dx + row * D;
    const T* drr = dres ? dres + row * D : nullptr;
    for (int64_t c = threadIdx.x; c < D; c += blockDim.x) {
      const float d = to_f(dyr[c]);
      const float xh = (to_f(hr[c]) - mu) * rs;
      const float g = w ? d * w[c] : d;
      float v = RMS ? rs * (g - xh * a1) : rs * (g - a2 - xh * a1);
      if (drr) v += to_f(drr[c]);
      dxr[c] = from_f<T>(v);
    }
  }
  if (acc && use_smem) {
    __syncthreads();
    float* out = partial + static_cast<int64_t>(blockIdx.x) * kAcc * D;
    for (int64_t j = threadIdx.x; j < kAcc * D; j += blockDim.x) out[j] = acc[j];
  }
}

template <typename T, typename O, bool RMS>
cudaError_t launch_fwd(const void* x, const void* r, const float* w, const float* b, float eps, int64_t N, int64_t D,
                       void* y, void* h, float* mean, float* rstd, cudaStream_t s) {
  if (N == 0 || D == 0) return cudaSuccess;
  LLMK_LAUNCH(static_cast<unsigned>(N), row_threads(D), 0, s, norm_fwd_kernel<T, O, RMS>)(
      static_cast<const T*>(x), static_cast<const T*>(r), w, b, eps, D, static_cast<O*>(y), static_cast<T*>(h),
      mean, rstd);
  return cudaGetLastError();
}

template <typename T, typename O, bool RMS>
cudaError_t launch_bwd(const void* dy, const void* h, const float* mean, const float* rstd, const float* w,
                       const void* dres, int64_t N, int64_t D, void* dx, float* dw, float* db, float* partial,
                       cudaStream_t s) {
  if (N == 0 || D == 0) return cudaSuccess;
  constexpr int kAcc = RMS ? 1 : 2;
  const int64_t G = norm_bwd_grid(N);
  size_t smem = 32 * sizeof(float);
  bool use_smem = false;
  if (partial) {
    int dev = 0, optin = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    const size_t need = smem + static_cast<size_t>(kAcc) * D * sizeof(float);
    if (need <= static_cast<size_t>(optin)) {
      use_smem = true;
      smem = need;
    }
  }
  auto kernel = norm_bwd_kernel<T, O, RMS>;
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  LLMK_LAUNCH(static_cast<unsigned>(G), row_threads(D), smem, s, kernel)(
      static_cast<const O*>(dy), static_cast<const T*>(h), mean, rstd, w, static_cast<const T*>(dres), N, D,
      static_cast<T*>(dx), partial, use_smem);
  if (partial) {
    col_reduce(partial, G, kAcc * D, D, dw, s);
    if (!RMS) col_reduce(partial + D, G, kAcc * D, D, db, s);
  }
  return cudaGetLastError();
}

}  // namespace

int64_t norm_bwd_grid(int64_t N) {
  const int64_t g = 2 * static_cast<int64_t>(sm_count());
  return N < g ? (N < 1 ? 1 : N) : g;
}

cudaError_t layer_norm_fwd(DType dt, const void* x, const void* residual, const float* w, const float* b, float eps,
                           int64_t N, int64_t D, void* y, void* h, float* mean, float* rstd, cudaStream_t s) {
  LLMK_DISPATCH_CUDA(dt, return (launch_fwd<T, T, false>(x, residual, w, b, eps, N, D, y, h, mean, rstd, s)));
}

cudaError_t layer_norm_bwd(DType dt, const void* dy, const void* h, const float* mean, const float* rstd,
                           const float* w, const void* dres, int64_t N, int64_t D, void* dx, float* dw, float* db,
                           float* partial, cudaStream_t s) {
  LLMK_DISPATCH_CUDA(dt, return (launch_bwd<T, T, false>(dy, h, mean, rstd, w, dres, N, D, dx, dw, db, partial, s)));
}

cudaError_t rms_norm_fwd(DType dt, bool out_f32, const void* x, const void* residual, const float* w, float eps,
                         int64_t N, int64_t D, void* y, void* h, float* rstd, cudaStream_t s) {
  if (out_f32) {
    LLMK_DISPATCH_CUDA(dt, return (launch_fwd<T, float, true>(x, residual, w, nullptr, eps, N, D, y, h, nullptr,
                                                              rstd, s)));
  }
  LLMK_DISPATCH_CUDA(dt, return (launch_fwd<T, T, true>(x, residual, w, nullptr, eps, N, D, y, h, nullptr, rstd, s)));
}

cudaError_t rms_norm_bwd(DType dt, bool dy_f32, const void* dy, const void* h, const float* rstd, const float* w,
                         const void* dres, int64_t N, int64_t D, void* dx, float* dw, float* partial,
                         cudaStream_t s) {
  if (dy_f32) {
    LLMK_DISPATCH_CUDA(dt, return (launch_bwd<T, float, true>(dy, h, nullptr, rstd, w, dres, N, D, dx, dw, nullptr,
                                                              partial, s)));
  }
  LLMK_DISPATCH_CUDA(dt, return (launch_bwd<T, T, true>(dy, h, nullptr, rstd, w, dres, N, D, dx, dw, nullptr,
                                                        partial, s)));
}

}  // namespace llmk_cuda
