// GroupNorm CUDA kernels and the CUDA registration. Checks, allocation and
// the (N, C)-sized algebra are shared with the CPU path (group_norm.cpp).
//
// COMPILED, NEVER RUN: no session has had a GPU to execute these yet. They
// are kept deliberately simple:
//   * statistics: one block per (n, group, chunk of 4096 elements, longer
//     where a group would have more than max_chunks = 1024 of them: their
//     combine runs on one thread per group), so even batch 1 with 32 groups
//     gives thousands of blocks; two passes over the
//     chunk (the second from L1/L2): rough mean, then sums of (x - rough) and
//     its square, written in float64 to a workspace; the chunks are combined
//     in a fixed order afterwards (no atomics);
//   * per-channel sums for the backward: one block per (plane, chunk)
//     (contiguous) or per (sample, row chunk, 32-channel tile)
//     (channels_last), block reductions in a fixed order, partials written to
//     a workspace and summed in a fixed order;
//   * elementwise passes (forward output, dx): grid-stride, 16-byte vector
//     accesses when every pointer is aligned and numel divides, else scalar;
//     64-bit indexing throughout; the coefficient index is divided out
//     once per vector (32-bit division when the operands fit) and stepped
//     when the vector can cross a plane or a row;
//   * one block per item (chunk, plane): grids are capped at 2^30 blocks and
//     the kernels step by gridDim.x beyond that;
//   * the (N, C)-sized algebra between them: one small kernel per step, one
//     thread per group, plane or channel, running the functions of
//     group_norm_algebra.h that the CPU runs as loops (so the CPU tests check
//     their arithmetic): 1 launch in the forward, 6 in the backward (float32
//     statistics always take the kCorrect pass: deciding on the host would
//     need a device sync), where ATen ops took about 30 and 60.
#include "group_norm.h"

#include "../common/cuda_utils.cuh"

#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <initializer_list>

