// L2 normalization / cosine_linear CUDA kernels and the CUDA registration.
// Checks, layout and formulas: l2_norm.cpp / l2_norm.h.
//
// Row layout (inner == 1: dim last in memory, cosine_linear's rows): a row is
// spread over `tpr` threads (a power of two; rows of up to 32 threads share a
// block), 16-byte vector accesses when the row and pointers allow; pass one
// reduces, pass two re-reads the row (from L1/L2) and writes.
// Column layout (inner > 1, NCHW with dim=1): a block is 32 consecutive inner
// positions x 8 channel slices (coalesced 32-wide accesses along inner); the
// 8 partial sums are combined through shared memory in a fixed order. When
// there are too few tiles to fill the GPU (batch 1), the channels are split
// across blocks, forward and backward alike: a first kernel writes per-split
// sums (of x^2; of dy * w * x), the second adds them in a fixed order and
// writes its channel slice of out (dx).
// Weight gradients: per-slice partial sums written by column-parallel
// kernels, then summed in a fixed order (deterministic, no atomics).
#include "l2_norm.h"

#include "../common/cuda_utils.cuh"

#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <torch/library.h>

namespace torchfuse::l2_norm {
namespace {

using namespace torchfuse::cuda;

constexpr int kBlock = 256;     // threads per block
constexpr int kMaxTpr = 512;    // threads per row, row layout
constexpr int kTileX = 32;      // inner positions per block, column layout
constexpr int kTileY = 8;       // channel slices per block, column layout

template <typename A>
__device__ __forceinline__ A inv_clamped(A n, A eps) {
  return A(1) / (n < eps ? eps : n);  // a NaN norm stays NaN, as clamp_min
}

template <typename A>
__device__ __forceinline__ A sqrt_acc(A v) {
  if constexpr (sizeof(A) == 8) {
    return ::sqrt(v);
  } else {
    return ::sqrtf(v);
  }
}

// ------------------------------------------------------------ row layout
// blockDim = (tpr, rows per block); loops are block-uniform so every thread
// reaches every reduction. out == nullptr: norms only.
template <typename T, int V>
__global__ void __launch_bounds__(kMaxTpr) row_fwd_kernel(
    const T* __restrict__ x,
    const at::opmath_type<T>* __restrict__ w,
    T* __restrict__ out,
    at::opmath_type<T>* __restrict__ norm,
    int64_t M,
    int64_t nvec,
    at::opmath_type<T> eps) {
  using A = at::opmath_type<T>;
  __shared__ A smem[32];
  const int64_t N = nvec * V;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < M;
       base += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t row = base + threadIdx.y;
    const bool valid = row < M;
    const T* xr = x + row * N;
    A ss = 0;
    if (valid) {
      for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
        const Vec<T, V> xv = load_vec<T, V>(xr + v * V);
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const A a = static_cast<A>(xv.v[k]);
          ss += a * a;
        }
      }
    }
    ss = row_sum(ss, smem);
    if (!valid) continue;  // no barrier below
    const A n = sqrt_acc(ss);
    if (threadIdx.x == 0) norm[row] = n;
    if (out == nullptr) continue;
    const A r = inv_clamped(n, eps);
    store_scaled_row<T, V>(xr, out + row * N, nvec, r, w);
  }
}

