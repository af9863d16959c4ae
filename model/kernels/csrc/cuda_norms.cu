// LayerNorm / RMSNorm (+ fused residual add) forward and backward, CUDA.
// Two implementations of each direction, picked per call by the launchers:
// * vectorised (D a multiple of the 16-byte vector width V = 16 / sizeof(T), every pointer 16-byte
//   aligned, D <= 4 * V * 1024): 128-bit loads/stores; each thread caches its NV <= 4 vectors of
//   the row in registers, so a row is read once (forward: x [+ residual]; backward: dy and h) and
//   written once; block reductions take one barrier (double-buffered, block_sum_db).  Backward:
//   a persistent grid of norm_bwd_grid(N) blocks walks the rows; each thread owns the same
//   columns in every row and keeps their weight/bias gradient sums in registers (the weight too),
//   written once per block to the float32 `partial` buffer, then a column reduction sums them.
// * scalar fallback (any D / alignment): one element per thread and loop iteration, the row
//   re-read from L1/L2 (two-pass variance); backward accumulators in shared memory (in the
//   block's slice of the global `partial` buffer when D is too large for shared memory).
// Each thread owns the same columns in every loop, so the accumulators need no atomics.
#include "cuda_common.cuh"

#include <initializer_list>

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


// ------------------------------------------------------------------ vectorised, row in registers
//
// Register budget: a block has 65536 registers.  Unbounded, the backward kernel with NV = 4 16-bit
// vectors per thread needs ~204 registers (ptxas, sm_80/sm_90), so 512 threads could never launch
// ("too many resources requested").  Hence __launch_bounds__ with the largest block the planner
// may pick (the compiler then fits the registers, spilling if it must), backward limited to NV <= 2
// (NV = 4 at <= 256 threads covers no wider row than NV = 2 at 512), a launch-time check of the
// kernel's real limit (cudaFuncGetAttributes) that falls back to the scalar kernels, and a test
// that reads ptxas's register counts (tests/test_kernels_build.py).
constexpr int kVecFwdMaxThreads = 1024;
constexpr int kVecBwdMaxThreads = 512;
constexpr int kVecBwdMaxNV = 2;

template <typename T, typename O, bool RMS, int NV, bool HOIST = false>
__global__ void __launch_bounds__(kVecFwdMaxThreads) norm_fwd_vec_kernel(const T* x, const T* r, const float* w, const float* b, float eps, int64_t D,
                                    O* y, T* h, float* mean_out, float* rstd_out) {
  constexpr int V = 16 / sizeof(T);
  __shared__ float sh[2][32];
  const int64_t row = blockIdx.x;
  const int64_t nvec = D / V;
  const float inv_d = 1.0f / static_cast<float>(D);
  float v[NV][V];
  float s1 = 0.f;
  // HOIST (LLMK_TUNE norm_fwd_hoist=1, NV <= 2 only): the affine parameters (the same for every
  // row, L2-resident) are loaded with the row, so their latency overlaps the row's instead of
  // following the reductions; it costs registers (bf16 LayerNorm NV = 1: 40 instead of 32 per
  // thread, 3 blocks of 512 threads per SM instead of 4), hence measured before it is a default.
  // Not at NV = 4, where holding them would spill (64 registers at the 1024-thread launch bound).
  static_assert(!HOIST || NV <= 2, "hoisted affine parameters only for NV <= 2");
  float wv[NV][V], bv[NV][V];
  auto load_affine = [&](int k) {
    const int64_t j = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
    if (j < nvec) {
      if (w) load_vec(w + j * V, wv[k]);
      if (!RMS && b) load_vec(b + j * V, bv[k]);
    }
  };
  if constexpr (HOIST) {
#pragma unroll
    for (int k = 0; k < NV; ++k) load_affine(k);
  }
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int64_t j = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
    if (j < nvec) {
      const int64_t off = row * D + j * V;
      load_vec(x + off, v[k]);
      if (r) {
        float rv[V];
        load_vec(r + off, rv);
#pragma unroll
        for (int e = 0; e < V; ++e) v[k][e] = rnd<T>(v[k][e] + rv[e]);
        store_vec(h + off, v[k]);
      }
#pragma unroll
      for (int e = 0; e < V; ++e) s1 += RMS ? v[k][e] * v[k][e] : v[k][e];
    }
  }
  s1 = block_sum_db(s1, sh[0]);
  float mu = 0.f, rs;
  if (RMS) {
    rs = 1.0f / sqrtf(s1 * inv_d + eps);
  } else {
    mu = s1 * inv_d;
    float s2 = 0.f;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      if (threadIdx.x + static_cast<int64_t>(k) * blockDim.x < nvec) {
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const float d = v[k][e] - mu;
          s2 += d * d;
        }
      }
    }
    s2 = block_sum_db(s2, sh[1]);
    rs = 1.0f / sqrtf(s2 * inv_d + eps);
  }
  if (threadIdx.x == 0) {
    if (!RMS) mean_out[row] = mu;
    rstd_out[row] = rs;
  }
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int64_t j = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
    if constexpr (!HOIST) load_affine(k);
    if (j < nvec) {
      float n[V];
#pragma unroll
      for (int e = 0; e < V; ++e) {
        if (RMS) {
          n[e] = rnd<T>(v[k][e] * rs);
          if (w) n[e] *= wv[k][e];
        } else {
          n[e] = (v[k][e] - mu) * rs;
          if (w) n[e] *= wv[k][e];
          if (b) n[e] += bv[k][e];
        }
      }
      store_vec(y + row * D + j * V, n);
    }
  }
}

