// Local/spatial response norm CUDA kernels and the CUDA registration. Checks
// and formulas: lrn.cpp / lrn.h.
//
// x is viewed as (B, R, W). A thread owns one column w of one plane b and a
// chunk of consecutive rows, and walks them taking each window sum afresh
// (size loads, served by L1; a float64 running sum for windows wider than
// kDirectWindow, re-anchored where it is not finite: see WindowSum); threads
// of a warp own
// consecutive columns, so every row access is coalesced. Rows are split into
// chunks only as far as needed to give the GPU enough threads (batch 1).
// The spatial op first sums x^2 (and, in the backward, dy*y/s) along columns
// into a float32 buffer, one thread per chunk of a row.
//
// Backward: kernel 1 recomputes s and writes t = dy * y / s (float32
// buffer); kernel 2 runs the reflected window over t and recomputes s^-beta:
//   dx = dy * s^-beta - 2 alpha_n beta * x * sum_reflected(t).
// No atomics: every output element is written by one thread, in a fixed order.
//
// channels_last local_response_norm (x, dy, out laid out (B, W, R), lrn.h)
// runs in place: one thread per element, its window over the R contiguous
// channels of its position summed directly (LRN windows are a few channels;
// the threads of a warp read neighbouring channels, so L1 serves the
// overlapping reads; a non-finite value stays in its own window). Windows
// wider than kDirectWindow run as the planar kernels on a view with one
// column (planar_cl). The in-place backward is the same two kernels with t
// in a float32 buffer. channels_last spatial_response_norm (windows up to
// kClSpatialMaxWindow) likewise sums each element's size x size window of
// its channel directly (the threads of a warp own neighbouring channels, so
// every access is coalesced).
#include "lrn.h"

#include "../common/cuda_utils.cuh"

#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <torch/library.h>

namespace torchfuse::lrn {
namespace {

using namespace torchfuse::cuda;

constexpr int kThreads = 256;

template <typename A>
__device__ __forceinline__ A inv_pow(A s, A beta) {
  if (beta == A(0.75)) {
    const A r = ::sqrt(s);
    return A(1) / (r * ::sqrt(r));
  }
  if (beta == A(0.5)) return A(1) / ::sqrt(s);
  if (beta == A(1)) return A(1) / s;
  return ::pow(s, -beta);
}

// s = k + alpha_n * max(S, 0) from a window sum S; NaN stays NaN (as the
// CPU's vec::maximum).
template <typename A>
__device__ __forceinline__ A scale_of(A S, A alpha_n, A k) {
  return k + alpha_n * (S < A(0) ? A(0) : S);
}

// Windows up to this size are summed directly (as on the CPU).
constexpr int64_t kDirectWindow = 32;

// The sums of get(j), j in [i - lo, i + hi] within [0, n), for i stepping by
// one. Each window is summed afresh up to kDirectWindow terms, as torch's
// pooling sums it: a running add/subtract in float loses the small squares
// added beside a large one, and when the large one leaves the window the sum
// is left near zero (x = 1e4 then ones, size 3, alpha 3: y = 1 where 4^-0.75
// is right). Wider windows keep a float64 running sum, exact but for 2^-53 of
// the largest term in it, taken afresh at the first step and wherever it is
// not finite (an inf or NaN stays in a running sum after leaving the window).
template <typename A>
struct WindowSum {
  int64_t n, lo, hi;
  double acc = 0;

  __device__ WindowSum(int64_t n_, int64_t lo_, int64_t hi_) : n(n_), lo(lo_), hi(hi_) {}

