// Bias + GELU(tanh), SwiGLU and rotary embedding, forward and backward, CUDA.
// Grid-stride elementwise kernels; the bias gradient of bias_gelu is reduced in the backward
// kernel itself (32 x 8 tiles, shared-memory column sums, per-block partials + column reduce).
// The reference's low-precision intermediate roundings are reproduced with rnd<T>.
// bias-GELU and SwiGLU have vectorised variants (*_vec_kernel: 128-bit loads/stores of W = 16 /
// sizeof(T) elements, a vector never crossing a row), taken when D is a multiple of W and every
// row of every operand starts 16-byte aligned (base pointers aligned; SwiGLU's gate/up row
// strides multiples of W); the scalar kernels otherwise.  bias-GELU backward's vectorised tile is
// 32 column vectors x 8 rows, so its bias-gradient partials (one per block and column, summed in
// a fixed order, then the column reduction) stay deterministic.
#include "cuda_common.cuh"

#include <initializer_list>

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

// ------------------------------------------------------------------------------- vectorised
constexpr int kVecThreads = 256;  // the vectorised kernels' blocks (their __launch_bounds__)

template <typename T>
__global__ void __launch_bounds__(kVecThreads)
    bias_gelu_fwd_vec_kernel(const T* x, const float* b, int64_t nvec, int64_t dvec, T* y) {
  constexpr int W = 16 / sizeof(T);
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < nvec;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float a[W];
    load_vec(x + v * W, a);
    if (b) {
      float bv[W];
      load_vec(b + (v % dvec) * W, bv);
#pragma unroll
      for (int e = 0; e < W; ++e) a[e] = rnd<T>(a[e] + bv[e]);
    }
#pragma unroll
    for (int e = 0; e < W; ++e) a[e] = gelu_tanh(a[e]);
    store_vec(y + v * W, a);
  }
}

// block (32, 8): column vector cv = blockIdx.x * 32 + threadIdx.x (columns cv * W ..), rows strided
// by gridDim.y * 8; the per-block column sums go to partial[blockIdx.y * D + c].
template <typename T>
__global__ void __launch_bounds__(kVecThreads)
    bias_gelu_bwd_vec_kernel(const T* dy, const T* x, const float* b, int64_t N, int64_t D, T* dx, float* partial) {
  constexpr int W = 16 / sizeof(T);
  __shared__ float sm[8][W][33];
  const int64_t cv = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  const bool active = cv * W < D;
  float acc[W], bv[W];
#pragma unroll
  for (int e = 0; e < W; ++e) {
    acc[e] = 0.f;
    bv[e] = 0.f;
  }
  if (active) {
    if (b) load_vec(b + cv * W, bv);
    for (int64_t r = static_cast<int64_t>(blockIdx.y) * 8 + threadIdx.y; r < N;
         r += static_cast<int64_t>(gridDim.y) * 8) {
      const int64_t i = r * D + cv * W;
      float xv[W], g[W];
      load_vec(x + i, xv);
      load_vec(dy + i, g);
#pragma unroll
      for (int e = 0; e < W; ++e) {
        const float v = b ? rnd<T>(xv[e] + bv[e]) : xv[e];
        g[e] *= gelu_tanh_grad(v);
        acc[e] += rnd<T>(g[e]);
      }
      store_vec(dx + i, g);
    }
  }
  if (partial) {
#pragma unroll
    for (int e = 0; e < W; ++e) sm[threadIdx.y][e][threadIdx.x] = acc[e];
    __syncthreads();
    if (threadIdx.y == 0 && active) {
      float s[W];
#pragma unroll
      for (int e = 0; e < W; ++e) {
        s[e] = 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j) s[e] += sm[j][e][threadIdx.x];
      }
      store_vec(partial + static_cast<int64_t>(blockIdx.y) * D + cv * W, s);
    }
  }
}

