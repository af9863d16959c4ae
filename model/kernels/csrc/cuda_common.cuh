// Device helpers shared by the CUDA kernels: storage-type conversions (float32 compute),
// warp/block reductions and launch-size helpers.  Needs only the CUDA toolkit headers (or, with
// -DLLMK_CUDA_EMULATION, the host-compiler emulator cuda_emu.h that the tests run them with).
#pragma once

#ifdef LLMK_CUDA_EMULATION
#include "cuda_emu.h"  // defines LLMK_LAUNCH / LLMK_EXTERN_SHARED for the emulator
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// Kernel launch `kernel<<<grid, block, smem, stream>>>(args...)` written as
// LLMK_LAUNCH(grid, block, smem, stream, kernel)(args...), and `extern __shared__ type name[]` as
// LLMK_EXTERN_SHARED(type, name), so the same sources also compile with the emulator.
#define LLMK_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define LLMK_EXTERN_SHARED(type, name) extern __shared__ type name[]
#endif

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "cuda_launch.h"

// Launch-shape overrides for tuning sweeps (bench/kernel_sweep.py): LLMK_TUNE="key=value,..." in
// the environment, e.g. "ce_bwd_unroll=4,norm_fwd_threads=128".  Read at each launch (a getenv
// is small next to a kernel launch), so one process can sweep; 0 or absent = the built-in choice.
// Outside namespace llmk_cuda: the emulator takes that namespace's function statics for
// __shared__ variables.
namespace llmk_tune {
inline int knob(const char* key) {
  const char* p = std::getenv("LLMK_TUNE");
  const size_t n = std::strlen(key);
  while (p != nullptr && *p != '\0') {
    if (std::strncmp(p, key, n) == 0 && p[n] == '=') return std::atoi(p + n + 1);
    p = std::strchr(p, ',');
    if (p != nullptr) ++p;
  }
  return 0;
}
}  // namespace llmk_tune

namespace llmk_cuda {

constexpr float kInf = __builtin_huge_valf();

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Round to T's precision and back (reproduces the reference's intermediate roundings).
template <typename T>
__device__ __forceinline__ float rnd(float v) { return to_f(from_f<T>(v)); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block; every thread gets the result.  `sh` holds >= 32 floats.  blockDim.x must be
// a multiple of 32.
__device__ __forceinline__ float block_sum(float v, float* sh) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // previous use of sh is finished
  if (lane == 0) sh[wid] = v;
  __syncthreads();
  if (wid == 0) {
    float t = lane < nw ? sh[lane] : 0.f;
    t = warp_sum(t);
    if (lane == 0) sh[0] = t;
  }
  __syncthreads();
  return sh[0];
}

// One-barrier block sum for kernels that reduce repeatedly: every warp reduces the per-warp
// partials itself, so no second barrier is needed; consecutive calls must alternate between two
// `sh` buffers of >= 32 floats (a buffer is rewritten only after every thread has passed the
// barrier of the call in between, i.e. has finished reading it).  blockDim.x % 32 == 0.
__device__ __forceinline__ float block_sum_db(float v, float* sh) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) sh[wid] = v;
  __syncthreads();
  return warp_sum(lane < nw ? sh[lane] : 0.f);
}
// Two sums in one barrier; `sh` holds >= 64 floats (alternate two such buffers, as above).
__device__ __forceinline__ void block_sum2_db(float& a, float& b, float* sh) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) {
    sh[wid] = a;
    sh[32 + wid] = b;
  }
  __syncthreads();
  a = warp_sum(lane < nw ? sh[lane] : 0.f);
  b = warp_sum(lane < nw ? sh[32 + lane] : 0.f);
}