  template <typename Get>
  __device__ __forceinline__ A at(int64_t i, bool first, const Get& get) {
    const int64_t j0 = i - lo > 0 ? i - lo : 0;
    const int64_t j1 = i + hi < n - 1 ? i + hi : n - 1;
    if (lo + hi + 1 <= kDirectWindow) {
      A a = 0;
      for (int64_t j = j0; j <= j1; ++j) a += get(j);
      return a;
    }
    if (!first) {
      if (i + hi < n) acc += static_cast<double>(get(i + hi));
      if (i - lo - 1 >= 0) acc -= static_cast<double>(get(i - lo - 1));
    }
    if (first || !isfinite(acc)) {
      acc = 0;
      for (int64_t j = j0; j <= j1; ++j) acc += static_cast<double>(get(j));
    }
    return static_cast<A>(acc);
  }
};

// Calls put(i, window sum at i) for i in [i0, i1).
template <typename A, typename Get, typename Put>
__device__ __forceinline__ void run_window(int64_t i0, int64_t i1, int64_t n, int64_t lo,
                                           int64_t hi, const Get& get, const Put& put) {
  WindowSum<A> win(n, lo, hi);
  for (int64_t i = i0; i < i1; ++i) put(i, win.at(i, i == i0, get));
}

struct Geo {
  int64_t B, R, W;
  int64_t lo, hi;
  int64_t chunk, nchunks;  // rows per thread, chunks per column
};

// Thread -> (b, chunk, w); false when out of range.
__device__ __forceinline__ bool locate(const Geo& g, int64_t& b, int64_t& r0, int64_t& r1,
                                       int64_t& w) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= g.B * g.nchunks * g.W) return false;
  w = idx % g.W;
  const int64_t rest = idx / g.W;
  const int64_t c = rest % g.nchunks;
  b = rest / g.nchunks;
  r0 = c * g.chunk;
  r1 = r0 + g.chunk < g.R ? r0 + g.chunk : g.R;
  return true;
}

// Source of the window over rows: x^2 (across channels), or q, x^2 already
// summed along columns (spatial).
template <typename T, typename A>
__device__ __forceinline__ A sq_at(const T* x, const A* q, int64_t off) {
  if (q != nullptr) return q[off];
  const A v = static_cast<A>(x[off]);
  return v * v;
}

template <typename T>
__global__ void fwd_kernel(const T* __restrict__ x, const at::opmath_type<T>* __restrict__ q,
                           T* __restrict__ out, Geo g, at::opmath_type<T> alpha_n,
                           at::opmath_type<T> beta, at::opmath_type<T> k) {
  using A = at::opmath_type<T>;
  int64_t b, r0, r1, w;
  if (!locate(g, b, r0, r1, w)) return;
  const int64_t base = b * g.R * g.W + w;
  run_window<A>(
      r0, r1, g.R, g.lo, g.hi,
      [&](int64_t j) { return sq_at<T, A>(x, q, base + j * g.W); },
      [&](int64_t i, A S) {
        const int64_t off = base + i * g.W;
        const A s = scale_of(S, alpha_n, k);
        out[off] = static_cast<T>(static_cast<A>(x[off]) * inv_pow(s, beta));
      });
}

// t = dy * x * s^-beta / s
template <typename T>
__global__ void bwd_t_kernel(const T* __restrict__ x, const T* __restrict__ dy,
                             const at::opmath_type<T>* __restrict__ q,
                             at::opmath_type<T>* __restrict__ t, Geo g,
                             at::opmath_type<T> alpha_n, at::opmath_type<T> beta,
                             at::opmath_type<T> k) {
  using A = at::opmath_type<T>;
  int64_t b, r0, r1, w;
  if (!locate(g, b, r0, r1, w)) return;
  const int64_t base = b * g.R * g.W + w;
  run_window<A>(
      r0, r1, g.R, g.lo, g.hi,
      [&](int64_t j) { return sq_at<T, A>(x, q, base + j * g.W); },
      [&](int64_t i, A S) {
        const int64_t off = base + i * g.W;
        const A s = scale_of(S, alpha_n, k);
        t[off] = static_cast<A>(dy[off]) * static_cast<A>(x[off]) * inv_pow(s, beta) / s;
      });
}

