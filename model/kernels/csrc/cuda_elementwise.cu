// Bias + GELU(tanh), SwiGLU and rotary embedding, forward and backward, CUDA.
// Grid-stride elementwise kernels; the bias gradient of bias_gelu is reduced in the backward
// kernel itself (32 x 8 tiles, shared-memory column sums, per-block partials + column reduce).
// The reference's low-precision intermediate roundings are reproduced with rnd<T>.
#include "cuda_common.cuh"

namespace llmk_cuda {
namespace {

constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2/pi)
constexpr float kGeluA = 0.044715f;

__device__ __forceinline__ float gelu_tanh(float x) {
  const float u = kGeluC * (x + kGeluA * x * x * x);
  return 0.5f * x * (1.0f + tanhf(u));
}
__device__ __forceinline__ float gelu_tanh_grad(float x) {
  const float x2 = x * x;
  const float t = tanhf(kGeluC * (x + kGeluA * x2 * x));
  return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * kGeluC * (1.0f + 3.0f * kGeluA * x2);
}
__device__ __forceinline__ float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

template <typename T>
__global__ void bias_gelu_fwd_kernel(const T* x, const float* b, int64_t n, int64_t D, T* y) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = to_f(x[i]);
    if (b) v = rnd<T>(v + b[i % D]);
    y[i] = from_f<T>(gelu_tanh(v));
  }
}

// block (32, 8): column c = blockIdx.x * 32 + threadIdx.x, rows strided by gridDim.y * 8.
template <typename T>
__global__ void bias_gelu_bwd_kernel(const T* dy, const T* x, const float* b, int64_t N, int64_t D, T* dx,
                                     float* partial) {
  __shared__ float sm[8][33];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  float acc = 0.f;
  if (c < D) {
    for (int64_t r = static_cast<int64_t>(blockIdx.y) * 8 + threadIdx.y; r < N;
         r += static_cast<int64_t>(gridDim.y) * 8) {
      const int64_t i = r * D + c;
      float v = to_f(x[i]);
      if (b) v = rnd<T>(v + b[c]);
      const float g = to_f(dy[i]) * gelu_tanh_grad(v);
      dx[i] = from_f<T>(g);
      acc += rnd<T>(g);
    }
  }
  if (partial) {
    sm[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < D) {
      float s = 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j) s += sm[j][threadIdx.x];
      partial[static_cast<int64_t>(blockIdx.y) * D + c] = s;
    }
  }
}

template <typename T>
__global__ void swiglu_fwd_kernel(const T* g, int64_t sg, const T* u, int64_t su, int64_t n, int64_t D, T* y) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / D, c = i - r * D;
    const float gv = to_f(g[r * sg + c]);
    y[i] = from_f<T>(rnd<T>(gv * sigmoidf(gv)) * to_f(u[r * su + c]));
  }
}

template <typename T>
__global__ void swiglu_bwd_kernel(const T* dy, const T* g, int64_t sg, const T* u, int64_t su, int64_t n, int64_t D,
                                  T* dg, T* du) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / D, c = i - r * D;
    const float gv = to_f(g[r * sg + c]);
    const float d = to_f(dy[i]);
    const float s = sigmoidf(gv);
    du[i] = from_f<T>(d * rnd<T>(gv * s));
    dg[i] = from_f<T>(rnd<T>(d * to_f(u[r * su + c])) * s * (1.0f + gv * (1.0f - s)));
  }
}

template <typename T>
__global__ void rope_kernel(const T* x, int64_t sb, int64_t sh, int64_t st, const float* cs, const float* sn,
                            int64_t Bc, int64_t H, int64_t Tn, int64_t D, int64_t n_pairs, bool backward, T* y) {
  const int64_t half = D / 2;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_pairs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = i % half;
    const int64_t row = i / half;  // (b, h, t) in [B, H, T] order
    const int64_t t = row % Tn;
    const int64_t bh = row / Tn;
    const int64_t hh = bh % H, b = bh / H;
    const T* xr = x + b * sb + hh * sh + t * st;
    const int64_t coff = ((Bc == 1 ? 0 : b) * Tn + t) * D;
    const float x1 = to_f(xr[d]), x2 = to_f(xr[half + d]);
    const float ca = cs[coff + d], cb = cs[coff + half + d];
    const float sa = sn[coff + d], sb2 = sn[coff + half + d];
    T* yr = y + row * D;
    if (!backward) {
      yr[d] = from_f<T>(rnd<T>(x1 * ca) + rnd<T>(-(x2 * sa)));
      yr[half + d] = from_f<T>(rnd<T>(x2 * cb) + rnd<T>(x1 * sb2));
    } else {
      yr[d] = from_f<T>(rnd<T>(x1 * ca) + rnd<T>(x2 * sb2));
      yr[half + d] = from_f<T>(rnd<T>(x2 * cb) + rnd<T>(-(x1 * sa)));
    }
  }
}

