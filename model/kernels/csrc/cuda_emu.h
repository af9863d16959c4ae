// CUDA execution-model emulator for the host C++ compiler: a TEST TOOL, not a CPU backend.
//
// With -DLLMK_CUDA_EMULATION the unchanged kernel bodies of csrc/cuda_*.cu compile with g++ and
// run on the CPU (library torch.ops.llmk_cuda_emu, see build.py), so the kernels' indexing,
// reductions, shuffles, barriers and launch configurations are tested without a GPU.
//
// Model:
// * Every GPU thread of a block is a cooperative coroutine (private 64 KiB stack with a guard
//   page; a small stack switch on x86-64, ucontext elsewhere).  Blocks run one after another; a scheduler switches between the threads of the
//   running block only when one waits (__syncthreads, a warp collective) or returns, and sets
//   threadIdx (and blockIdx/blockDim/gridDim) on every switch.  Deterministic; no OS threads.
//   Adversarial order: warp by warp, each warp running as far as it can (up to a block barrier)
//   before the next starts, and within a warp lane after lane (independent thread scheduling),
//   so a missing __syncthreads / __syncwarp shows up as stale or NaN-poisoned data.
// * __syncthreads(): waits until every live thread of the block has arrived (threads that returned
//   count as arrived).  Threads waiting at different __syncthreads call sites are reported
//   ("divergent __syncthreads"; undefined behaviour in CUDA).
// * Warp collectives (__shfl_*_sync, __syncwarp, __ballot_sync/__any_sync/__all_sync): the lanes of
//   a warp of 32 named by `mask` must all arrive at the same collective with the same mask; the
//   caller must be in the mask, the mask may not name lanes that do not exist (partial warp) or
//   have exited, and a shuffle may not read a lane outside the mask.  Violations are errors.
// * Deadlock: when no thread of a block can make progress, the launch fails with a description
//   of where every thread waits, instead of hanging.
// * Shared memory: dynamic `extern __shared__` memory (declare it with LLMK_EXTERN_SHARED) is
//   sized from the launch; static `__shared__` variables are function-local statics (one per
//   kernel instantiation; blocks run sequentially).  Both are filled with 0xFF bytes (NaN for
//   float/half/bfloat16) at the start of every block, so a read before a write in the same block
//   shows as NaN instead of a value left by the previous block.  Writes past the end of dynamic
//   shared memory are detected (canary) after each block.  NOTE: function-local statics of
//   functions in namespace llmk_cuda are taken to be __shared__ variables (found through the
//   library's ELF symbol table); host code in that namespace must not keep zero-initialised
//   function-local statics.
// * Launch checks as on an H100/H200 (sm_90): blockDim <= 1024 threads (x, y <= 1024, z <= 64),
//   grid x < 2^31, y/z <= 65535, nothing empty -> cudaErrorInvalidConfiguration; dynamic shared
//   memory above 48 KiB needs cudaFuncSetAttribute(MaxDynamicSharedMemorySize), which is capped at
//   the opt-in limit (227 KiB) -> cudaErrorInvalidValue.  Device attributes: 132 SMs, compute 9.0
//   (LLMK_EMU_SM_COUNT / LLMK_EMU_SMEM_OPTIN override).  Kernel faults found by the emulator
//   (deadlock, divergence, misuse of a warp collective, misaligned vector access via
//   llmk_emu::check_aligned, shared-memory overrun) fail the launch with
//   cudaErrorLaunchFailure / cudaErrorMisalignedAddress; cudaGetErrorString gives the details.
//   Errors are returned by the next cudaGetLastError() and are not sticky.
// * LLMK_EMU_SCHEDULE=forward (default) | reverse | random[:seed] sets the order in which the
//   scheduler runs the warps and lanes of a block (and the blocks): run the tests under several
//   orders, a race usually changes the result under one of them.
// * __half / __nv_bfloat16: 16-bit storage types with round-to-nearest-even conversions, no
//   implicit conversions or arithmetic (like torch's -D__CUDA_NO_HALF_CONVERSIONS__ build).
//
// Not emulated (a real GPU can still fail where the emulator passes): concurrency between
// blocks and within a warp (races on global/shared memory are only exposed by schedule orders),
// out-of-bounds global memory accesses, memory ordering/fences, register and occupancy limits
// ("too many resources requested"), static shared memory per kernel (nvcc checks its 48 KiB
// limit; static + dynamic > the opt-in limit is not checked),
// device math library ulp differences and FMA contraction, timing/performance.
#pragma once

#ifdef __CUDACC__
#error "cuda_emu.h is for host compilers only (LLMK_CUDA_EMULATION)"
#endif

#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <math.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ------------------------------------------------------------------------------- runtime API

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorMisalignedAddress = 716,
  cudaErrorLaunchFailure = 719,
};
typedef cudaError_t cudaError;

