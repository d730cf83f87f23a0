// Local/spatial response norm CPU kernels (at::vec, at::parallel_for) and the
// CPU registration. Checks and formulas: lrn.cpp / lrn.h.
//
// Work is split into tasks of one plane b and a tile of columns (the whole
// row for the spatial op, whose window also runs along columns). A tile's
// squares sit in a small scratch buffer (L1/L2) and each window sum over rows
// is taken afresh from it (size vector loads; a float64 running sum past
// kDirectWindow, see window_rows), so that a large square leaving the window
// takes no small ones with it, as torch's pooling sums each window (float
// running sums, as before, could leave such a sum near zero for up to 16
// rows). Spatial column windows are summed directly from a zero-padded copy
// of the row, size shifted vector loads (float64 prefix sums for windows
// wider than kDirectWindow). The backward
// recomputes S from x (only x is saved), stores s^-beta and dy*y/s for the
// tile, and runs the reflected window over the latter: x and dy are read from
// memory once, dx written once.
//
// channels_last local_response_norm runs in place, one position (its C
// contiguous channels) at a time: squares into a zero-padded row, window sums
// as the sum of lo + hi + 1 shifted vector loads (no running sum, so nothing
// to re-anchor and a non-finite value stays in its own window; windows wider
// than kDirectWindow use the float64 prefix sums of the spatial columns),
// then the output; the backward does the same with dy*y/s and the reflected
// window. channels_last spatial_response_norm (windows up to
// kClSpatialMaxWindow) runs in place too, vectors along the channels: a task
// is (sample, kClRows output rows, kClChans channels); the column-window sums
// of the rows it needs (halo included) are summed directly into scratch, then
// each output sums size of those rows; the backward adds the halo rows of
// t = dy*y/s and their reflected windows. Before, such input ran on a
// contiguous copy and the result was
// copied back: 1x192x56x56 float32 forward, 2 threads, took 1.02 ms against
// 0.39 ms for the same tensor contiguous; in place its forward takes about
// what the contiguous kernel's does and its backward 1.2-1.7x less at the
// AlexNet/GoogLeNet shapes (bfloat16 1x192x56x56: 0.9x), interleaved, after
// the contiguous tiles grew (four short rows in L1 per position, against the
// contiguous backward's three scratch tiles of strided rows).
#include "lrn.h"

#include "../common/cpu_vec.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace torchfuse::lrn {

