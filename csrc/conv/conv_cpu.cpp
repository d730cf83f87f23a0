// 2-D convolution: the CPU passes that are not GEMMs (im2col, col2im, the
// direct kernels for groups with few input channels) and the CPU
// registration. Checks, GEMMs and layout: conv.cpp / conv.h.
//
// im2col and col2im work a row (of one output or input plane) at a time,
// with the column range where the kernel tap falls inside the image computed
// once per (row, tap), so that the inner loops carry no bounds checks and,
// at stride 1, run over contiguous memory (the compiler vectorizes them).
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

// A row of T to the accumulate type and back (vectorized conversions).
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
        int64_t oh;
        if (!output_index(h + g.pt - i * g.dh, g.sh, g.OH, oh)) continue;
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
      store_row<T>(acc.data(), dx + t * W, W);
    }
  });
}

// ------------------------------------------------------------------ direct
// The direct kernels work whole channel planes, out of copies of a group's
// input planes in the accumulate type with their zero padding materialised
// (a few KB each for the usual sizes: they stay in L1/L2), so that no inner
// loop carries a bounds check. A copy is split into sw column phases:
// element (r, col) of the padded plane sits at r * rs + (col % sw) * wph +
// col / sw (rs = sw * wph). Tap (i, j) of output (oh, ow) reads padded
// element (oh*sh + i*dh, ow*sw + j*dw): phase (j*dw) % sw, index ow +
// (j*dw) / sw, so for every stride a tap's reads along an output row are one
// contiguous run, and an output row is cin_g * KH * KW vector multiply-adds
// over contiguous runs, with the sums in registers.

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

// kFlat: with stride 1, output (oh, ow) reads padded element oh*rs + ow +
// toff[t] of each plane, so an output plane is one run over e = oh*rs + ow,
// e < OH*rs, whose columns ow >= OW are computed and thrown away: a 14x14
// plane (rs 16) fills 7 steps of 32 lanes 88% full, where its rows would
// fill 14 of 32. The run reads up to (KW-1)*dw past the plane: each plane
// has rs zeros of slack after it. Results go through a float buffer.
//
// Output rows [0, OHn) of R output planes at once, a step of 2 vectors of
// columns at a time: init[r] + sum over input planes ci < nin and taps t of
// wblk[(ci * kk + t) * R + r] * planes[ci * psize + oh*sh*rs + toff[t] + o],
// the 2R sums kept in registers (each load of an input feeds R outputs),
// handed to store(r, oh, o, count, a, b).
template <int R, typename A, typename Store>
TF_ALWAYS_INLINE void block_rows(const A* planes, int64_t psize, int64_t nin, int64_t rs,
                                 const int64_t* toff, int64_t kk, const A* wblk, const A* init,
                                 int64_t sh, int64_t OHn, int64_t OWn, const Store& store) {
  using AVec = at::vec::Vectorized<A>;
  for (int64_t oh = 0; oh < OHn; ++oh) {
    const A* base = planes + oh * sh * rs;
    // a plain loop (see tap_dots)
    for (int64_t o = 0; o < OWn; o += 2 * AVec::size()) {
      const int64_t c = std::min<int64_t>(2 * AVec::size(), OWn - o);
      AVec acc[2 * R];
      for (int r = 0; r < R; ++r) acc[2 * r] = acc[2 * r + 1] = AVec(init[r]);
      for (int64_t ci = 0; ci < nin; ++ci) {
        const A* bi = base + ci * psize + o;
        const A* wi = wblk + ci * kk * R;
        for (int64_t t = 0; t < kk; ++t) {
          AVec x0, x1;
          cpu::AccIO<A>::load(bi + toff[t], c, x0, x1);
          for (int r = 0; r < R; ++r) {
            const AVec wv(wi[t * R + r]);
            acc[2 * r] = at::vec::fmadd(wv, x0, acc[2 * r]);
            acc[2 * r + 1] = at::vec::fmadd(wv, x1, acc[2 * r + 1]);
          }
        }
      }
      for (int r = 0; r < R; ++r) store(r, oh, o, c, acc[2 * r], acc[2 * r + 1]);
    }
  }
}