// gate/up rows at r * sg / r * su (multiples of W), y/dy/dg/du contiguous; nvec = N * dvec vectors.
template <typename T>
__global__ void __launch_bounds__(kVecThreads)
    swiglu_fwd_vec_kernel(const T* g, int64_t sg, const T* u, int64_t su, int64_t nvec, int64_t dvec, T* y) {
  constexpr int W = 16 / sizeof(T);
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < nvec;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = v / dvec, c = (v - r * dvec) * W;
    float gv[W], uv[W];
    load_vec(g + r * sg + c, gv);
    load_vec(u + r * su + c, uv);
#pragma unroll
    for (int e = 0; e < W; ++e) gv[e] = rnd<T>(gv[e] * sigmoidf(gv[e])) * uv[e];
    store_vec(y + v * W, gv);
  }
}

template <typename T>
__global__ void __launch_bounds__(kVecThreads)
    swiglu_bwd_vec_kernel(const T* dy, const T* g, int64_t sg, const T* u, int64_t su, int64_t nvec, int64_t dvec,
                          T* dg, T* du) {
  constexpr int W = 16 / sizeof(T);
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < nvec;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = v / dvec, c = (v - r * dvec) * W;
    float gv[W], uv[W], d[W];
    load_vec(g + r * sg + c, gv);
    load_vec(u + r * su + c, uv);
    load_vec(dy + v * W, d);
#pragma unroll
    for (int e = 0; e < W; ++e) {
      const float s = sigmoidf(gv[e]);
      const float dge = rnd<T>(d[e] * uv[e]) * s * (1.0f + gv[e] * (1.0f - s));
      uv[e] = d[e] * rnd<T>(gv[e] * s);  // du
      gv[e] = dge;
    }
    store_vec(du + v * W, uv);
    store_vec(dg + v * W, gv);
  }
}

// Whether the vectorised kernels apply: D a multiple of T's vector width, every pointer 16-byte
// aligned and the row strides (elements; used only with more than one row) multiples of it.
template <typename T>
bool vec_ok(int64_t N, int64_t D, std::initializer_list<const void*> ptrs, std::initializer_list<int64_t> strides) {
  constexpr int64_t W = 16 / sizeof(T);
  if (D % W != 0) return false;
  for (const void* p : ptrs) {
    if (p && !aligned16(p)) return false;
  }
  for (int64_t st : strides) {
    if (N > 1 && st % W != 0) return false;
  }
  return true;
}

constexpr int kThreads = 256;

}  // namespace

int64_t bias_grad_grid_y(int64_t N) {
  const int64_t rows_per_block = 8;
  int64_t gy = (N + rows_per_block - 1) / rows_per_block;
  return gy < 1 ? 1 : (gy > 256 ? 256 : gy);
}