enum cudaDeviceAttr : int {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute : int {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
};

struct CUstream_st;
typedef CUstream_st* cudaStream_t;

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static

// ------------------------------------------------------------------------------ half types

struct __half {
  unsigned short __x;
};
struct __nv_bfloat16 {
  unsigned short __x;
};
struct alignas(4) __half2 {
  __half x, y;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

namespace llmk_emu {
inline uint32_t f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
}  // namespace llmk_emu

inline __half __float2half_rn(float f) {
  const uint32_t x = llmk_emu::f2u(f), a = x & 0x7fffffffu;
  const unsigned short sign = static_cast<unsigned short>((x >> 16) & 0x8000u);
  unsigned short h;
  if (a > 0x7f800000u) {
    h = 0x7fff;  // NaN (CUDA's canonical half NaN)
  } else if (a >= 0x477ff000u) {
    h = sign | 0x7c00;  // >= 65520 rounds to infinity
  } else if (a >= 0x38800000u) {  // normal: >= 2^-14
    h = sign | static_cast<unsigned short>((a - 0x38000000u + 0xfffu + ((a >> 13) & 1u)) >> 13);
  } else {  // subnormal or zero: units of 2^-24, exact scaling, round to nearest even
    h = sign | static_cast<unsigned short>(nearbyintf(llmk_emu::u2f(a) * 16777216.0f));
  }
  return __half{h};
}
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __half2float(__half v) {
  const uint32_t sign = static_cast<uint32_t>(v.__x & 0x8000u) << 16;
  const uint32_t e = (v.__x >> 10) & 0x1fu, m = v.__x & 0x3ffu;
  if (e == 0) {
    const float mag = static_cast<float>(m) * (1.0f / 16777216.0f);
    return sign ? -mag : mag;
  }
  if (e == 31) return llmk_emu::u2f(sign | 0x7f800000u | (m << 13));
  return llmk_emu::u2f(sign | ((e + 112u) << 23) | (m << 13));
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t x = llmk_emu::f2u(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{0x7fff};
  return __nv_bfloat16{static_cast<unsigned short>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16)};
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline float __bfloat162float(__nv_bfloat16 v) { return llmk_emu::u2f(static_cast<uint32_t>(v.__x) << 16); }
inline float __low2float(__half2 v) { return __half2float(v.x); }
inline float __high2float(__half2 v) { return __half2float(v.y); }
inline float __low2float(__nv_bfloat162 v) { return __bfloat162float(v.x); }
inline float __high2float(__nv_bfloat162 v) { return __bfloat162float(v.y); }

// ------------------------------------------------------------------------ vector types, math

struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) int4 {
  int x, y, z, w;
};

inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __int_as_float(int v) { return llmk_emu::u2f(static_cast<uint32_t>(v)); }
inline int __float_as_int(float v) { return static_cast<int>(llmk_emu::f2u(v)); }
inline float __uint_as_float(unsigned v) { return llmk_emu::u2f(v); }
inline unsigned __float_as_uint(float v) { return llmk_emu::f2u(v); }
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
// Only one emulated thread runs at a time, so a plain read-modify-write is atomic.
template <typename T>
inline T atomicAdd(T* p, T v) {
  T old = *p;
  *p = old + v;
  return old;
}
template <typename T>
inline T atomicMax(T* p, T v) {
  T old = *p;
  if (v > old) *p = v;
  return old;
}
constexpr int warpSize = 32;

// ------------------------------------------------------------------------------- the machine

namespace llmk_emu {

constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = 64 * 1024;
constexpr size_t kSmemCanary = 256;
constexpr int kDefaultSmem = 48 * 1024;

// Coroutine contexts.  x86-64: a 6-register stack switch (no syscall); elsewhere (or with
// -DLLMK_EMU_UCONTEXT) ucontext's swapcontext, which also saves the signal mask (a syscall).
#if defined(__x86_64__) && !defined(LLMK_EMU_UCONTEXT)
extern "C" void llmk_emu_switch(void** save_sp, void* to_sp);
__asm__(
    ".text\n"
    ".weak llmk_emu_switch\n"
    ".hidden llmk_emu_switch\n"
    ".type llmk_emu_switch,@function\n"
    "llmk_emu_switch:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
    "  ret\n"
    ".size llmk_emu_switch, .-llmk_emu_switch\n");
struct Ctx {
  void* sp = nullptr;
};
// A fresh context that starts fn() (which must never return) on [stack, stack + size).
inline void ctx_make(Ctx& c, Ctx& /*link*/, char* stack, size_t size, void (*fn)()) {
  auto top = reinterpret_cast<uintptr_t>(stack + size) & ~static_cast<uintptr_t>(15);
  auto* sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                           // fn's return address slot (never used)
  *--sp = reinterpret_cast<void*>(fn);       // popped by `ret`
  for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp, rbx, r12-r15
  c.sp = sp;
}
inline void ctx_switch(Ctx& from, Ctx& to) { llmk_emu_switch(&from.sp, to.sp); }
inline void ctx_prepare(Ctx&) {}
#else
struct Ctx {
  ucontext_t uc;
};
inline ucontext_t g_ctx_template;
inline void ctx_prepare(Ctx&) { getcontext(&g_ctx_template); }
inline void ctx_make(Ctx& c, Ctx& link, char* stack, size_t size, void (*fn)()) {
  std::memcpy(&c.uc, &g_ctx_template, sizeof(ucontext_t));
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = &link.uc;
  makecontext(&c.uc, fn, 0);
}
inline void ctx_switch(Ctx& from, Ctx& to) { swapcontext(&from.uc, &to.uc); }
#endif

enum State : int { kRun = 0, kBar = 1, kWarp = 2, kDone = 3, kFailed = 4 };
enum WarpOp : int { kShflIdx = 0, kShflUp, kShflDown, kShflXor, kSyncWarp, kBallot };
inline const char* op_name(int op) {
  static const char* names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync",
                                "__syncwarp", "__ballot_sync/__any_sync/__all_sync"};
  return names[op];
}

struct Thread {
  Ctx ctx;
  int state = kRun;
  unsigned gen = 0;
  const char* file = nullptr;  // where it waits
  int line = 0;
  uint3 idx{0, 0, 0};
};

struct Warp {
  unsigned arrived = 0, mask = 0, gen = 0, lanes = 0;  // lanes: the mask of lanes that exist
  int op = -1;
  const char* file = nullptr;
  int line = 0;
  uint64_t val[32];
  uint64_t res[32];
  int arg[32], width[32];
};

struct Machine {
  std::mutex mu;  // one launch at a time (any host thread)
  Ctx sched;
  std::vector<Thread> th;
  std::vector<Warp> warps;
  char* stacks = nullptr;
  size_t n_stacks = 0;
  Thread* cur = nullptr;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  int nthreads = 0, live = 0;
  unsigned bar_count = 0, bar_gen = 0;
  const char* bar_file = nullptr;
  int bar_line = 0;
  bool failed = false;
  bool restart = false;  // a barrier was released: the scheduler restarts its pass at the first warp
  cudaError_t fail_code = cudaSuccess;
  std::string fail_msg;
  cudaError_t last_error = cudaSuccess;
  std::string last_msg;  // details of last_error
  std::string err_msg;   // what cudaGetErrorString reports: details of the last error returned
  std::vector<char> smem;  // dynamic shared memory of the running block (+ canary)
  size_t smem_bytes = 0;
  std::map<const void*, int> max_dyn_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize
  std::vector<std::pair<char*, size_t>> static_smem;
  size_t static_smem_bytes = 0;
  bool static_scanned = false;
  std::mt19937 rng{12345};
  std::string launch_log;  // "<kernel expression> <blockDim.x>\n" per launch (tests read it)
};
inline Machine g_machine;

inline uint3 g_thread_idx{0, 0, 0};
inline uint3 g_block_idx{0, 0, 0};
inline dim3 g_block_dim;
inline dim3 g_grid_dim;

inline int env_int(const char* name, int dflt) {
  const char* v = std::getenv(name);
  return (v && *v) ? std::atoi(v) : dflt;
}
inline int sm_count() { return env_int("LLMK_EMU_SM_COUNT", 132); }
inline int smem_optin() { return env_int("LLMK_EMU_SMEM_OPTIN", 232448); }

// Failure inside an emulated thread: record it and never run this block again.
[[noreturn]] inline void fail(cudaError_t code, const std::string& msg) {
  Machine& m = g_machine;
  if (!m.failed) {
    m.failed = true;
    m.fail_code = code;
    char where[96];
    std::snprintf(where, sizeof where, " [block (%u,%u,%u) thread (%u,%u,%u)]", g_block_idx.x, g_block_idx.y,
                  g_block_idx.z, g_thread_idx.x, g_thread_idx.y, g_thread_idx.z);
    m.fail_msg = msg + where;
  }
  m.cur->state = kFailed;
  ctx_switch(m.cur->ctx, m.sched);
  std::abort();  // never resumed
}

inline void check_aligned(const void* p, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) {
    char buf[128];
    std::snprintf(buf, sizeof buf, "misaligned address: %zu-byte access at %p", bytes, p);
    fail(cudaErrorMisalignedAddress, buf);
  }
}

inline void yield_to_scheduler() {
  Machine& m = g_machine;
  ctx_switch(m.cur->ctx, m.sched);
}

inline int linear_tid() {
  return static_cast<int>(g_thread_idx.x + g_block_dim.x * (g_thread_idx.y + g_block_dim.y * g_thread_idx.z));
}

inline void release_barrier() {
  Machine& m = g_machine;
  m.bar_count = 0;
  m.bar_gen++;
  m.bar_file = nullptr;
}

inline void sync_threads(const char* file, int line) {
  Machine& m = g_machine;
  if (m.bar_count == 0) {
    m.bar_file = file;
    m.bar_line = line;
  } else if (m.bar_line != line || std::strcmp(m.bar_file, file) != 0) {
    fail(cudaErrorLaunchFailure, std::string("divergent __syncthreads: this thread at ") + file + ":" +
                                     std::to_string(line) + ", other threads wait at " + m.bar_file + ":" +
                                     std::to_string(m.bar_line));
  }
  m.bar_count++;
  Thread& t = *m.cur;
  if (static_cast<int>(m.bar_count) == m.live) {
    // Released: let the scheduler start over at the first warp in its order (not the warp that
    // arrived last), so warps that arrived early run ahead while later ones still read.
    release_barrier();
    t.file = file;
    t.line = line;
    m.restart = true;
    yield_to_scheduler();
    return;
  }
  t.state = kBar;
  t.gen = m.bar_gen;
  t.file = file;
  t.line = line;
  yield_to_scheduler();
  t.state = kRun;
}

// Source lane of `lane` for a shuffle, or -1 when the lane keeps its own value.
inline int shfl_src(int op, int lane, int arg, int width) {
  const int base = lane & ~(width - 1);
  switch (op) {
    case kShflIdx:
      return base + (arg & (width - 1));
    case kShflUp:
      return (lane - base) >= arg ? lane - arg : -1;
    case kShflDown:
      return (lane - base) + arg < width ? lane + arg : -1;
    case kShflXor: {
      const int s = lane ^ arg;
      return s < base + width ? s : -1;  // later groups are not reachable
    }
    default:
      return -1;
  }
}

// Warp rendezvous: every lane named by `mask` arrives with a value; returns this lane's result.
inline uint64_t warp_collective(int op, unsigned mask, uint64_t v, int arg, int width, const char* file, int line) {
  Machine& m = g_machine;
  const int tid = linear_tid(), lane = tid & 31;
  Warp& w = m.warps[tid >> 5];
  char buf[256];
  if (!((mask >> lane) & 1u)) {
    std::snprintf(buf, sizeof buf, "%s at %s:%d: calling lane %d is not in mask 0x%08x", op_name(op), file, line,
                  lane, mask);
    fail(cudaErrorLaunchFailure, buf);
  }
  if (mask & ~w.lanes) {
    std::snprintf(buf, sizeof buf,
                  "%s at %s:%d: mask 0x%08x names lanes that do not exist (warp has lanes 0x%08x: blockDim "
                  "not a multiple of 32?)",
                  op_name(op), file, line, mask, w.lanes);
    fail(cudaErrorLaunchFailure, buf);
  }
  if (op <= kShflXor && (width <= 0 || width > 32 || (width & (width - 1)))) {
    std::snprintf(buf, sizeof buf, "%s at %s:%d: width %d is not a power of two <= 32", op_name(op), file, line,
                  width);
    fail(cudaErrorLaunchFailure, buf);
  }
  if (w.arrived == 0) {
    w.op = op;
    w.mask = mask;
    w.file = file;
    w.line = line;
  } else if (w.op != op || w.mask != mask) {
    std::snprintf(buf, sizeof buf,
                  "divergent warp collective: lane %d calls %s (mask 0x%08x) at %s:%d while lanes 0x%08x are in "
                  "%s (mask 0x%08x) at %s:%d",
                  lane, op_name(op), mask, file, line, w.arrived, op_name(w.op), w.mask, w.file, w.line);
    fail(cudaErrorLaunchFailure, buf);
  }
  for (int l = 0; l < 32; ++l) {
    if (((mask >> l) & 1u) && m.th[(tid & ~31) + l].state == kDone) {
      std::snprintf(buf, sizeof buf, "%s at %s:%d: mask 0x%08x names lane %d, which has exited", op_name(op), file,
                    line, mask, l);
      fail(cudaErrorLaunchFailure, buf);
    }
  }
  w.val[lane] = v;
  w.arg[lane] = arg;
  w.width[lane] = width;
  w.arrived |= 1u << lane;
  Thread& t = *m.cur;
  if (w.arrived == mask) {
    uint64_t all = 0;
    for (int l = 0; l < 32; ++l)
      if ((mask >> l) & 1u) all |= static_cast<uint64_t>(w.val[l] != 0) << l;
    for (int l = 0; l < 32; ++l) {
      if (!((mask >> l) & 1u)) continue;
      if (op == kBallot) {
        w.res[l] = all;
      } else if (op == kSyncWarp) {
        w.res[l] = 0;
      } else {
        const int src = shfl_src(op, l, w.arg[l], w.width[l]);
        if (src >= 0 && !((mask >> src) & 1u)) {
          std::snprintf(buf, sizeof buf, "%s at %s:%d: lane %d reads lane %d, which is not in mask 0x%08x",
                        op_name(op), file, line, l, src, mask);
          fail(cudaErrorLaunchFailure, buf);
        }
        w.res[l] = w.val[src >= 0 ? src : l];
      }
    }
    w.arrived = 0;
    w.gen++;
  } else {
    t.state = kWarp;
    t.gen = w.gen;
    t.file = file;
    t.line = line;
    yield_to_scheduler();
    t.state = kRun;
  }
  return w.res[lane];
}

template <typename V>
inline V shfl(int op, unsigned mask, V v, int arg, int width, const char* file, int line) {
  static_assert(sizeof(V) <= 8 && std::is_trivially_copyable<V>::value, "shuffle of an unsupported type");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(V));
  bits = warp_collective(op, mask, bits, arg, width, file, line);
  V out;
  std::memcpy(&out, &bits, sizeof(V));
  return out;
}

