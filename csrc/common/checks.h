// Argument checks shared by every op. Each names the offending argument and
// raises the exception type torch raises for the same mistake.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/irange.h>

#include <vector>

namespace torchfuse {

// Floating dtypes the kernels are compiled for.
inline bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 ||
      t == at::kDouble;
}

// The type kernels accumulate in, and save statistics and parameter gradients
// in: float64 for float64 input, float32 for the others.
inline at::ScalarType acc_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The largest scratch buffer (im2col columns, kept gradients) the kernels
// size themselves to on CPU: glibc serves blocks below its largest mmap
// threshold (32 MiB on 64-bit) from its heap, reused call after call; a
// block at or past it (with the allocator's alignment and glibc's header, a
// request of exactly 32 MiB is) is mapped afresh at every call and costs a
// page fault per 4 KiB. 1 MiB below, for margin. (On CUDA, the caching
// allocator reuses blocks of any size.)
constexpr int64_t kHeapScratchMax = (int64_t{32} << 20) - (int64_t{1} << 20);

// torch raises NotImplementedError ("... not implemented for 'Int'") when a
// floating-point op gets an integer tensor; so do we.
inline void check_floating(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK_NOT_IMPLEMENTED(
      is_kernel_dtype(t.scalar_type()),
      op, ": \"", arg, "\" not implemented for '", t.scalar_type(),
      "' (expected float32, float16, bfloat16 or float64)");
}

inline void check_same_device(
    const at::Tensor& t,
    const at::Tensor& ref,
    const char* op,
    const char* arg) {
  TORCH_CHECK(
      t.device() == ref.device(), op, ": expected ", arg,
      " to be on the same device as input (", ref.device(), "), but got ",
      t.device());
}

inline void check_same_dtype(
    const at::Tensor& t,
    const at::Tensor& ref,
    const char* op,
    const char* arg) {
  TORCH_CHECK(
      t.scalar_type() == ref.scalar_type(), op, ": expected ", arg,
      " to have the same dtype as input (", ref.scalar_type(), "), but got ",
      t.scalar_type());
}

inline void check_same_shape(
    const at::Tensor& t,
    const at::Tensor& ref,
    const char* op,
    const char* arg) {
  TORCH_CHECK(
      t.sizes() == ref.sizes(), op, ": expected ", arg,
      " to have the same shape as input ", ref.sizes(), ", but got ",
      t.sizes());
}

// Product of sizes as int64 (0 for any zero-size dimension).
inline int64_t prod(at::IntArrayRef sizes) {
  int64_t p = 1;
  for (auto s : sizes) p *= s;
  return p;
}

}  // namespace torchfuse
