// Softmax cross-entropy, CUDA: ce_fwd / ce_bwd (the backward scales row i by scale[i * scale_stride]:
// one value for the mean loss, or a per-token upstream gradient), and cross-entropy with the
// entropy per row, ce_ent_fwd / ce_ent_bwd (see "cross-entropy and entropy" below).
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

template <typename T, int U>
__global__ void __launch_bounds__(kCeVecFwdThreads)
    ce_fwd_vec_kernel(const T* logits, int64_t sb, int64_t st, int64_t Tn, int64_t V, const int64_t* tg,
                      int64_t ignore_index, int64_t vocab_start, bool check_range, float* loss, float* lse,
                      float* tlogit) {
  constexpr int W = 16 / sizeof(T);
  __shared__ float shm[32], shs[32];
  const int64_t i = blockIdx.x;
  const T* row = logits + (i / Tn) * sb + (i % Tn) * st;
  const int64_t nvec = V / W;
  const int64_t step = static_cast<int64_t>(blockDim.x) * U;
  float m = -kInf, s = 0.f;
  int64_t j = threadIdx.x;
  for (; j + (U - 1) * static_cast<int64_t>(blockDim.x) < nvec; j += step) {
    float x[U * W];
#pragma unroll
    for (int k = 0; k < U; ++k) {
      float v[W];
      load_vec(row + (j + k * static_cast<int64_t>(blockDim.x)) * W, v);
#pragma unroll
      for (int e = 0; e < W; ++e) x[k * W + e] = v[e];
    }
    lse_push_block(m, s, x);
  }
  for (; j < nvec; j += blockDim.x) {  // the row's last (fewer than U * blockDim.x) vectors
    float x[W];
    load_vec(row + j * W, x);
    lse_push_block(m, s, x);
  }
  block_lse(m, s, shm, shs);
  if (threadIdx.x == 0) ce_fwd_finish(row, i, m, s, V, tg, ignore_index, vocab_start, check_range, loss, lse, tlogit);
}

