// Kernels with the defects the emulator exists to catch, and one without:
// tests/test_cuda_emu.py checks that each defect is caught (an error, or a
// result that depends on the thread order), so the emulator's checks are
// known to be able to fail. Compiled into the emulator library only (build.py),
// never into torchfuse.
#include "../../csrc/common/cuda_utils.cuh"

#include <torch/library.h>

namespace cuemu_selftest {
namespace {

using torchfuse::cuda::load_vec;
using torchfuse::cuda::warp_sum;

// out[t] = the value thread t + 1 wrote to shared memory, with or without the
// barrier between the write and the read.
template <bool SYNC>
__global__ void neighbour_kernel(float* out) {
  __shared__ float smem[64];
  smem[threadIdx.x] = static_cast<float>(threadIdx.x) + 1.0f;
  if constexpr (SYNC) __syncthreads();
  out[threadIdx.x] = smem[(threadIdx.x + 1) % 64];
  if constexpr (SYNC) __syncthreads();
  smem[threadIdx.x] = -1.0f;  // stale for the next launch
}

// Reads shared memory that no thread of this block wrote (the previous launch
// did).
__global__ void unwritten_shared_kernel(float* out) {
  __shared__ float smem[64];
  out[threadIdx.x] = smem[threadIdx.x];
  __syncthreads();
  smem[threadIdx.x] = 1.0f;
}

// Half of warp 0 shuffles while the other half waits at __syncthreads.
__global__ void divergent_shuffle_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  __syncthreads();
  out[threadIdx.x] = v;
}

// Lanes 16-31 have exited; lanes 0-15 read them through the shuffle.
__global__ void exited_lanes_kernel(float* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = warp_sum(static_cast<float>(threadIdx.x));
}

// Block b writes out[b] and then reads out[b - 1], which block b - 1 of the
// same launch writes: right only when the blocks run in increasing order.
__global__ void cross_block_kernel(float* out) {
  const unsigned b = blockIdx.x;
  out[b] = static_cast<float>(b) + 1.0f;
  if (b > 0) out[b] += out[b - 1];
}

__global__ void copy_kernel(const float* in, float* out) {
  const auto v = load_vec<float, 4>(in);
  for (int k = 0; k < 4; ++k) out[threadIdx.x * 4 + k] = v.v[k];
}

at::Tensor run(const std::string& name) {
  at::Tensor out = at::zeros({64}, at::kFloat);
  float* o = out.data_ptr<float>();
  if (name == "neighbour_synced") {
    neighbour_kernel<true><<<1, 64>>>(o);
  } else if (name == "neighbour_unsynced") {
    neighbour_kernel<false><<<1, 64>>>(o);
  } else if (name == "unwritten_shared") {
    unwritten_shared_kernel<<<2, 64>>>(o);
  } else if (name == "divergent_shuffle") {
    divergent_shuffle_kernel<<<1, 64>>>(o);
  } else if (name == "exited_lanes") {
    exited_lanes_kernel<<<1, 32>>>(o);
  } else if (name == "cross_block") {
    cross_block_kernel<<<64, 1>>>(o);
  } else if (name == "grid_y") {
    copy_kernel<<<dim3(1, 70000), 1>>>(o, o + 4);
  } else if (name == "block_size") {
    copy_kernel<<<1, 2048>>>(o, o + 4);
  } else if (name == "misaligned") {
    copy_kernel<<<1, 1>>>(o + 1, o + 8);
  } else if (name == "out_of_bounds") {  // for CUEMU_ASAN=1 builds: a write past the end
    copy_kernel<<<1, 16>>>(o, o + 4);
  } else if (name == "aligned") {
    copy_kernel<<<1, 1>>>(o + 4, o + 8);
  } else {
    TORCH_CHECK(false, "cuemu_selftest: no case ", name);
  }
  return out;
}

}  // namespace
}  // namespace cuemu_selftest

TORCH_LIBRARY(cuemu_selftest, m) {
  m.def("run(str name) -> Tensor", &cuemu_selftest::run);
  m.def("launch_count() -> int", [] { return cuemu::launch_count(); });
}
