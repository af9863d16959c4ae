// Operator schemas shared by the CPU (namespace llmk_cpu) and CUDA (namespace llmk_cuda)
// libraries.  Every op writes into caller-provided output tensors (annotated `(a!)`) and returns
// nothing, so callers (and the tests, which poison the outputs with NaN) control allocation.
// Layouts: row ops take contiguous [N, D]; swiglu takes [N, D] with unit last stride (any row
// stride); rope takes x [B, H, T, D] with unit last stride and cos/sin float32 [Bc, T, D]
// (Bc in {1, B}); cross-entropy takes logits [B, T, V] with unit last stride.  ce_bwd's scale is one
// float32 (every row) or one per row; ce_ent_* (cross-entropy and entropy per row) take optional
// targets (without them: entropy only, no row is ignored).
#pragma once

#define LLMK_SCHEMAS(m)                                                                                     \
  m.def("layer_norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, "             \
        "Tensor(a!) y, Tensor(b!)? h, Tensor(c!) mean, Tensor(d!) rstd) -> ()");                            \
  m.def("layer_norm_bwd(Tensor dy, Tensor h, Tensor mean, Tensor rstd, Tensor? weight, Tensor? dres, "      \
        "Tensor(a!) dx, Tensor(b!)? dweight, Tensor(c!)? dbias) -> ()");                                    \
  m.def("rms_norm_fwd(Tensor x, Tensor? residual, Tensor? weight, float eps, Tensor(a!) y, "               \
        "Tensor(b!)? h, Tensor(c!) rstd) -> ()");                                                           \
  m.def("rms_norm_bwd(Tensor dy, Tensor h, Tensor rstd, Tensor? weight, Tensor? dres, Tensor(a!) dx, "      \
        "Tensor(b!)? dweight) -> ()");                                                                      \
  m.def("bias_gelu_fwd(Tensor x, Tensor? bias, Tensor(a!) y) -> ()");                                       \
  m.def("bias_gelu_bwd(Tensor dy, Tensor x, Tensor? bias, Tensor(a!) dx, Tensor(b!)? dbias) -> ()");        \
  m.def("swiglu_fwd(Tensor gate, Tensor up, Tensor(a!) y) -> ()");                                          \
  m.def("swiglu_bwd(Tensor dy, Tensor gate, Tensor up, Tensor(a!) dgate, Tensor(b!) dup) -> ()");           \
  m.def("rope_fwd(Tensor x, Tensor cos, Tensor sin, bool backward, Tensor(a!) y) -> ()");                   \
  m.def("ce_fwd(Tensor logits, Tensor targets, int ignore_index, int vocab_start, bool check_range, "       \
        "Tensor(a!) loss, Tensor(b!) lse, Tensor(c!)? target_logit) -> ()");                                \
  m.def("ce_bwd(Tensor logits, Tensor targets, Tensor lse, Tensor scale, int ignore_index, "                \
        "int vocab_start, Tensor(a!) grad) -> ()");                                                         \
  m.def("ce_ent_fwd(Tensor logits, Tensor? targets, int ignore_index, int vocab_start, bool check_range, "  \
        "Tensor(a!) lse, Tensor(b!) entropy, Tensor(c!)? loss, Tensor(d!)? target_logit) -> ()");           \
  m.def("ce_ent_bwd(Tensor logits, Tensor? targets, Tensor lse, Tensor entropy, Tensor? grad_loss, "        \
        "Tensor? grad_entropy, int ignore_index, int vocab_start, Tensor(a!) grad) -> ()");

// Register the implementations of every op from namespace `ns` (inside TORCH_LIBRARY_IMPL).
#define LLMK_IMPLS(m, ns) \
  m.impl("layer_norm_fwd", &ns::layer_norm_fwd); \
  m.impl("layer_norm_bwd", &ns::layer_norm_bwd); \
  m.impl("rms_norm_fwd", &ns::rms_norm_fwd); \
  m.impl("rms_norm_bwd", &ns::rms_norm_bwd); \
  m.impl("bias_gelu_fwd", &ns::bias_gelu_fwd); \
  m.impl("bias_gelu_bwd", &ns::bias_gelu_bwd); \
  m.impl("swiglu_fwd", &ns::swiglu_fwd); \
  m.impl("swiglu_bwd", &ns::swiglu_bwd); \
  m.impl("rope_fwd", &ns::rope_fwd); \
  m.impl("ce_fwd", &ns::ce_fwd); \
  m.impl("ce_bwd", &ns::ce_bwd); \
  m.impl("ce_ent_fwd", &ns::ce_ent_fwd); \
  m.impl("ce_ent_bwd", &ns::ce_ent_bwd);