constexpr int kThreads = 256;

}  // namespace

int64_t bias_grad_grid_y(int64_t N) {
  const int64_t rows_per_block = 8;
  int64_t gy = (N + rows_per_block - 1) / rows_per_block;
  return gy < 1 ? 1 : (gy > 256 ? 256 : gy);
}

cudaError_t bias_gelu_fwd(DType dt, const void* x, const float* bias, int64_t N, int64_t D, void* y, cudaStream_t s) {
  const int64_t n = N * D;
  if (n == 0) return cudaSuccess;
  LLMK_DISPATCH_CUDA(dt, LLMK_LAUNCH(grid_1d(n, kThreads), kThreads, 0, s, bias_gelu_fwd_kernel<T>)(
                             static_cast<const T*>(x), bias, n, D, static_cast<T*>(y)));
  return cudaGetLastError();
}

cudaError_t bias_gelu_bwd(DType dt, const void* dy, const void* x, const float* bias, int64_t N, int64_t D, void* dx,
                          float* db, float* partial, cudaStream_t s) {
  if (N == 0 || D == 0) return cudaSuccess;
  const int64_t gy = db ? bias_grad_grid_y(N) : ((N + 7) / 8 > 4096 ? 4096 : (N + 7) / 8);
  const dim3 grid(static_cast<unsigned>((D + 31) / 32), static_cast<unsigned>(gy));
  const dim3 block(32, 8);
  float* part = db ? partial : nullptr;
  LLMK_DISPATCH_CUDA(dt, LLMK_LAUNCH(grid, block, 0, s, bias_gelu_bwd_kernel<T>)(
                             static_cast<const T*>(dy), static_cast<const T*>(x), bias, N, D, static_cast<T*>(dx),
                             part));
  if (db) col_reduce(partial, gy, D, D, db, s);
  return cudaGetLastError();
}

cudaError_t swiglu_fwd(DType dt, const void* gate, int64_t sg, const void* up, int64_t su, int64_t N, int64_t D,
                       void* y, cudaStream_t s) {
  const int64_t n = N * D;
  if (n == 0) return cudaSuccess;
  LLMK_DISPATCH_CUDA(dt, LLMK_LAUNCH(grid_1d(n, kThreads), kThreads, 0, s, swiglu_fwd_kernel<T>)(
                             static_cast<const T*>(gate), sg, static_cast<const T*>(up), su, n, D,
                             static_cast<T*>(y)));
  return cudaGetLastError();
}

cudaError_t swiglu_bwd(DType dt, const void* dy, const void* gate, int64_t sg, const void* up, int64_t su, int64_t N,
                       int64_t D, void* dg, void* du, cudaStream_t s) {
  const int64_t n = N * D;
  if (n == 0) return cudaSuccess;
  LLMK_DISPATCH_CUDA(dt, LLMK_LAUNCH(grid_1d(n, kThreads), kThreads, 0, s, swiglu_bwd_kernel<T>)(
                             static_cast<const T*>(dy), static_cast<const T*>(gate), sg, static_cast<const T*>(up),
                             su, n, D, static_cast<T*>(dg), static_cast<T*>(du)));
  return cudaGetLastError();
}

cudaError_t rope(DType dt, const void* x, int64_t sb, int64_t sh, int64_t st, const float* cos, const float* sin,
                 int64_t Bc, int64_t B, int64_t H, int64_t Tn, int64_t D, bool backward, void* y, cudaStream_t s) {
  const int64_t n_pairs = B * H * Tn * (D / 2);
  if (n_pairs == 0) return cudaSuccess;
  LLMK_DISPATCH_CUDA(dt, LLMK_LAUNCH(grid_1d(n_pairs, kThreads), kThreads, 0, s, rope_kernel<T>)(
                             static_cast<const T*>(x), sb, sh, st, cos, sin, Bc, H, Tn, D, n_pairs, backward,
                             static_cast<T*>(y)));
  return cudaGetLastError();
}

}  // namespace llmk_cuda