// ------------------------------------------------------------------- static __shared__ storage

// Function-local statics of functions in namespace llmk_cuda (mangled "_ZZN9llmk_cuda...") are the
// kernels' static __shared__ variables.  Found once in this library's ELF symbol table.
inline void scan_static_smem() {
  Machine& m = g_machine;
  m.static_scanned = true;
  Dl_info info;
  if (!dladdr(reinterpret_cast<void*>(&scan_static_smem), &info) || !info.dli_fname) return;
  const int fd = open(info.dli_fname, O_RDONLY);
  if (fd < 0) return;
  struct stat st;
  if (fstat(fd, &st) != 0) {
    close(fd);
    return;
  }
  void* map = mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ, MAP_PRIVATE, fd, 0);
  close(fd);
  if (map == MAP_FAILED) return;
  const char* base = static_cast<const char*>(map);
  const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(base);
  if (std::memcmp(eh->e_ident, ELFMAG, SELFMAG) == 0 && eh->e_ident[EI_CLASS] == ELFCLASS64) {
    const auto* sh = reinterpret_cast<const Elf64_Shdr*>(base + eh->e_shoff);
    // load bias: the runtime address of this function minus its link-time address
    for (int i = 0; i < eh->e_shnum; ++i) {
      if (sh[i].sh_type != SHT_SYMTAB) continue;
      const auto* syms = reinterpret_cast<const Elf64_Sym*>(base + sh[i].sh_offset);
      const char* strtab = base + sh[sh[i].sh_link].sh_offset;
      const size_t n = sh[i].sh_size / sizeof(Elf64_Sym);
      const char* bias = static_cast<const char*>(info.dli_fbase);
      for (size_t k = 0; k < n; ++k) {
        const Elf64_Sym& s = syms[k];
        if (ELF64_ST_TYPE(s.st_info) != STT_OBJECT || s.st_size == 0 || s.st_shndx == SHN_UNDEF) continue;
        const char* name = strtab + s.st_name;
        if (std::strncmp(name, "_ZZN9llmk_cuda", 14) != 0) continue;
        const std::string guard = std::string("_ZGV") + (name + 2);
        bool has_guard = false;  // dynamically initialised: not a __shared__ variable
        for (size_t j = 0; j < n && !has_guard; ++j) has_guard = guard == strtab + syms[j].st_name;
        if (has_guard) continue;
        m.static_smem.emplace_back(const_cast<char*>(bias + s.st_value), static_cast<size_t>(s.st_size));
        m.static_smem_bytes += s.st_size;
      }
    }
  }
  munmap(map, static_cast<size_t>(st.st_size));
}

