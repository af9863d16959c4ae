// Registration of the CPU kernels as torch.ops.llmk_cpu.* (no pybind11: keeps the JIT build fast).
#include <torch/library.h>

#include "cpu_common.h"
#include "ops_schema.h"

namespace llmk::cpu {

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, ": undefined tensor");
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got ", t.device());
}

void check_rows(const Tensor& t, int64_t N, int64_t D, at::ScalarType dt, const char* name) {
  check_cpu(t, name);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == N && t.size(1) == D, name, ": expected shape [", N, ", ", D, "], got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == dt, name, ": expected dtype ", dt, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, ": must be contiguous");
}

void check_vec(const OptTensor& t, int64_t n, at::ScalarType dt, const char* name) {
  if (!has(t)) return;
  check_cpu(*t, name);
  TORCH_CHECK(t->numel() == n && t->is_contiguous(), name, ": expected ", n, " contiguous elements, got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == dt, name, ": expected dtype ", dt, ", got ", t->scalar_type());
}

}  // namespace llmk::cpu

TORCH_LIBRARY(llmk_cpu, m) {
  LLMK_SCHEMAS(m)
}

TORCH_LIBRARY_IMPL(llmk_cpu, CPU, m) {
  LLMK_IMPLS(m, llmk::cpu)
}