namespace torchfuse::group_norm {
namespace {

using namespace torchfuse::cuda;

constexpr int kThreads = 256;
constexpr int64_t kStatChunk = 4096;
constexpr int64_t kReduceChunk = 4096;
constexpr int kTileC = 32, kTileR = 8;  // channels_last reduction block
constexpr int64_t kSmallPlane = 256;    // sub-warp rows in reduce_planar_kernel up to this S

template <Act ACT, typename A>
__device__ __forceinline__ A act_fwd(A y) {
  if constexpr (ACT == Act::kRelu) {
    return (y > A(0) || y != y) ? y : A(0);  // NaN propagates, as torch.relu
  } else if constexpr (ACT == Act::kSilu) {
    return y / (A(1) + exp(-y));
  } else {
    return y;
  }
}

// dy * act'(y)
template <Act ACT, typename A>
__device__ __forceinline__ A act_grad(A dy, A y) {
  if constexpr (ACT == Act::kRelu) {
    return y > A(0) ? dy : A(0);
  } else if constexpr (ACT == Act::kSilu) {
    const A s = A(1) / (A(1) + exp(-y));
    return dy * s * (A(1) + y * (A(1) - s));
  } else {
    return dy;
  }
}

// Calls f(offset) for this thread's elements of a statistics chunk of cnt
// elements starting at `base`: contiguous (planar), or rows of D channels at
// row stride C (cl; element e is row e / D, channel e % D, stepped without a
// division per element).
template <typename F>
__device__ __forceinline__ void for_chunk(bool cl, int64_t base, int64_t cnt, int64_t C,
                                          int64_t D, const F& f) {
  if (!cl) {
    for (int64_t e = threadIdx.x; e < cnt; e += blockDim.x) f(base + e);
    return;
  }
  const int64_t step_r = blockDim.x / D, step_j = blockDim.x % D;
  int64_t r = threadIdx.x / D, j = threadIdx.x % D;
  for (int64_t e = threadIdx.x; e < cnt; e += blockDim.x) {
    f(base + r * C + j);
    r += step_r;
    j += step_j;
    if (j >= D) {
      j -= D;
      ++r;
    }
  }
}

// ------------------------------------------------------------- statistics
template <typename T>
__global__ void stats_kernel(
    const T* __restrict__ x,
    double* __restrict__ mean_k,
    double* __restrict__ m2_k,
    int64_t C, int64_t S, int64_t G, int64_t D, int64_t K, int64_t L, int64_t R,
    bool cl, int64_t total) {
  using A = at::opmath_type<T>;
  __shared__ A smem[32];
  // t = (n * G + g) * K + k; block-stride (block-uniform, so block_sum stays legal)
  for (int64_t t = blockIdx.x; t < total; t += gridDim.x) {
  const int64_t k = t % K, ng = t / K, g = ng % G, n = ng / G;
  int64_t cnt, base;
  if (!cl) {
    const int64_t M = D * S;
    base = ng * M + k * L;
    cnt = min(L, M - k * L);
  } else {
    const int64_t r0 = k * R;
    base = (n * S + r0) * C + g * D;
    cnt = min(R, S - r0) * D;
  }
  A s = 0;
  for_chunk(cl, base, cnt, C, D, [&](int64_t o) { s += static_cast<A>(x[o]); });
  const A m0 = block_sum(s, smem) / static_cast<A>(cnt);
  A s1 = 0, s2 = 0;
  for_chunk(cl, base, cnt, C, D, [&](int64_t o) {
    const A d = static_cast<A>(x[o]) - m0;
    s1 += d;
    s2 += d * d;
  });
  s1 = block_sum(s1, smem);
  s2 = block_sum(s2, smem);
  if (threadIdx.x == 0) {
    const double c = static_cast<double>(cnt), d1 = static_cast<double>(s1);
    mean_k[t] = static_cast<double>(m0) + d1 / c;
    m2_k[t] = static_cast<double>(s2) - d1 * d1 / c;
  }
  }
}

// ------------------------------------------------------------ elementwise
template <Mode MODE, Act ACT, typename A>
__device__ __forceinline__ A pointwise_op(A x, A dy, const A* p) {
  const A d = x - p[0];
  const A y = d * p[1] + p[2];
  if constexpr (MODE == Mode::kForward) {
    return act_fwd<ACT>(y);
  } else {
    return p[3] * act_grad<ACT>(dy, y) + p[4] * d + p[5];
  }
}

// Index into the (N, C) coefficient planes of element e.
__device__ __forceinline__ int64_t coef_index(int64_t e, int64_t C, int64_t S, bool cl) {
  int64_t q, r;
  if (!cl) {
    divmod(e, S, q, r);
    return q;
  }
  int64_t n, c;
  divmod(e, S * C, n, r);
  divmod(r, C, q, c);
  return n * C + c;
}

template <typename T, Mode MODE, Act ACT, int V>
__global__ void pointwise_kernel(
    const T* __restrict__ x,
    const T* __restrict__ dy,
    T* __restrict__ out,
    const at::opmath_type<T>* __restrict__ prm,
    int64_t nvec, int64_t C, int64_t S, int64_t NC, bool cl, bool uniform) {
  using A = at::opmath_type<T>;
  constexpr int NP = num_params(MODE);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < nvec;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e0 = i * V;
    const Vec<T, V> xv = load_vec<T, V>(x + e0);
    Vec<T, V> dv;
    if constexpr (MODE == Mode::kBackward) dv = load_vec<T, V>(dy + e0);
    Vec<T, V> ov;
    A p[NP];
    auto apply = [&](int j) {
      const A d = MODE == Mode::kBackward ? static_cast<A>(dv.v[j]) : A(0);
      ov.v[j] = static_cast<T>(pointwise_op<MODE, ACT>(static_cast<A>(xv.v[j]), d, p));
    };
    auto load_p = [&](int64_t pc) {
#pragma unroll
      for (int q = 0; q < NP; ++q) p[q] = prm[q * NC + pc];
    };
    if (uniform) {
      // The V elements lie in one plane (planar: one channel's coefficients,
      // loaded once) or are V consecutive channels of one row (cl).
      const int64_t pc0 = coef_index(e0, C, S, cl);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        if (j == 0 || cl) load_p(pc0 + (cl ? j : 0));
        apply(j);
      }
    } else {
      // The vector may cross a plane (planar) or a row (cl): the index of e0
      // is divided out once and stepped per element.
      if (!cl) {
        int64_t plane, pos;
        divmod(e0, S, plane, pos);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          if (j == 0 || pos == 0) load_p(plane);
          apply(j);
          if (++pos == S) {
            pos = 0;
            ++plane;
          }
        }
      } else {
        const int64_t SC = S * C;
        int64_t n, r, q, c;
        divmod(e0, SC, n, r);
        divmod(r, C, q, c);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          load_p(n * C + c);
          apply(j);
          if (++c == C) c = 0;
          if (++r == SC) {
            r = 0;
            ++n;
          }
        }
      }
    }
    store_vec<T, V>(out + e0, ov);
  }
}