// -------------------------------------------------------------------------------- the launch

inline void thread_entry() {
  Machine& m = g_machine;
  m.body(m.body_arg);
  Thread& t = *m.cur;
  const int tid = linear_tid(), lane = tid & 31;
  const Warp& w = m.warps[tid >> 5];
  if (w.arrived && ((w.mask >> lane) & 1u)) {
    char buf[200];
    std::snprintf(buf, sizeof buf, "lane %d exited while lanes 0x%08x wait for it in %s (mask 0x%08x) at %s:%d",
                  lane, w.arrived, op_name(w.op), w.mask, w.file, w.line);
    fail(cudaErrorLaunchFailure, buf);
  }
  t.state = kDone;
  m.live--;
  if (m.bar_count > 0 && static_cast<int>(m.bar_count) == m.live) release_barrier();
  ctx_switch(t.ctx, m.sched);
  std::abort();
}

inline bool ready(const Machine& m, const Thread& t, int tid) {
  switch (t.state) {
    case kRun:
      return true;
    case kBar:
      return t.gen != m.bar_gen;
    case kWarp:
      return t.gen != m.warps[tid >> 5].gen;
    default:
      return false;
  }
}

inline std::string describe_deadlock(const Machine& m) {
  std::string s = "deadlock: no thread of the block can make progress;";
  int i = 0;
  const int n = m.nthreads;
  while (i < n) {
    const Thread& t = m.th[i];
    int j = i + 1;
    while (j < n && m.th[j].state == t.state && m.th[j].line == t.line && m.th[j].file == t.file) ++j;
    char buf[200];
    if (t.state == kDone) {
      std::snprintf(buf, sizeof buf, " threads %d-%d exited;", i, j - 1);
    } else {
      std::snprintf(buf, sizeof buf, " threads %d-%d wait in %s at %s:%d;", i, j - 1,
                    t.state == kBar ? "__syncthreads" : op_name(m.warps[i >> 5].op), t.file ? t.file : "?",
                    t.line);
    }
    s += buf;
    i = j;
  }
  return s;
}