// 128-bit vector access: N elements of T (N * sizeof(T) a multiple of 16) at a 16-byte aligned p,
// converted to / from float32.  Accessed as Pack<T> (an aligned array of T, so no type punning).
template <typename T>
struct alignas(16) Pack {
  T v[16 / sizeof(T)];
};
template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[N]) {
  static_assert((N * sizeof(T)) % 16 == 0, "whole 16-byte vectors only");
  constexpr int kPer = 16 / sizeof(T);
#ifdef LLMK_CUDA_EMULATION
  llmk_emu::check_aligned(p, 16);
#endif
#pragma unroll
  for (int c = 0; c < N / kPer; ++c) {
    const Pack<T> u = reinterpret_cast<const Pack<T>*>(p)[c];
#pragma unroll
    for (int k = 0; k < kPer; ++k) out[c * kPer + k] = to_f(u.v[k]);
  }
}
template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[N]) {
  static_assert((N * sizeof(T)) % 16 == 0, "whole 16-byte vectors only");
  constexpr int kPer = 16 / sizeof(T);
#ifdef LLMK_CUDA_EMULATION
  llmk_emu::check_aligned(p, 16);
#endif
#pragma unroll
  for (int c = 0; c < N / kPer; ++c) {
    Pack<T> u;
#pragma unroll
    for (int k = 0; k < kPer; ++k) u.v[k] = from_f<T>(in[c * kPer + k]);
    reinterpret_cast<Pack<T>*>(p)[c] = u;
  }
}
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Online softmax state (running max m, sum of exp(x - m)); NaN inputs propagate through s.
__device__ __forceinline__ void lse_push(float& m, float& s, float x) {
  if (x > m) {
    s = s * expf(m - x) + 1.0f;  // m == -inf: s == 0 and exp(-inf) == 0
    m = x;
  } else {
    s += (x == -kInf) ? 0.0f : expf(x - m);
  }
}
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
  const float mn = fmaxf(m, m2);
  if (mn == -kInf) {
    s = s + s2;
  } else {
    s = s * expf(m - mn) + s2 * expf(m2 - mn);
  }
  m = mn;
}
__device__ __forceinline__ void block_lse(float& m, float& s, float* shm, float* shs) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    float m2 = __shfl_xor_sync(0xffffffffu, m, o);
    float s2 = __shfl_xor_sync(0xffffffffu, s, o);
    lse_merge(m, s, m2, s2);
  }
  if (lane == 0) {
    shm[wid] = m;
    shs[wid] = s;
  }
  __syncthreads();
  if (wid == 0) {
    float mm = lane < nw ? shm[lane] : -kInf;
    float ss = lane < nw ? shs[lane] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      float m2 = __shfl_xor_sync(0xffffffffu, mm, o);
      float s2 = __shfl_xor_sync(0xffffffffu, ss, o);
      lse_merge(mm, ss, m2, s2);
    }
    if (lane == 0) {
      shm[0] = mm;
      shs[0] = ss;
    }
  }
  __syncthreads();
  m = shm[0];
  s = shs[0];
}

inline int row_threads(int64_t D) {
  return D >= 4096 ? 512 : D >= 1024 ? 256 : D >= 256 ? 128 : 64;
}

// Whether `kernel` can launch with `threads` threads on the current device (its register use may
// allow fewer than 1024; the kernels' __launch_bounds__ should already guarantee it).
template <typename F>
bool can_launch(F* kernel, int threads) {
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return threads <= attr.maxThreadsPerBlock;
}

inline unsigned grid_1d(int64_t n, int threads) {
  int64_t blocks = (n + threads - 1) / threads;
  if (blocks > 65536) blocks = 65536;  // grid-stride loops cover the rest
  return static_cast<unsigned>(blocks < 1 ? 1 : blocks);
}

inline int sm_count() {
  int dev = 0, sms = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  return sms > 0 ? sms : 80;
}

namespace {
// out[c] = sum_g partial[g * stride + c], c < D  (column sums of per-block partial gradients).
// Block (32, 32): 32 columns, the G rows split over threadIdx.y, then summed in shared memory.
__global__ void col_reduce_kernel(const float* partial, int64_t G, int64_t stride, int64_t D, float* out) {
  __shared__ float sm[32][33];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  float s = 0.f;
  if (c < D) {
    for (int64_t g = threadIdx.y; g < G; g += 32) s += partial[g * stride + c];
  }
  sm[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < D) {
    float t = 0.f;
#pragma unroll
    for (int j = 0; j < 32; ++j) t += sm[j][threadIdx.x];
    out[c] = t;
  }
}
}  // namespace

inline void col_reduce(const float* partial, int64_t G, int64_t stride, int64_t D, float* out, cudaStream_t s) {
  if (out == nullptr || D == 0) return;
  LLMK_LAUNCH(static_cast<unsigned>((D + 31) / 32), dim3(32, 32), 0, s, col_reduce_kernel)(partial, G, stride, D, out);
}

#define LLMK_DISPATCH_CUDA(dt, ...)    \
  switch (dt) {                        \
    case kF32: {                       \
      using T = float;                 \
      __VA_ARGS__;                     \
      break;                           \
    }                                  \
    case kF16: {                       \
      using T = __half;                \
      __VA_ARGS__;                     \
      break;                           \
    }                                  \
    case kBF16: {                      \
      using T = __nv_bfloat16;         \
      __VA_ARGS__;                     \
      break;                           \
    }                                  \
    default:                           \
      return cudaErrorInvalidValue;    \
  }

}  // namespace llmk_cuda
