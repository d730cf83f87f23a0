// RMSNorm CUDA kernels and the CUDA registration. Argument checks and
// allocation are shared with the CPU path (rms_norm.cpp); see there for the
// formulas.
//
// Rows that fit in registers (up to 512 threads x 4 vectors of 16 bytes: 16K
// bf16/fp16 or 8K fp32 elements) are read from memory exactly once, forward
// and backward:
//   * a row is spread over `tpr` threads (a power of two); rows of up to 32
//     threads share a block, wider rows get a block each;
//   * the backward loops over rows grid-stride with each thread owning fixed
//     columns, so the weight gradient accumulates in registers and each block
//     writes one float32 partial row; the partial rows are summed afterwards
//     in a fixed order (deterministic, no atomics).
// Longer rows are read twice (the second read mostly from L2), and their
// weight gradient comes from a column-parallel kernel.
#include "rms_norm.h"

#include "../common/cuda_utils.cuh"

#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <torch/library.h>

namespace torchfuse::rms_norm {
namespace {

using namespace torchfuse::cuda;

constexpr int kIters = 4;        // vectors per thread, register-resident path
constexpr int kMaxTpr = 512;     // threads per row, register-resident path
constexpr int kBlock = 256;      // threads per block for narrow rows
constexpr int kLargeBlock = 512; // threads per row, long-row path

template <typename T, int V>
__device__ __forceinline__ void to_acc(
    const Vec<T, V>& v, at::opmath_type<T> (&a)[V]) {
#pragma unroll
  for (int k = 0; k < V; ++k) a[k] = static_cast<at::opmath_type<T>>(v.v[k]);
}

// ------------------------------------------------------------------ forward
// blockDim = (tpr, rows per block). Loops are block-uniform so that every
// thread reaches every reduction.
template <typename T, int V>
__global__ void __launch_bounds__(kMaxTpr) fwd_reg_kernel(
    const T* __restrict__ x,
    const T* __restrict__ res,
    const at::opmath_type<T>* __restrict__ w,
    T* __restrict__ out,
    T* __restrict__ summed,
    at::opmath_type<T>* __restrict__ rstd,
    int64_t M,
    int nvec,
    at::opmath_type<T> eps) {
  using A = at::opmath_type<T>;
  __shared__ A smem[32];
  const int tpr = blockDim.x;
  const int64_t N = static_cast<int64_t>(nvec) * V;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < M;
       base += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t row = base + threadIdx.y;
    const bool valid = row < M;
    Vec<T, V> xv[kIters];
    A ss = 0;
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int v = threadIdx.x + i * tpr;
      if (valid && v < nvec) {
        const int64_t off = row * N + static_cast<int64_t>(v) * V;
        xv[i] = load_vec<T, V>(x + off);
        if (res != nullptr) {
          const Vec<T, V> rv = load_vec<T, V>(res + off);
#pragma unroll
          for (int k = 0; k < V; ++k) {
            xv[i].v[k] = static_cast<T>(
                static_cast<A>(xv[i].v[k]) + static_cast<A>(rv.v[k]));
          }
          store_vec<T, V>(summed + off, xv[i]);
        }
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const A a = static_cast<A>(xv[i].v[k]);
          ss += a * a;
        }
      }
    }
    ss = row_sum(ss, smem);
    const A r = rsqrt_acc(ss / static_cast<A>(N) + eps);
    if (valid && threadIdx.x == 0) rstd[row] = r;
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int v = threadIdx.x + i * tpr;
      if (valid && v < nvec) {
        Vec<T, V> o;
        if (w != nullptr) {
          const Vec<A, V> wv = load_vec<A, V>(w + static_cast<int64_t>(v) * V);
#pragma unroll
          for (int k = 0; k < V; ++k) {
            o.v[k] = static_cast<T>(static_cast<A>(xv[i].v[k]) * r * wv.v[k]);
          }
        } else {
#pragma unroll
          for (int k = 0; k < V; ++k) {
            o.v[k] = static_cast<T>(static_cast<A>(xv[i].v[k]) * r);
          }
        }
        store_vec<T, V>(out + row * N + static_cast<int64_t>(v) * V, o);
      }
    }
  }
}