template <typename T, typename O, bool RMS, int NV>
__global__ void __launch_bounds__(kVecBwdMaxThreads) norm_bwd_vec_kernel(const O* dy, const T* hx, const float* mean, const float* rstd, const float* w,
                                    const T* dres, int64_t N, int64_t D, T* dx, float* partial) {
  constexpr int V = 16 / sizeof(T);
  constexpr int kAcc = RMS ? 1 : 2;
  __shared__ float sh[2][64];
  const int64_t nvec = D / V;
  const float inv_d = 1.0f / static_cast<float>(D);
  float wv[NV][V], aw[NV][V], ab[NV][V];
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int64_t j = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      wv[k][e] = 1.f;
      aw[k][e] = 0.f;
      ab[k][e] = 0.f;
    }
    if (w && j < nvec) load_vec(w + j * V, wv[k]);
  }
  int buf = 0;
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const float mu = RMS ? 0.f : mean[row];
    const float rs = rstd[row];
    float d[NV][V], xh[NV][V];
    float a1 = 0.f, a2 = 0.f;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t j = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
      if (j < nvec) {
        const int64_t off = row * D + j * V;
        load_vec(dy + off, d[k]);
        load_vec(hx + off, xh[k]);
#pragma unroll
        for (int e = 0; e < V; ++e) {
          xh[k][e] = (xh[k][e] - mu) * rs;
          const float g = d[k][e] * wv[k][e];
          a1 += g * xh[k][e];
          a2 += g;
          if (partial) {
            if (RMS) {
              aw[k][e] += d[k][e] * rnd<T>(xh[k][e]);
            } else {
              aw[k][e] += d[k][e] * xh[k][e];
              ab[k][e] += d[k][e];
            }
          }
        }
      }
    }
    block_sum2_db(a1, a2, sh[buf]);
    buf ^= 1;
    a1 *= inv_d;
    a2 *= inv_d;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t j = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
      if (j < nvec) {
        const int64_t off = row * D + j * V;
        float o[V], rv[V];
        if (dres) load_vec(dres + off, rv);
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const float g = d[k][e] * wv[k][e];
          o[e] = RMS ? rs * (g - xh[k][e] * a1) : rs * (g - a2 - xh[k][e] * a1);
          if (dres) o[e] += rv[e];
        }
        store_vec(dx + off, o);
      }
    }
  }
  if (partial) {
    float* out = partial + static_cast<int64_t>(blockIdx.x) * kAcc * D;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t j = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
      if (j < nvec) {
        store_vec(out + j * V, aw[k]);
        if (!RMS) store_vec(out + D + j * V, ab[k]);
      }
    }
  }
}

// Threads and vectors per thread (NV in {1, 2, 4}, at most max_nv) of the vectorised kernels for
// a row of D elements of T with at most max_threads threads, or 0 when they do not apply (then the
// scalar kernels run).
// `start` (LLMK_TUNE norm_fwd_threads / norm_bwd_threads) replaces row_threads(D) as the first
// block size tried.
template <typename T>
int vec_plan(int64_t D, std::initializer_list<const void*> ptrs, int max_threads, int max_nv, int& threads,
             int start = 0) {
  constexpr int V = 16 / sizeof(T);
  if (D % V != 0) return 0;
  for (const void* p : ptrs) {
    if (p && !aligned16(p)) return 0;
  }
  const int64_t nvec = D / V;
  if (start < 32 || start % 32 != 0) start = row_threads(D);
  threads = start < max_threads ? start : max_threads;
  while (nvec > static_cast<int64_t>(max_nv) * threads && threads < max_threads) threads *= 2;
  const int64_t nv = (nvec + threads - 1) / threads;
  const int plan = nv <= 1 ? 1 : nv == 2 ? 2 : nv <= 4 ? 4 : 0;
  return plan <= max_nv ? plan : 0;
}