constexpr int64_t kBlock = 4;  // output planes per block_rows pass

// block_rows with R = rcount (1 to kBlock) fixed at compile time (inlined
// into the task, with the store lambda: see test_package's nm check).
template <typename A, typename Store>
TF_ALWAYS_INLINE void block_rows_n(int64_t rcount, const A* planes, int64_t psize, int64_t nin, int64_t rs,
                  const int64_t* toff, int64_t kk, const A* wblk, const A* init, int64_t sh,
                  int64_t OHn, int64_t OWn, const Store& store) {
  switch (rcount) {
    case 1: block_rows<1>(planes, psize, nin, rs, toff, kk, wblk, init, sh, OHn, OWn, store);
      return;
    case 2: block_rows<2>(planes, psize, nin, rs, toff, kk, wblk, init, sh, OHn, OWn, store);
      return;
    case 3: block_rows<3>(planes, psize, nin, rs, toff, kk, wblk, init, sh, OHn, OWn, store);
      return;
    default: block_rows<4>(planes, psize, nin, rs, toff, kk, wblk, init, sh, OHn, OWn, store);
  }
}

// The kFlat run of R output planes (e < E = rows * rs) through obuf (plane
// r at r * E), then each plane's rows (their first OWn columns) stored to
// out(r), an (rows, OWn) plane of T.
template <typename T, typename A, typename Out>
TF_ALWAYS_INLINE void flat_block(int64_t R, const A* planes, int64_t psize, int64_t nin,
                                 int64_t rs, const int64_t* toff, int64_t kk, const A* wblk,
                                 const A* init, int64_t rows, int64_t OWn, A* obuf,
                                 const Out& out) {
  using AVec = at::vec::Vectorized<A>;
  const int64_t E = rows * rs;
  block_rows_n(R, planes, psize, nin, rs, toff, kk, wblk, init, 1, 1, E,
               [&](int64_t r, int64_t, int64_t e, int64_t cnt, const AVec& u, const AVec& v)
                   TF_INLINE_LAMBDA { cpu::AccIO<A>::store(obuf + r * E + e, u, v, cnt); });
  for (int64_t r = 0; r < R; ++r) {
    T* o = out(r);
    for (int64_t h = 0; h < rows; ++h) store_row<T>(obuf + r * E + h * rs, o + h * OWn, OWn);
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

// Forward: one task per (sample, group, block of up to kBlock output
// channels): the group's cin_g input planes copied and padded (once per run
// of consecutive tasks of one sample and group), then the block's output
// rows.
template <typename T>
void direct_forward_kernel(const DirectParams& p) {
  using A = at::opmath_type<T>;
  using AVec = at::vec::Vectorized<A>;
  const Geometry& g = p.g;
  const T* x = p.x.const_data_ptr<T>();
  const T* w = p.w.const_data_ptr<T>();
  const T* b = p.bias.defined() ? p.bias.const_data_ptr<T>() : nullptr;
  T* out = p.out.mutable_data_ptr<T>();
  const int64_t cin_g = g.cin_g(), cout_g = g.cout_g(), kk = g.kk(), OH = g.OH, OW = g.OW;
  const int64_t nblk = (cout_g + kBlock - 1) / kBlock;
  const PlaneShape s(g.H + g.pt + g.pb, g.W + g.pl + g.pr, g.sw);
  const std::vector<int64_t> toff = tap_offsets(g, s);
  // stride 1: the plane computed as one flat run (see kFlat)
  const bool flat = g.sh == 1 && g.sw == 1;
  const int64_t psize = s.size() + s.rs, E = OH * s.rs;
  at::parallel_for(0, g.N * g.groups * nblk, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> planes(cin_g * psize), row(g.W), wblk(cin_g * kk * kBlock), init(kBlock),
        obuf(flat ? kBlock * E : 0);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t blk = t % nblk, gi = (t / nblk) % g.groups, n = t / nblk / g.groups;
      // the blocks of one (sample, group) are consecutive tasks: fill once
      for (int64_t ci = 0; ci < cin_g && (t == begin || blk == 0); ++ci) {
        fill_plane(x + (n * g.Cin + gi * cin_g + ci) * g.H * g.W, g.H, g.W, g.pt, g.pl, s,
                   planes.data() + ci * psize, row.data());
      }
      const int64_t c0 = gi * cout_g + blk * kBlock;
      const int64_t R = std::min(kBlock, cout_g - blk * kBlock);
      for (int64_t r = 0; r < R; ++r) {
        init[r] = b != nullptr ? static_cast<A>(b[c0 + r]) : A(0);
        for (int64_t e = 0; e < cin_g * kk; ++e) {
          wblk[e * R + r] = static_cast<A>(w[(c0 + r) * cin_g * kk + e]);
        }
      }
      T* o = out + n * g.Cout * OH * OW;
      if (flat) {
        flat_block<T>(R, planes.data(), psize, cin_g, s.rs, toff.data(), kk, wblk.data(),
                      init.data(), OH, OW, obuf.data(),
                      [&](int64_t r) TF_INLINE_LAMBDA { return o + g.pos(c0 + r) * OH * OW; });
        continue;
      }
      block_rows_n(R, planes.data(), psize, cin_g, s.rs, toff.data(), kk, wblk.data(),
                   init.data(), g.sh, OH, OW,
                   [&](int64_t r, int64_t oh, int64_t ow, int64_t cnt, const AVec& u,
                       const AVec& v) TF_INLINE_LAMBDA {
                     cpu::VecIO<T>::store(o + (g.pos(c0 + r) * OH + oh) * OW + ow, u, v, cnt);
                   });
    }
  });
}