// One block per row (grid-stride), two passes over the row.
template <typename T, int V>
__global__ void __launch_bounds__(kLargeBlock) fwd_large_kernel(
    const T* __restrict__ x,
    const T* __restrict__ res,
    const at::opmath_type<T>* __restrict__ w,
    T* __restrict__ out,
    T* __restrict__ summed,
    at::opmath_type<T>* __restrict__ rstd,
    int64_t M,
    int64_t nvec,
    at::opmath_type<T> eps) {
  using A = at::opmath_type<T>;
  __shared__ A smem[32];
  const int64_t N = nvec * V;
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const T* xr = x + row * N;
    A ss = 0;
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      Vec<T, V> xv = load_vec<T, V>(xr + v * V);
      if (res != nullptr) {
        const Vec<T, V> rv = load_vec<T, V>(res + row * N + v * V);
#pragma unroll
        for (int k = 0; k < V; ++k) {
          xv.v[k] = static_cast<T>(static_cast<A>(xv.v[k]) + static_cast<A>(rv.v[k]));
        }
        store_vec<T, V>(summed + row * N + v * V, xv);
      }
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const A a = static_cast<A>(xv.v[k]);
        ss += a * a;
      }
    }
    ss = block_sum(ss, smem);
    const A r = rsqrt_acc(ss / static_cast<A>(N) + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    // With a residual each thread re-reads exactly the summed vectors it
    // wrote itself, so no barrier is needed between the passes.
    const T* src = res != nullptr ? summed + row * N : xr;
    store_scaled_row<T, V>(src, out + row * N, nvec, r, w);
  }
}

// ----------------------------------------------------------------- backward
template <typename T, int V>
__global__ void __launch_bounds__(kMaxTpr) bwd_reg_kernel(
    const T* __restrict__ dy,
    const T* __restrict__ ds,
    const T* __restrict__ x,
    const at::opmath_type<T>* __restrict__ rstd,
    const at::opmath_type<T>* __restrict__ w,
    T* __restrict__ dx,
    at::opmath_type<T>* __restrict__ dw_partial,  // [gridDim.x, N] or null
    int64_t M,
    int nvec) {
  using A = at::opmath_type<T>;
  __shared__ A smem[32];
  const int tpr = blockDim.x;
  const int64_t N = static_cast<int64_t>(nvec) * V;
  A acc[kIters][V];
#pragma unroll
  for (int i = 0; i < kIters; ++i) {
#pragma unroll
    for (int k = 0; k < V; ++k) acc[i][k] = 0;
  }
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < M;
       base += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t row = base + threadIdx.y;
    const bool valid = row < M;
    Vec<T, V> xv[kIters], dv[kIters];
    A gx = 0;
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int v = threadIdx.x + i * tpr;
      if (valid && v < nvec) {
        const int64_t off = row * N + static_cast<int64_t>(v) * V;
        xv[i] = load_vec<T, V>(x + off);
        dv[i] = load_vec<T, V>(dy + off);
        Vec<A, V> wv;
        if (w != nullptr) wv = load_vec<A, V>(w + static_cast<int64_t>(v) * V);
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const A g = static_cast<A>(dv[i].v[k]) * (w != nullptr ? wv.v[k] : A(1));
          gx += g * static_cast<A>(xv[i].v[k]);
        }
      }
    }
    gx = row_sum(gx, smem);
    if (!valid) continue;  // block-uniform from here: no more barriers
    const A r = rstd[row];
    const A c = gx * r * r * r / static_cast<A>(N);
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int v = threadIdx.x + i * tpr;
      if (v < nvec) {
        const int64_t off = row * N + static_cast<int64_t>(v) * V;
        Vec<A, V> wv;
        if (w != nullptr) wv = load_vec<A, V>(w + static_cast<int64_t>(v) * V);
        Vec<T, V> sv;
        if (ds != nullptr) sv = load_vec<T, V>(ds + off);
        Vec<T, V> o;
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const A d = static_cast<A>(dv[i].v[k]);
          const A xa = static_cast<A>(xv[i].v[k]);
          A val = d * (w != nullptr ? wv.v[k] : A(1)) * r - xa * c;
          if (ds != nullptr) val += static_cast<A>(sv.v[k]);
          o.v[k] = static_cast<T>(val);
          acc[i][k] += d * xa * r;
        }
        store_vec<T, V>(dx + off, o);
      }
    }
  }
  if (dw_partial == nullptr) return;
  // Rows of the block that share columns (threadIdx.y > 0) fold their
  // accumulators into row 0 in a fixed order through shared memory, so each
  // block writes a single partial row.
  extern __shared__ __align__(16) unsigned char fold_raw[];
  A* fold = reinterpret_cast<A*>(fold_raw);  // [tpr * kIters * V]
  for (int y = 1; y < static_cast<int>(blockDim.y); ++y) {
    if (threadIdx.y == y) {
#pragma unroll
      for (int i = 0; i < kIters; ++i) {
#pragma unroll
        for (int k = 0; k < V; ++k) fold[(i * tpr + threadIdx.x) * V + k] = acc[i][k];
      }
    }
    __syncthreads();
    if (threadIdx.y == 0) {
#pragma unroll
      for (int i = 0; i < kIters; ++i) {
#pragma unroll
        for (int k = 0; k < V; ++k) acc[i][k] += fold[(i * tpr + threadIdx.x) * V + k];
      }
    }
    __syncthreads();
  }
  if (threadIdx.y != 0) return;
  A* p = dw_partial + static_cast<int64_t>(blockIdx.x) * N;