namespace {

using cpu::AccIO;
using cpu::for_each_step;
using cpu::VecIO;

// s^-beta, with the common beta = 0.75 (AlexNet, GoogLeNet) by square roots.
template <typename AVec>
inline AVec inv_pow(const AVec& s, typename AVec::value_type beta) {
  using A = typename AVec::value_type;
  if (beta == A(0.75)) {
    const AVec r = s.sqrt();
    return (r * r.sqrt()).reciprocal();
  }
  if (beta == A(0.5)) return s.sqrt().reciprocal();
  if (beta == A(1)) return s.reciprocal();
  return s.pow(AVec(-beta));
}

// Windows up to this size are summed directly (channels_last rows, and the
// window sums over rows of the contiguous kernels).
constexpr int64_t kDirectWindow = 32;

// acc[j] = sum of q[i * ld + j], i in [0, rows), j in [0, m). Out of line: a
// call per row, and the callers' per-row callbacks keep their registers
// (inlined, the backward ran 5-20% slower).
template <typename A>
__attribute__((noinline)) void sum_rows(const A* q, int64_t ld, int64_t rows, int64_t m,
                                        A* acc) {
  using AVec = at::vec::Vectorized<A>;
  for_each_step<AVec::size()>(m, [&](int64_t j, int64_t c) TF_INLINE_LAMBDA {
    AVec a = AVec::loadu(q + j, c);
    for (int64_t i = 1; i < rows; ++i) a = a + AVec::loadu(q + i * ld + j, c);
    a.store(acc + j, c);
  });
}

// Window sums over the R rows of q (m columns, row stride ld): calls f(r, acc)
// with acc[j] = sum of q[i][j], i in [r - lo, r + hi] within [0, R). Windows
// up to kDirectWindow rows are summed afresh for every row (lo + hi + 1 vector
// loads from the tile in cache), as torch's pooling sums each window: a
// running add/subtract in float loses the small squares added beside a large
// one, and when the large one leaves the window the sum is left near zero
// (x = 1e4 then ones, size 3, alpha 3: y = 1 where 4^-0.75 is right). Wider
// windows keep a float64 running sum (acc64, m values), exact but for
// 2^-53 of the largest square in it, taken afresh where it is not finite (an
// inf or NaN stays in a running sum after leaving the window).
template <typename A, typename F>
void window_rows(const A* q, int64_t R, int64_t ld, int64_t m, int64_t lo, int64_t hi,
                 A* acc, double* acc64, const F& f) {
  if (lo + hi + 1 <= kDirectWindow) {
    for (int64_t r = 0; r < R; ++r) {
      sum_rows(q + std::max<int64_t>(0, r - lo) * ld, ld,
               std::min(R - 1, r + hi) - std::max<int64_t>(0, r - lo) + 1, m, acc);
      f(r, static_cast<const A*>(acc));
    }
    return;
  }
  for (int64_t r = 0; r < R; ++r) {
    const int64_t i0 = std::max<int64_t>(0, r - lo), i1 = std::min(R - 1, r + hi);
    const bool add = r > 0 && r + hi < R, sub = r > 0 && r - lo - 1 >= 0;
    for (int64_t j = 0; j < m; ++j) {
      double a = acc64[j];
      if (add) a += static_cast<double>(q[(r + hi) * ld + j]);
      if (sub) a -= static_cast<double>(q[(r - lo - 1) * ld + j]);
      if (r == 0 || !std::isfinite(a)) {
        a = 0;
        for (int64_t i = i0; i <= i1; ++i) a += static_cast<double>(q[i * ld + j]);
      }
      acc64[j] = a;
      acc[j] = static_cast<A>(a);
    }
    f(r, static_cast<const A*>(acc));
  }
}

// Window sum along one row of W values: dst[w] = sum v[i], i in [w-lo, w+hi]
// (float64 prefix sums; v and dst may not alias).
template <typename A>
void window_cols(const A* v, A* dst, int64_t W, int64_t lo, int64_t hi, double* prefix) {
  prefix[0] = 0;
  for (int64_t i = 0; i < W; ++i) prefix[i + 1] = prefix[i] + static_cast<double>(v[i]);
  for (int64_t w = 0; w < W; ++w) {
    const int64_t i0 = std::max<int64_t>(0, w - lo), i1 = std::min(W, w + hi + 1);
    double d = prefix[i1] - prefix[i0];
    if (!std::isfinite(d)) {  // an inf or NaN in the prefix: this window's own sum
      d = 0;
      for (int64_t i = i0; i < i1; ++i) d += static_cast<double>(v[i]);
    }
    dst[w] = static_cast<A>(d);
  }
}

// Contiguous tiles: about kTileElems elements (R rows of n columns), but
// narrower, down to kTileMin, where that would leave fewer than
// kTasksPerThread tasks per thread. Against a fixed 8192 (interleaved, 2
// threads, forward / backward): 8x256x27x27 float32 2.1x / 2.0x faster,
// bfloat16 2.6x / 2.1x; 8x96x55x55 float32 1.3x / 1.4x; batch 1 unchanged
// within the noise.
constexpr int64_t kTileElems = 32768;
constexpr int64_t kTileMin = 8192;
constexpr int64_t kTasksPerThread = 16;

// channels_last spatial tasks: output rows and channels per task.
constexpr int64_t kClRows = 8;
constexpr int64_t kClChans = 64;

// dst[c] = sum of v[c - lo .. c + hi] over a row of C values, v given as vp,
// a copy padded with lo zeros before and hi (plus a vector of slack) after.
template <typename A>
void window_padded(const A* vp, A* dst, int64_t C, int64_t lo, int64_t hi, double* prefix) {
  using AVec = at::vec::Vectorized<A>;
  constexpr int64_t K = AVec::size();
  if (lo + hi + 1 > kDirectWindow) {
    window_cols(vp + lo, dst, C, lo, hi, prefix);
    return;
  }
  for_each_step<K>(C, [&](int64_t c0, int64_t c) TF_INLINE_LAMBDA {
    AVec a = AVec::loadu(vp + c0, c);
    for (int64_t d = 1; d <= lo + hi; ++d) a = a + AVec::loadu(vp + c0 + d, c);
    a.store(dst + c0, c);
  });
}

template <typename T>
struct Kernel {
  using IO = VecIO<T>;
  using A = typename IO::A;
  using AVec = typename IO::AVec;
  static constexpr int64_t S = IO::kStep;

