// 2-D convolution: the CPU passes that are not GEMMs (im2col, col2im, the
// direct depthwise kernels) and the CPU registration. Checks, GEMMs and
// layout: conv.cpp / conv.h.
//
// Every kernel works a row (of one output or input plane) at a time, in a
// float (double for float64) row buffer, with the column range where the
// kernel tap falls inside the image computed once per (row, tap), so that
// the inner loops carry no bounds checks and, at stride 1, run over
// contiguous memory (the compiler vectorizes them).
#include "conv.h"

#include "../common/cpu_vec.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace torchfuse::conv {

namespace {

// Output columns [lo, hi) whose input column o * s + off lies in [0, size).
inline void valid_range(int64_t off, int64_t s, int64_t size, int64_t count, int64_t& lo,
                        int64_t& hi) {
  // o * s + off >= 0  <=>  o >= ceil(-off / s)
  lo = off >= 0 ? 0 : (-off + s - 1) / s;
  // o * s + off <= size - 1  <=>  o <= floor((size - 1 - off) / s)
  const int64_t top = size - 1 - off;
  hi = top < 0 ? 0 : std::min<int64_t>(count, top / s + 1);
  lo = std::min(lo, hi);
}

template <typename T, typename C>
void im2col_kernel(const Im2colParams& p) {
  const Geometry& g = p.g;
  const T* x = p.x.const_data_ptr<T>();
  C* col = p.col.mutable_data_ptr<C>();
  const int64_t kk = g.kk(), rows = g.Cin * kk, cin_g = g.cin_g();
  const int64_t H = g.H, W = g.W, OH = g.OH, OW = g.OW;
  at::parallel_for(0, p.nb * rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(g.L(), 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / rows, r = t % rows;
      const int64_t c = r / kk, i = (r % kk) / g.KW, j = r % g.KW;
      const T* xc = x + (n * g.Cin + c) * H * W;
      C* dst = col + n * p.ns + (r + (c / cin_g) * p.extra) * p.rs;
      const int64_t off_w = j * g.dw - g.pl;
      int64_t lo, hi;
      valid_range(off_w, g.sw, W, OW, lo, hi);
      for (int64_t oh = 0; oh < OH; ++oh) {
        C* d = dst + oh * OW;
        const int64_t ih = oh * g.sh - g.pt + i * g.dh;
        if (ih < 0 || ih >= H) {
          std::fill(d, d + OW, C(0));
          continue;
        }
        const T* xr = xc + ih * W + off_w;
        std::fill(d, d + lo, C(0));
        if (g.sw == 1) {
          for (int64_t ow = lo; ow < hi; ++ow) d[ow] = static_cast<C>(xr[ow]);
        } else {
          for (int64_t ow = lo; ow < hi; ++ow) d[ow] = static_cast<C>(xr[ow * g.sw]);
        }
        std::fill(d + hi, d + OW, C(0));
      }
    }
  });
}

template <typename T>
void col2im_kernel(const Col2imParams& p) {
  using A = at::opmath_type<T>;
  const Geometry& g = p.g;
  const T* col = p.col.const_data_ptr<T>();
  T* dx = p.dx.mutable_data_ptr<T>();
  const int64_t kk = g.kk(), L = g.L(), H = g.H, W = g.W, OW = g.OW;
  // one task per input row (n, c, h): its W sums in a row buffer
  at::parallel_for(0, p.nb * g.Cin * H, std::max<int64_t>(1, 2048 / std::max<int64_t>(W, 1)),
                   [&](int64_t begin, int64_t end) {
    std::vector<A> acc(W);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t h = t % H, nc = t / H, c = nc % g.Cin, n = nc / g.Cin;
      std::fill(acc.begin(), acc.end(), A(0));
      const T* cn = col + (n * g.Cin * kk + c * kk) * L;
      for (int64_t i = 0; i < g.KH; ++i) {
        const int64_t u = h + g.pt - i * g.dh;
        if (u < 0 || u % g.sh != 0 || u / g.sh >= g.OH) continue;
        const int64_t oh = u / g.sh;
        for (int64_t j = 0; j < g.KW; ++j) {
          const T* cr = cn + (i * g.KW + j) * L + oh * OW;
          // input column w takes output column ow with w = ow * sw - pl + j * dw
          const int64_t off = j * g.dw - g.pl;
          int64_t lo, hi;
          valid_range(off, g.sw, W, OW, lo, hi);
          if (g.sw == 1) {
            A* a = acc.data() + off;
            for (int64_t ow = lo; ow < hi; ++ow) a[ow] += static_cast<A>(cr[ow]);
          } else {
            for (int64_t ow = lo; ow < hi; ++ow) {
              acc[ow * g.sw + off] += static_cast<A>(cr[ow]);
            }
          }
        }
      }
      T* d = dx + t * W;
      for (int64_t w = 0; w < W; ++w) d[w] = static_cast<T>(acc[w]);
    }
  });
}