inline void ensure_stacks(size_t n) {
  Machine& m = g_machine;
  if (m.n_stacks >= n) return;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t per = kStackBytes + page;
  if (m.stacks) munmap(m.stacks, m.n_stacks * per);
  void* p = mmap(nullptr, n * per, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    std::fprintf(stderr, "llmk_emu: cannot map %zu thread stacks\n", n);
    std::abort();
  }
  m.stacks = static_cast<char*>(p);
  m.n_stacks = n;
  for (size_t i = 0; i < n; ++i) mprotect(m.stacks + i * per, page, PROT_NONE);  // overflow guard
}

inline void set_error(cudaError_t e, const std::string& msg) {
  Machine& m = g_machine;
  if (m.last_error == cudaSuccess) {
    m.last_error = e;
    m.last_msg = msg;
  }
}

// The i-th index of 0..n-1 in schedule order (forward, reverse; random uses a permutation).
struct Order {
  unsigned n;
  int mode;
  std::vector<unsigned> perm;
  Order(unsigned count, int m) : n(count), mode(m) {
    if (mode == 2 && n > (1u << 20)) mode = 0;  // huge grids: forward
    if (mode == 2) {
      perm.resize(n);
      for (unsigned i = 0; i < n; ++i) perm[i] = i;
      std::shuffle(perm.begin(), perm.end(), g_machine.rng);
    }
  }
  unsigned operator[](unsigned i) const { return mode == 0 ? i : mode == 1 ? n - 1 - i : perm[i]; }
};