// grad_input as a stride-1 correlation with the flipped kernel: dy[oh, ow]
// placed (zeros between, for stride > 1) at padded position
// (oh*sh + (KH-1)*dh - pt, ow*sw + (KW-1)*dw - pl) of an (H + (KH-1)*dh) x
// (W + (KW-1)*dw) plane; dx[h, w] = sum over the group's outputs co and taps
// of w[co, ci, KH-1-i, KW-1-j] * plane_co[h + i*dh, w + j*dw]. One task per
// (sample, group, block of up to kBlock input channels).
template <typename T>
void direct_dinput_kernel(const DirectParams& p) {
  using A = at::opmath_type<T>;
  using AVec = at::vec::Vectorized<A>;
  const Geometry& g = p.g;
  const T* dy = p.dy.const_data_ptr<T>();
  const T* w = p.w.const_data_ptr<T>();
  T* dx = p.dx.mutable_data_ptr<T>();
  const int64_t cin_g = g.cin_g(), cout_g = g.cout_g(), kk = g.kk();
  const int64_t H = g.H, W = g.W, OH = g.OH, OW = g.OW;
  const int64_t nblk = (cin_g + kBlock - 1) / kBlock;
  const int64_t top = (g.KH - 1) * g.dh - g.pt, left = (g.KW - 1) * g.dw - g.pl;
  const PlaneShape s(H + (g.KH - 1) * g.dh, W + (g.KW - 1) * g.dw, 1);
  const std::vector<int64_t> toff = tap_offsets(g, s);
  // output columns whose position ow*sw + left lies in the plane
  int64_t lo, hi;
  valid_range(left, g.sw, s.wph, OW, lo, hi);
  const int64_t psize = s.size() + s.rs, E = H * s.rs;  // computed flat (kFlat)
  at::parallel_for(0, g.N * g.groups * nblk, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> planes(cout_g * psize), row(OW), wblk(cout_g * kk * kBlock),
        init(kBlock, A(0)), obuf(kBlock * E);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t blk = t % nblk, gi = (t / nblk) % g.groups, n = t / nblk / g.groups;
      // the blocks of one (sample, group) are consecutive tasks: fill once
      for (int64_t co = 0; co < cout_g && (t == begin || blk == 0); ++co) {
        const T* dyc = dy + (n * g.Cout + g.pos(gi * cout_g + co)) * OH * OW;
        A* buf = planes.data() + co * psize;
        std::fill(buf, buf + s.size(), A(0));
        for (int64_t oh = 0; oh < OH; ++oh) {
          const int64_t r = oh * g.sh + top;
          if (r < 0 || r >= s.rows || lo >= hi) continue;
          A* dst = buf + r * s.rs + left;
          if (g.sw == 1) {
            load_row(dyc + oh * OW + lo, dst + lo, hi - lo);
          } else {
            load_row(dyc + oh * OW, row.data(), OW);
            for (int64_t ow = lo; ow < hi; ++ow) dst[ow * g.sw] = row[ow];
          }
        }
      }
      const int64_t i0 = blk * kBlock, R = std::min(kBlock, cin_g - i0);
      for (int64_t co = 0; co < cout_g; ++co) {
        const T* wc = w + (gi * cout_g + co) * cin_g * kk;
        for (int64_t r = 0; r < R; ++r) {
          for (int64_t e = 0; e < kk; ++e) {
            wblk[(co * kk + e) * R + r] = static_cast<A>(wc[(i0 + r) * kk + kk - 1 - e]);
          }
        }
      }
      T* d = dx + (n * g.Cin + gi * cin_g + i0) * H * W;
      flat_block<T>(R, planes.data(), psize, cout_g, s.rs, toff.data(), kk, wblk.data(),
                    init.data(), H, W, obuf.data(),
                    [&](int64_t r) TF_INLINE_LAMBDA { return d + r * H * W; });
    }
  });
}