// dx = dy * s^-beta - coef * x * U, U the reflected window sum of u (= t, or
// t summed along columns); s recomputed from x (or q).
template <typename T>
__global__ void bwd_dx_kernel(const T* __restrict__ x, const T* __restrict__ dy,
                              const at::opmath_type<T>* __restrict__ q,
                              const at::opmath_type<T>* __restrict__ u, T* __restrict__ dx,
                              Geo g, at::opmath_type<T> alpha_n, at::opmath_type<T> beta,
                              at::opmath_type<T> k, at::opmath_type<T> coef) {
  using A = at::opmath_type<T>;
  int64_t b, r0, r1, w;
  if (!locate(g, b, r0, r1, w)) return;
  const int64_t base = b * g.R * g.W + w;
  // The two window sums advance in lock-step, row by row; U's is reflected.
  WindowSum<A> winS(g.R, g.lo, g.hi), winU(g.R, g.hi, g.lo);
  for (int64_t i = r0; i < r1; ++i) {
    const A accS =
        winS.at(i, i == r0, [&](int64_t j) { return sq_at<T, A>(x, q, base + j * g.W); });
    const A accU = winU.at(i, i == r0, [&](int64_t j) { return u[base + j * g.W]; });
    const int64_t off = base + i * g.W;
    const A s = scale_of(accS, alpha_n, k);
    const A xv = static_cast<A>(x[off]);
    dx[off] = static_cast<T>(static_cast<A>(dy[off]) * inv_pow(s, beta) - coef * xv * accU);
  }
}

// Column windows (spatial): dst[row][w] = sum of v(row, j), j in
// [w - lo, w + hi]; v = x^2 (x given) or src. One thread per chunk of a row.
template <typename T>
__global__ void cols_kernel(const T* __restrict__ x, const at::opmath_type<T>* __restrict__ src,
                            at::opmath_type<T>* __restrict__ dst, int64_t rows, int64_t W,
                            int64_t lo, int64_t hi, int64_t chunk,
                            int64_t nchunks) {
  using A = at::opmath_type<T>;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * nchunks) return;
  const int64_t row = idx / nchunks, c = idx % nchunks;
  const int64_t w0 = c * chunk, w1 = w0 + chunk < W ? w0 + chunk : W;
  const int64_t base = row * W;
  run_window<A>(
      w0, w1, W, lo, hi,
      [&](int64_t j) {
        if (src != nullptr) return src[base + j];
        const A v = static_cast<A>(x[base + j]);
        return v * v;
      },
      [&](int64_t i, A S) { dst[base + i] = S; });
}

// ------------------------------------------------- channels_last (LRN)
// Sum of v(j) over the window [c - lo, c + hi] within [0, R).
template <typename A, typename Get>
__device__ __forceinline__ A cl_window(int64_t c, int64_t R, int64_t lo, int64_t hi,
                                       const Get& v) {
  const int64_t j0 = c - lo > 0 ? c - lo : 0, j1 = c + hi < R - 1 ? c + hi : R - 1;
  A S = 0;
  for (int64_t j = j0; j <= j1; ++j) S += v(j);
  return S;
}

template <typename T>
__device__ __forceinline__ at::opmath_type<T> cl_scale(const T* x, int64_t base, int64_t c,
                                                       int64_t R, int64_t lo, int64_t hi,
                                                       at::opmath_type<T> alpha_n,
                                                       at::opmath_type<T> k) {
  using A = at::opmath_type<T>;
  const A S = cl_window<A>(c, R, lo, hi, [&](int64_t j) {
    const A v = static_cast<A>(x[base + j]);
    return v * v;
  });
  return scale_of(S, alpha_n, k);
}