// ------------------------------------------------------ per-channel sums
template <Mode MODE, Act ACT, typename A>
__device__ __forceinline__ void reduce_op(A x, A dy, const A* p, A* q) {
  const A d = x - p[0];
  if constexpr (MODE == Mode::kCorrect) {
    q[0] += d;
  } else {
    const A g = act_grad<ACT>(dy, d * p[1] + p[2]);
    q[0] += g;
    q[1] += g * (d * p[3] + p[4]);
  }
}

// Contiguous: a row of blockDim.x lanes per item (plane, chunk of R
// positions), blockDim.y items a block. Planes longer than kSmallPlane: 256
// lanes, one item a block (block_sum); shorter: min(32, next_pow2(S)) lanes
// and 256 / lanes items a block, sub-warp sums (one 256-thread block per
// plane left all but S of its threads idle: (N, C) input, 255 of 256).
template <typename T, Mode MODE, Act ACT>
__global__ void reduce_planar_kernel(
    const T* __restrict__ x,
    const T* __restrict__ dy,
    const at::opmath_type<T>* __restrict__ prm,
    at::opmath_type<T>* __restrict__ part,
    int64_t N, int64_t C, int64_t S, int64_t K, int64_t R) {
  using A = at::opmath_type<T>;
  constexpr int NP = num_params(MODE), NQ = num_sums(MODE);
  __shared__ A smem[32];
  const int64_t NC = N * C, items = NC * K, rows = blockDim.y;
  // block-stride over groups of `rows` items: uniform, so every thread
  // reaches row_sum (items past the end sum nothing and write nothing)
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * rows; base < items;
       base += static_cast<int64_t>(gridDim.x) * rows) {
  const int64_t t = base + threadIdx.y;
  const bool valid = t < items;
  const int64_t plane = t / K, k = t % K;
  A q[NQ];
#pragma unroll
  for (int i = 0; i < NQ; ++i) q[i] = A(0);
  // kCorrect: groups that need no correction are not read (row-uniform).
  if (valid && (MODE != Mode::kCorrect || prm[NC + plane] != A(0))) {
    A p[NP];
#pragma unroll
    for (int i = 0; i < NP; ++i) p[i] = prm[i * NC + plane];
    const int64_t s0 = k * R, s1 = min(S, s0 + R);
    const T* xp = x + plane * S;
    const T* dp = MODE == Mode::kGrad ? dy + plane * S : nullptr;
    for (int64_t s = s0 + threadIdx.x; s < s1; s += blockDim.x) {
      const A d = MODE == Mode::kGrad ? static_cast<A>(dp[s]) : A(0);
      reduce_op<MODE, ACT>(static_cast<A>(xp[s]), d, p, q);
    }
  }
#pragma unroll
  for (int i = 0; i < NQ; ++i) {
    const A v = row_sum(q[i], smem);
    if (threadIdx.x == 0 && valid) {
      const int64_t n = plane / C, c = plane % C;
      part[((i * N + n) * K + k) * C + c] = v;
    }
  }
  }
}