// prescaled: dx = dy - x * (m ? r^2 * dot(dy, x) : 0)
// else:      dx = r * g - x * (m ? r^3 * dot(g, x) : 0),  g = dy * w
template <typename T, int V>
__global__ void __launch_bounds__(kMaxTpr) row_bwd_kernel(
    const T* __restrict__ dy,
    const T* __restrict__ x,
    const at::opmath_type<T>* __restrict__ norm,
    const at::opmath_type<T>* __restrict__ w,
    T* __restrict__ dx,
    int64_t M,
    int64_t nvec,
    at::opmath_type<T> eps,
    bool prescaled) {
  using A = at::opmath_type<T>;
  __shared__ A smem[32];
  const int64_t N = nvec * V;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < M;
       base += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t row = base + threadIdx.y;
    const bool valid = row < M;
    const int64_t r0 = row * N;
    A d = 0;
    if (valid) {
      for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
        const Vec<T, V> xv = load_vec<T, V>(x + r0 + v * V);
        const Vec<T, V> gv = load_vec<T, V>(dy + r0 + v * V);
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const A wk = w != nullptr ? w[v * V + k] : A(1);
          d += static_cast<A>(gv.v[k]) * wk * static_cast<A>(xv.v[k]);
        }
      }
    }
    d = row_sum(d, smem);
    if (!valid) continue;
    const A n = norm[row];
    const A r = inv_clamped(n, eps);
    const A kk = n >= eps ? (prescaled ? r * r * d : r * r * r * d) : A(0);
    const A gs = prescaled ? A(1) : r;
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      const Vec<T, V> xv = load_vec<T, V>(x + r0 + v * V);
      const Vec<T, V> gv = load_vec<T, V>(dy + r0 + v * V);
      Vec<T, V> o;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const A wk = w != nullptr ? w[v * V + k] : A(1);
        o.v[k] = static_cast<T>(
            static_cast<A>(gv.v[k]) * wk * gs - static_cast<A>(xv.v[k]) * kk);
      }
      store_vec<T, V>(dx + r0 + v * V, o);
    }
  }
}

// dweight partials, row layout: thread = channel (coalesced), blockIdx.y = a
// slice of rows; partial[slice, c] = sum over the slice of dy * x * r.
template <typename T>
__global__ void row_dw_kernel(
    const T* __restrict__ dy,
    const T* __restrict__ x,
    const at::opmath_type<T>* __restrict__ norm,
    at::opmath_type<T>* __restrict__ partial,
    int64_t M,
    int64_t C,
    int64_t rows_per_slice,
    at::opmath_type<T> eps) {
  using A = at::opmath_type<T>;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_slice;
  const int64_t r1 = r0 + rows_per_slice < M ? r0 + rows_per_slice : M;
  A acc = 0;
  for (int64_t r = r0; r < r1; ++r) {
    acc += static_cast<A>(dy[r * C + c]) * static_cast<A>(x[r * C + c]) *
        inv_clamped(norm[r], eps);
  }
  partial[static_cast<int64_t>(blockIdx.y) * C + c] = acc;
}

// --------------------------------------------------------- column layout
// Sum over this block's channel range [c0, c1) of f(c) for one inner
// position, combined across threadIdx.y in a fixed order; every thread of
// the block must call it, and every thread gets the result for its column.
template <typename A, typename F>
__device__ __forceinline__ A col_block_sum(
    bool valid, int64_t c0, int64_t c1, A (*red)[kTileX + 1], const F& f) {
  A s = 0;
  if (valid) {
    for (int64_t c = c0 + threadIdx.y; c < c1; c += kTileY) s += f(c);
  }
  red[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0) {
    A t = red[0][threadIdx.x];
#pragma unroll
    for (int y = 1; y < kTileY; ++y) t += red[y][threadIdx.x];
    red[0][threadIdx.x] = t;
  }
  __syncthreads();
  s = red[0][threadIdx.x];
  __syncthreads();  // red is reused by the next call
  return s;
}

// The column path's term for channel c at element e of x: x^2 (dy ==
// nullptr: the forward's sum of squares) or dy * w * x (the backward's dot).
template <typename T>
__device__ __forceinline__ at::opmath_type<T> col_term(
    const T* x, const T* dy, const at::opmath_type<T>* w, int64_t e, int64_t c) {
  using A = at::opmath_type<T>;
  const A a = static_cast<A>(x[e]);
  if (dy == nullptr) return a * a;
  const A wc = w != nullptr ? w[c] : A(1);
  return static_cast<A>(dy[e]) * wc * a;
}

