// Gram matrices / style loss: the CUDA passes around the GEMMs (cuBLAS,
// through at::baddbmm in gram.cpp) and the CUDA registration.
//
// loss: one block per row of C elements (grid-stride over rows), its sum of
// squares written as the row's partial sum; a second single-block kernel adds
// the partial sums in a fixed order (deterministic, no atomics) and scales
// for the mean.
// sym: 32 x 32 tiles through shared memory, so that the transposed operand
// w[n, j, i] is read coalesced too.
#include "gram.h"

#include "../common/cuda_utils.cuh"

#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <torch/library.h>

namespace torchfuse::gram {
namespace {

using namespace torchfuse::cuda;

constexpr int kBlock = 256;
constexpr int kTile = 32;
constexpr int kTileRows = 8;  // sym's block: kTile x kTileRows threads

int64_t grid_cap() {
  return static_cast<int64_t>(num_sms()) * 32;
}

template <typename T, typename A>
__global__ void loss_rows_kernel(
    const T* __restrict__ g, const A* __restrict__ t, A* __restrict__ d,
    T* __restrict__ out, A* __restrict__ part, int64_t rows, int64_t C, bool t_batched) {
  __shared__ A smem[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t n = r / C, i = r - n * C;
    const A* tr = t + (t_batched ? n * C * C : 0) + i * C;
    A acc = 0;
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
      const A v = static_cast<A>(g[r * C + j]) - tr[j];
      d[r * C + j] = v;
      if (out != nullptr) {
        out[r * C + j] = static_cast<T>(v * v);
      } else {
        acc += v * v;
      }
    }
    if (part != nullptr) {
      acc = block_sum(acc, smem);
      if (threadIdx.x == 0) part[r] = acc;
    }
  }
}

// One block: thread k adds partial sums k, k + blockDim.x, ... in order, then
// the block's fixed-shape reduction.
template <typename A>
__global__ void loss_total_kernel(const A* __restrict__ part, A* __restrict__ out, int64_t rows,
                                  A scale) {
  __shared__ A smem[32];
  A acc = 0;
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) acc += part[r];
  acc = block_sum(acc, smem);
  if (threadIdx.x == 0) out[0] = acc * scale;
}

template <typename T, typename TA, typename A>
__global__ void sym_kernel(
    const TA* __restrict__ a, const A* __restrict__ g, bool g_full, T* __restrict__ s,
    A* __restrict__ dt, int64_t N, int64_t C, A coef) {
  __shared__ A tile[kTile][kTile + 1];
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const A g0 = g != nullptr && !g_full ? g[0] : A(1);
  for (int64_t n = blockIdx.z; n < N; n += gridDim.z) {
    const int64_t base = n * C * C;
    // the transposed tile: w[n, j0 + y, i0 + x], read along rows
    for (int y = threadIdx.y; y < kTile; y += kTileRows) {
      const int64_t j = j0 + y, i = i0 + threadIdx.x;
      if (j < C && i < C) {
        const int64_t idx = base + j * C + i;
        tile[y][threadIdx.x] = static_cast<A>(a[idx]) * (g_full ? g[idx] : g0);
      }
    }
    __syncthreads();
    for (int y = threadIdx.y; y < kTile; y += kTileRows) {
      const int64_t i = i0 + y, j = j0 + threadIdx.x;
      if (i < C && j < C) {
        const int64_t idx = base + i * C + j;
        const A w = static_cast<A>(a[idx]) * (g_full ? g[idx] : g0);
        s[idx] = static_cast<T>(w + tile[threadIdx.x][y]);
        if (dt != nullptr) dt[idx] = -coef * w;
      }
    }
    __syncthreads();  // the tile is rewritten for the next sample
  }
}

template <typename T>
void loss_launch(const LossParams& p) {
  using A = at::opmath_type<T>;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t rows = p.N * p.C;
  const bool none = p.reduction == Reduction::None;
  at::Tensor part;
  if (!none) part = at::empty({rows}, p.d.options());
  const int block = static_cast<int>(std::min<int64_t>(kBlock, std::max<int64_t>(
      32, ceil_div(p.C, 32) * 32)));
  const int64_t grid = std::min<int64_t>(rows, grid_cap());
  loss_rows_kernel<T, A><<<grid, block, 0, stream>>>(
      p.gram.const_data_ptr<T>(), p.target.const_data_ptr<A>(), p.d.mutable_data_ptr<A>(),
      none ? p.out.mutable_data_ptr<T>() : nullptr,
      none ? nullptr : part.mutable_data_ptr<A>(), rows, p.C, p.t_batched);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (none) return;
  const A scale = p.reduction == Reduction::Mean
      ? static_cast<A>(1.0 / (static_cast<double>(rows) * static_cast<double>(p.C)))
      : A(1);
  loss_total_kernel<A><<<1, 1024, 0, stream>>>(
      part.const_data_ptr<A>(), p.out.mutable_data_ptr<A>(), rows, scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename TA>
void sym_launch(const SymParams& p) {
  using A = at::opmath_type<T>;
  const int64_t tiles = ceil_div(p.C, kTile);
  TORCH_CHECK(tiles <= 65535, "gram_matrix: too many channels for the CUDA kernel (", p.C, ")");
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(tiles),
                  static_cast<unsigned>(std::min<int64_t>(p.N, 65535)));
  const A* g = p.g.defined() ? p.g.const_data_ptr<A>() : nullptr;
  sym_kernel<T, TA, A><<<grid, dim3(kTile, kTileRows), 0, at::cuda::getCurrentCUDAStream()>>>(
      p.a.const_data_ptr<TA>(), g, g != nullptr && p.g.dim() > 0, p.s.mutable_data_ptr<T>(),
      p.dtarget.defined() ? p.dtarget.mutable_data_ptr<A>() : nullptr, p.N, p.C,
      static_cast<A>(p.coef));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void loss_cuda(const LossParams& p) {
  const c10::cuda::CUDAGuard guard(p.gram.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, p.gram.scalar_type(), "style_loss_cuda",
      [&] { loss_launch<scalar_t>(p); });
}

void sym_cuda(const SymParams& p) {
  const c10::cuda::CUDAGuard guard(p.s.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, p.s.scalar_type(), "gram_sym_cuda", [&] {
        using A = at::opmath_type<scalar_t>;
        if (p.a.scalar_type() == p.s.scalar_type()) {
          sym_launch<scalar_t, scalar_t>(p);
        } else {
          TORCH_CHECK(p.a.scalar_type() == c10::CppTypeToScalarType<A>::value,
                      "gram: unexpected dtype ", p.a.scalar_type());
          sym_launch<scalar_t, A>(p);
        }
      });
}

const Launchers kCuda{loss_cuda, sym_cuda};

}  // namespace

TORCH_LIBRARY_IMPL(torchfuse, CUDA, m) {
  m.impl("gram_matrix", &gram_matrix_op<kCuda>);
  m.impl("gram_matrix_backward", &gram_matrix_backward_op<kCuda>);
  m.impl("style_loss", &style_loss_op<kCuda>);
  m.impl("style_loss_backward", &style_loss_backward_op<kCuda>);
}

}  // namespace torchfuse::gram