// ---------------------------------------------------------------- depthwise
// The depthwise kernels work one channel plane at a time, out of a copy of
// the plane in the accumulate type with its zero padding materialised (a
// few KB for the usual sizes: it stays in L1/L2), so that no inner loop
// carries a bounds check. The copy is split into sw column phases: element
// (r, col) of the padded plane sits at r * rs + (col % sw) * wph + col / sw
// (rs = sw * wph). Tap (i, j) of output (oh, ow) reads padded element
// (oh*sh + i*dh, ow*sw + j*dw): phase (j*dw) % sw, index ow + (j*dw) / sw, so
// for every stride a tap's reads along an output row are one contiguous run,
// and an output row is KH * KW multiply-adds over contiguous rows that the
// compiler vectorizes (with KW unrolled for 3, 5 and 7).

template <typename T>
TF_ALWAYS_INLINE void load_row(const T* src, at::opmath_type<T>* dst, int64_t n) {
  using IO = cpu::VecIO<T>;
  using A = at::opmath_type<T>;
  cpu::for_each_step<IO::kStep>(n, [&](int64_t j, int64_t c) TF_INLINE_LAMBDA {
    typename IO::AVec a, b;
    IO::load(src + j, c, a, b);
    cpu::AccIO<A>::store(dst + j, a, b, c);
  });
}

template <typename T>
TF_ALWAYS_INLINE void store_row(const at::opmath_type<T>* src, T* dst, int64_t n) {
  using IO = cpu::VecIO<T>;
  using A = at::opmath_type<T>;
  cpu::for_each_step<IO::kStep>(n, [&](int64_t j, int64_t c) TF_INLINE_LAMBDA {
    typename IO::AVec a, b;
    cpu::AccIO<A>::load(src + j, c, a, b);
    IO::store(dst + j, a, b, c);
  });
}

struct PlaneShape {
  int64_t rows = 0, wph = 0, sw = 1, rs = 0;
  PlaneShape(int64_t rows_, int64_t cols, int64_t sw_)
      : rows(rows_), wph((cols + sw_ - 1) / sw_), sw(sw_), rs(sw_ * ((cols + sw_ - 1) / sw_)) {}
  int64_t size() const { return rows * rs; }
  // where tap column j*dw of an output row starts, relative to its row
  int64_t tap(int64_t jd) const { return (jd % sw) * wph + jd / sw; }
};

// The plane `src` (H x W, in T) into `buf` (shape s, zeroed first), its
// element (h, w) at padded position (h + top, w + left).
template <typename T>
void fill_plane(const T* src, int64_t H, int64_t W, int64_t top, int64_t left,
                const PlaneShape& s, at::opmath_type<T>* buf, at::opmath_type<T>* row) {
  using A = at::opmath_type<T>;
  std::fill(buf, buf + s.size(), A(0));
  for (int64_t h = 0; h < H; ++h) {
    A* dst = buf + (h + top) * s.rs;
    if (s.sw == 1) {
      load_row(src + h * W, dst + left, W);
    } else {
      load_row(src + h * W, row, W);
      for (int64_t q = 0; q < s.sw; ++q) {  // phase q: padded columns k*sw + q
        int64_t lo, hi;
        valid_range(q - left, s.sw, W, s.wph, lo, hi);
        A* dq = dst + q * s.wph;
        const A* rq = row + q - left;
        for (int64_t k = lo; k < hi; ++k) dq[k] = rq[k * s.sw];
      }
    }
  }
}