// For TB taps at once, adds dyf[oh * OW + o] * src[oh * rstep + toff[k] + o]
// over rows oh < OH and columns o < OW into the vector partial sums
// part[2k], part[2k+1] (kept in registers meanwhile; dy's vectors loaded
// once for all the taps).
template <int TB, typename A>
TF_ALWAYS_INLINE void tap_dots(const A* src, const int64_t* toff, const A* dyf, int64_t OH,
                               int64_t OW, int64_t rstep, A* part) {
  using AVec = at::vec::Vectorized<A>;
  constexpr int64_t V = AVec::size();
  AVec p[2 * TB];
#pragma GCC unroll 32
  for (int k = 0; k < 2 * TB; ++k) p[k] = AVec::loadu(part + k * V);
  // Plain loops, the tap loop unrolled (#pragma) so that p stays in
  // registers: with a for_each_step lambda capturing p, or the partial-step
  // loads inside the unrolled loop, GCC kept p in memory and copied it
  // (rep movs) on every call.
  for (int64_t oh = 0; oh < OH; ++oh) {
    const A* xr = src + oh * rstep;
    const A* dr = dyf + oh * OW;
    int64_t o = 0;
    for (; o + 2 * V <= OW; o += 2 * V) {
      const AVec d0 = AVec::loadu(dr + o), d1 = AVec::loadu(dr + o + V);
#pragma GCC unroll 16
      for (int k = 0; k < TB; ++k) {
        p[2 * k] = at::vec::fmadd(d0, AVec::loadu(xr + toff[k] + o), p[2 * k]);
        p[2 * k + 1] = at::vec::fmadd(d1, AVec::loadu(xr + toff[k] + o + V), p[2 * k + 1]);
      }
    }
    if (o < OW) {
      const int64_t cnt = OW - o;
      AVec d0, d1;
      cpu::AccIO<A>::load(dr + o, cnt, d0, d1);  // zeros past cnt: adds nothing
#pragma GCC unroll 16
      for (int k = 0; k < TB; ++k) {
        AVec x0, x1;
        cpu::AccIO<A>::load(xr + toff[k] + o, cnt, x0, x1);
        p[2 * k] = at::vec::fmadd(d0, x0, p[2 * k]);
        p[2 * k + 1] = at::vec::fmadd(d1, x1, p[2 * k + 1]);
      }
    }
  }
#pragma GCC unroll 32
  for (int k = 0; k < 2 * TB; ++k) p[k].store(part + k * V);
}