template <typename T>
__global__ void ce_bwd_kernel(const T* logits, int64_t sb, int64_t st, int64_t Tn, int64_t V, const int64_t* tg,
                              const float* lse, const float* scale, int64_t scale_stride, int64_t ignore_index,
                              int64_t vocab_start, T* grad, int64_t gsb, int64_t gst) {
  const int64_t i = blockIdx.x;
  const T* row = logits + (i / Tn) * sb + (i % Tn) * st;
  T* out = grad + (i / Tn) * gsb + (i % Tn) * gst;
  const int64_t t = tg[i];
  const bool ignored = t == ignore_index;
  const int64_t tl = t - vocab_start;  // may be outside [0, V): then no column matches
  const float l = lse[i];
  const float sc = scale[i * scale_stride];  // stride 0: one scale for every row
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

// Column chunk of the vectorised backward: kCeVecBwdThreads threads x U vectors.
template <typename T, int U>
constexpr int64_t ce_vec_bwd_chunk() {
  return static_cast<int64_t>(kCeVecBwdThreads) * U * (16 / sizeof(T));
}

template <typename T, int U>
__global__ void __launch_bounds__(kCeVecBwdThreads)
    ce_bwd_vec_kernel(const T* logits, int64_t sb, int64_t st, int64_t Tn, int64_t V, const int64_t* tg,
                      const float* lse, const float* scale, int64_t scale_stride, int64_t ignore_index,
                      int64_t vocab_start, T* grad, int64_t gsb, int64_t gst) {
  constexpr int W = 16 / sizeof(T);
  const int64_t i = blockIdx.x;
  const T* row = logits + (i / Tn) * sb + (i % Tn) * st;
  T* out = grad + (i / Tn) * gsb + (i % Tn) * gst;
  const int64_t t = tg[i];
  const bool ignored = t == ignore_index;
  const int64_t tl = t - vocab_start;  // may be outside [0, V): then no column matches
  const float l = lse[i];
  const float sc = scale[i * scale_stride];  // stride 0: one scale for every row
  const int64_t nvec = V / W;
  const int64_t chunk = static_cast<int64_t>(blockDim.x) * U;  // vectors
  for (int64_t v0 = static_cast<int64_t>(blockIdx.y) * chunk; v0 < nvec;
       v0 += static_cast<int64_t>(gridDim.y) * chunk) {
    float x[U][W];
    // Every load of the thread before any of its stores, and not waiting for the target: an
    // ignored row (rare) is read for nothing rather than every row's loads waiting on tg[i].
#pragma unroll
    for (int k = 0; k < U; ++k) {
      const int64_t j = v0 + threadIdx.x + k * static_cast<int64_t>(blockDim.x);
      if (j < nvec) load_vec(row + j * W, x[k]);
    }
#pragma unroll
    for (int k = 0; k < U; ++k) {
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

// Blocks per row along the columns of a backward: one per chunk of `chunk` columns, at most `cap`
// (> 0) and gridDim.y's limit; the kernels' grid-stride loop walks the chunks beyond.
inline unsigned column_blocks(int64_t V, int64_t chunk, int64_t cap = 0) {
  int64_t gy = (V + chunk - 1) / chunk;
  if (cap > 0 && gy > cap) gy = cap;
  return static_cast<unsigned>(gy > kMaxGridY ? kMaxGridY : gy);
}

// Launch shapes of the vectorised kernels (LLMK_TUNE overrides, see cuda_common.cuh):
// ce_fwd_unroll / ce_bwd_unroll = vectors per thread and iteration (2 or 4), ce_fwd_threads = the
// forward's block (a multiple of 32 up to 512), ce_bwd_gy = column-chunk blocks per row (the rest
// walked by the grid-stride loop; 0 = one block per chunk).
inline int ce_unroll(const char* key) { return llmk_tune::knob(key) == 4 ? 4 : 2; }

template <typename T>
cudaError_t launch_fwd(const void* logits, int64_t sb, int64_t st, int64_t Tn, int64_t N, int64_t V,
                       const int64_t* targets, int64_t ignore_index, int64_t vocab_start, bool check_range,
                       float* loss, float* lse, float* target_logit, cudaStream_t s) {
  const unsigned grid = static_cast<unsigned>(N);
  if (V % (16 / sizeof(T)) == 0 && rows_aligned<T>(logits, sb, st, Tn, N)) {
    int threads = llmk_tune::knob("ce_fwd_threads");
    if (threads < 32 || threads > kCeVecFwdThreads || threads % 32 != 0) threads = kCeVecFwdThreads;
#define LLMK_CE_FWD_VEC(U)                                                                                 \
  if (can_launch(ce_fwd_vec_kernel<T, U>, threads)) {                                                     \
    LLMK_LAUNCH(grid, threads, 0, s, ce_fwd_vec_kernel<T, U>)(static_cast<const T*>(logits), sb, st, Tn, V, \
                                                             targets, ignore_index, vocab_start, check_range, \
                                                             loss, lse, target_logit);                      \
    return cudaGetLastError();                                                                             \
  }
    if (ce_unroll("ce_fwd_unroll") == 4) {
      LLMK_CE_FWD_VEC(4)
    } else {
      LLMK_CE_FWD_VEC(2)
    }
#undef LLMK_CE_FWD_VEC
  }
  LLMK_LAUNCH(grid, kFwdThreads, 0, s, ce_fwd_kernel<T>)(static_cast<const T*>(logits), sb, st, Tn, V, targets,
                                                        ignore_index, vocab_start, check_range, loss, lse,
                                                        target_logit);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const void* logits, int64_t sb, int64_t st, int64_t Tn, int64_t N, int64_t V,
                       const int64_t* targets, const float* lse, const float* scale, int64_t scale_stride,
                       int64_t ignore_index, int64_t vocab_start, void* grad, int64_t gsb, int64_t gst,
                       cudaStream_t s) {
  auto grid_y = [V](int64_t chunk) { return column_blocks(V, chunk, llmk_tune::knob("ce_bwd_gy")); };
  if (V % (16 / sizeof(T)) == 0 && rows_aligned<T>(logits, sb, st, Tn, N) && rows_aligned<T>(grad, gsb, gst, Tn, N)) {
#define LLMK_CE_BWD_VEC(U)                                                                                 \
  if (can_launch(ce_bwd_vec_kernel<T, U>, kCeVecBwdThreads)) {                                            \
    const dim3 grid(static_cast<unsigned>(N), grid_y(ce_vec_bwd_chunk<T, U>()));                          \
    LLMK_LAUNCH(grid, kCeVecBwdThreads, 0, s, ce_bwd_vec_kernel<T, U>)(                                   \
        static_cast<const T*>(logits), sb, st, Tn, V, targets, lse, scale, scale_stride, ignore_index,    \
        vocab_start, static_cast<T*>(grad), gsb, gst);                                                     \
    return cudaGetLastError();                                                                             \
  }
    if (ce_unroll("ce_bwd_unroll") == 4) {
      LLMK_CE_BWD_VEC(4)
    } else {
      LLMK_CE_BWD_VEC(2)
    }
#undef LLMK_CE_BWD_VEC
  }
  const dim3 grid(static_cast<unsigned>(N), grid_y(kBwdChunk));
  LLMK_LAUNCH(grid, kBwdThreads, 0, s, ce_bwd_kernel<T>)(static_cast<const T*>(logits), sb, st, Tn, V, targets,
                                                        lse, scale, scale_stride, ignore_index, vocab_start,
                                                        static_cast<T*>(grad), gsb, gst);
  return cudaGetLastError();
}

// ----------------------------------------------------------------- cross-entropy and entropy
// ce_ent_fwd: per row lse, entropy H and (with targets) loss / target logit from the online state
//   (m, c, r, u):  m = max x,  c = #{x = m},  r = sum_{x < m} exp(x - m),  u = sum exp(x - m) (x - m)
//   s = c + r,  log s = log1p(r) if c == 1 else log(s),  lse = m + log s,  H = log s - u / s
// (two terms >= 0: no cancellation for large logits; the maxima counted apart so a confident
// row, s = 1 + r with r << 1, keeps r's precision), loss = (m - x_t) + log s.  With targets, an
// ignored row is not read (lse = H = loss = 0).  ce_ent_bwd: with d = x - lse (= log p) and
// upstream gradients gl (loss) and gh (entropy),
//   grad = p (gl - gh (d + H)) - gl [x is the target]        (dH/dx = -p (log p + H)).
// The same kernel shapes as ce_fwd / ce_bwd: a block per row (scalar, or two 128-bit vectors per
// thread and iteration), backward over (row, column chunk) with every element read, then written.
// -inf logits: p = 0, and (x - m) is floored at kDFloor in p * (x - m) so it stays 0 (NaN stays
// NaN: the floor is a comparison, not fmaxf).

constexpr float kDFloor = -110.f;  // exp() of it is exactly 0 in float32 (below half the least subnormal)

__device__ __forceinline__ float floor_d(float d) { return d < kDFloor ? kDFloor : d; }

struct EntState {
  float m, c, r, u;  // see above; empty: (-inf, 0, 0, 0)
};

// Rescales the non-empty state st to a new max mn > st.m: its maxima join the rest.
__device__ __forceinline__ void ent_rescale(EntState& st, float mn) {
  if (st.c != 0.f || st.r != 0.f) {  // empty: (m - mn) * 0 would be -inf * 0 (a NaN r goes on)
    const float dm = st.m - mn, a = expf(dm);  // x - mn = (x - m) + dm
    st.u = a * (st.u + dm * (st.c + st.r));
    st.r = a * st.c + a * st.r;
  }
  st.c = 0.f;
  st.m = mn;
}

// Adds the N values x to the state: their max first, one rescale if it grew, then one expf per
// element.  A NaN propagates into r (fmaxf skips it, expf(NaN) does not), so lse and H come out
// NaN.  +inf logits give NaN (the entropy is undefined there).
template <int N>
__device__ __forceinline__ void ent_push(EntState& st, const float (&x)[N]) {
  float bm = x[0];
#pragma unroll
  for (int e = 1; e < N; ++e) bm = fmaxf(bm, x[e]);
  if (bm > st.m) ent_rescale(st, bm);
  // m == -inf: all of x is -inf (or NaN): exp(x - 0) is 0 (or NaN), never a max
  const float ref = st.m == -kInf ? 0.f : st.m;
  float ac = 0.f, ar = 0.f, au = 0.f;
#pragma unroll
  for (int e = 0; e < N; ++e) {
    const float d = x[e] - ref;
    const float p = expf(d);
    if (d == 0.f) {
      ac += 1.f;
    } else {
      ar += p;
    }
    au += p * floor_d(d);
  }
  st.c += ac;
  st.r += ar;
  st.u += au;
}

__device__ __forceinline__ void ent_merge(EntState& a, EntState b) {
  if (b.m > a.m) {
    ent_rescale(a, b.m);
  } else if (b.m < a.m) {
    ent_rescale(b, a.m);
  }
  a.c += b.c;
  a.r += b.r;
  a.u += b.u;
}
__device__ __forceinline__ EntState ent_shfl_xor(const EntState& st, int o) {
  return {__shfl_xor_sync(0xffffffffu, st.m, o), __shfl_xor_sync(0xffffffffu, st.c, o),
          __shfl_xor_sync(0xffffffffu, st.r, o), __shfl_xor_sync(0xffffffffu, st.u, o)};
}
// The block's merged state, in thread 0 (the only one that uses it).  blockDim.x % 32 == 0;
// `sh` holds 4 x 32 floats.
__device__ __forceinline__ void block_ent(EntState& st, float* sh) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) ent_merge(st, ent_shfl_xor(st, o));
  if (lane == 0) {
    sh[wid] = st.m;
    sh[32 + wid] = st.c;
    sh[64 + wid] = st.r;
    sh[96 + wid] = st.u;
  }
  __syncthreads();
  if (wid == 0) {
    st = lane < nw ? EntState{sh[lane], sh[32 + lane], sh[64 + lane], sh[96 + lane]} : EntState{-kInf, 0.f, 0.f, 0.f};
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ent_merge(st, ent_shfl_xor(st, o));
  }
}

// Row i's outputs, by thread 0 after the block merge.
template <typename T>
__device__ __forceinline__ void ce_ent_finish(const T* row, int64_t i, const EntState& st, int64_t V,
                                              const int64_t* tg, int64_t vocab_start, bool check_range, float* lse,
                                              float* ent, float* loss, float* tlogit) {
  const float s = st.c + st.r;
  const float logs = st.c == 1.f ? log1pf(st.r) : logf(s);
  float l = st.m + logs;
  float xt = 0.f;
  if (tg != nullptr) {
    const int64_t tl = tg[i] - vocab_start;
    if (tl >= 0 && tl < V) {
      xt = to_f(row[tl]);
    } else if (check_range) {
      l = __int_as_float(0x7fc00000);  // out-of-range target: NaN instead of a read out of bounds
    }
  }
  lse[i] = l;
  ent[i] = logs - st.u / s;
  if (loss) loss[i] = l != l ? l : (st.m - xt) + logs;  // (m - x_t first: exact for the top token)
  if (tlogit) tlogit[i] = xt;
}

// An ignored row (targets given): zeros, the row is not read.  True for the whole block.
__device__ __forceinline__ bool ce_ent_ignored(int64_t i, const int64_t* tg, int64_t ignore_index, float* lse,
                                               float* ent, float* loss, float* tlogit) {
  if (tg == nullptr || tg[i] != ignore_index) return false;
  if (threadIdx.x == 0) {
    lse[i] = 0.f;
    ent[i] = 0.f;
    if (loss) loss[i] = 0.f;
    if (tlogit) tlogit[i] = 0.f;
  }
  return true;
}

template <typename T>
__global__ void ce_ent_fwd_kernel(const T* logits, int64_t sb, int64_t st, int64_t Tn, int64_t V, const int64_t* tg,
                                  int64_t ignore_index, int64_t vocab_start, bool check_range, float* lse, float* ent,
                                  float* loss, float* tlogit) {
  __shared__ float sh[4 * 32];
  const int64_t i = blockIdx.x;
  if (ce_ent_ignored(i, tg, ignore_index, lse, ent, loss, tlogit)) return;
  const T* row = logits + (i / Tn) * sb + (i % Tn) * st;
  EntState es{-kInf, 0.f, 0.f, 0.f};
  for (int64_t c = threadIdx.x; c < V; c += blockDim.x) {
    const float x[1] = {to_f(row[c])};
    ent_push(es, x);
  }
  block_ent(es, sh);
  if (threadIdx.x == 0) ce_ent_finish(row, i, es, V, tg, vocab_start, check_range, lse, ent, loss, tlogit);
}

template <typename T>
__global__ void __launch_bounds__(kCeVecFwdThreads)
    ce_ent_fwd_vec_kernel(const T* logits, int64_t sb, int64_t st, int64_t Tn, int64_t V, const int64_t* tg,
                          int64_t ignore_index, int64_t vocab_start, bool check_range, float* lse, float* ent,
                          float* loss, float* tlogit) {
  constexpr int W = 16 / sizeof(T);
  __shared__ float sh[4 * 32];
  const int64_t i = blockIdx.x;
  if (ce_ent_ignored(i, tg, ignore_index, lse, ent, loss, tlogit)) return;
  const T* row = logits + (i / Tn) * sb + (i % Tn) * st;
  const int64_t nvec = V / W;
  const int64_t step = static_cast<int64_t>(blockDim.x) * kCeUnroll;
  EntState es{-kInf, 0.f, 0.f, 0.f};
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
    ent_push(es, x);
  }
  for (; j < nvec; j += blockDim.x) {  // the row's last (fewer than kCeUnroll * blockDim.x) vectors
    float x[W];
    load_vec(row + j * W, x);
    ent_push(es, x);
  }
  block_ent(es, sh);
  if (threadIdx.x == 0) ce_ent_finish(row, i, es, V, tg, vocab_start, check_range, lse, ent, loss, tlogit);
}

// Per-row constants of the backward: grad = p (c1 - gh d) - gl [target], tl = the target's column
// (or -1: none, also without targets or without a loss gradient).
struct EntRow {
  bool ignored;
  int64_t tl;
  float l, gl, gh, c1;
};
__device__ __forceinline__ EntRow ent_row(int64_t i, const int64_t* tg, const float* lse, const float* ent,
                                          const float* gloss, const float* gent, int64_t ignore_index,
                                          int64_t vocab_start) {
  EntRow r;
  r.ignored = tg != nullptr && tg[i] == ignore_index;
  r.tl = (tg != nullptr && gloss != nullptr) ? tg[i] - vocab_start : -1;  // outside [0, V): no column matches
  r.l = lse[i];
  r.gl = gloss != nullptr ? gloss[i] : 0.f;
  r.gh = gent != nullptr ? gent[i] : 0.f;
  r.c1 = gent != nullptr ? r.gl - r.gh * ent[i] : r.gl;
  return r;
}
__device__ __forceinline__ float ent_grad(const EntRow& r, float x, bool target) {
  const float d = x - r.l;
  const float g = expf(d) * (r.c1 - r.gh * floor_d(d));
  return target ? g - r.gl : g;
}

template <typename T>
__global__ void ce_ent_bwd_kernel(const T* logits, int64_t sb, int64_t st, int64_t Tn, int64_t V, const int64_t* tg,
                                  const float* lse, const float* ent, const float* gloss, const float* gent,
                                  int64_t ignore_index, int64_t vocab_start, T* grad, int64_t gsb, int64_t gst) {
  const int64_t i = blockIdx.x;
  const T* row = logits + (i / Tn) * sb + (i % Tn) * st;
  T* out = grad + (i / Tn) * gsb + (i % Tn) * gst;
  const EntRow r = ent_row(i, tg, lse, ent, gloss, gent, ignore_index, vocab_start);
  for (int64_t c0 = static_cast<int64_t>(blockIdx.y) * kBwdChunk; c0 < V;
       c0 += static_cast<int64_t>(gridDim.y) * kBwdChunk) {
    const int64_t c1 = c0 + kBwdChunk < V ? c0 + kBwdChunk : V;
    for (int64_t c = c0 + threadIdx.x; c < c1; c += blockDim.x) {
      out[c] = from_f<T>(r.ignored ? 0.f : ent_grad(r, to_f(row[c]), c == r.tl));
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kCeVecBwdThreads)
    ce_ent_bwd_vec_kernel(const T* logits, int64_t sb, int64_t st, int64_t Tn, int64_t V, const int64_t* tg,
                          const float* lse, const float* ent, const float* gloss, const float* gent,
                          int64_t ignore_index, int64_t vocab_start, T* grad, int64_t gsb, int64_t gst) {
  constexpr int W = 16 / sizeof(T);
  const int64_t i = blockIdx.x;
  const T* row = logits + (i / Tn) * sb + (i % Tn) * st;
  T* out = grad + (i / Tn) * gsb + (i % Tn) * gst;
  const EntRow r = ent_row(i, tg, lse, ent, gloss, gent, ignore_index, vocab_start);
  const int64_t nvec = V / W;
  const int64_t chunk = static_cast<int64_t>(blockDim.x) * kCeUnroll;  // vectors
  for (int64_t v0 = static_cast<int64_t>(blockIdx.y) * chunk; v0 < nvec;
       v0 += static_cast<int64_t>(gridDim.y) * chunk) {
    float x[kCeUnroll][W];
#pragma unroll
    for (int k = 0; k < kCeUnroll; ++k) {  // every load of the thread before any of its stores
      const int64_t j = v0 + threadIdx.x + k * static_cast<int64_t>(blockDim.x);
      if (j < nvec && !r.ignored) load_vec(row + j * W, x[k]);
    }
#pragma unroll
    for (int k = 0; k < kCeUnroll; ++k) {
      const int64_t j = v0 + threadIdx.x + k * static_cast<int64_t>(blockDim.x);
      if (j < nvec) {
        float g[W];
#pragma unroll
        for (int e = 0; e < W; ++e) g[e] = r.ignored ? 0.f : ent_grad(r, x[k][e], j * W + e == r.tl);
        store_vec(out + j * W, g);
      }
    }
  }
}

template <typename T>
cudaError_t launch_ent_fwd(const void* logits, int64_t sb, int64_t st, int64_t Tn, int64_t N, int64_t V,
                           const int64_t* targets, int64_t ignore_index, int64_t vocab_start, bool check_range,
                           float* lse, float* ent, float* loss, float* target_logit, cudaStream_t s) {
  const unsigned grid = static_cast<unsigned>(N);
  if (V % (16 / sizeof(T)) == 0 && rows_aligned<T>(logits, sb, st, Tn, N) &&
      can_launch(ce_ent_fwd_vec_kernel<T>, kCeVecFwdThreads)) {
    LLMK_LAUNCH(grid, kCeVecFwdThreads, 0, s, ce_ent_fwd_vec_kernel<T>)(
        static_cast<const T*>(logits), sb, st, Tn, V, targets, ignore_index, vocab_start, check_range, lse, ent, loss,
        target_logit);
  } else {
    LLMK_LAUNCH(grid, kFwdThreads, 0, s, ce_ent_fwd_kernel<T>)(
        static_cast<const T*>(logits), sb, st, Tn, V, targets, ignore_index, vocab_start, check_range, lse, ent, loss,
        target_logit);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_ent_bwd(const void* logits, int64_t sb, int64_t st, int64_t Tn, int64_t N, int64_t V,
                           const int64_t* targets, const float* lse, const float* ent, const float* gloss,
                           const float* gent, int64_t ignore_index, int64_t vocab_start, void* grad, int64_t gsb,
                           int64_t gst, cudaStream_t s) {
  if (V % (16 / sizeof(T)) == 0 && rows_aligned<T>(logits, sb, st, Tn, N) &&
      rows_aligned<T>(grad, gsb, gst, Tn, N) && can_launch(ce_ent_bwd_vec_kernel<T>, kCeVecBwdThreads)) {
    const dim3 grid(static_cast<unsigned>(N), column_blocks(V, ce_vec_bwd_chunk<T, kCeUnroll>()));
    LLMK_LAUNCH(grid, kCeVecBwdThreads, 0, s, ce_ent_bwd_vec_kernel<T>)(
        static_cast<const T*>(logits), sb, st, Tn, V, targets, lse, ent, gloss, gent, ignore_index, vocab_start,
        static_cast<T*>(grad), gsb, gst);
  } else {
    const dim3 grid(static_cast<unsigned>(N), column_blocks(V, kBwdChunk));
    LLMK_LAUNCH(grid, kBwdThreads, 0, s, ce_ent_bwd_kernel<T>)(
        static_cast<const T*>(logits), sb, st, Tn, V, targets, lse, ent, gloss, gent, ignore_index, vocab_start,
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
                   const int64_t* targets, const float* lse, const float* scale, int64_t scale_stride,
                   int64_t ignore_index, int64_t vocab_start, void* grad, int64_t gsb, int64_t gst, cudaStream_t s) {
  if (N == 0 || V == 0) return cudaSuccess;
  LLMK_DISPATCH_CUDA(dt, return (launch_bwd<T>(logits, sb, st, Tn, N, V, targets, lse, scale, scale_stride,
                                               ignore_index, vocab_start, grad, gsb, gst, s)));
}

cudaError_t ce_ent_fwd(DType dt, const void* logits, int64_t sb, int64_t st, int64_t Tn, int64_t N, int64_t V,
                       const int64_t* targets, int64_t ignore_index, int64_t vocab_start, bool check_range,
                       float* lse, float* ent, float* loss, float* target_logit, cudaStream_t s) {
  if (N == 0) return cudaSuccess;
  LLMK_DISPATCH_CUDA(dt, return (launch_ent_fwd<T>(logits, sb, st, Tn, N, V, targets, ignore_index, vocab_start,
                                                   check_range, lse, ent, loss, target_logit, s)));
}

cudaError_t ce_ent_bwd(DType dt, const void* logits, int64_t sb, int64_t st, int64_t Tn, int64_t N, int64_t V,
                       const int64_t* targets, const float* lse, const float* ent, const float* grad_loss,
                       const float* grad_ent, int64_t ignore_index, int64_t vocab_start, void* grad, int64_t gsb,
                       int64_t gst, cudaStream_t s) {
  if (N == 0 || V == 0) return cudaSuccess;
  LLMK_DISPATCH_CUDA(dt, return (launch_ent_bwd<T>(logits, sb, st, Tn, N, V, targets, lse, ent, grad_loss, grad_ent,
                                                   ignore_index, vocab_start, grad, gsb, gst, s)));
}

}  // namespace llmk_cuda