  const Params& p;
  int64_t n = 0;      // tile width (columns), also the scratch row stride
  int64_t tiles = 0;  // tiles per plane

  // The formula's constants as vectors, and its two steps.
  struct Coefs {
    AVec va, vk, zero, coef;  // alpha_n, k, 0, 2 alpha_n beta
    A beta;
    // s = k + alpha_n * max(S, 0), in place (NaN stays NaN: vec::maximum)
    TF_ALWAYS_INLINE void scale(AVec& s0, AVec& s1) const {
      s0 = at::vec::fmadd(va, at::vec::maximum(s0, zero), vk);
      s1 = at::vec::fmadd(va, at::vec::maximum(s1, zero), vk);
    }
    // out = x * s^-beta, s from the window sums S
    TF_ALWAYS_INLINE void store_y(T* out, const AVec& x0, const AVec& x1, AVec s0, AVec s1,
                                  int64_t c) const {
      scale(s0, s1);
      IO::store(out, x0 * inv_pow(s0, beta), x1 * inv_pow(s1, beta), c);
    }
    TF_ALWAYS_INLINE void y_step(const T* x, const A* sum, T* out, int64_t c) const {
      AVec x0, x1, s0, s1;
      IO::load(x, c, x0, x1);
      AccIO<A>::load(sum, c, s0, s1);
      store_y(out, x0, x1, s0, s1, c);
    }
    // out[0, m) = x * s^-beta along a row, S in sum. A plain loop, as square_row.
    TF_ALWAYS_INLINE void y_row(const T* x, const A* sum, T* out, int64_t m) const {
      int64_t j = 0;
      for (; j + S <= m; j += S) y_step(x + j, sum + j, out + j, S);
      if (j < m) y_step(x + j, sum + j, out + j, m - j);
    }
  };

  // dst[0, m) = x[0, m)^2 in the accumulate type. A plain loop over an
  // always-inline step: written with for_each_step and a lambda, GCC 12
  // outlined the lambda for half and bfloat16 (a call per 32 elements; the
  // bfloat16 channels_last forward took 1.5x as long).
  static TF_ALWAYS_INLINE void square_step(const T* x, A* dst, int64_t c) {
    AVec a, b;
    IO::load(x, c, a, b);
    AccIO<A>::store(dst, a * a, b * b, c);
  }
  static TF_ALWAYS_INLINE void square_row(const T* x, A* dst, int64_t m) {
    int64_t j = 0;
    for (; j + S <= m; j += S) square_step(x + j, dst + j, S);
    if (j < m) square_step(x + j, dst + j, m - j);
  }
  Coefs coefs() const {
    return {AVec(static_cast<A>(p.alpha_n)), AVec(static_cast<A>(p.k)), AVec(A(0)),
            AVec(static_cast<A>(2 * p.alpha_n * p.beta)), static_cast<A>(p.beta)};
  }