namespace {

template <typename T>
cudaError_t launch_bias_gelu_fwd(const void* x, const float* bias, int64_t N, int64_t D, void* y, cudaStream_t s) {
  constexpr int W = 16 / sizeof(T);
  const int64_t n = N * D;
  if (vec_ok<T>(N, D, {x, bias, y}, {}) && can_launch(bias_gelu_fwd_vec_kernel<T>, kVecThreads)) {
    LLMK_LAUNCH(grid_1d(n / W, kVecThreads), kVecThreads, 0, s, bias_gelu_fwd_vec_kernel<T>)(
        static_cast<const T*>(x), bias, n / W, D / W, static_cast<T*>(y));
  } else {
    LLMK_LAUNCH(grid_1d(n, kThreads), kThreads, 0, s, bias_gelu_fwd_kernel<T>)(static_cast<const T*>(x), bias, n, D,
                                                                              static_cast<T*>(y));
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bias_gelu_bwd(const void* dy, const void* x, const float* bias, int64_t N, int64_t D, void* dx,
                                 float* db, float* partial, cudaStream_t s) {
  constexpr int W = 16 / sizeof(T);
  const int64_t gy = db ? bias_grad_grid_y(N) : ((N + 7) / 8 > 4096 ? 4096 : (N + 7) / 8);
  const dim3 block(32, 8);
  float* part = db ? partial : nullptr;
  if (vec_ok<T>(N, D, {dy, x, bias, dx, part}, {}) && can_launch(bias_gelu_bwd_vec_kernel<T>, kVecThreads)) {
    const dim3 grid(static_cast<unsigned>((D / W + 31) / 32), static_cast<unsigned>(gy));
    LLMK_LAUNCH(grid, block, 0, s, bias_gelu_bwd_vec_kernel<T>)(static_cast<const T*>(dy), static_cast<const T*>(x),
                                                               bias, N, D, static_cast<T*>(dx), part);
  } else {
    const dim3 grid(static_cast<unsigned>((D + 31) / 32), static_cast<unsigned>(gy));
    LLMK_LAUNCH(grid, block, 0, s, bias_gelu_bwd_kernel<T>)(static_cast<const T*>(dy), static_cast<const T*>(x),
                                                           bias, N, D, static_cast<T*>(dx), part);
  }
  if (db) col_reduce(partial, gy, D, D, db, s);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_swiglu_fwd(const void* gate, int64_t sg, const void* up, int64_t su, int64_t N, int64_t D,
                              void* y, cudaStream_t s) {
  constexpr int W = 16 / sizeof(T);
  const int64_t n = N * D;
  if (vec_ok<T>(N, D, {gate, up, y}, {sg, su}) && can_launch(swiglu_fwd_vec_kernel<T>, kVecThreads)) {
    LLMK_LAUNCH(grid_1d(n / W, kVecThreads), kVecThreads, 0, s, swiglu_fwd_vec_kernel<T>)(
        static_cast<const T*>(gate), sg, static_cast<const T*>(up), su, n / W, D / W, static_cast<T*>(y));
  } else {
    LLMK_LAUNCH(grid_1d(n, kThreads), kThreads, 0, s, swiglu_fwd_kernel<T>)(
        static_cast<const T*>(gate), sg, static_cast<const T*>(up), su, n, D, static_cast<T*>(y));
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_swiglu_bwd(const void* dy, const void* gate, int64_t sg, const void* up, int64_t su, int64_t N,
                              int64_t D, void* dg, void* du, cudaStream_t s) {
  constexpr int W = 16 / sizeof(T);
  const int64_t n = N * D;
  if (vec_ok<T>(N, D, {dy, gate, up, dg, du}, {sg, su}) && can_launch(swiglu_bwd_vec_kernel<T>, kVecThreads)) {
    LLMK_LAUNCH(grid_1d(n / W, kVecThreads), kVecThreads, 0, s, swiglu_bwd_vec_kernel<T>)(
        static_cast<const T*>(dy), static_cast<const T*>(gate), sg, static_cast<const T*>(up), su, n / W, D / W,
        static_cast<T*>(dg), static_cast<T*>(du));
  } else {
    LLMK_LAUNCH(grid_1d(n, kThreads), kThreads, 0, s, swiglu_bwd_kernel<T>)(
        static_cast<const T*>(dy), static_cast<const T*>(gate), sg, static_cast<const T*>(up), su, n, D,
        static_cast<T*>(dg), static_cast<T*>(du));
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t bias_gelu_fwd(DType dt, const void* x, const float* bias, int64_t N, int64_t D, void* y, cudaStream_t s) {
  if (N * D == 0) return cudaSuccess;
  LLMK_DISPATCH_CUDA(dt, return (launch_bias_gelu_fwd<T>(x, bias, N, D, y, s)));
}

cudaError_t bias_gelu_bwd(DType dt, const void* dy, const void* x, const float* bias, int64_t N, int64_t D, void* dx,
                          float* db, float* partial, cudaStream_t s) {
  if (N == 0 || D == 0) return cudaSuccess;
  LLMK_DISPATCH_CUDA(dt, return (launch_bias_gelu_bwd<T>(dy, x, bias, N, D, dx, db, partial, s)));
}

cudaError_t swiglu_fwd(DType dt, const void* gate, int64_t sg, const void* up, int64_t su, int64_t N, int64_t D,
                       void* y, cudaStream_t s) {
  if (N * D == 0) return cudaSuccess;
  LLMK_DISPATCH_CUDA(dt, return (launch_swiglu_fwd<T>(gate, sg, up, su, N, D, y, s)));
}

cudaError_t swiglu_bwd(DType dt, const void* dy, const void* gate, int64_t sg, const void* up, int64_t su, int64_t N,
                       int64_t D, void* dg, void* du, cudaStream_t s) {
  if (N * D == 0) return cudaSuccess;
  LLMK_DISPATCH_CUDA(dt, return (launch_swiglu_bwd<T>(dy, gate, sg, up, su, N, D, dg, du, s)));
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