// col_term summed over channels [c0, c1) at the column starting at element
// off (col_block_sum: every thread of the block calls it).
template <typename T>
__device__ __forceinline__ at::opmath_type<T> col_sum(
    bool valid, int64_t c0, int64_t c1, at::opmath_type<T> (*red)[kTileX + 1], const T* x,
    const T* dy, const at::opmath_type<T>* w, int64_t off, int64_t inner) {
  return col_block_sum<at::opmath_type<T>>(
      valid, c0, c1, red, [&](int64_t c) { return col_term(x, dy, w, off + c * inner, c); });
}

// The sum over all C channels at position pos (= o * inner + i, column
// element off): with partial == nullptr (one split) computed here, else the
// per-split partial sums added in split order (deterministic). Block-uniform.
template <typename T>
__device__ __forceinline__ at::opmath_type<T> col_total(
    bool valid, const at::opmath_type<T>* partial, int64_t splits, int64_t stride, int64_t pos,
    int64_t C, at::opmath_type<T> (*red)[kTileX + 1], const T* x, const T* dy,
    const at::opmath_type<T>* w, int64_t off, int64_t inner) {
  using A = at::opmath_type<T>;
  if (partial == nullptr) return col_sum<T>(valid, 0, C, red, x, dy, w, off, inner);
  A s = 0;
  if (valid) {
    for (int64_t k = 0; k < splits; ++k) s += partial[k * stride + pos];
  }
  return s;
}

// Split path, first kernel: partial[split, o * inner + i] = the sum over the
// split's channels of x^2 (dy == nullptr: forward) or of dy * w * x
// (backward). grid = (tiles, splits).
template <typename T>
__global__ void col_partial_kernel(
    const T* __restrict__ x,
    const T* __restrict__ dy,
    const at::opmath_type<T>* __restrict__ w,
    at::opmath_type<T>* __restrict__ partial,
    int64_t outer,
    int64_t C,
    int64_t inner,
    int64_t c_per_split) {
  using A = at::opmath_type<T>;
  __shared__ A red[kTileY][kTileX + 1];
  const int64_t per_outer = ceil_div(inner, kTileX);
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * c_per_split;
  const int64_t c1 = c0 + c_per_split < C ? c0 + c_per_split : C;
  for (int64_t t = blockIdx.x; t < outer * per_outer; t += gridDim.x) {
    const int64_t o = t / per_outer;
    const int64_t i = (t % per_outer) * kTileX + threadIdx.x;
    const bool valid = i < inner;
    const int64_t off = o * C * inner + i;
    const A s = col_sum<T>(valid, c0, c1, red, x, dy, w, off, inner);
    if (valid && threadIdx.y == 0) {
      partial[static_cast<int64_t>(blockIdx.y) * outer * inner + o * inner + i] = s;
    }
  }
}

// Writes out for this block's channel slice (grid.y = splits). With
// partial == nullptr (one split) the sum of squares is computed here.
template <typename T>
__global__ void col_fwd_kernel(
    const T* __restrict__ x,
    const at::opmath_type<T>* __restrict__ w,
    const at::opmath_type<T>* __restrict__ partial,
    T* __restrict__ out,
    at::opmath_type<T>* __restrict__ norm,
    int64_t outer,
    int64_t C,
    int64_t inner,
    int64_t c_per_split,
    at::opmath_type<T> eps) {
  using A = at::opmath_type<T>;
  __shared__ A red[kTileY][kTileX + 1];
  const int64_t per_outer = ceil_div(inner, kTileX);
  const int64_t splits = gridDim.y;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * c_per_split;
  const int64_t c1 = c0 + c_per_split < C ? c0 + c_per_split : C;
  for (int64_t t = blockIdx.x; t < outer * per_outer; t += gridDim.x) {
    const int64_t o = t / per_outer;
    const int64_t i = (t % per_outer) * kTileX + threadIdx.x;
    const bool valid = i < inner;
    const int64_t pos = o * inner + i, off = o * C * inner + i;
    const A ss = col_total<T>(valid, partial, splits, outer * inner, pos, C, red, x, nullptr,
                              nullptr, off, inner);
    if (!valid) continue;  // no barrier below
    const A n = sqrt_acc(ss);
    if (blockIdx.y == 0 && threadIdx.y == 0) norm[pos] = n;
    const A r = inv_clamped(n, eps);
    for (int64_t c = c0 + threadIdx.y; c < c1; c += kTileY) {
      const A wc = w != nullptr ? w[c] : A(1);
      out[off + c * inner] = static_cast<T>(static_cast<A>(x[off + c * inner]) * r * wc);
    }
  }
}