#pragma unroll
  for (int i = 0; i < kIters; ++i) {
    const int v = threadIdx.x + i * tpr;
    if (v < nvec) {
      Vec<A, V> o;
#pragma unroll
      for (int k = 0; k < V; ++k) o.v[k] = acc[i][k];
      store_vec<A, V>(p + static_cast<int64_t>(v) * V, o);
    }
  }
}

// dx for long rows: one block per row, two passes.
template <typename T, int V>
__global__ void __launch_bounds__(kLargeBlock) bwd_large_kernel(
    const T* __restrict__ dy,
    const T* __restrict__ ds,
    const T* __restrict__ x,
    const at::opmath_type<T>* __restrict__ rstd,
    const at::opmath_type<T>* __restrict__ w,
    T* __restrict__ dx,
    int64_t M,
    int64_t nvec) {
  using A = at::opmath_type<T>;
  __shared__ A smem[32];
  const int64_t N = nvec * V;
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const int64_t r0 = row * N;
    A gx = 0;
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      const Vec<T, V> xv = load_vec<T, V>(x + r0 + v * V);
      const Vec<T, V> dv = load_vec<T, V>(dy + r0 + v * V);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const A wk = w != nullptr ? w[v * V + k] : A(1);
        gx += static_cast<A>(dv.v[k]) * wk * static_cast<A>(xv.v[k]);
      }
    }
    gx = block_sum(gx, smem);
    const A r = rstd[row];
    const A c = gx * r * r * r / static_cast<A>(N);
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      const Vec<T, V> xv = load_vec<T, V>(x + r0 + v * V);
      const Vec<T, V> dv = load_vec<T, V>(dy + r0 + v * V);
      Vec<T, V> sv;
      if (ds != nullptr) sv = load_vec<T, V>(ds + r0 + v * V);
      Vec<T, V> o;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const A wk = w != nullptr ? w[v * V + k] : A(1);
        A val = static_cast<A>(dv.v[k]) * wk * r - static_cast<A>(xv.v[k]) * c;
        if (ds != nullptr) val += static_cast<A>(sv.v[k]);
        o.v[k] = static_cast<T>(val);
      }
      store_vec<T, V>(dx + r0 + v * V, o);
    }
  }
}

// Weight gradient for long rows: thread = column, blockIdx.y = a slice of
// rows; partial[slice, col] (summed afterwards in a fixed order).
template <typename T>
__global__ void dw_columns_kernel(
    const T* __restrict__ dy,
    const T* __restrict__ x,
    const at::opmath_type<T>* __restrict__ rstd,
    at::opmath_type<T>* __restrict__ partial,
    int64_t M,
    int64_t N,
    int64_t rows_per_slice) {
  using A = at::opmath_type<T>;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= N) return;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_slice;
  const int64_t r1 = r0 + rows_per_slice < M ? r0 + rows_per_slice : M;
  A acc = 0;
  for (int64_t r = r0; r < r1; ++r) {
    acc += static_cast<A>(dy[r * N + col]) * static_cast<A>(x[r * N + col]) * rstd[r];
  }
  partial[static_cast<int64_t>(blockIdx.y) * N + col] = acc;
}

