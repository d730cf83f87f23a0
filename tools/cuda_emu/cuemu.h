// cuemu: runs the project's CUDA kernels on the CPU, for tests on machines
// without a GPU. Force-included (-include) into each csrc/*/*_cuda.cu after
// tools/cuda_emu/build.py has rewritten its `<<<...>>>` launches as
// ::cuemu::launch(kernel, grid, block, smem, stream)(args...).
//
// What it models: every thread of a block runs on its own fiber (ucontext),
// one block at a time; __syncthreads and the warp shuffle are barriers among
// the block's (the warp's) live threads, so threads run ahead to the next
// barrier in the order set by CUEMU_ORDER (forward, reverse, or a seeded
// shuffle), which turns a missing barrier into a wrong result; the blocks of
// a grid run in that order too, which turns a read of another block's write
// within the launch into a wrong result. It checks the
// launch limits (grid.x < 2^31, grid.y/z <= 65535, <= 1024 threads a block,
// <= 48 KiB dynamic shared memory), a shuffle that reads a lane which is not
// taking part, 16-byte vector accesses (Vec loads) that are not aligned, and
// a block whose threads wait on each other (a barrier reached by some of its
// threads only). It does not model timing, memory coherence between blocks
// running at once; shared memory not written before it is read reads NaN.
// CUEMU_TRACE=1 prints every launch (kernel, grid, block) to stderr.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <tuple>
#include <typeinfo>
#include <type_traits>
#include <utility>

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;

extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Static shared memory: build.py rewrites `__shared__ T name[n];` as
// `auto& name = ::cuemu::shared<T[n]>("site");`, storage that the runtime
// keeps across blocks and fills with 0xff bytes (NaN) at its first use in each
// block, so a read of shared memory that no thread of the block wrote gives
// NaN rather than a value an earlier block left.
#define __align__(n) alignas(n)
#define __grid_constant__

namespace cuemu {

using KernelBody = void (*)(void*);

// Runs body(arg) on every thread of every block of the grid.
void run_grid(const char* name, int64_t gx, int64_t gy, int64_t gz, int64_t bx, int64_t by,
              int64_t bz, int64_t smem, KernelBody body, void* arg);
void sync_block();
// The 8-byte value of lane (lane ^ mask) within groups of `width` lanes.
uint64_t shfl_xor(unsigned member_mask, uint64_t v, int lane_mask, int width);
void* dynamic_smem();
void* shared_alloc(const char* site, size_t type_hash, size_t bytes, size_t align);
template <typename T>
T& shared(const char* site) {
  return *static_cast<T*>(shared_alloc(site, typeid(T).hash_code(), sizeof(T), alignof(T)));
}
// Kernel launches run so far (tests check that an op went through here).
int64_t launch_count();
void check_aligned(const void* p, size_t bytes);

struct Dims {
  int64_t x, y, z;
};
template <typename T>
Dims dims_of(const T& v) {
  if constexpr (std::is_same_v<T, dim3>) {
    return {v.x, v.y, v.z};
  } else {
    static_assert(std::is_integral_v<T>, "a grid or block size must be integral");
    return {static_cast<int64_t>(v), 1, 1};
  }
}

template <typename... P>
struct Launch {
  const char* name;
  void (*kernel)(P...);
  Dims grid, block;
  int64_t smem;

  template <typename... Args>
  void operator()(Args&&... args) const {
    // The kernel's parameters, converted as a launch converts them.
    std::tuple<P...> params(static_cast<P>(std::forward<Args>(args))...);
    struct Ctx {
      void (*kernel)(P...);
      std::tuple<P...>* params;
    } ctx{kernel, &params};
    run_grid(name, grid.x, grid.y, grid.z, block.x, block.y, block.z, smem,
             [](void* c) {
               auto* cx = static_cast<Ctx*>(c);
               std::apply(cx->kernel, *cx->params);
             },
             &ctx);
  }
};

template <typename... P, typename G, typename B>
Launch<P...> launch(const char* name, void (*kernel)(P...), const G& grid, const B& block,
                    int64_t smem = 0, cudaStream_t = nullptr) {
  return Launch<P...>{name, kernel, dims_of(grid), dims_of(block), smem};
}

}  // namespace cuemu

inline void __syncthreads() { ::cuemu::sync_block(); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of <= 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = ::cuemu::shfl_xor(mask, bits, lane_mask, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// CUDA's overloaded device min/max for mixed integer widths.
template <typename A, typename B>
__device__ inline std::common_type_t<A, B> min(A a, B b) {
  using R = std::common_type_t<A, B>;
  return static_cast<R>(a) < static_cast<R>(b) ? static_cast<R>(a) : static_cast<R>(b);
}
template <typename A, typename B>
__device__ inline std::common_type_t<A, B> max(A a, B b) {
  using R = std::common_type_t<A, B>;
  return static_cast<R>(a) < static_cast<R>(b) ? static_cast<R>(b) : static_cast<R>(a);
}
using std::isfinite;
using std::isinf;
using std::isnan;
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
inline double rsqrt(double v) { return 1.0 / std::sqrt(v); }

// The CUDA registrations become CPU ones, which replace torchfuse's own CPU
// kernels when the emulator library is loaded after torchfuse.
#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, k, m) _TORCH_LIBRARY_IMPL(ns, CPU, m, C10_UID)