inline int schedule_mode() {
  const char* s = std::getenv("LLMK_EMU_SCHEDULE");
  if (!s || !*s || std::strcmp(s, "forward") == 0) return 0;
  if (std::strcmp(s, "reverse") == 0) return 1;
  if (std::strncmp(s, "random", 6) == 0) return 2;
  std::fprintf(stderr, "llmk_emu: unknown LLMK_EMU_SCHEDULE=%s (forward|reverse|random[:seed])\n", s);
  return 0;
}

// Runs one block; false when it failed (m.fail_*).
inline bool run_block(int mode) {
  Machine& m = g_machine;
  const int n = m.nthreads;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  for (auto& r : m.static_smem) std::memset(r.first, 0xff, r.second);
  std::memset(m.smem.data(), 0xff, m.smem_bytes);
  std::memset(m.smem.data() + m.smem_bytes, 0xa5, kSmemCanary);
  m.live = n;
  m.restart = false;
  m.bar_count = 0;
  m.bar_file = nullptr;
  m.failed = false;
  for (auto& w : m.warps) {
    w.arrived = 0;
    w.op = -1;
  }
  for (int i = 0; i < n; ++i) {
    Thread& t = m.th[i];
    ctx_make(t.ctx, m.sched, m.stacks + static_cast<size_t>(i) * (kStackBytes + page) + page, kStackBytes,
             thread_entry);
    t.state = kRun;
    t.file = nullptr;
    t.line = 0;
    t.idx = uint3{i % g_block_dim.x, (i / g_block_dim.x) % g_block_dim.y, i / (g_block_dim.x * g_block_dim.y)};
  }
  // Warp by warp: each warp runs (its lanes one after another, each until it waits) as far as it
  // can, i.e. up to a block barrier, before the next warp starts: warps progress independently,
  // so a missing barrier between warps shows up as a read of stale or poisoned data.
  const int nwarps = (n + 31) / 32;
  while (m.live > 0) {
    bool progressed = false;
    const Order wo(static_cast<unsigned>(nwarps), mode);  // a fresh permutation per pass when random
    for (int wi = 0; wi < nwarps; ++wi) {
      const unsigned w = wo[static_cast<unsigned>(wi)];
      const unsigned lanes = static_cast<unsigned>(std::min(32, n - static_cast<int>(w) * 32));
      for (bool again = true; again;) {
        again = false;
        const Order lo(lanes, mode);
        for (unsigned i = 0; i < lanes; ++i) {
          const unsigned k = w * 32 + lo[i];
          Thread& t = m.th[k];
          if (!ready(m, t, static_cast<int>(k))) continue;
          m.cur = &t;
          g_thread_idx = t.idx;
          ctx_switch(m.sched, t.ctx);
          progressed = again = true;
          if (m.failed) return false;
          if (m.restart) break;
        }
        if (m.restart) break;
      }
      if (m.restart) {
        m.restart = false;
        break;
      }
    }
    if (!progressed) {
      m.failed = true;
      m.fail_code = cudaErrorLaunchFailure;
      char where[64];
      std::snprintf(where, sizeof where, " [block (%u,%u,%u)]", g_block_idx.x, g_block_idx.y, g_block_idx.z);
      m.fail_msg = describe_deadlock(m) + where;
      return false;
    }
  }
  for (size_t i = 0; i < kSmemCanary; ++i) {
    if (static_cast<unsigned char>(m.smem[m.smem_bytes + i]) != 0xa5) {
      m.failed = true;
      m.fail_code = cudaErrorLaunchFailure;
      char buf[160];
      std::snprintf(buf, sizeof buf, "write past the end of dynamic shared memory (%zu bytes) [block (%u,%u,%u)]",
                    m.smem_bytes, g_block_idx.x, g_block_idx.y, g_block_idx.z);
      m.fail_msg = buf;
      return false;
    }
  }
  return true;
}

