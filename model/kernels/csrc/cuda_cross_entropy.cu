// Softmax cross-entropy, CUDA.
// Forward: one block per row, online (max, sum-exp) per thread in a single pass over the row,
// merged across the block; writes only lse / loss / target logit per row.
// Backward: grid (rows, column chunks); each thread reads a logit and writes its gradient, so the
// gradient may be written in place into the logits buffer.
#include "cuda_common.cuh"

namespace llmk_cuda {
namespace {

constexpr int kFwdThreads = 512;
constexpr int kBwdThreads = 256;
constexpr int64_t kBwdChunk = kBwdThreads * 8;

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
  if (threadIdx.x == 0) {
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
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kBwdChunk;
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

}  // namespace

cudaError_t ce_fwd(DType dt, const void* logits, int64_t sb, int64_t st, int64_t Tn, int64_t N, int64_t V,
                   const int64_t* targets, int64_t ignore_index, int64_t vocab_start, bool check_range, float* loss,
                   float* lse, float* target_logit, cudaStream_t s) {
  if (N == 0) return cudaSuccess;
  LLMK_DISPATCH_CUDA(dt, LLMK_LAUNCH(static_cast<unsigned>(N), kFwdThreads, 0, s, ce_fwd_kernel<T>)(
                             static_cast<const T*>(logits), sb, st, Tn, V, targets, ignore_index, vocab_start,
                             check_range, loss, lse, target_logit));
  return cudaGetLastError();
}

cudaError_t ce_bwd(DType dt, const void* logits, int64_t sb, int64_t st, int64_t Tn, int64_t N, int64_t V,
                   const int64_t* targets, const float* lse, const float* scale, int64_t ignore_index,
                   int64_t vocab_start, void* grad, int64_t gsb, int64_t gst, cudaStream_t s) {
  if (N == 0 || V == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(N), static_cast<unsigned>((V + kBwdChunk - 1) / kBwdChunk));
  LLMK_DISPATCH_CUDA(dt, LLMK_LAUNCH(grid, kBwdThreads, 0, s, ce_bwd_kernel<T>)(
                             static_cast<const T*>(logits), sb, st, Tn, V, targets, lse, scale, ignore_index,
                             vocab_start, static_cast<T*>(grad), gsb, gst));
  return cudaGetLastError();
}

}  // namespace llmk_cuda