  explicit Kernel(const Params& p_) : p(p_) {
    if (p.cols) {
      n = p.W;
    } else {
      // (columns are independent: the results do not depend on the width)
      auto cols_for = [&](int64_t elems) {
        return (elems / std::max<int64_t>(p.R, 1) + S - 1) / S * S;
      };
      const int64_t per_task = p.B * p.W / (kTasksPerThread * at::get_num_threads());
      const int64_t want =
          std::max(cols_for(kTileMin), std::min(cols_for(kTileElems), per_task / S * S));
      n = std::min(p.W, std::max<int64_t>(S, want));
    }
    tiles = (p.W + n - 1) / n;
  }

  // q[r][j] = x[r][w0 + j]^2, or (spatial) its column-window sum; tmp: n.
  void squares(const T* x, int64_t w0, int64_t m, A* q, A* tmp, double* prefix) const {
    if (p.cols) pad_row(tmp, m, p.lo, p.hi);
    for (int64_t r = 0; r < p.R; ++r) {
      const T* xr = x + r * p.W + w0;
      square_row(xr, p.cols ? tmp + p.lo : q + r * n, m);
      if (p.cols) window_padded(tmp, q + r * n, m, p.lo, p.hi, prefix);
    }
  }

  // Zeroes the pads of a row buffer laid out [lo | m values | hi + slack]
  // for window_padded (the scratch's last row; it has lo + hi + 2S extra).
  static void pad_row(A* row, int64_t m, int64_t lo, int64_t hi) {
    std::fill(row, row + lo, A(0));
    std::fill(row + lo + m, row + lo + m + hi + 2 * S, A(0));
  }