// Output rows [0, OHn) of one plane, a step of 2 vectors of columns at a
// time: init + sum over taps t of wt[t] * buf[oh*sh*rs + toff[t] + o], the
// sums kept in registers, handed to store(oh, o, count, a, b).
template <typename A, typename Store>
TF_ALWAYS_INLINE void plane_rows(const A* buf, int64_t rs, const int64_t* toff, const A* wt,
                                 int64_t kk, int64_t sh, int64_t OHn, int64_t OWn, A init,
                                 const Store& store) {
  using AVec = at::vec::Vectorized<A>;
  for (int64_t oh = 0; oh < OHn; ++oh) {
    const A* base = buf + oh * sh * rs;
    cpu::for_each_step<2 * AVec::size()>(OWn, [&](int64_t o, int64_t c) TF_INLINE_LAMBDA {
      AVec a(init), b(init);
      for (int64_t t = 0; t < kk; ++t) {
        AVec x0, x1;
        cpu::AccIO<A>::load(base + toff[t] + o, c, x0, x1);
        const AVec wv(wt[t]);
        a = at::vec::fmadd(wv, x0, a);
        b = at::vec::fmadd(wv, x1, b);
      }
      store(oh, o, c, a, b);
    });
  }
}

// toff[i * KW + j] = i * dh * rs + (where column tap j*dw starts in a row)
inline std::vector<int64_t> tap_offsets(const Geometry& g, const PlaneShape& s) {
  std::vector<int64_t> toff(g.kk());
  for (int64_t i = 0; i < g.KH; ++i) {
    for (int64_t j = 0; j < g.KW; ++j) toff[i * g.KW + j] = i * g.dh * s.rs + s.tap(j * g.dw);
  }
  return toff;
}

template <typename T>
void dw_forward_kernel(const DepthwiseParams& p) {
  using A = at::opmath_type<T>;
  using AVec = at::vec::Vectorized<A>;
  const Geometry& g = p.g;
  const T* x = p.x.const_data_ptr<T>();
  const T* w = p.w.const_data_ptr<T>();
  const T* b = p.bias.defined() ? p.bias.const_data_ptr<T>() : nullptr;
  T* out = p.out.mutable_data_ptr<T>();
  const int64_t mult = g.Cout / g.Cin, kk = g.kk(), OH = g.OH, OW = g.OW;
  const PlaneShape s(g.H + g.pt + g.pb, g.W + g.pl + g.pr, g.sw);
  const std::vector<int64_t> toff = tap_offsets(g, s);
  // one task per input plane (n, ci), for its mult output channels
  at::parallel_for(0, g.N * g.Cin, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> buf(s.size()), row(g.W), wt(kk);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t ci = t % g.Cin, n = t / g.Cin;
      fill_plane(x + t * g.H * g.W, g.H, g.W, g.pt, g.pl, s, buf.data(), row.data());
      for (int64_t m = 0; m < mult; ++m) {
        const int64_t c = ci * mult + m;
        for (int64_t e = 0; e < kk; ++e) wt[e] = static_cast<A>(w[c * kk + e]);
        T* o = out + (n * g.Cout + g.pos(c)) * OH * OW;
        plane_rows(buf.data(), s.rs, toff.data(), wt.data(), kk, g.sh, OH, OW,
                   b != nullptr ? static_cast<A>(b[c]) : A(0),
                   [&](int64_t oh, int64_t ow, int64_t cnt, const AVec& u, const AVec& v)
                       TF_INLINE_LAMBDA { cpu::VecIO<T>::store(o + oh * OW + ow, u, v, cnt); });
      }
    }
  });
}