inline void launch(const void* kernel, const char* name, dim3 grid, dim3 block, size_t smem, void (*body)(void*),
                   void* arg) {
  Machine& m = g_machine;
  std::lock_guard<std::mutex> lock(m.mu);
  if (m.launch_log.size() < (1u << 20)) m.launch_log += std::string(name) + " " + std::to_string(block.x) + "\n";
  if (!m.static_scanned) scan_static_smem();
  const uint64_t nthreads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > 1024 || block.y > 1024 || block.z > 64 ||
      nthreads > kMaxThreads) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "invalid configuration argument: blockDim (%u,%u,%u) (at most 1024 threads)",
                  block.x, block.y, block.z);
    return set_error(cudaErrorInvalidConfiguration, buf);
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "invalid configuration argument: gridDim (%u,%u,%u)", grid.x, grid.y, grid.z);
    return set_error(cudaErrorInvalidConfiguration, buf);
  }
  const auto it = m.max_dyn_smem.find(kernel);
  const size_t limit = it == m.max_dyn_smem.end() ? kDefaultSmem : static_cast<size_t>(it->second);
  // (static __shared__ sizes are not attributed to kernels: only the dynamic size is checked)
  if (smem > limit || smem > static_cast<size_t>(smem_optin())) {
    char buf[200];
    std::snprintf(buf, sizeof buf,
                  "invalid argument: %zu bytes of dynamic shared memory (kernel limit %zu: raise it with "
                  "cudaFuncSetAttribute; device opt-in limit %d)",
                  smem, limit, smem_optin());
    return set_error(cudaErrorInvalidValue, buf);
  }
  const int n = static_cast<int>(nthreads);
  ensure_stacks(static_cast<size_t>(n));
  m.th.resize(static_cast<size_t>(n));
  m.warps.assign(static_cast<size_t>((n + 31) / 32), Warp{});
  for (size_t w = 0; w < m.warps.size(); ++w) {
    const int lanes = std::min(32, n - static_cast<int>(w) * 32);
    m.warps[w].lanes = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
  }
  m.nthreads = n;
  m.body = body;
  m.body_arg = arg;
  m.smem_bytes = smem;
  m.smem.assign(smem + kSmemCanary + 16, 0);
  ctx_prepare(m.sched);
  g_block_dim = block;
  g_grid_dim = grid;
  const int mode = schedule_mode();
  if (mode == 2) {
    const char* s = std::getenv("LLMK_EMU_SCHEDULE");
    m.rng.seed(s[6] == ':' ? static_cast<unsigned>(std::atoi(s + 7)) : 12345u);
  }
  const Order oz(grid.z, mode), oy(grid.y, mode), ox(grid.x, mode);
  for (unsigned iz = 0; iz < grid.z; ++iz) {
    for (unsigned iy = 0; iy < grid.y; ++iy) {
      for (unsigned ix = 0; ix < grid.x; ++ix) {
        g_block_idx = uint3{ox[ix], oy[iy], oz[iz]};
        if (!run_block(mode)) {
          m.cur = nullptr;
          return set_error(m.fail_code, "kernel failed in the CUDA emulator: " + m.fail_msg);
        }
      }
    }
  }
  m.cur = nullptr;
}

inline void* dynamic_smem() { return g_machine.smem.data(); }

template <typename... P>
struct Launch {
  dim3 grid, block;
  size_t smem;
  const char* name;
  void (*kernel)(P...);

  template <typename Tuple>
  static void call(void* p) {
    auto* c = static_cast<std::pair<void (*)(P...), Tuple*>*>(p);
    std::apply(c->first, *c->second);
  }

  template <typename... A>
  void operator()(A&&... a) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launch: wrong number of arguments");
    using Tuple = std::tuple<std::decay_t<P>...>;
    Tuple args(static_cast<std::decay_t<P>>(std::forward<A>(a))...);
    std::pair<void (*)(P...), Tuple*> c(kernel, &args);
    launch(reinterpret_cast<const void*>(kernel), name, grid, block, smem, &Launch::call<Tuple>, &c);
  }
};

template <typename... P>
Launch<P...> make_launch(dim3 grid, dim3 block, size_t smem, cudaStream_t, const char* name, void (*kernel)(P...)) {
  return Launch<P...>{grid, block, smem, name, kernel};
}

// The launches since the last call ("<kernel expression as written> <blockDim.x>" per line).
inline std::string take_launch_log() {
  std::lock_guard<std::mutex> lock(g_machine.mu);
  std::string out;
  out.swap(g_machine.launch_log);
  return out;
}

}  // namespace llmk_emu