// ------------------------------------------------------------------ launch
// out = partial.sum(0): a fixed-order reduction, so the weight gradient is the
// same from run to run.
void sum_rows(at::Tensor out, const at::Tensor& partial) {
  at::sum_out(out, partial, at::IntArrayRef{0});
}

struct Config {
  int vec;        // elements per access (1 when unaligned)
  int64_t nvec;   // accesses per row
  int tpr;        // threads per row (register path)
  int rows;       // rows per block (register path)
  bool reg;       // register-resident path
};

template <typename T>
Config choose(int64_t N, std::initializer_list<const void*> ptrs, const void* w) {
  using A = at::opmath_type<T>;
  constexpr int V = vec_width<T>();
  bool aligned = N % V == 0;
  for (const void* p : ptrs) aligned = aligned && (p == nullptr || is_aligned(p, 16));
  aligned = aligned && (w == nullptr || is_aligned(w, sizeof(A) * V));
  Config c;
  c.vec = aligned ? V : 1;
  c.nvec = N / c.vec;
  c.reg = c.nvec <= static_cast<int64_t>(kMaxTpr) * kIters;
  c.tpr = c.reg ? next_pow2(ceil_div(c.nvec, kIters)) : kLargeBlock;
  c.rows = c.tpr <= 32 ? kBlock / c.tpr : 1;
  // row_sum's shuffles use the full mask: whole warps, one row per block above 32
  TORCH_INTERNAL_ASSERT((c.tpr * c.rows) % 32 == 0 && (c.tpr <= 32 || c.rows == 1));
  return c;
}

int64_t grid_for(int64_t M, int rows_per_block, int threads) {
  const int64_t want = ceil_div(M, rows_per_block);
  const int64_t resident = static_cast<int64_t>(num_sms()) * (2048 / threads);
  return std::max<int64_t>(1, std::min<int64_t>(want, resident * 4));
}

