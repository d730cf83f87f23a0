// CUDA helpers shared by every kernel: aligned vector accesses, warp and block
// reductions, launch helpers.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>

namespace torchfuse::cuda {

// N elements of T moved as one (16-byte when sizeof(T) * N == 16) access.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
#ifdef TORCHFUSE_CUDA_EMU  // tools/cuda_emu: a misaligned vector access faults on a GPU
  ::cuemu::check_aligned(p, sizeof(Vec<T, N>));
#endif
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
#ifdef TORCHFUSE_CUDA_EMU
  ::cuemu::check_aligned(p, sizeof(Vec<T, N>));
#endif
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

// Elements per 16-byte access.
template <typename T>
constexpr int vec_width() {
  return 16 / sizeof(T) > 0 ? 16 / sizeof(T) : 1;
}

inline bool is_aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

// Sum over `width` consecutive lanes (width a power of two <= 32). Every lane
// of the warp must call it.
template <typename A>
__device__ __forceinline__ A warp_sum(A v, int width = 32) {
  for (int offset = width / 2; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset, width);
  }
  return v;
}

// Sum over a 1-D block (blockDim.y == 1, blockDim.x a multiple of 32: the
// shuffles name all 32 lanes); the result is returned to every
// thread. Every thread of the block must call it. `smem` holds 32 values.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* smem) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = threadIdx.x < nwarps ? smem[threadIdx.x] : A(0);
  if (warp == 0) v = warp_sum(v);
  if (threadIdx.x == 0) smem[0] = v;
  __syncthreads();
  return smem[0];
}

// Reduction across the threads of one row: a block reduction when a row
// spans the whole block (threads_per_row > 32), else a sub-warp one.
template <typename A>
__device__ __forceinline__ A row_sum(A v, A* smem) {
  return blockDim.x > 32 ? block_sum(v, smem) : warp_sum(v, blockDim.x);
}

template <typename A>
__device__ __forceinline__ A rsqrt_acc(A v) {
  if constexpr (sizeof(A) == 8) {
    return ::rsqrt(v);
  } else {
    return ::rsqrtf(v);
  }
}

inline int next_pow2(int64_t v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

inline int num_sms() {
  return at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

// out[j] = src[j] * r * w[j] (w may be nullptr: 1) over one row of nvec
// V-wide vectors, the block's threads striding: the store of a row norm.
// src is not __restrict__: it may be a buffer this kernel wrote (add_rms_norm
// re-reads `summed`), which the read-only (non-coherent) load path must not
// be used for.
template <typename T, int V, typename A>
__device__ __forceinline__ void store_scaled_row(
    const T* src, T* __restrict__ out, int64_t nvec, A r,
    const A* __restrict__ w) {
  for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
    const Vec<T, V> xv = load_vec<T, V>(src + v * V);
    Vec<T, V> o;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const A wk = w != nullptr ? w[v * V + k] : A(1);
      o.v[k] = static_cast<T>(static_cast<A>(xv.v[k]) * r * wk);
    }
    store_vec<T, V>(out + v * V, o);
  }
}

// Quotient and remainder of non-negative a, b; 32-bit when both fit (64-bit division is
// emulated on the GPU, several times the cost).
__device__ __forceinline__ void divmod(int64_t a, int64_t b, int64_t& q, int64_t& r) {
  if (((a | b) >> 32) == 0) {
    const uint32_t a32 = static_cast<uint32_t>(a), b32 = static_cast<uint32_t>(b);
    q = a32 / b32;
    r = a32 - static_cast<uint32_t>(q) * b32;
  } else {
    q = a / b;
    r = a - q * b;
  }
}

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

}  // namespace torchfuse::cuda