// channels_last: block (kTileC, kTileR) per (sample, chunk of R rows,
// 32-channel tile); threadIdx.x walks channels (coalesced), threadIdx.y rows.
template <typename T, Mode MODE, Act ACT>
__global__ void reduce_cl_kernel(
    const T* __restrict__ x,
    const T* __restrict__ dy,
    const at::opmath_type<T>* __restrict__ prm,
    at::opmath_type<T>* __restrict__ part,
    int64_t N, int64_t C, int64_t S, int64_t K, int64_t R, int64_t tiles) {
  using A = at::opmath_type<T>;
  constexpr int NP = num_params(MODE), NQ = num_sums(MODE);
  __shared__ A smem[NQ][kTileR][kTileC];
  const int64_t NC = N * C;
  for (int64_t t = blockIdx.x; t < N * K * tiles; t += gridDim.x) {  // block-stride
  const int64_t tile = t % tiles, nk = t / tiles;
  const int64_t n = nk / K, k = nk % K;
  const int64_t c = tile * kTileC + threadIdx.x;
  A q[NQ];
#pragma unroll
  for (int i = 0; i < NQ; ++i) q[i] = A(0);
  if (c < C && (MODE != Mode::kCorrect || prm[NC + n * C + c] != A(0))) {
    A p[NP];
#pragma unroll
    for (int i = 0; i < NP; ++i) p[i] = prm[i * NC + n * C + c];
    const int64_t s0 = k * R, s1 = min(S, s0 + R);
    for (int64_t s = s0 + threadIdx.y; s < s1; s += kTileR) {
      const int64_t e = (n * S + s) * C + c;
      const A d = MODE == Mode::kGrad ? static_cast<A>(dy[e]) : A(0);
      reduce_op<MODE, ACT>(static_cast<A>(x[e]), d, p, q);
    }
  }
#pragma unroll
  for (int i = 0; i < NQ; ++i) smem[i][threadIdx.y][threadIdx.x] = q[i];
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
#pragma unroll
    for (int i = 0; i < NQ; ++i) {
      A v = smem[i][0][threadIdx.x];
      for (int y = 1; y < kTileR; ++y) v += smem[i][y][threadIdx.x];  // fixed order
      part[((i * N + n) * K + k) * C + c] = v;
    }
  }
  __syncthreads();  // smem is rewritten by the next block-stride step
  }
}

// ------------------------------------------------------------- launchers
// Grids of the one-block-per-item kernels: at most kMaxBlocks (grid.x is
// 32-bit; a (2^22, 1024) half backward has 2^32 planes), the kernels loop.
constexpr int64_t kMaxBlocks = int64_t{1} << 30;

unsigned block_grid(int64_t items) {
  return static_cast<unsigned>(std::min(items, kMaxBlocks));
}

int64_t grid_for(int64_t work) {
  const int64_t cap = static_cast<int64_t>(num_sms()) * 2048 / kThreads;
  return std::max<int64_t>(1, std::min(ceil_div(work, kThreads), cap));
}