template <typename T, int V>
void fwd_launch_v(const FwdParams& p, const Config& c) {
  using A = at::opmath_type<T>;
  auto stream = at::cuda::getCurrentCUDAStream();
  const T* x = p.x.const_data_ptr<T>();
  const T* res = p.residual.defined() ? p.residual.const_data_ptr<T>() : nullptr;
  T* summed = p.summed.defined() ? p.summed.mutable_data_ptr<T>() : nullptr;
  const A* w = p.weight.defined() ? p.weight.const_data_ptr<A>() : nullptr;
  T* out = p.out.mutable_data_ptr<T>();
  A* rstd = p.rstd.mutable_data_ptr<A>();
  const A eps = static_cast<A>(p.eps);
  if (c.reg) {
    const dim3 block(c.tpr, c.rows);
    const int64_t grid = grid_for(p.M, c.rows, c.tpr * c.rows);
    fwd_reg_kernel<T, V><<<grid, block, 0, stream>>>(
        x, res, w, out, summed, rstd, p.M, static_cast<int>(c.nvec), eps);
  } else {
    const int64_t grid = grid_for(p.M, 1, kLargeBlock);
    fwd_large_kernel<T, V><<<grid, kLargeBlock, 0, stream>>>(
        x, res, w, out, summed, rstd, p.M, c.nvec, eps);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void fwd_launch(const FwdParams& p) {
  constexpr int V = vec_width<T>();
  const Config c = choose<T>(
      p.N,
      {p.x.const_data_ptr(), p.out.const_data_ptr(),
       p.residual.defined() ? p.residual.const_data_ptr() : nullptr,
       p.summed.defined() ? p.summed.const_data_ptr() : nullptr},
      p.weight.defined() ? p.weight.const_data_ptr() : nullptr);
  if (c.vec == V) {
    fwd_launch_v<T, V>(p, c);
  } else {
    fwd_launch_v<T, 1>(p, c);
  }
}

template <typename T, int V>
void bwd_launch_v(const BwdParams& p, const Config& c) {
  using A = at::opmath_type<T>;
  auto stream = at::cuda::getCurrentCUDAStream();
  const T* dy = p.dy.const_data_ptr<T>();
  const T* ds = p.dsummed.defined() ? p.dsummed.const_data_ptr<T>() : nullptr;
  const T* x = p.x.const_data_ptr<T>();
  const A* rstd = p.rstd.const_data_ptr<A>();
  const A* w = p.weight.defined() ? p.weight.const_data_ptr<A>() : nullptr;
  T* dx = p.dx.mutable_data_ptr<T>();
  const bool want_dw = p.dweight.defined();
  if (c.reg) {
    const dim3 block(c.tpr, c.rows);
    // With a weight gradient, each block writes one partial row: keep the
    // grid to about two resident blocks per SM so that the partial rows (and
    // their final sum) stay small next to the data.
    const int64_t grid = want_dw
        ? std::max<int64_t>(1, std::min<int64_t>(ceil_div(p.M, c.rows), 2 * num_sms()))
        : grid_for(p.M, c.rows, c.tpr * c.rows);
    at::Tensor partial;
    A* part = nullptr;
    size_t smem = 0;
    if (want_dw) {
      partial = at::empty({grid, p.N}, p.dweight.options());
      part = partial.mutable_data_ptr<A>();
      if (c.rows > 1) smem = sizeof(A) * c.tpr * kIters * V;
    }
    bwd_reg_kernel<T, V><<<grid, block, smem, stream>>>(
        dy, ds, x, rstd, w, dx, part, p.M, static_cast<int>(c.nvec));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (want_dw) sum_rows(p.dweight, partial);
  } else {
    const int64_t grid = grid_for(p.M, 1, kLargeBlock);
    bwd_large_kernel<T, V><<<grid, kLargeBlock, 0, stream>>>(
        dy, ds, x, rstd, w, dx, p.M, c.nvec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (want_dw) {
      constexpr int kThreads = 256;
      const int64_t col_blocks = ceil_div(p.N, kThreads);
      const int64_t slices = std::max<int64_t>(
          1, std::min<int64_t>(p.M, ceil_div(4 * num_sms(), col_blocks)));
      const int64_t rows_per_slice = ceil_div(p.M, slices);
      const int64_t used = ceil_div(p.M, rows_per_slice);
      at::Tensor partial = at::empty({used, p.N}, p.dweight.options());
      dw_columns_kernel<T><<<dim3(col_blocks, used), kThreads, 0, stream>>>(
          dy, x, rstd, partial.mutable_data_ptr<A>(), p.M, p.N, rows_per_slice);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      sum_rows(p.dweight, partial);
    }
  }
}

template <typename T>
void bwd_launch(const BwdParams& p) {
  constexpr int V = vec_width<T>();
  const Config c = choose<T>(
      p.N,
      {p.dy.const_data_ptr(), p.x.const_data_ptr(), p.dx.const_data_ptr(),
       p.dsummed.defined() ? p.dsummed.const_data_ptr() : nullptr},
      p.weight.defined() ? p.weight.const_data_ptr() : nullptr);
  if (c.vec == V) {
    bwd_launch_v<T, V>(p, c);
  } else {
    bwd_launch_v<T, 1>(p, c);
  }
}

void fwd_cuda(const FwdParams& p) {
  const c10::cuda::CUDAGuard guard(p.x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, p.x.scalar_type(), "rms_norm_cuda",
      [&] { fwd_launch<scalar_t>(p); });
}

void bwd_cuda(const BwdParams& p) {
  const c10::cuda::CUDAGuard guard(p.x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, p.x.scalar_type(), "rms_norm_backward_cuda",
      [&] { bwd_launch<scalar_t>(p); });
}

}  // namespace

TORCH_LIBRARY_IMPL(torchfuse, CUDA, m) {
  m.impl("rms_norm", &rms_norm_op<fwd_cuda>);
  m.impl("add_rms_norm", &add_rms_norm_op<fwd_cuda>);
  m.impl("rms_norm_backward", &rms_norm_backward_op<bwd_cuda>);
}

}  // namespace torchfuse::rms_norm