  // f(b, w0, m, scratch, prefix) over every (plane, tile); `rows` scratch
  // rows of n accumulate-type values per task, plus two more rows.
  template <typename F>
  void for_tasks(int64_t rows, const F& f) const {
    const int64_t tasks = p.B * tiles;
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, p.R * n));
    at::parallel_for(0, tasks, grain, [&](int64_t tb, int64_t te) {
      std::vector<A> scratch((rows * p.R + 2) * n + p.lo + p.hi + 2 * S);
      std::vector<double> prefix(n + 1);  // spatial prefix sums, or acc64 of window_rows
      for (int64_t t = tb; t < te; ++t) {
        const int64_t b = t / tiles, w0 = (t % tiles) * n;
        f(b, w0, std::min(n, p.W - w0), scratch.data(), prefix.data());
      }
    });
  }

  void forward() const {
    const T* x = p.x.const_data_ptr<T>();
    T* out = p.out.mutable_data_ptr<T>();
    const Coefs cf = coefs();
    for_tasks(1, [&](int64_t b, int64_t w0, int64_t m, A* scratch, double* prefix) {
      const T* xb = x + b * p.R * p.W + w0;
      T* ob = out + b * p.R * p.W + w0;
      A* q = scratch;                    // R x n
      A* acc = scratch + p.R * n;        // n
      A* tmp = acc + n;                  // n
      squares(xb - w0, w0, m, q, tmp, prefix);
      window_rows(q, p.R, n, m, p.lo, p.hi, acc, prefix, [&](int64_t r, const A* s) {
        cf.y_row(xb + r * p.W, s, ob + r * p.W, m);
      });
    });
  }

  // channels_last: f(offset, scratch, ld, prefix) per position (a row of R
  // contiguous channels); scratch: `rows` rows of ld = R + lo + hi + 2S.
  template <typename F>
  void for_positions(int64_t rows, const F& f) const {
    const int64_t C = p.R, ld = C + p.lo + p.hi + 2 * S;
    const int64_t grain = std::max<int64_t>(1, 16384 / C);
    at::parallel_for(0, p.B * p.W, grain, [&](int64_t pb, int64_t pe) {
      std::vector<A> scratch(rows * ld, A(0));  // the pads stay zero
      std::vector<double> prefix(C + 1);
      for (int64_t q = pb; q < pe; ++q) f(q * C, scratch.data(), ld, prefix.data());
    });
  }

  // sum[0, C) = window sums of x^2 over the position's channels at x + o;
  // sq: a padded row [lo zeros | x^2 | hi zeros].
  void cl_window_sums(const T* x, int64_t o, A* sq, A* sum, double* prefix) const {
    square_row(x + o, sq + p.lo, p.R);
    window_padded(sq, sum, p.R, p.lo, p.hi, prefix);
  }

  void forward_cl() const {
    const T* x = p.x.const_data_ptr<T>();
    T* out = p.out.mutable_data_ptr<T>();
    const Coefs cf = coefs();
    const int64_t C = p.R;
    for_positions(2, [&](int64_t o, A* scratch, int64_t ld, double* prefix) {
      A* sum = scratch + ld;  // window sums S
      cl_window_sums(x, o, scratch, sum, prefix);
      cf.y_row(x + o, sum, out + o, C);
    });
  }

  void backward_cl() const {
    const T* x = p.x.const_data_ptr<T>();
    const T* dy = p.dy.const_data_ptr<T>();
    T* dx = p.out.mutable_data_ptr<T>();
    const Coefs cf = coefs();
    const int64_t C = p.R;
    for_positions(4, [&](int64_t o, A* scratch, int64_t ld, double* prefix) {
      A* sum = scratch + ld;  // S, then the reflected window sums U
      A* tp = sum + ld;       // [hi zeros | t = dy * y / s | lo zeros]
      A* rb = tp + ld;        // s^-beta
      cl_window_sums(x, o, scratch, sum, prefix);
      for_each_step<S>(C, [&](int64_t j, int64_t c) TF_INLINE_LAMBDA {
        AVec x0, x1, d0, d1, s0, s1;
        IO::load(x + o + j, c, x0, x1);
        IO::load(dy + o + j, c, d0, d1);
        AccIO<A>::load(sum + j, c, s0, s1);
        cf.scale(s0, s1);
        const AVec r0 = inv_pow(s0, cf.beta), r1 = inv_pow(s1, cf.beta);
        AccIO<A>::store(rb + j, r0, r1, c);
        AccIO<A>::store(tp + p.hi + j, d0 * x0 * r0 / s0, d1 * x1 * r1 / s1, c);
      });
      window_padded(tp, sum, C, p.hi, p.lo, prefix);  // reflected: [c - hi, c + lo]
      for_each_step<S>(C, [&](int64_t j, int64_t c) TF_INLINE_LAMBDA {
        AVec x0, x1, d0, d1, r0, r1, u0, u1;
        IO::load(x + o + j, c, x0, x1);
        IO::load(dy + o + j, c, d0, d1);
        AccIO<A>::load(rb + j, c, r0, r1);
        AccIO<A>::load(sum + j, c, u0, u1);
        IO::store(dx + o + j, d0 * r0 - cf.coef * x0 * u0, d1 * r1 - cf.coef * x1 * u1, c);
      });
    });
  }

  // channels_last spatial: f(n, h0, h1, c0, mc, scratch) per task; the
  // scratch holds `rows` rows of W * kClChans accumulate-type values.
  template <typename F>
  void for_cl_spatial(int64_t rows, const F& f) const {
    const int64_t C = p.C, H = p.R, mw = std::min<int64_t>(C, kClChans);
    const int64_t cblocks = (C + mw - 1) / mw, hblocks = (H + kClRows - 1) / kClRows;
    at::parallel_for(0, p.B / C * hblocks * cblocks, 1, [&](int64_t tb, int64_t te) {
      std::vector<A> scratch(rows * p.W * mw);
      for (int64_t t = tb; t < te; ++t) {
        const int64_t n = t / (hblocks * cblocks), hb = t / cblocks % hblocks, cb = t % cblocks;
        const int64_t h0 = hb * kClRows, c0 = cb * mw;
        f(n, h0, std::min(H, h0 + kClRows), c0, std::min(mw, C - c0), scratch.data());
      }
    });
  }

  // Offset of (n, row i, column w, channel c0) in a channels_last tensor.
  int64_t cl_at(int64_t n, int64_t i, int64_t w, int64_t c0) const {
    return ((n * p.R + i) * p.W + w) * p.C + c0;
  }

  // dst[w][:] = sum of src[j][:], j in [w - lo, w + hi] within [0, W); rows
  // of mc values.
  void cl_window_w(const A* src, A* dst, int64_t mc, int64_t lo, int64_t hi) const {
    for (int64_t w = 0; w < p.W; ++w) {
      const int64_t j0 = std::max<int64_t>(0, w - lo), j1 = std::min(p.W - 1, w + hi);
      for_each_step<AVec::size()>(mc, [&](int64_t j, int64_t c) TF_INLINE_LAMBDA {
        AVec a = AVec::loadu(src + j0 * mc + j, c);
        for (int64_t i = j0 + 1; i <= j1; ++i) a = a + AVec::loadu(src + i * mc + j, c);
        a.store(dst + w * mc + j, c);
      });
    }
  }

  // rs[i - i0] = column-window sums of x^2 for rows i in [i0, i1); sq: one row.
  void cl_row_sums(int64_t n, int64_t i0, int64_t i1, int64_t c0, int64_t mc, A* sq,
                   A* rs) const {
    const T* x = p.x.const_data_ptr<T>();
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t w = 0; w < p.W; ++w) square_row(x + cl_at(n, i, w, c0), sq + w * mc, mc);
      cl_window_w(sq, rs + (i - i0) * p.W * mc, mc, p.lo, p.hi);
    }
  }

  // Sum over rows [max(0, h - lo), min(H - 1, h + hi)] of rows (row i at
  // rows + (i - i0) * W * mc), at column w, lanes [j, j + c) as a pair.
  void cl_sum_rows(const A* rows, int64_t i0, int64_t h, int64_t lo, int64_t hi, int64_t w,
                   int64_t mc, int64_t j, int64_t c, AVec& s0, AVec& s1) const {
    const int64_t ia = std::max<int64_t>(0, h - lo), ib = std::min(p.R - 1, h + hi);
    s0 = AVec(A(0));
    s1 = AVec(A(0));
    for (int64_t i = ia; i <= ib; ++i) {
      AVec u, v;
      AccIO<A>::load(rows + ((i - i0) * p.W + w) * mc + j, c, u, v);
      s0 = s0 + u;
      s1 = s1 + v;
    }
  }

  void forward_cls() const {
    const T* x = p.x.const_data_ptr<T>();
    T* out = p.out.mutable_data_ptr<T>();
    const Coefs cf = coefs();
    const int64_t H = p.R, W = p.W, lo = p.lo, hi = p.hi;
    for_cl_spatial(1 + kClRows + lo + hi, [&](int64_t n, int64_t h0, int64_t h1, int64_t c0,
                                              int64_t mc, A* scratch) {
      A* sq = scratch;               // one row: x^2
      A* rs = scratch + W * mc;      // rows [i0, i1): column-window sums
      const int64_t i0 = std::max<int64_t>(0, h0 - lo), i1 = std::min(H, h1 + hi);
      cl_row_sums(n, i0, i1, c0, mc, sq, rs);
      for (int64_t h = h0; h < h1; ++h) {
        for (int64_t w = 0; w < W; ++w) {
          const int64_t o = cl_at(n, h, w, c0);
          for_each_step<S>(mc, [&](int64_t j, int64_t c) TF_INLINE_LAMBDA {
            AVec x0, x1, s0, s1;
            cl_sum_rows(rs, i0, h, lo, hi, w, mc, j, c, s0, s1);
            IO::load(x + o + j, c, x0, x1);
            cf.store_y(out + o + j, x0, x1, s0, s1, c);
          });
        }
      }
    });
  }

  void backward_cls() const {
    const T* x = p.x.const_data_ptr<T>();
    const T* dy = p.dy.const_data_ptr<T>();
    T* dx = p.out.mutable_data_ptr<T>();
    const Coefs cf = coefs();
    const int64_t H = p.R, W = p.W, lo = p.lo, hi = p.hi;
    const int64_t rows = 1 + (kClRows + 2 * (lo + hi)) + (kClRows + lo + hi) + kClRows;
    for_cl_spatial(rows, [&](int64_t n, int64_t h0, int64_t h1, int64_t c0, int64_t mc,
                             A* scratch) {
      // t is needed on rows [ti0, ti1) (the reflected window of the outputs),
      // S on those, so the column-window sums of x^2 on [ri0, ri1). The
      // output rows keep s^-beta from the t pass (rb) rather than summing S
      // again and taking the power twice: backward 1.1-1.25x faster
      // (interleaved, float32, 1x96x55x55 0.41 -> 0.33 ms, 8x256x27x27 3.9 ->
      // 3.3 ms).
      const int64_t ti0 = std::max<int64_t>(0, h0 - hi), ti1 = std::min(H, h1 + lo);
      const int64_t ri0 = std::max<int64_t>(0, ti0 - lo), ri1 = std::min(H, ti1 + hi);
      A* sq = scratch;                            // one row: x^2, then t
      A* rs = sq + W * mc;                        // rows [ri0, ri1)
      A* tr = rs + (kClRows + 2 * (lo + hi)) * W * mc;  // rows [ti0, ti1): windows of t
      A* rb = tr + (kClRows + lo + hi) * W * mc;        // rows [h0, h1): s^-beta
      cl_row_sums(n, ri0, ri1, c0, mc, sq, rs);
      for (int64_t i = ti0; i < ti1; ++i) {
        A* ri = i >= h0 && i < h1 ? rb + (i - h0) * W * mc : nullptr;
        for (int64_t w = 0; w < W; ++w) {
          const int64_t o = cl_at(n, i, w, c0);
          for_each_step<S>(mc, [&](int64_t j, int64_t c) TF_INLINE_LAMBDA {
            AVec x0, x1, d0, d1, s0, s1;
            cl_sum_rows(rs, ri0, i, lo, hi, w, mc, j, c, s0, s1);
            IO::load(x + o + j, c, x0, x1);
            IO::load(dy + o + j, c, d0, d1);
            cf.scale(s0, s1);
            const AVec r0 = inv_pow(s0, cf.beta), r1 = inv_pow(s1, cf.beta);
            if (ri != nullptr) AccIO<A>::store(ri + w * mc + j, r0, r1, c);
            AccIO<A>::store(sq + w * mc + j, d0 * x0 * r0 / s0, d1 * x1 * r1 / s1, c);
          });
        }
        cl_window_w(sq, tr + (i - ti0) * W * mc, mc, hi, lo);  // reflected columns
      }
      for (int64_t h = h0; h < h1; ++h) {
        for (int64_t w = 0; w < W; ++w) {
          const int64_t o = cl_at(n, h, w, c0);
          const A* rr = rb + ((h - h0) * W + w) * mc;
          for_each_step<S>(mc, [&](int64_t j, int64_t c) TF_INLINE_LAMBDA {
            AVec x0, x1, d0, d1, r0, r1, u0, u1;
            AccIO<A>::load(rr + j, c, r0, r1);
            cl_sum_rows(tr, ti0, h, hi, lo, w, mc, j, c, u0, u1);  // reflected rows
            IO::load(x + o + j, c, x0, x1);
            IO::load(dy + o + j, c, d0, d1);
            IO::store(dx + o + j, d0 * r0 - cf.coef * x0 * u0, d1 * r1 - cf.coef * x1 * u1, c);
          });
        }
      }
    });
  }

  void backward() const {
    const T* x = p.x.const_data_ptr<T>();
    const T* dy = p.dy.const_data_ptr<T>();
    T* dx = p.out.mutable_data_ptr<T>();
    const Coefs cf = coefs();
    for_tasks(3, [&](int64_t b, int64_t w0, int64_t m, A* scratch, double* prefix) {
      const int64_t off = b * p.R * p.W + w0;
      A* q = scratch;              // R x n: squares, then the t window source
      A* rb = q + p.R * n;         // R x n: s^-beta
      A* tb = rb + p.R * n;        // R x n: t = dy * y / s
      A* acc = tb + p.R * n;       // n
      A* tmp = acc + n;            // n
      squares(x + off - w0, w0, m, q, tmp, prefix);
      window_rows(q, p.R, n, m, p.lo, p.hi, acc, prefix, [&](int64_t r, const A* s) {
        const T* xr = x + off + r * p.W;
        const T* dr = dy + off + r * p.W;
        for_each_step<S>(m, [&](int64_t j, int64_t c) TF_INLINE_LAMBDA {
          AVec x0, x1, d0, d1, s0, s1;
          IO::load(xr + j, c, x0, x1);
          IO::load(dr + j, c, d0, d1);
          AccIO<A>::load(s + j, c, s0, s1);
          cf.scale(s0, s1);
          const AVec r0 = inv_pow(s0, cf.beta), r1 = inv_pow(s1, cf.beta);
          AccIO<A>::store(rb + r * n + j, r0, r1, c);
          AccIO<A>::store(tb + r * n + j, d0 * x0 * r0 / s0, d1 * x1 * r1 / s1, c);
        });
      });
      const A* src = tb;
      if (p.cols) {  // reflected columns [w - hi, w + lo]
        pad_row(tmp, m, p.hi, p.lo);
        for (int64_t r = 0; r < p.R; ++r) {
          std::copy(tb + r * n, tb + r * n + m, tmp + p.hi);
          window_padded(tmp, q + r * n, m, p.hi, p.lo, prefix);
        }
        src = q;
      }
      // reflected window: rows [r - hi, r + lo]
      window_rows(src, p.R, n, m, p.hi, p.lo, acc, prefix, [&](int64_t r, const A* u) {
        const T* xr = x + off + r * p.W;
        const T* dr = dy + off + r * p.W;
        T* gr = dx + off + r * p.W;
        const A* rr = rb + r * n;
        for_each_step<S>(m, [&](int64_t j, int64_t c) TF_INLINE_LAMBDA {
          AVec x0, x1, d0, d1, r0, r1, u0, u1;
          IO::load(xr + j, c, x0, x1);
          IO::load(dr + j, c, d0, d1);
          AccIO<A>::load(rr + j, c, r0, r1);
          AccIO<A>::load(u + j, c, u0, u1);
          IO::store(gr + j, d0 * r0 - cf.coef * x0 * u0, d1 * r1 - cf.coef * x1 * u1, c);
        });
      });
    });
  }
};

void fwd_cpu(const Params& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(),
                                  "response_norm_cpu", [&] {
                                    const Kernel<scalar_t> k(p);
                                    if (!p.channels_last) {
                                      k.forward();
                                    } else {
                                      p.cols ? k.forward_cls() : k.forward_cl();
                                    }
                                  });
}

void bwd_cpu(const Params& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(),
                                  "response_norm_backward_cpu",
                                  [&] {
                                    const Kernel<scalar_t> k(p);
                                    if (!p.channels_last) {
                                      k.backward();
                                    } else {
                                      p.cols ? k.backward_cls() : k.backward_cl();
                                    }
                                  });
}

}  // namespace

TORCH_LIBRARY_IMPL(torchfuse, CPU, m) {
  m.impl("local_response_norm", &lrn_op<fwd_cpu>);
  m.impl("local_response_norm_backward", &lrn_backward_op<bwd_cpu>);
  m.impl("spatial_response_norm", &srn_op<fwd_cpu>);
  m.impl("spatial_response_norm_backward", &srn_backward_op<bwd_cpu>);
}

}  // namespace torchfuse::lrn