// grad_input as a stride-1 correlation with the flipped kernel: dy[oh, ow]
// placed (zeros between, for stride > 1) at padded position
// (oh*sh + (KH-1)*dh - pt, ow*sw + (KW-1)*dw - pl) of an (H + (KH-1)*dh) x
// (W + (KW-1)*dw) plane; dx[h, w] = sum_ij w[KH-1-i, KW-1-j] *
// plane[h + i*dh, w + j*dw]. The channel's mult outputs add up in a plane
// of sums, in a fixed order.
template <typename T>
void dw_dinput_kernel(const DepthwiseParams& p) {
  using A = at::opmath_type<T>;
  using AVec = at::vec::Vectorized<A>;
  const Geometry& g = p.g;
  const T* dy = p.dy.const_data_ptr<T>();
  const T* w = p.w.const_data_ptr<T>();
  T* dx = p.dx.mutable_data_ptr<T>();
  const int64_t mult = g.Cout / g.Cin, kk = g.kk(), H = g.H, W = g.W, OH = g.OH, OW = g.OW;
  const int64_t top = (g.KH - 1) * g.dh - g.pt, left = (g.KW - 1) * g.dw - g.pl;
  const PlaneShape s(H + (g.KH - 1) * g.dh, W + (g.KW - 1) * g.dw, 1);
  const std::vector<int64_t> toff = tap_offsets(g, s);
  // output columns whose position ow*sw + left lies in the plane
  int64_t lo, hi;
  valid_range(left, g.sw, s.wph, OW, lo, hi);
  at::parallel_for(0, g.N * g.Cin, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> buf(s.size()), row(OW), wt(kk), sum(mult > 1 ? H * W : 0);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t ci = t % g.Cin, n = t / g.Cin;
      T* d = dx + t * H * W;
      for (int64_t m = 0; m < mult; ++m) {
        const int64_t c = ci * mult + m;
        for (int64_t e = 0; e < kk; ++e) wt[e] = static_cast<A>(w[c * kk + kk - 1 - e]);
        const T* dyc = dy + (n * g.Cout + g.pos(c)) * OH * OW;
        std::fill(buf.begin(), buf.end(), A(0));
        for (int64_t oh = 0; oh < OH; ++oh) {
          const int64_t r = oh * g.sh + top;
          if (r < 0 || r >= s.rows || lo >= hi) continue;
          A* dst = buf.data() + r * s.rs + left;
          if (g.sw == 1) {
            load_row(dyc + oh * OW + lo, dst + lo, hi - lo);
          } else {
            load_row(dyc + oh * OW, row.data(), OW);
            for (int64_t ow = lo; ow < hi; ++ow) dst[ow * g.sw] = row[ow];
          }
        }
        if (mult == 1) {
          plane_rows(buf.data(), s.rs, toff.data(), wt.data(), kk, 1, H, W, A(0),
                     [&](int64_t h, int64_t w0, int64_t cnt, const AVec& u, const AVec& v)
                         TF_INLINE_LAMBDA { cpu::VecIO<T>::store(d + h * W + w0, u, v, cnt); });
        } else {
          plane_rows(buf.data(), s.rs, toff.data(), wt.data(), kk, 1, H, W, A(0),
                     [&](int64_t h, int64_t w0, int64_t cnt, const AVec& u, const AVec& v)
                         TF_INLINE_LAMBDA {
                       A* sr = sum.data() + h * W + w0;
                       AVec s0 = u, s1 = v;
                       if (m > 0) {
                         AVec p0, p1;
                         cpu::AccIO<A>::load(sr, cnt, p0, p1);
                         s0 = p0 + u;
                         s1 = p1 + v;
                       }
                       cpu::AccIO<A>::store(sr, s0, s1, cnt);
                     });
        }
      }
      if (mult > 1) store_row<T>(sum.data(), d, H * W);
    }
  });
}

