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

template <typename T>
void dw_forward_kernel(const DepthwiseParams& p) {
  using A = at::opmath_type<T>;
  const Geometry& g = p.g;
  const T* x = p.x.const_data_ptr<T>();
  const T* w = p.w.const_data_ptr<T>();
  const T* b = p.bias.defined() ? p.bias.const_data_ptr<T>() : nullptr;
  T* out = p.out.mutable_data_ptr<T>();
  const int64_t mult = g.Cout / g.Cin, H = g.H, W = g.W, OH = g.OH, OW = g.OW;
  // one task per output row (n, c, oh)
  at::parallel_for(0, g.N * g.Cout * OH, std::max<int64_t>(1, 2048 / std::max<int64_t>(OW, 1)),
                   [&](int64_t begin, int64_t end) {
    std::vector<A> acc(OW);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t oh = t % OH, nc = t / OH, c = nc % g.Cout, n = nc / g.Cout;
      const T* xc = x + (n * g.Cin + c / mult) * H * W;
      const T* wc = w + c * g.kk();
      std::fill(acc.begin(), acc.end(), b != nullptr ? static_cast<A>(b[c]) : A(0));
      for (int64_t i = 0; i < g.KH; ++i) {
        const int64_t ih = oh * g.sh - g.pt + i * g.dh;
        if (ih < 0 || ih >= H) continue;
        for (int64_t j = 0; j < g.KW; ++j) {
          const A wv = static_cast<A>(wc[i * g.KW + j]);
          const int64_t off = j * g.dw - g.pl;
          int64_t lo, hi;
          valid_range(off, g.sw, W, OW, lo, hi);
          const T* xr = xc + ih * W + off;
          if (g.sw == 1) {
            for (int64_t ow = lo; ow < hi; ++ow) acc[ow] += wv * static_cast<A>(xr[ow]);
          } else {
            for (int64_t ow = lo; ow < hi; ++ow) {
              acc[ow] += wv * static_cast<A>(xr[ow * g.sw]);
            }
          }
        }
      }
      T* o = out + ((n * g.Cout + g.pos(c)) * OH + oh) * OW;
      for (int64_t ow = 0; ow < OW; ++ow) o[ow] = static_cast<T>(acc[ow]);
    }
  });
}

template <typename T>
void dw_dinput_kernel(const DepthwiseParams& p) {
  using A = at::opmath_type<T>;
  const Geometry& g = p.g;
  const T* dy = p.dy.const_data_ptr<T>();
  const T* w = p.w.const_data_ptr<T>();
  T* dx = p.dx.mutable_data_ptr<T>();
  const int64_t mult = g.Cout / g.Cin, H = g.H, W = g.W, OH = g.OH, OW = g.OW;
  // one task per input plane (n, ci): its outputs' contributions scattered
  // into a plane buffer in a fixed order
  at::parallel_for(0, g.N * g.Cin, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> acc(H * W);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t ci = t % g.Cin, n = t / g.Cin;
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t m = 0; m < mult; ++m) {
        const int64_t c = ci * mult + m;
        const T* dyc = dy + (n * g.Cout + g.pos(c)) * OH * OW;
        const T* wc = w + c * g.kk();
        for (int64_t oh = 0; oh < OH; ++oh) {
          const T* dr = dyc + oh * OW;
          for (int64_t i = 0; i < g.KH; ++i) {
            const int64_t ih = oh * g.sh - g.pt + i * g.dh;
            if (ih < 0 || ih >= H) continue;
            for (int64_t j = 0; j < g.KW; ++j) {
              const A wv = static_cast<A>(wc[i * g.KW + j]);
              const int64_t off = j * g.dw - g.pl;
              int64_t lo, hi;
              valid_range(off, g.sw, W, OW, lo, hi);
              A* ar = acc.data() + ih * W + off;
              if (g.sw == 1) {
                for (int64_t ow = lo; ow < hi; ++ow) ar[ow] += wv * static_cast<A>(dr[ow]);
              } else {
                for (int64_t ow = lo; ow < hi; ++ow) {
                  ar[ow * g.sw] += wv * static_cast<A>(dr[ow]);
                }
              }
            }
          }
        }
      }
      T* d = dx + t * H * W;
      for (int64_t e = 0; e < H * W; ++e) d[e] = static_cast<T>(acc[e]);
    }
  });
}

template <typename T>
void dw_dweight_kernel(const DepthwiseParams& p) {
  using A = at::opmath_type<T>;
  const Geometry& g = p.g;
  const T* dy = p.dy.const_data_ptr<T>();
  const T* x = p.x.const_data_ptr<T>();
  A* dw = p.dw.mutable_data_ptr<A>();
  const int64_t mult = g.Cout / g.Cin, H = g.H, W = g.W, OH = g.OH, OW = g.OW, kk = g.kk();
  // one task per output channel; each output row's dot products are summed
  // first, then added to the tap's total in (n, oh) order
  at::parallel_for(0, g.Cout, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> acc(kk);
    for (int64_t c = begin; c < end; ++c) {
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t n = 0; n < g.N; ++n) {
        const T* dyc = dy + (n * g.Cout + g.pos(c)) * OH * OW;
        const T* xc = x + (n * g.Cin + c / mult) * H * W;
        for (int64_t oh = 0; oh < OH; ++oh) {
          const T* dr = dyc + oh * OW;
          for (int64_t i = 0; i < g.KH; ++i) {
            const int64_t ih = oh * g.sh - g.pt + i * g.dh;
            if (ih < 0 || ih >= H) continue;
            for (int64_t j = 0; j < g.KW; ++j) {
              const int64_t off = j * g.dw - g.pl;
              int64_t lo, hi;
              valid_range(off, g.sw, W, OW, lo, hi);
              const T* xr = xc + ih * W + off;
              A s = 0;
              if (g.sw == 1) {
                for (int64_t ow = lo; ow < hi; ++ow) {
                  s += static_cast<A>(dr[ow]) * static_cast<A>(xr[ow]);
                }
              } else {
                for (int64_t ow = lo; ow < hi; ++ow) {
                  s += static_cast<A>(dr[ow]) * static_cast<A>(xr[ow * g.sw]);
                }
              }
              acc[i * g.KW + j] += s;
            }
          }
        }
      }
      std::copy(acc.begin(), acc.end(), dw + c * kk);
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
