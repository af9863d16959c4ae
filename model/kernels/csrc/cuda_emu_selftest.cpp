// Self-tests of the CUDA emulator (cuda_emu.h), built only into the emulated test library
// (torch.ops.llmk_cuda_emu._emu_selftest / _emu_convert, used by tests/test_kernels_cuda_emu.py):
// kernels that deadlock, diverge, misuse warp collectives or launch limits must be reported as
// errors; shuffles, shared-memory poisoning and the half/bfloat16 conversions must be right.
#ifndef LLMK_CUDA_EMULATION
#error "cuda_emu_selftest.cpp is part of the emulated test library only"
#endif
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <string>

#include "cuda_common.cuh"

namespace llmk_cuda {
namespace emu_selftest {

__global__ void deadlock_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x != 32) v = __shfl_xor_sync(0xffffffffu, v, 1);  // lane 0 of warp 1 skips it
  __syncthreads();
  out[threadIdx.x] = v;
}

__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.f;
}

__global__ void write_kernel(float* out) { out[threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * blockIdx.x)] = 1.f; }

__global__ void full_mask_shuffle_kernel(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<float>(threadIdx.x), 1);
}

__global__ void exited_lane_kernel(float* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<float>(threadIdx.x), 1);
}

__global__ void dyn_smem_kernel(float* out, int n) {
  LLMK_EXTERN_SHARED(float, smem);
  if (threadIdx.x == 0) smem[n] = 1.f;
  __syncthreads();
  out[threadIdx.x] = smem[0];
}

// Reads shared memory before writing it: must see the poison (NaN) in every block.
__global__ void shared_poison_kernel(float* out) {
  __shared__ float sh[64];
  LLMK_EXTERN_SHARED(float, dyn);
  const int t = threadIdx.x;
  out[blockIdx.x * 128 + t] = sh[t];
  out[blockIdx.x * 128 + 64 + t] = dyn[t];
  sh[t] = 1.f;
  dyn[t] = 2.f;
}

// Every warp collective the emulator implements; 2 warps of 32, 8 results per thread.
__global__ void shuffle_kernel(float* out) {
  const int t = threadIdx.x, lane = t & 31;
  const float v = static_cast<float>(t);
  float* o = out + t * 8;
  o[0] = __shfl_xor_sync(0xffffffffu, v, 1);
  o[1] = __shfl_down_sync(0xffffffffu, v, 3);
  o[2] = __shfl_up_sync(0xffffffffu, v, 2);
  o[3] = __shfl_sync(0xffffffffu, v, 7);
  o[4] = __shfl_xor_sync(0xffffffffu, v, 16, 16);  // width 16: the upper group is out of reach
  o[5] = __shfl_down_sync(0xffffffffu, v, 4, 8);
  o[6] = static_cast<float>(__ballot_sync(0xffffffffu, lane % 3 == 0) == 0x49249249u);
  __syncwarp();
  o[7] = lane < 16 ? __shfl_xor_sync(0x0000ffffu, v, 2) : -1.f;  // half-warp mask
}

__global__ void misaligned_kernel(float* out) {
  llmk_emu::check_aligned(out + 1, 16);
  out[threadIdx.x] = 1.f;
}

// Missing barrier: thread 0 writes, the others read without __syncthreads.  Forward schedule runs
// thread 0 first (looks right); reverse runs the readers first (they see the poison).
__global__ void missing_barrier_kernel(float* out) {
  __shared__ float v;
  if (threadIdx.x == 0) v = 42.f;
  out[threadIdx.x] = v;
}