// dx for this block's channel slice (grid.y = splits). With partial ==
// nullptr (one split) the sum of dy * w * x is computed here.
template <typename T>
__global__ void col_bwd_kernel(
    const T* __restrict__ dy,
    const T* __restrict__ x,
    const at::opmath_type<T>* __restrict__ norm,
    const at::opmath_type<T>* __restrict__ w,
    const at::opmath_type<T>* __restrict__ partial,
    T* __restrict__ dx,
    int64_t outer,
    int64_t C,
    int64_t inner,
    int64_t c_per_split,
    at::opmath_type<T> eps) {
  using A = at::opmath_type<T>;
  __shared__ A red[kTileY][kTileX + 1];
  const int64_t per_outer = ceil_div(inner, kTileX);
  const int64_t splits = gridDim.y;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * c_per_split;
  const int64_t c1 = c0 + c_per_split < C ? c0 + c_per_split : C;
  for (int64_t t = blockIdx.x; t < outer * per_outer; t += gridDim.x) {
    const int64_t o = t / per_outer;
    const int64_t i = (t % per_outer) * kTileX + threadIdx.x;
    const bool valid = i < inner;
    const int64_t pos = o * inner + i, off = o * C * inner + i;
    const A d = col_total<T>(valid, partial, splits, outer * inner, pos, C, red, x, dy, w, off,
                             inner);
    if (!valid) continue;  // no barrier below
    const A n = norm[pos];
    const A r = inv_clamped(n, eps);
    const A kk = n >= eps ? r * r * r * d : A(0);
    for (int64_t c = c0 + threadIdx.y; c < c1; c += kTileY) {
      const A wc = w != nullptr ? w[c] : A(1);
      dx[off + c * inner] = static_cast<T>(
          static_cast<A>(dy[off + c * inner]) * wc * r - static_cast<A>(x[off + c * inner]) * kk);
    }
  }
}

// dweight partials, column layout: block = (channel c, slice of outer);
// partial[slice, c] = sum over the slice's (o, i) of dy * x * r.
template <typename T>
__global__ void col_dw_kernel(
    const T* __restrict__ dy,
    const T* __restrict__ x,
    const at::opmath_type<T>* __restrict__ norm,
    at::opmath_type<T>* __restrict__ partial,
    int64_t outer,
    int64_t C,
    int64_t inner,
    int64_t outer_per_slice,
    at::opmath_type<T> eps) {
  using A = at::opmath_type<T>;
  __shared__ A smem[32];
  const int64_t c = blockIdx.x;
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * outer_per_slice;
  const int64_t o1 = o0 + outer_per_slice < outer ? o0 + outer_per_slice : outer;
  A acc = 0;
  for (int64_t o = o0; o < o1; ++o) {
    const int64_t off = (o * C + c) * inner;
    for (int64_t i = threadIdx.x; i < inner; i += blockDim.x) {
      acc += static_cast<A>(dy[off + i]) * static_cast<A>(x[off + i]) *
          inv_clamped(norm[o * inner + i], eps);
    }
  }
  acc = block_sum(acc, smem);
  if (threadIdx.x == 0) partial[static_cast<int64_t>(blockIdx.y) * C + c] = acc;
}