// MODE 0: out = x * s^-beta; 1: out (float32 t) = dy * x * s^-beta / s;
// 2: out = dx = dy * s^-beta - coef * x * U, U = reflected_sum() (of t).
template <typename T, int MODE, typename U>
__device__ __forceinline__ void cl_store(int64_t e, at::opmath_type<T> s, const T* x,
                                         const T* dy, void* out, at::opmath_type<T> beta,
                                         at::opmath_type<T> coef, const U& reflected_sum) {
  using A = at::opmath_type<T>;
  const A xv = static_cast<A>(x[e]);
  if constexpr (MODE == 0) {
    static_cast<T*>(out)[e] = static_cast<T>(xv * inv_pow(s, beta));
  } else if constexpr (MODE == 1) {
    static_cast<A*>(out)[e] = static_cast<A>(dy[e]) * xv * inv_pow(s, beta) / s;
  } else {
    static_cast<T*>(out)[e] =
        static_cast<T>(static_cast<A>(dy[e]) * inv_pow(s, beta) - coef * xv * reflected_sum());
  }
}

template <typename T, int MODE>
__global__ void cl_kernel(const T* __restrict__ x, const T* __restrict__ dy,
                          const at::opmath_type<T>* __restrict__ t, void* __restrict__ out,
                          int64_t numel, int64_t R, int64_t lo, int64_t hi,
                          at::opmath_type<T> alpha_n, at::opmath_type<T> beta,
                          at::opmath_type<T> k, at::opmath_type<T> coef) {
  using A = at::opmath_type<T>;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < numel;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t pos, c;
    divmod(e, R, pos, c);
    const int64_t base = pos * R;  // the position's channel 0
    const A s = cl_scale<T>(x, base, c, R, lo, hi, alpha_n, k);
    cl_store<T, MODE>(e, s, x, dy, out, beta, coef, [&] {
      return cl_window<A>(c, R, hi, lo, [&](int64_t j) { return t[base + j]; });
    });
  }
}

// channels_last spatial, MODE as cl_kernel; element e = ((n H + h) W + w) C + c.
template <typename T, int MODE>
__global__ void cls_kernel(const T* __restrict__ x, const T* __restrict__ dy,
                           const at::opmath_type<T>* __restrict__ t, void* __restrict__ out,
                           int64_t numel, int64_t H, int64_t W, int64_t C, int64_t lo,
                           int64_t hi, at::opmath_type<T> alpha_n, at::opmath_type<T> beta,
                           at::opmath_type<T> k, at::opmath_type<T> coef) {
  using A = at::opmath_type<T>;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < numel;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t pos, c, nh, w, n, h;
    divmod(e, C, pos, c);   // pos = (n H + h) W + w
    divmod(pos, W, nh, w);  // nh = n H + h
    divmod(nh, H, n, h);
    const int64_t base = n * H * W * C + c;  // (n, 0, 0, c)
    auto at_hw = [&](int64_t i, int64_t j) { return base + (i * W + j) * C; };
    // sum of v(i, j) over rows [h - a, h + b] and columns [w - a, w + b]
    auto window2 = [&](int64_t a, int64_t b, auto v) {
      return cl_window<A>(h, H, a, b, [&](int64_t i) {
        return cl_window<A>(w, W, a, b, [&](int64_t j) { return v(at_hw(i, j)); });
      });
    };
    const A S = window2(lo, hi, [&](int64_t o) {
      const A v = static_cast<A>(x[o]);
      return v * v;
    });
    const A s = scale_of(S, alpha_n, k);
    cl_store<T, MODE>(e, s, x, dy, out, beta, coef,
                      [&] { return window2(hi, lo, [&](int64_t o) { return t[o]; }); });
  }
}