// grad_weight: per tap, the products of dy's rows with the padded input
// plane's rows (read as the forward reads them) summed elementwise in vector
// accumulators over a plane, then reduced and added to the tap's total in
// n order: one task per input channel, for its mult outputs (a fixed order:
// the thread count changes no bit).
template <typename T>
void dw_dweight_kernel(const DepthwiseParams& p) {
  using A = at::opmath_type<T>;
  using AVec = at::vec::Vectorized<A>;
  const Geometry& g = p.g;
  const T* dy = p.dy.const_data_ptr<T>();
  const T* x = p.x.const_data_ptr<T>();
  A* dw = p.dw.mutable_data_ptr<A>();
  const int64_t mult = g.Cout / g.Cin, kk = g.kk(), OH = g.OH, OW = g.OW;
  const PlaneShape s(g.H + g.pt + g.pb, g.W + g.pl + g.pr, g.sw);
  const std::vector<int64_t> toff = tap_offsets(g, s);
  at::parallel_for(0, g.Cin, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> buf(s.size()), row(g.W), acc(mult * kk);
    std::vector<AVec> part(2 * kk);
    for (int64_t ci = begin; ci < end; ++ci) {
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t n = 0; n < g.N; ++n) {
        fill_plane(x + (n * g.Cin + ci) * g.H * g.W, g.H, g.W, g.pt, g.pl, s, buf.data(),
                   row.data());
        for (int64_t m = 0; m < mult; ++m) {
          const int64_t c = ci * mult + m;
          const T* dyc = dy + (n * g.Cout + g.pos(c)) * OH * OW;
          std::fill(part.begin(), part.end(), AVec(A(0)));
          for (int64_t oh = 0; oh < OH; ++oh) {
            const A* base = buf.data() + oh * g.sh * s.rs;
            const T* dr = dyc + oh * OW;
            cpu::for_each_step<cpu::VecIO<T>::kStep>(OW, [&](int64_t o, int64_t cnt)
                                                              TF_INLINE_LAMBDA {
              AVec d0, d1;
              cpu::VecIO<T>::load(dr + o, cnt, d0, d1);
              for (int64_t t = 0; t < kk; ++t) {
                AVec x0, x1;
                cpu::AccIO<A>::load(base + toff[t] + o, cnt, x0, x1);
                part[2 * t] = at::vec::fmadd(d0, x0, part[2 * t]);
                part[2 * t + 1] = at::vec::fmadd(d1, x1, part[2 * t + 1]);
              }
            });
          }
          A* a = acc.data() + m * kk;
          for (int64_t t = 0; t < kk; ++t) a[t] += cpu::reduce_sum(part[2 * t] + part[2 * t + 1]);
        }
      }
      std::copy(acc.begin(), acc.end(), dw + ci * mult * kk);
    }
  });
}

void im2col_cpu(const Im2colParams& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "im2col_cpu", [&] {
    if (p.col.scalar_type() == p.x.scalar_type()) {
      im2col_kernel<scalar_t, scalar_t>(p);
    } else {
      using A = at::opmath_type<scalar_t>;
      TORCH_CHECK(p.col.scalar_type() == c10::CppTypeToScalarType<A>::value,
                  "conv2d: unexpected im2col dtype ", p.col.scalar_type());
      im2col_kernel<scalar_t, A>(p);
    }
  });
}

void col2im_cpu(const Col2imParams& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dx.scalar_type(), "col2im_cpu",
                                  [&] { col2im_kernel<scalar_t>(p); });
}

void dw_forward_cpu(const DepthwiseParams& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(),
                                  "conv2d_depthwise_cpu", [&] { dw_forward_kernel<scalar_t>(p); });
}

void dw_dinput_cpu(const DepthwiseParams& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dy.scalar_type(),
                                  "conv2d_depthwise_dinput_cpu",
                                  [&] { dw_dinput_kernel<scalar_t>(p); });
}

void dw_dweight_cpu(const DepthwiseParams& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dy.scalar_type(),
                                  "conv2d_depthwise_dweight_cpu",
                                  [&] { dw_dweight_kernel<scalar_t>(p); });
}

const Launchers kCpu{im2col_cpu, col2im_cpu, dw_forward_cpu, dw_dinput_cpu, dw_dweight_cpu};

}  // namespace

TORCH_LIBRARY_IMPL(torchfuse, CPU, m) {
  m.impl("conv2d", &conv2d_op<kCpu>);
  m.impl("conv2d_backward", &conv2d_backward_op<kCpu>);
}

}  // namespace torchfuse::conv