// ---------------------------------------------------------------- epilogue
// dst[i, j] = src[i, j] * r(nrow[i]) * r(ncol[j]) + bias[j]; src may alias dst
// (each element is read, then written, by the same thread).
template <typename T, int V>
__global__ void scale_kernel(
    const T* src,
    T* dst,
    const at::opmath_type<T>* __restrict__ nrow,
    const at::opmath_type<T>* __restrict__ ncol,
    const at::opmath_type<T>* __restrict__ bias,
    int64_t M,
    int64_t ovec,
    at::opmath_type<T> eps) {
  using A = at::opmath_type<T>;
  const int64_t total = M * ovec;
  const int64_t O = ovec * V;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / ovec;
    const int64_t j0 = (e % ovec) * V;
    const A ri = inv_clamped(nrow[i], eps);
    const Vec<T, V> sv = load_vec<T, V>(src + i * O + j0);
    Vec<T, V> o;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      A val = static_cast<A>(sv.v[k]) * ri * inv_clamped(ncol[j0 + k], eps);
      if (bias != nullptr) val += bias[j0 + k];
      o.v[k] = static_cast<T>(val);
    }
    store_vec<T, V>(dst + i * O + j0, o);
  }
}

// ------------------------------------------------------------------ launch
int64_t grid_cap(int threads) {
  return static_cast<int64_t>(num_sms()) * (2048 / threads) * 4;
}

template <typename T>
bool vec_ok(int64_t n, std::initializer_list<const void*> ptrs) {
  bool ok = n % vec_width<T>() == 0;
  for (const void* p : ptrs) ok = ok && (p == nullptr || is_aligned(p, 16));
  return ok;
}

struct RowConfig {
  int tpr, rows;
  int64_t grid;
};

RowConfig row_config(int64_t M, int64_t nvec) {
  RowConfig c;
  c.tpr = next_pow2(std::min<int64_t>(kMaxTpr, std::max<int64_t>(1, ceil_div(nvec, 4))));
  c.rows = c.tpr <= 32 ? kBlock / c.tpr : 1;
  // row_sum's shuffles use the full mask: whole warps, one row per block above 32
  TORCH_INTERNAL_ASSERT((c.tpr * c.rows) % 32 == 0 && (c.tpr <= 32 || c.rows == 1));
  c.grid = std::max<int64_t>(
      1, std::min<int64_t>(ceil_div(M, c.rows), grid_cap(c.tpr * c.rows)));
  return c;
}

// Column path blocks: kTileX positions by kTileY channel lanes; the
// channels are split across blocks (grid.y) when the tiles alone cannot fill
// the GPU, at most C / 16 splits so that each still has work. The forward and
// the backward split alike: SSD's conv4_3 L2Norm at batch 1, (1, 512, 38, 38),
// is 46 tiles for 132 SMs.
struct ColSplit {
  dim3 block, grid;
  int64_t c_per_split, used;
};

ColSplit col_split(int64_t outer, int64_t C, int64_t inner) {
  ColSplit cs;
  cs.block = dim3(kTileX, kTileY);
  const int64_t tiles = outer * ceil_div(inner, kTileX);
  const int64_t want = 2 * static_cast<int64_t>(num_sms());
  const int64_t splits =
      tiles >= want ? 1 : std::max<int64_t>(1, std::min<int64_t>(ceil_div(want, tiles), C / 16));
  cs.c_per_split = ceil_div(C, splits);
  cs.used = ceil_div(C, cs.c_per_split);
  cs.grid = dim3(static_cast<unsigned>(std::min(tiles, grid_cap(kTileX * kTileY))),
                 static_cast<unsigned>(cs.used));
  return cs;
}