template <typename T, int MODE>
void cl_launch(const Params& p, const at::opmath_type<T>* t, void* out) {
  using A = at::opmath_type<T>;
  const int64_t numel = p.x.numel();
  const int64_t cap = static_cast<int64_t>(num_sms()) * (2048 / kThreads) * 4;
  const int64_t blocks = std::max<int64_t>(1, std::min(ceil_div(numel, kThreads), cap));
  auto stream = at::cuda::getCurrentCUDAStream();
  const T* dy = MODE == 0 ? nullptr : p.dy.const_data_ptr<T>();
  const A alpha_n = static_cast<A>(p.alpha_n), beta = static_cast<A>(p.beta),
          k = static_cast<A>(p.k), coef = static_cast<A>(2 * p.alpha_n * p.beta);
  if (p.cols) {
    cls_kernel<T, MODE><<<blocks, kThreads, 0, stream>>>(
        p.x.const_data_ptr<T>(), dy, t, out, numel, p.R, p.W, p.C, p.lo, p.hi, alpha_n, beta,
        k, coef);
  } else {
    cl_kernel<T, MODE><<<blocks, kThreads, 0, stream>>>(
        p.x.const_data_ptr<T>(), dy, t, out, numel, p.R, p.lo, p.hi, alpha_n, beta, k, coef);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ------------------------------------------------------------------ launch
Geo make_geo(const Params& p, int64_t lo, int64_t hi) {
  Geo g;
  g.B = p.B;
  g.R = p.R;
  g.W = p.W;
  g.lo = lo;
  g.hi = hi;
  // Split rows only as far as needed to fill the GPU; a chunk is at least as
  // long as the window so that, past kDirectWindow, anchoring the running sum
  // at its start costs at most one extra read per row.
  const int64_t want = static_cast<int64_t>(num_sms()) * 2048;
  const int64_t columns = std::max<int64_t>(1, p.B * p.W);
  const int64_t split = std::max<int64_t>(1, std::min<int64_t>(p.R, ceil_div(want, columns)));
  g.chunk = std::max<int64_t>({ceil_div(p.R, split), p.lo + p.hi + 1, int64_t{8}});
  g.chunk = std::min<int64_t>(g.chunk, p.R);
  g.nchunks = ceil_div(p.R, g.chunk);
  return g;
}

int64_t blocks_for(int64_t threads) {
  return ceil_div(threads, kThreads);
}

template <typename T>
void cols_launch(const Params& p, const T* x, const at::opmath_type<T>* src,
                 at::opmath_type<T>* dst, int64_t lo, int64_t hi) {
  const int64_t rows = p.B * p.R;
  const int64_t size = p.lo + p.hi + 1;
  const int64_t chunk = std::min<int64_t>(p.W, std::max<int64_t>(32, size));
  const int64_t nchunks = ceil_div(p.W, chunk);
  cols_kernel<T><<<blocks_for(rows * nchunks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      x, src, dst, rows, p.W, lo, hi, chunk, nchunks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// channels_last local_response_norm with a window wider than kDirectWindow
// runs as the planar kernels with one column: (B, W, R) in memory is the
// planar (B * W, R, 1), each thread walking the channels of a position with
// the running float64 sum, so that the cost per element does not grow with
// the window (cl_kernel sums each window afresh: size loads per element).
// The loads of a warp's threads are R elements apart, not coalesced; the
// lines they fetch serve the next steps of the same threads.
bool planar_cl(const Params& p) {
  return p.channels_last && !p.cols && p.lo + p.hi + 1 > kDirectWindow;
}

Params as_planar(const Params& p) {
  Params q = p;
  q.B = p.x.numel() / p.R;
  q.W = 1;
  q.channels_last = false;
  return q;
}

template <typename T>
void fwd_launch(const Params& p) {
  using A = at::opmath_type<T>;
  if (planar_cl(p)) {
    fwd_launch<T>(as_planar(p));
    return;
  }
  if (p.channels_last) {
    cl_launch<T, 0>(p, nullptr, p.out.mutable_data_ptr<T>());
    return;
  }
  const T* x = p.x.const_data_ptr<T>();
  at::Tensor qbuf;
  const A* q = nullptr;
  if (p.cols) {
    qbuf = at::empty(p.x.sizes(), p.x.options().dtype(c10::CppTypeToScalarType<A>::value));
    cols_launch<T>(p, x, nullptr, qbuf.mutable_data_ptr<A>(), p.lo, p.hi);
    q = qbuf.const_data_ptr<A>();
  }
  const Geo g = make_geo(p, p.lo, p.hi);
  fwd_kernel<T><<<blocks_for(g.B * g.nchunks * g.W), kThreads, 0,
                  at::cuda::getCurrentCUDAStream()>>>(
      x, q, p.out.mutable_data_ptr<T>(), g, static_cast<A>(p.alpha_n), static_cast<A>(p.beta),
      static_cast<A>(p.k));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void bwd_launch(const Params& p) {
  if (planar_cl(p)) {
    bwd_launch<T>(as_planar(p));
    return;
  }
  using A = at::opmath_type<T>;
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto acc_opts = p.x.options().dtype(c10::CppTypeToScalarType<A>::value);
  if (p.channels_last) {  // t in a float32 buffer laid out as x
    at::Tensor tbuf = at::empty({p.x.numel()}, acc_opts);
    cl_launch<T, 1>(p, nullptr, tbuf.mutable_data_ptr<A>());
    cl_launch<T, 2>(p, tbuf.const_data_ptr<A>(), p.out.mutable_data_ptr<T>());
    return;
  }
  const T* x = p.x.const_data_ptr<T>();
  const T* dy = p.dy.const_data_ptr<T>();
  at::Tensor qbuf;
  const A* q = nullptr;
  if (p.cols) {
    qbuf = at::empty(p.x.sizes(), acc_opts);
    cols_launch<T>(p, x, nullptr, qbuf.mutable_data_ptr<A>(), p.lo, p.hi);
    q = qbuf.const_data_ptr<A>();
  }
  const A alpha_n = static_cast<A>(p.alpha_n), beta = static_cast<A>(p.beta),
          k = static_cast<A>(p.k);
  at::Tensor tbuf = at::empty(p.x.sizes(), acc_opts);
  const Geo g = make_geo(p, p.lo, p.hi);
  const int64_t blocks = blocks_for(g.B * g.nchunks * g.W);
  bwd_t_kernel<T><<<blocks, kThreads, 0, stream>>>(x, dy, q, tbuf.mutable_data_ptr<A>(), g,
                                                   alpha_n, beta, k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor ubuf = tbuf;
  if (p.cols) {  // reflected column window of t
    ubuf = at::empty(p.x.sizes(), acc_opts);
    cols_launch<T>(p, nullptr, tbuf.const_data_ptr<A>(), ubuf.mutable_data_ptr<A>(), p.hi,
                   p.lo);
  }
  bwd_dx_kernel<T><<<blocks, kThreads, 0, stream>>>(
      x, dy, q, ubuf.const_data_ptr<A>(), p.out.mutable_data_ptr<T>(), g, alpha_n, beta, k,
      static_cast<A>(2 * p.alpha_n * p.beta));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void fwd_cuda(const Params& p) {
  const c10::cuda::CUDAGuard guard(p.x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(),
                                  "response_norm_cuda", [&] { fwd_launch<scalar_t>(p); });
}

void bwd_cuda(const Params& p) {
  const c10::cuda::CUDAGuard guard(p.x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(),
                                  "response_norm_backward_cuda", [&] { bwd_launch<scalar_t>(p); });
}

}  // namespace

TORCH_LIBRARY_IMPL(torchfuse, CUDA, m) {
  m.impl("local_response_norm", &lrn_op<fwd_cuda>);
  m.impl("local_response_norm_backward", &lrn_backward_op<bwd_cuda>);
  m.impl("spatial_response_norm", &srn_op<fwd_cuda>);
  m.impl("spatial_response_norm_backward", &srn_backward_op<bwd_cuda>);
}

}  // namespace torchfuse::lrn
