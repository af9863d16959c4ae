// Softmax cross-entropy, CUDA.
// Two implementations of each direction, picked per call by the launchers:
// * vectorised (V a multiple of the 16-byte vector width W = 16 / sizeof(T) and every row start,
//   and the gradient's, 16-byte aligned: base pointers aligned and the row strides of the
//   dimensions with more than one entry multiples of W): 128-bit loads/stores.
//   Forward: one block of 512 threads per row; each thread loads two vectors, takes their max
//   first, rescales its running sum once if the max grew, then one expf per element (the scalar
//   online update needs up to two per element).  Backward: grid (rows, column chunks of
//   256 threads x 2 vectors); each thread reads its two vectors, then writes their gradients.
// * scalar fallback (any V / row alignment, e.g. a vocabulary shard of odd width or logits[:, :-1]
//   of an odd V): one element per thread and loop iteration, online (max, sum-exp) update.
// Forward: the per-thread (max, sum-exp) states are merged across the block; only lse / loss /
// target logit are written per row.  Backward: every element is read, then written, by the same
// thread, so the gradient may be written in place into the logits buffer.  Column chunks beyond
// gridDim.y <= 65535 are walked by a grid-stride loop.
#include "cuda_common.cuh"

namespace llmk_cuda {
namespace {

constexpr int kFwdThreads = 512;
constexpr int kBwdThreads = 256;
constexpr int64_t kBwdChunk = kBwdThreads * 8;
constexpr int kCeVecFwdThreads = 512;  // the vectorised kernels' blocks (their __launch_bounds__)
constexpr int kCeVecBwdThreads = 256;
constexpr int kCeUnroll = 2;  // vectors per thread and loop iteration (loads in flight)
constexpr unsigned kMaxGridY = 65535;

// Row i's final (loss, lse, target logit), by thread 0 after the block merge.
template <typename T>
__device__ __forceinline__ void ce_fwd_finish(const T* row, int64_t i, float m, float s, int64_t V, const int64_t* tg,
                                              int64_t ignore_index, int64_t vocab_start, bool check_range,
                                              float* loss, float* lse, float* tlogit) {
  float l = m + logf(s);
  const int64_t t = tg[i];
  float xt = 0.f;
  if (t != ignore_index) {
    const int64_t tl = t - vocab_start;
    if (tl >= 0 && tl < V) {
      xt = to_f(row[tl]);
    } else if (check_range) {
      l = __int_as_float(0x7fc00000);  // out-of-range target: NaN loss instead of a read out of bounds
    }
  }
  lse[i] = l;
  if (tlogit) tlogit[i] = xt;
  loss[i] = (t == ignore_index) ? 0.f : l - xt;
}

template <typename T>
__global__ void ce_fwd_kernel(const T* logits, int64_t sb, int64_t st, int64_t Tn, int64_t V, const int64_t* tg,
                              int64_t ignore_index, int64_t vocab_start, bool check_range, float* loss, float* lse,
                              float* tlogit) {
  __shared__ float shm[32], shs[32];
  const int64_t i = blockIdx.x;
  const T* row = logits + (i / Tn) * sb + (i % Tn) * st;
  float m = -kInf, s = 0.f;
  for (int64_t c = threadIdx.x; c < V; c += blockDim.x) lse_push(m, s, to_f(row[c]));
  block_lse(m, s, shm, shs);
  if (threadIdx.x == 0) ce_fwd_finish(row, i, m, s, V, tg, ignore_index, vocab_start, check_range, loss, lse, tlogit);
}

// Adds the N values x to the online state (m, s): the max of x first, one rescale of s if it grew,
// then one expf per element.  NaN propagates into s (fmaxf skips it, expf(NaN) does not); a state
// and block of -inf only stay (-inf, 0).
template <int N>
__device__ __forceinline__ void lse_push_block(float& m, float& s, const float (&x)[N]) {
  float bm = x[0];
#pragma unroll
  for (int e = 1; e < N; ++e) bm = fmaxf(bm, x[e]);
  if (bm > m) {
    s *= expf(m - bm);  // m == -inf: s == 0, exp(-inf) == 0
    m = bm;
  }
  // m == -inf: all of x is -inf (or NaN), exp(x - 0) is 0 (or NaN).  m == +inf: each +inf counts
  // 1 (exp(inf - inf) would be NaN), the rest 0.
  const float ref = m == -kInf ? 0.f : m;
  const bool pinf = m == kInf;
  float a = 0.f;
#pragma unroll
  for (int e = 0; e < N; ++e) a += (pinf && x[e] == kInf) ? 1.0f : expf(x[e] - ref);
  s += a;
}

template <typename T>
__global__ void __launch_bounds__(kCeVecFwdThreads)
    ce_fwd_vec_kernel(const T* logits, int64_t sb, int64_t st, int64_t Tn, int64_t V, const int64_t* tg,
                      int64_t ignore_index, int64_t vocab_start, bool check_range, float* loss, float* lse,
                      float* tlogit) {
  constexpr int W = 16 / sizeof(T);
  __shared__ float shm[32], shs[32];
  const int64_t i = blockIdx.x;
  const T* row = logits + (i / Tn) * sb + (i % Tn) * st;
  const int64_t nvec = V / W;
  const int64_t step = static_cast<int64_t>(blockDim.x) * kCeUnroll;
  float m = -kInf, s = 0.f;
  int64_t j = threadIdx.x;
  for (; j + (kCeUnroll - 1) * static_cast<int64_t>(blockDim.x) < nvec; j += step) {
    float x[kCeUnroll * W];
#pragma unroll
    for (int k = 0; k < kCeUnroll; ++k) {
      float v[W];
      load_vec(row + (j + k * static_cast<int64_t>(blockDim.x)) * W, v);
#pragma unroll
      for (int e = 0; e < W; ++e) x[k * W + e] = v[e];
    }
    lse_push_block(m, s, x);
  }
  for (; j < nvec; j += blockDim.x) {  // the row's last (fewer than kCeUnroll * blockDim.x) vectors
    float x[W];
    load_vec(row + j * W, x);
    lse_push_block(m, s, x);
  }
  block_lse(m, s, shm, shs);
  if (threadIdx.x == 0) ce_fwd_finish(row, i, m, s, V, tg, ignore_index, vocab_start, check_range, loss, lse, tlogit);
}

template <typename T>
__global__ void ce_bwd_kernel(const T* logits, int64_t sb, int64_t st, int64_t Tn, int64_t V, const int64_t* tg,
                              const float* lse, const float* scale, int64_t ignore_index, int64_t vocab_start,
                              T* grad, int64_t gsb, int64_t gst) {
  const int64_t i = blockIdx.x;
  const T* row = logits + (i / Tn) * sb + (i % Tn) * st;
  T* out = grad + (i / Tn) * gsb + (i % Tn) * gst;
  const int64_t t = tg[i];
  const bool ignored = t == ignore_index;
  const int64_t tl = t - vocab_start;  // may be outside [0, V): then no column matches
  const float l = lse[i];
  const float sc = *scale;
  for (int64_t c0 = static_cast<int64_t>(blockIdx.y) * kBwdChunk; c0 < V;
       c0 += static_cast<int64_t>(gridDim.y) * kBwdChunk) {
    const int64_t c1 = c0 + kBwdChunk < V ? c0 + kBwdChunk : V;
    for (int64_t c = c0 + threadIdx.x; c < c1; c += blockDim.x) {
      float g = 0.f;
      if (!ignored) {
        const float p = expf(to_f(row[c]) - l);
        g = (c == tl ? p - 1.0f : p) * sc;
      }
      out[c] = from_f<T>(g);
    }
  }
}

// Column chunk of the vectorised backward: kCeVecBwdThreads threads x kCeUnroll vectors.
template <typename T>
constexpr int64_t ce_vec_bwd_chunk() {
  return static_cast<int64_t>(kCeVecBwdThreads) * kCeUnroll * (16 / sizeof(T));
}

template <typename T>
__global__ void __launch_bounds__(kCeVecBwdThreads)
    ce_bwd_vec_kernel(const T* logits, int64_t sb, int64_t st, int64_t Tn, int64_t V, const int64_t* tg,
                      const float* lse, const float* scale, int64_t ignore_index, int64_t vocab_start, T* grad,
                      int64_t gsb, int64_t gst) {
  constexpr int W = 16 / sizeof(T);
  const int64_t i = blockIdx.x;
  const T* row = logits + (i / Tn) * sb + (i % Tn) * st;
  T* out = grad + (i / Tn) * gsb + (i % Tn) * gst;
  const int64_t t = tg[i];
  const bool ignored = t == ignore_index;
  const int64_t tl = t - vocab_start;  // may be outside [0, V): then no column matches
  const float l = lse[i];
  const float sc = *scale;
  const int64_t nvec = V / W;
  const int64_t chunk = static_cast<int64_t>(blockDim.x) * kCeUnroll;  // vectors
  for (int64_t v0 = static_cast<int64_t>(blockIdx.y) * chunk; v0 < nvec;
       v0 += static_cast<int64_t>(gridDim.y) * chunk) {
    float x[kCeUnroll][W];
#pragma unroll
    for (int k = 0; k < kCeUnroll; ++k) {  // every load of the thread before any of its stores
      const int64_t j = v0 + threadIdx.x + k * static_cast<int64_t>(blockDim.x);
      if (j < nvec && !ignored) load_vec(row + j * W, x[k]);
    }
#pragma unroll
    for (int k = 0; k < kCeUnroll; ++k) {
      const int64_t j = v0 + threadIdx.x + k * static_cast<int64_t>(blockDim.x);
      if (j < nvec) {
        float g[W];
#pragma unroll
        for (int e = 0; e < W; ++e) {
          if (ignored) {
            g[e] = 0.f;
          } else {
            const float p = expf(x[k][e] - l);
            g[e] = (j * W + e == tl ? p - 1.0f : p) * sc;
          }
        }
        store_vec(out + j * W, g);
      }
    }
  }
}

// Whether rows i = 0..N-1 at p + (i / Tn) * sb + (i % Tn) * st all start 16-byte aligned (a
// stride matters only for a dimension with more than one entry).
template <typename T>
bool rows_aligned(const void* p, int64_t sb, int64_t st, int64_t Tn, int64_t N) {
  constexpr int64_t W = 16 / sizeof(T);
  if (!aligned16(p)) return false;
  if (N > Tn && sb % W != 0) return false;
  return Tn <= 1 || st % W == 0;
}

template <typename T>
cudaError_t launch_fwd(const void* logits, int64_t sb, int64_t st, int64_t Tn, int64_t N, int64_t V,
                       const int64_t* targets, int64_t ignore_index, int64_t vocab_start, bool check_range,
                       float* loss, float* lse, float* target_logit, cudaStream_t s) {
  const unsigned grid = static_cast<unsigned>(N);
  if (V % (16 / sizeof(T)) == 0 && rows_aligned<T>(logits, sb, st, Tn, N) &&
      can_launch(ce_fwd_vec_kernel<T>, kCeVecFwdThreads)) {
    LLMK_LAUNCH(grid, kCeVecFwdThreads, 0, s, ce_fwd_vec_kernel<T>)(
        static_cast<const T*>(logits), sb, st, Tn, V, targets, ignore_index, vocab_start, check_range, loss, lse,
        target_logit);
  } else {
    LLMK_LAUNCH(grid, kFwdThreads, 0, s, ce_fwd_kernel<T>)(static_cast<const T*>(logits), sb, st, Tn, V, targets,
                                                          ignore_index, vocab_start, check_range, loss, lse,
                                                          target_logit);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const void* logits, int64_t sb, int64_t st, int64_t Tn, int64_t N, int64_t V,
                       const int64_t* targets, const float* lse, const float* scale, int64_t ignore_index,
                       int64_t vocab_start, void* grad, int64_t gsb, int64_t gst, cudaStream_t s) {
  auto grid_y = [V](int64_t chunk) {
    const int64_t gy = (V + chunk - 1) / chunk;
    return static_cast<unsigned>(gy > kMaxGridY ? kMaxGridY : gy);
  };
  if (V % (16 / sizeof(T)) == 0 && rows_aligned<T>(logits, sb, st, Tn, N) &&
      rows_aligned<T>(grad, gsb, gst, Tn, N) && can_launch(ce_bwd_vec_kernel<T>, kCeVecBwdThreads)) {
    const dim3 grid(static_cast<unsigned>(N), grid_y(ce_vec_bwd_chunk<T>()));
    LLMK_LAUNCH(grid, kCeVecBwdThreads, 0, s, ce_bwd_vec_kernel<T>)(
        static_cast<const T*>(logits), sb, st, Tn, V, targets, lse, scale, ignore_index, vocab_start,
        static_cast<T*>(grad), gsb, gst);
  } else {
    const dim3 grid(static_cast<unsigned>(N), grid_y(kBwdChunk));
    LLMK_LAUNCH(grid, kBwdThreads, 0, s, ce_bwd_kernel<T>)(static_cast<const T*>(logits), sb, st, Tn, V, targets,
                                                          lse, scale, ignore_index, vocab_start,
                                                          static_cast<T*>(grad), gsb, gst);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t ce_fwd(DType dt, const void* logits, int64_t sb, int64_t st, int64_t Tn, int64_t N, int64_t V,
                   const int64_t* targets, int64_t ignore_index, int64_t vocab_start, bool check_range, float* loss,
                   float* lse, float* target_logit, cudaStream_t s) {
  if (N == 0) return cudaSuccess;
  LLMK_DISPATCH_CUDA(dt, return (launch_fwd<T>(logits, sb, st, Tn, N, V, targets, ignore_index, vocab_start,
                                               check_range, loss, lse, target_logit, s)));
}

cudaError_t ce_bwd(DType dt, const void* logits, int64_t sb, int64_t st, int64_t Tn, int64_t N, int64_t V,
                   const int64_t* targets, const float* lse, const float* scale, int64_t ignore_index,
                   int64_t vocab_start, void* grad, int64_t gsb, int64_t gst, cudaStream_t s) {
  if (N == 0 || V == 0) return cudaSuccess;
  LLMK_DISPATCH_CUDA(dt, return (launch_bwd<T>(logits, sb, st, Tn, N, V, targets, lse, scale, ignore_index,
                                               vocab_start, grad, gsb, gst, s)));
}

}  // namespace llmk_cuda