template <typename T>
void stats_launch(const StatsParams& sp) {
  const Geometry& g = sp.geo;
  const int64_t blocks = g.N * g.G * sp.K;
  stats_kernel<T><<<block_grid(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      sp.x.const_data_ptr<T>(), sp.mean_k.mutable_data_ptr<double>(),
      sp.m2_k.mutable_data_ptr<double>(), g.C, g.S, g.G, g.D, sp.K, sp.L, sp.R, g.cl, blocks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, Mode MODE, Act ACT, int V>
void pointwise_launch_v(const PointwiseParams& pp) {
  using A = at::opmath_type<T>;
  const Geometry& g = pp.geo;
  const int64_t nvec = pp.x.numel() / V;
  pointwise_kernel<T, MODE, ACT, V>
      <<<grid_for(nvec), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          pp.x.const_data_ptr<T>(),
          MODE == Mode::kBackward ? pp.dy.const_data_ptr<T>() : nullptr,
          pp.out.mutable_data_ptr<T>(), pp.params.const_data_ptr<A>(), nvec, g.C, g.S,
          g.N * g.C, g.cl, (g.cl ? g.C : g.S) % V == 0);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, Mode MODE, Act ACT>
void pointwise_launch(const PointwiseParams& pp) {
  constexpr int V = vec_width<T>();
  bool vec = pp.x.numel() % V == 0;
  for (const at::Tensor* t : {&pp.x, &pp.dy, &pp.out}) {
    if (t->defined()) vec = vec && is_aligned(t->const_data_ptr(), 16);
  }
  if (vec) {
    pointwise_launch_v<T, MODE, ACT, V>(pp);
  } else {
    pointwise_launch_v<T, MODE, ACT, 1>(pp);
  }
}

template <typename T, Mode MODE, Act ACT>
void reduce_launch(const ReduceParams& rp) {
  using A = at::opmath_type<T>;
  const Geometry& g = rp.geo;
  auto stream = at::cuda::getCurrentCUDAStream();
  const T* x = rp.x.const_data_ptr<T>();
  const T* dy = MODE == Mode::kGrad ? rp.dy.const_data_ptr<T>() : nullptr;
  const A* prm = rp.params.const_data_ptr<A>();
  A* part = rp.partial.mutable_data_ptr<A>();
  if (!g.cl) {
    const int lanes =
        g.S <= kSmallPlane ? static_cast<int>(std::min<int64_t>(32, next_pow2(g.S))) : kThreads;
    const int rows = kThreads / lanes;
    reduce_planar_kernel<T, MODE, ACT>
        <<<block_grid(ceil_div(g.N * g.C * rp.K, rows)), dim3(lanes, rows), 0, stream>>>(
        x, dy, prm, part, g.N, g.C, g.S, rp.K, rp.R);
  } else {
    const int64_t tiles = ceil_div(g.C, kTileC);
    reduce_cl_kernel<T, MODE, ACT>
        <<<block_grid(g.N * rp.K * tiles), dim3(kTileC, kTileR), 0, stream>>>(
        x, dy, prm, part, g.N, g.C, g.S, rp.K, rp.R, tiles);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------- algebra
// One thread per item of an algebra step (group_norm_algebra.h: the same
// functions the CPU runs in a loop).
template <typename A>
__global__ void algebra_kernel(AlgStep s, AlgView<A> v, int64_t items) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < items;
       i += step) {
    alg_step(s, v, i);
  }
}

template <typename A>
void algebra_cuda(AlgStep s, const AlgView<A>& v) {
  constexpr int kAlgThreads = 128;
  const int64_t items = alg_items(s, v);
  if (items == 0) return;
  algebra_kernel<A><<<block_grid(ceil_div(items, kAlgThreads)), kAlgThreads, 0,
                      at::cuda::getCurrentCUDAStream()>>>(s, v, items);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void stats_cuda(const StatsParams& sp) {
  const c10::cuda::CUDAGuard guard(sp.x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, sp.x.scalar_type(), "group_norm_stats_cuda",
      [&] { stats_launch<scalar_t>(sp); });
}

void pointwise_cuda(const PointwiseParams& pp) {
  const c10::cuda::CUDAGuard guard(pp.x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, pp.x.scalar_type(), "group_norm_pointwise_cuda", [&] {
        with_act(pp.act, [&](auto act) {
          if (pp.mode == Mode::kForward) {
            pointwise_launch<scalar_t, Mode::kForward, decltype(act)::value>(pp);
          } else {
            pointwise_launch<scalar_t, Mode::kBackward, decltype(act)::value>(pp);
          }
        });
      });
}

void reduce_cuda(const ReduceParams& rp) {
  const c10::cuda::CUDAGuard guard(rp.x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, rp.x.scalar_type(), "group_norm_reduce_cuda", [&] {
        if (rp.mode == Mode::kCorrect) {
          reduce_launch<scalar_t, Mode::kCorrect, Act::kNone>(rp);
        } else {
          with_act(rp.act, [&](auto act) {
            reduce_launch<scalar_t, Mode::kGrad, decltype(act)::value>(rp);
          });
        }
      });
}

}  // namespace

// Statistics chunks of ~4096 elements of one group (cl: R = 4096 / D rows);
// reduction chunks of 4096 positions (cl: 4096 / C rows).
const Launchers kCuda{
    .stats = stats_cuda,
    .pointwise = pointwise_cuda,
    .reduce = reduce_cuda,
    .algebra = algebra_cuda<float>,
    .algebra64 = algebra_cuda<double>,
    .stat_chunk = kStatChunk,
    .stat_chunk_cl = kStatChunk,
    .cl_per_group = true,
    .reduce_chunk = kReduceChunk,
    .reduce_rows_cl = kReduceChunk / kTileC,  // at least 128 rows of a 32-channel tile
    .max_chunks = 1024,
    .always_correct = true,
};

TORCH_LIBRARY_IMPL(torchfuse, CUDA, m) {
  m.impl("group_norm", &group_norm_op<kCuda>);
  m.impl("group_norm_backward", &group_norm_backward_op<kCuda>);
}

}  // namespace torchfuse::group_norm