cudaError_t run(const std::string& name, float* out) {
  cudaStream_t s = nullptr;
  if (name == "deadlock") {
    LLMK_LAUNCH(1, 64, 0, s, deadlock_kernel)(out);
  } else if (name == "divergent_barrier") {
    LLMK_LAUNCH(1, 64, 0, s, divergent_barrier_kernel)(out);
  } else if (name == "threads_1024") {
    LLMK_LAUNCH(1, 1024, 0, s, write_kernel)(out);
  } else if (name == "threads_1025") {
    LLMK_LAUNCH(1, 1025, 0, s, write_kernel)(out);
  } else if (name == "block_32x33") {
    LLMK_LAUNCH(1, dim3(32, 33), 0, s, write_kernel)(out);
  } else if (name == "empty_grid") {
    LLMK_LAUNCH(0, 32, 0, s, write_kernel)(out);
  } else if (name == "partial_warp_shuffle") {
    LLMK_LAUNCH(1, 48, 0, s, full_mask_shuffle_kernel)(out);
  } else if (name == "exited_lane") {
    LLMK_LAUNCH(1, 32, 0, s, exited_lane_kernel)(out);
  } else if (name == "smem_64k_no_attribute") {
    LLMK_LAUNCH(1, 32, 64 * 1024, s, dyn_smem_kernel)(out, 0);
  } else if (name == "smem_64k_attribute") {
    cudaError_t e = cudaFuncSetAttribute(dyn_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024);
    if (e != cudaSuccess) return e;
    LLMK_LAUNCH(1, 32, 64 * 1024, s, dyn_smem_kernel)(out, 0);
  } else if (name == "smem_attribute_above_optin") {
    return cudaFuncSetAttribute(dyn_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 256 * 1024);
  } else if (name == "smem_overrun") {
    LLMK_LAUNCH(1, 32, 128, s, dyn_smem_kernel)(out, 40);
  } else if (name == "shared_poison") {
    LLMK_LAUNCH(3, 64, 64 * sizeof(float), s, shared_poison_kernel)(out);
  } else if (name == "shuffles") {
    LLMK_LAUNCH(1, 64, 0, s, shuffle_kernel)(out);
  } else if (name == "misaligned") {
    LLMK_LAUNCH(1, 32, 0, s, misaligned_kernel)(out);
  } else if (name == "missing_barrier") {
    LLMK_LAUNCH(1, 64, 0, s, missing_barrier_kernel)(out);
  } else {
    return cudaErrorInvalidDeviceFunction;
  }
  return cudaGetLastError();
}

}  // namespace emu_selftest
}  // namespace llmk_cuda

namespace {

void emu_selftest(const std::string& name, const at::Tensor& out) {
  TORCH_CHECK(out.is_cpu() && out.scalar_type() == at::kFloat && out.is_contiguous() && out.numel() >= 4096,
              "_emu_selftest: out must be a contiguous CPU float32 tensor of >= 4096 elements");
  const cudaError_t e = llmk_cuda::emu_selftest::run(name, out.mutable_data_ptr<float>());
  TORCH_CHECK(e != cudaErrorInvalidDeviceFunction, "_emu_selftest: unknown test ", name);
  TORCH_CHECK(e == cudaSuccess, "CUDA error ", static_cast<int>(e), ": ", cudaGetErrorString(e));
}

// float32 -> the bit patterns of __half / __nv_bfloat16 (int16), and back to float32.
void emu_convert(const at::Tensor& x, const at::Tensor& h, const at::Tensor& b, const at::Tensor& hf,
                 const at::Tensor& bf) {
  const int64_t n = x.numel();
  for (const at::Tensor* t : {&x, &h, &b, &hf, &bf})
    TORCH_CHECK(t->is_cpu() && t->is_contiguous() && t->numel() == n, "_emu_convert: bad tensor");
  const float* xp = x.const_data_ptr<float>();
  auto* hp = h.mutable_data_ptr<int16_t>();
  auto* bp = b.mutable_data_ptr<int16_t>();
  float* hfp = hf.mutable_data_ptr<float>();
  float* bfp = bf.mutable_data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    const __half hv = __float2half_rn(xp[i]);
    const __nv_bfloat16 bv = __float2bfloat16_rn(xp[i]);
    hp[i] = static_cast<int16_t>(hv.__x);
    bp[i] = static_cast<int16_t>(bv.__x);
    hfp[i] = __half2float(hv);
    bfp[i] = __bfloat162float(bv);
  }
}

std::string emu_launch_log() { return llmk_emu::take_launch_log(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmk_cuda_emu, m) {
  m.def("_emu_launch_log() -> str", &emu_launch_log);  // no tensor arguments: a catch-all kernel
  m.def("_emu_selftest(str name, Tensor(a!) out) -> ()");
  m.def("_emu_convert(Tensor x, Tensor(a!) half_bits, Tensor(b!) bf16_bits, Tensor(c!) half_f32, "
        "Tensor(d!) bf16_f32) -> ()");
}

TORCH_LIBRARY_IMPL(llmk_cuda_emu, CPU, m) {
  m.impl("_emu_selftest", &emu_selftest);
  m.impl("_emu_convert", &emu_convert);
}