template <typename T, int V>
void row_fwd_launch(const FwdParams& p) {
  using A = at::opmath_type<T>;
  const int64_t nvec = p.C / V;
  const RowConfig c = row_config(p.outer, nvec);
  row_fwd_kernel<T, V><<<c.grid, dim3(c.tpr, c.rows), 0, at::cuda::getCurrentCUDAStream()>>>(
      p.x.const_data_ptr<T>(),
      p.weight.defined() ? p.weight.const_data_ptr<A>() : nullptr,
      p.out.defined() ? p.out.mutable_data_ptr<T>() : nullptr,
      p.norm.mutable_data_ptr<A>(), p.outer, nvec, static_cast<A>(p.eps));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void fwd_launch(const FwdParams& p) {
  using A = at::opmath_type<T>;
  auto stream = at::cuda::getCurrentCUDAStream();
  if (p.inner == 1) {
    if (vec_ok<T>(p.C, {p.x.const_data_ptr(),
                        p.out.defined() ? p.out.const_data_ptr() : nullptr})) {
      row_fwd_launch<T, vec_width<T>()>(p);
    } else {
      row_fwd_launch<T, 1>(p);
    }
    return;
  }
  const T* x = p.x.const_data_ptr<T>();
  const A* w = p.weight.defined() ? p.weight.const_data_ptr<A>() : nullptr;
  T* out = p.out.mutable_data_ptr<T>();
  A* norm = p.norm.mutable_data_ptr<A>();
  const A eps = static_cast<A>(p.eps);
  const ColSplit cs = col_split(p.outer, p.C, p.inner);
  if (cs.used == 1) {
    col_fwd_kernel<T><<<cs.grid, cs.block, 0, stream>>>(
        x, w, nullptr, out, norm, p.outer, p.C, p.inner, cs.c_per_split, eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  at::Tensor partial = at::empty({cs.used, p.outer * p.inner}, p.norm.options());
  col_partial_kernel<T><<<cs.grid, cs.block, 0, stream>>>(
      x, nullptr, nullptr, partial.mutable_data_ptr<A>(), p.outer, p.C, p.inner, cs.c_per_split);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  col_fwd_kernel<T><<<cs.grid, cs.block, 0, stream>>>(
      x, w, partial.const_data_ptr<A>(), out, norm, p.outer, p.C, p.inner, cs.c_per_split, eps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int V>
void row_bwd_launch(const BwdParams& p) {
  using A = at::opmath_type<T>;
  const int64_t nvec = p.C / V;
  const RowConfig c = row_config(p.outer, nvec);
  row_bwd_kernel<T, V><<<c.grid, dim3(c.tpr, c.rows), 0, at::cuda::getCurrentCUDAStream()>>>(
      p.dy.const_data_ptr<T>(), p.x.const_data_ptr<T>(), p.norm.const_data_ptr<A>(),
      p.weight.defined() ? p.weight.const_data_ptr<A>() : nullptr,
      p.dx.mutable_data_ptr<T>(), p.outer, nvec, static_cast<A>(p.eps), p.prescaled);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void bwd_launch(const BwdParams& p) {
  using A = at::opmath_type<T>;
  auto stream = at::cuda::getCurrentCUDAStream();
  const T* dy = p.dy.const_data_ptr<T>();
  const T* x = p.x.const_data_ptr<T>();
  const A* norm = p.norm.const_data_ptr<A>();
  const A eps = static_cast<A>(p.eps);
  if (p.inner == 1) {
    if (vec_ok<T>(p.C, {p.dy.const_data_ptr(), p.x.const_data_ptr(), p.dx.const_data_ptr()})) {
      row_bwd_launch<T, vec_width<T>()>(p);
    } else {
      row_bwd_launch<T, 1>(p);
    }
  } else {
    TORCH_INTERNAL_ASSERT(!p.prescaled, "prescaled backward is row-only");
    const A* w = p.weight.defined() ? p.weight.const_data_ptr<A>() : nullptr;
    const ColSplit cs = col_split(p.outer, p.C, p.inner);
    at::Tensor partial;
    if (cs.used > 1) {
      partial = at::empty({cs.used, p.outer * p.inner}, p.norm.options());
      col_partial_kernel<T><<<cs.grid, cs.block, 0, stream>>>(
          x, dy, w, partial.mutable_data_ptr<A>(), p.outer, p.C, p.inner, cs.c_per_split);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    col_bwd_kernel<T><<<cs.grid, cs.block, 0, stream>>>(
        dy, x, norm, w, cs.used > 1 ? partial.const_data_ptr<A>() : nullptr,
        p.dx.mutable_data_ptr<T>(), p.outer, p.C, p.inner, cs.c_per_split, eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (!p.dweight.defined()) return;
  at::Tensor partial;
  if (p.inner == 1) {
    constexpr int kThreads = 256;
    const int64_t col_blocks = ceil_div(p.C, kThreads);
    const int64_t slices = std::max<int64_t>(
        1, std::min<int64_t>(p.outer, ceil_div(4 * num_sms(), col_blocks)));
    const int64_t rows_per_slice = ceil_div(p.outer, slices);
    const int64_t used = ceil_div(p.outer, rows_per_slice);
    partial = at::empty({used, p.C}, p.dweight.options());
    row_dw_kernel<T><<<dim3(col_blocks, used), kThreads, 0, stream>>>(
        dy, x, norm, partial.mutable_data_ptr<A>(), p.outer, p.C, rows_per_slice, eps);
  } else {
    const int64_t slices = std::max<int64_t>(
        1, std::min<int64_t>(p.outer, ceil_div(4 * num_sms(), p.C)));
    const int64_t per_slice = ceil_div(p.outer, slices);
    const int64_t used = ceil_div(p.outer, per_slice);
    partial = at::empty({used, p.C}, p.dweight.options());
    col_dw_kernel<T><<<dim3(p.C, used), kBlock, 0, stream>>>(
        dy, x, norm, partial.mutable_data_ptr<A>(), p.outer, p.C, p.inner, per_slice, eps);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor dweight = p.dweight;  // a handle to the same storage
  at::sum_out(dweight, partial, at::IntArrayRef{0});  // fixed-order reduction
}

template <typename T, int V>
void scale_launch_v(const ScaleParams& p) {
  using A = at::opmath_type<T>;
  const int64_t ovec = p.O / V;
  const int64_t grid = std::max<int64_t>(
      1, std::min<int64_t>(ceil_div(p.M * ovec, kBlock), grid_cap(kBlock)));
  scale_kernel<T, V><<<grid, kBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
      p.src.const_data_ptr<T>(), p.dst.mutable_data_ptr<T>(), p.nrow.const_data_ptr<A>(),
      p.ncol.const_data_ptr<A>(), p.bias.defined() ? p.bias.const_data_ptr<A>() : nullptr,
      p.M, ovec, static_cast<A>(p.eps));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void scale_launch(const ScaleParams& p) {
  if (vec_ok<T>(p.O, {p.src.const_data_ptr(), p.dst.const_data_ptr()})) {
    scale_launch_v<T, vec_width<T>()>(p);
  } else {
    scale_launch_v<T, 1>(p);
  }
}

void fwd_cuda(const FwdParams& p) {
  const c10::cuda::CUDAGuard guard(p.x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, p.x.scalar_type(), "l2_norm_cuda",
      [&] { fwd_launch<scalar_t>(p); });
}

void bwd_cuda(const BwdParams& p) {
  const c10::cuda::CUDAGuard guard(p.x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, p.x.scalar_type(), "l2_norm_backward_cuda",
      [&] { bwd_launch<scalar_t>(p); });
}

void scale_cuda(const ScaleParams& p) {
  const c10::cuda::CUDAGuard guard(p.src.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, p.src.scalar_type(), "cosine_linear_scale_cuda",
      [&] { scale_launch<scalar_t>(p); });
}

const Launchers kCuda{fwd_cuda, bwd_cuda, scale_cuda};

}  // namespace

TORCH_LIBRARY_IMPL(torchfuse, CUDA, m) {
  m.impl("l2_norm", &l2_norm_op<kCuda>);
  m.impl("l2_norm_backward", &l2_norm_backward_op<kCuda>);
  m.impl("cosine_linear", &cosine_linear_op<kCuda>);
  m.impl("cosine_linear_backward", &cosine_linear_backward_op<kCuda>);
}

}  // namespace torchfuse::l2_norm