constexpr int64_t kTapBlock = 9;  // a 3x3 kernel's taps in one pass

template <typename A>
void tap_dots_n(int64_t count, const A* src, const int64_t* toff, const A* dyf, int64_t OH,
                int64_t OW, int64_t rstep, A* part) {
  switch (count) {
    case 1: tap_dots<1>(src, toff, dyf, OH, OW, rstep, part); return;
    case 2: tap_dots<2>(src, toff, dyf, OH, OW, rstep, part); return;
    case 3: tap_dots<3>(src, toff, dyf, OH, OW, rstep, part); return;
    case 4: tap_dots<4>(src, toff, dyf, OH, OW, rstep, part); return;
    case 5: tap_dots<5>(src, toff, dyf, OH, OW, rstep, part); return;
    case 6: tap_dots<6>(src, toff, dyf, OH, OW, rstep, part); return;
    case 7: tap_dots<7>(src, toff, dyf, OH, OW, rstep, part); return;
    case 8: tap_dots<8>(src, toff, dyf, OH, OW, rstep, part); return;
    default: tap_dots<9>(src, toff, dyf, OH, OW, rstep, part);
  }
}

// grad_weight: one task per block of output channels of a group. Per sample,
// the group's input planes are copied and padded as the forward reads them
// and each output's dy plane is converted once; then, per (input channel,
// tap), the products of dy's rows and the plane's rows are added to two
// vector partial sums per weight, which run over all samples and are reduced
// at the end (a fixed order: the thread count changes no bit).
template <typename T>
void direct_dweight_kernel(const DirectParams& p) {
  using A = at::opmath_type<T>;
  using AVec = at::vec::Vectorized<A>;
  constexpr int64_t V = AVec::size();
  const Geometry& g = p.g;
  const T* dy = p.dy.const_data_ptr<T>();
  const T* x = p.x.const_data_ptr<T>();
  A* dw = p.dw.mutable_data_ptr<A>();
  const int64_t cin_g = g.cin_g(), cout_g = g.cout_g(), kk = g.kk(), OH = g.OH, OW = g.OW;
  const PlaneShape s(g.H + g.pt + g.pb, g.W + g.pl + g.pr, g.sw);
  const std::vector<int64_t> toff = tap_offsets(g, s);
  // stride 1: flat runs over the plane (kFlat), dy's rows spaced rs apart
  // with zeros between
  const bool flat = g.sh == 1 && g.sw == 1;
  const int64_t psize = s.size() + s.rs, E = OH * s.rs;
  // one task per block of up to 8 output channels of one group: the group's
  // input planes are filled once per sample for the whole block
  constexpr int64_t kOut = 8;
  const int64_t nblk = (cout_g + kOut - 1) / kOut;
  at::parallel_for(0, g.groups * nblk, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> planes(cin_g * psize), row(g.W), dyf(flat ? E : OH * OW);
    // two vectors of partial sums per weight
    std::vector<A> part(2 * AVec::size() * kOut * cin_g * kk);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t gi = t / nblk, c0 = gi * cout_g + (t % nblk) * kOut;
      const int64_t R = std::min(kOut, (gi + 1) * cout_g - c0);
      std::fill(part.begin(), part.end(), A(0));
      for (int64_t n = 0; n < g.N; ++n) {
        for (int64_t ci = 0; ci < cin_g; ++ci) {
          fill_plane(x + (n * g.Cin + gi * cin_g + ci) * g.H * g.W, g.H, g.W, g.pt, g.pl, s,
                     planes.data() + ci * psize, row.data());
        }
        for (int64_t r = 0; r < R; ++r) {
          const T* dyc = dy + (n * g.Cout + g.pos(c0 + r)) * OH * OW;
          if (flat) {
            for (int64_t oh = 0; oh < OH; ++oh) {
              load_row(dyc + oh * OW, dyf.data() + oh * s.rs, OW);
            }
          } else {
            load_row(dyc, dyf.data(), OH * OW);
          }
          for (int64_t ci = 0; ci < cin_g; ++ci) {
            for (int64_t t0 = 0; t0 < kk; t0 += kTapBlock) {
              tap_dots_n(std::min(kTapBlock, kk - t0), planes.data() + ci * psize,
                         toff.data() + t0, dyf.data(), flat ? 1 : OH, flat ? E : OW,
                         g.sh * s.rs, part.data() + 2 * V * ((r * cin_g + ci) * kk + t0));
            }
          }
        }
      }
      for (int64_t e = 0; e < R * cin_g * kk; ++e) {
        const A* pe = part.data() + 2 * V * e;
        dw[c0 * cin_g * kk + e] = cpu::reduce_sum(AVec::loadu(pe) + AVec::loadu(pe + V));
      }
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

void direct_forward_cpu(const DirectParams& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(),
                                  "conv2d_direct_cpu", [&] { direct_forward_kernel<scalar_t>(p); });
}

void direct_dinput_cpu(const DirectParams& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dy.scalar_type(),
                                  "conv2d_direct_dinput_cpu",
                                  [&] { direct_dinput_kernel<scalar_t>(p); });
}