template <typename T, typename O, bool RMS>
cudaError_t launch_fwd(const void* x, const void* r, const float* w, const float* b, float eps, int64_t N, int64_t D,
                       void* y, void* h, float* mean, float* rstd, cudaStream_t s) {
  if (N == 0 || D == 0) return cudaSuccess;
  int threads = 0;
  const int nv = vec_plan<T>(D, {x, r, w, b, y, h}, kVecFwdMaxThreads, 4, threads,
                             llmk_tune::knob("norm_fwd_threads"));
  const unsigned grid = static_cast<unsigned>(N);
#define LLMK_NORM_FWD_VEC(...)                                                                            \
  if (can_launch(__VA_ARGS__, threads)) {                                                                 \
    LLMK_LAUNCH(grid, threads, 0, s, __VA_ARGS__)(static_cast<const T*>(x), static_cast<const T*>(r), w, b, eps, D, \
                                                  static_cast<O*>(y), static_cast<T*>(h), mean, rstd);      \
    return cudaGetLastError();                                                                            \
  }
  const bool hoist = llmk_tune::knob("norm_fwd_hoist") == 1;
  if (nv == 1 && hoist) {
    LLMK_NORM_FWD_VEC(norm_fwd_vec_kernel<T, O, RMS, 1, true>)
  } else if (nv == 1) {
    LLMK_NORM_FWD_VEC(norm_fwd_vec_kernel<T, O, RMS, 1>)
  } else if (nv == 2 && hoist) {
    LLMK_NORM_FWD_VEC(norm_fwd_vec_kernel<T, O, RMS, 2, true>)
  } else if (nv == 2) {
    LLMK_NORM_FWD_VEC(norm_fwd_vec_kernel<T, O, RMS, 2>)
  } else if (nv == 4) {
    LLMK_NORM_FWD_VEC(norm_fwd_vec_kernel<T, O, RMS, 4>)
  }
#undef LLMK_NORM_FWD_VEC
  LLMK_LAUNCH(grid, row_threads(D), 0, s, norm_fwd_kernel<T, O, RMS>)(
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
  int threads = 0;
  int nv = vec_plan<T>(D, {dy, h, w, dres, dx, partial}, kVecBwdMaxThreads, kVecBwdMaxNV, threads,
                       llmk_tune::knob("norm_bwd_threads"));
  if (nv == 1 && !can_launch(norm_bwd_vec_kernel<T, O, RMS, 1>, threads)) nv = 0;
  if (nv == 2 && !can_launch(norm_bwd_vec_kernel<T, O, RMS, 2>, threads)) nv = 0;
  if (nv) {
#define LLMK_NORM_BWD_VEC(NV)                                                                              \
  LLMK_LAUNCH(static_cast<unsigned>(G), threads, 0, s, norm_bwd_vec_kernel<T, O, RMS, NV>)(               \
      static_cast<const O*>(dy), static_cast<const T*>(h), mean, rstd, w, static_cast<const T*>(dres), N, D, \
      static_cast<T*>(dx), partial)
    if (nv == 1) {
      LLMK_NORM_BWD_VEC(1);
    } else {
      LLMK_NORM_BWD_VEC(2);
    }
#undef LLMK_NORM_BWD_VEC
    if (partial) {
      col_reduce(partial, G, kAcc * D, D, dw, s);
      if (!RMS) col_reduce(partial + D, G, kAcc * D, D, db, s);
    }
    return cudaGetLastError();
  }
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
  LLMK_LAUNCH(static_cast<unsigned>(G), row_threads(D), smem, s, norm_bwd_kernel<T, O, RMS>)(
      static_cast<const O*>(dy), static_cast<const T*>(h), mean, rstd, w, static_cast<const T*>(dres), N, D,
      static_cast<T*>(dx), partial, use_smem);
  if (partial) {
    col_reduce(partial, G, kAcc * D, D, dw, s);
    if (!RMS) col_reduce(partial + D, G, kAcc * D, D, db, s);
  }
  return cudaGetLastError();
}

}  // namespace

// Blocks of the persistent backward: 2 per SM (LLMK_TUNE norm_bwd_blocks = per SM; blocks beyond
// what fits at once run in later waves).
int64_t norm_bwd_grid(int64_t N) {
  const int per_sm = llmk_tune::knob("norm_bwd_blocks");
  const int64_t g = (per_sm > 0 ? per_sm : 2) * static_cast<int64_t>(sm_count());
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