// ------------------------------------------------------------------------- device built-ins

inline const uint3& threadIdx = llmk_emu::g_thread_idx;
inline const uint3& blockIdx = llmk_emu::g_block_idx;
inline const dim3& blockDim = llmk_emu::g_block_dim;
inline const dim3& gridDim = llmk_emu::g_grid_dim;

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  llmk_emu::sync_threads(file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  llmk_emu::warp_collective(llmk_emu::kSyncWarp, mask, 0, 0, 32, file, line);
}
template <typename V>
inline V __shfl_sync(unsigned mask, V v, int src, int width = warpSize, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
  return llmk_emu::shfl(llmk_emu::kShflIdx, mask, v, src, width, file, line);
}
template <typename V>
inline V __shfl_up_sync(unsigned mask, V v, unsigned delta, int width = warpSize,
                        const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return llmk_emu::shfl(llmk_emu::kShflUp, mask, v, static_cast<int>(delta), width, file, line);
}
template <typename V>
inline V __shfl_down_sync(unsigned mask, V v, unsigned delta, int width = warpSize,
                          const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return llmk_emu::shfl(llmk_emu::kShflDown, mask, v, static_cast<int>(delta), width, file, line);
}
template <typename V>
inline V __shfl_xor_sync(unsigned mask, V v, int lane_mask, int width = warpSize,
                         const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return llmk_emu::shfl(llmk_emu::kShflXor, mask, v, lane_mask, width, file, line);
}
inline unsigned __ballot_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  const uint64_t all = llmk_emu::warp_collective(llmk_emu::kBallot, mask, pred != 0, 0, 32, file, line);
  return static_cast<unsigned>(all & mask);
}
inline int __any_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return __ballot_sync(mask, pred, file, line) != 0;
}
inline int __all_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return __ballot_sync(mask, pred, file, line) == mask;
}

// ------------------------------------------------------------------------ runtime functions

inline cudaError_t cudaGetLastError() {
  llmk_emu::Machine& m = llmk_emu::g_machine;
  const cudaError_t e = m.last_error;
  m.last_error = cudaSuccess;
  if (e != cudaSuccess) m.err_msg = m.last_msg;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return llmk_emu::g_machine.last_error; }
inline const char* cudaGetErrorString(cudaError_t e) {
  if (e == cudaSuccess) return "no error";
  const std::string& msg = llmk_emu::g_machine.err_msg;
  return msg.empty() ? "error (CUDA emulator)" : msg.c_str();
}
inline cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int dev) {
  if (dev != 0) return cudaErrorInvalidValue;
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock:
      *value = 1024;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock:
      *value = llmk_emu::kDefaultSmem;
      return cudaSuccess;
    case cudaDevAttrWarpSize:
      *value = 32;
      return cudaSuccess;
    case cudaDevAttrMultiProcessorCount:
      *value = llmk_emu::sm_count();
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor:
      *value = 9;
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor:
      *value = 0;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = llmk_emu::smem_optin();
      return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
// Registers are not modelled: every kernel reports the 1024-thread block limit.
struct cudaFuncAttributes {
  size_t sharedSizeBytes, constSizeBytes, localSizeBytes;
  int maxThreadsPerBlock, numRegs, ptxVersion, binaryVersion, cacheModeCA, maxDynamicSharedSizeBytes;
};
template <typename F>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, F* kernel) {
  llmk_emu::Machine& m = llmk_emu::g_machine;
  std::lock_guard<std::mutex> lock(m.mu);
  *attr = cudaFuncAttributes{};
  attr->maxThreadsPerBlock = llmk_emu::kMaxThreads;
  const auto it = m.max_dyn_smem.find(reinterpret_cast<const void*>(kernel));
  attr->maxDynamicSharedSizeBytes = it == m.max_dyn_smem.end() ? llmk_emu::kDefaultSmem : it->second;
  return cudaSuccess;
}
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  llmk_emu::Machine& m = llmk_emu::g_machine;
  std::lock_guard<std::mutex> lock(m.mu);
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > llmk_emu::smem_optin()) {
    m.err_msg = "invalid argument: cudaFuncSetAttribute(" + std::to_string(attr) + ", " + std::to_string(value) +
                ") (MaxDynamicSharedMemorySize up to the opt-in limit " + std::to_string(llmk_emu::smem_optin()) +
                ")";
    return cudaErrorInvalidValue;
  }
  m.max_dyn_smem[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}

// Launch syntax (see cuda_common.cuh): LLMK_LAUNCH(grid, block, smem, stream, kernel)(args...)
#define LLMK_LAUNCH(grid, block, smem, stream, ...) \
  ::llmk_emu::make_launch(grid, block, smem, stream, #__VA_ARGS__, __VA_ARGS__)
#define LLMK_EXTERN_SHARED(type, name) type* const name = static_cast<type*>(::llmk_emu::dynamic_smem())