void direct_dweight_cpu(const DirectParams& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dy.scalar_type(),
                                  "conv2d_direct_dweight_cpu",
                                  [&] { direct_dweight_kernel<scalar_t>(p); });
}

// Groups of at most 16 input channels (kernels larger than 1x1: a 1x1
// convolution reads its input directly in the GEMM) and every depthwise one.
// At 32 (ResNeXt-50 stage 4, 16x1024x7x7, groups 32, float32, 2 threads)
// the direct kernels' forward took 7.9 ms against im2col + GEMM's 15.5 but
// their grad_weight 25.8 against 18.2: about even, left to the GEMM. Where
// torch's convolution (oneDNN) is the alternative, float32 and float64 stop
// at 8: at 16 (ResNeXt-50 stage 3, RegNetX group width 16) oneDNN's float32
// forward and grad_input took 0.85-0.90x the direct kernels' time and its
// grad_weight 0.45-0.48x; in bfloat16 the direct forward was 1.3-2x faster.
bool use_direct_cpu(const Geometry& g, at::ScalarType dtype, bool torch_alternative) {
  if (g.cin_g() == 1) return true;
  const bool low = dtype == at::kHalf || dtype == at::kBFloat16;
  return g.kk() > 1 && g.cin_g() <= (torch_alternative && !low ? 8 : 16);
}

// A float16/bfloat16 weight gradient with at most 8 groups: im2col + the
// float32 GEMM measured 1.3-2.9x faster than oneDNN's bfloat16 one (2-core
// Xeon; groups 1, 2, 3 and 7: AlexNet, DeepLabv3, DRN, ShuffleNet v1, RegNet
// shapes), 0.66x at 32 groups (ResNeXt-50 stage 4); float32 was even or
// slower.
bool own_dweight_cpu(const Geometry& g, at::ScalarType dtype) {
  return (dtype == at::kHalf || dtype == at::kBFloat16) && g.groups <= 8;
}

const Launchers kCpu{im2col_cpu, col2im_cpu, use_direct_cpu, own_dweight_cpu,
                     direct_forward_cpu, direct_dinput_cpu, direct_dweight_cpu};

}  // namespace

TORCH_LIBRARY_IMPL(torchfuse, CPU, m) {
  m.impl("conv2d", &conv2d_op<kCpu>);
  m.impl("conv2d_backward", &conv2d_backward_op<kCpu>);
}

}  // namespace torchfuse::conv
