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
#include <cmath>
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
// loop carries a bounds check. A copy is split into sh x sw phases by row
// and column: element (r, c) of the padded plane sits in phase
// (r % sh, c % sw), a sub-plane of hph x wph elements, at row r / sh, column
// c / sw. Tap (i, j) of output (oh, ow) reads padded element (oh*sh + i*dh,
// ow*sw + j*dw): phase ((i*dh) % sh, (j*dw) % sw), row oh + (i*dh) / sh,
// column ow + (j*dw) / sw, i.e. toff(i, j) + oh * wph + ow. So for every
// stride each tap's reads over the whole output plane are one run over
// e = oh * wph + ow (kFlat), and an output plane is cin_g * KH * KW vector
// multiply-adds over such runs, with the sums in registers. (Stride 2 used
// to compute a row at a time, 7 of 32 lanes at MobileNetV2's 14 -> 7 layer;
// most of its 4 ns per output, against 0.7 at stride 1, was the plane fill,
// though: see fill_plane. The flat run alone did not measurably change it.)

struct PlaneShape {
  int64_t sh = 1, sw = 1, hph = 0, wph = 0, sub = 0;
  PlaneShape(int64_t rows, int64_t cols, int64_t sh_, int64_t sw_)
      : sh(sh_), sw(sw_), hph((rows + sh_ - 1) / sh_), wph((cols + sw_ - 1) / sw_),
        sub(hph * wph) {}
  int64_t size() const { return sh * sw * sub; }
  // padded element (r, c)
  int64_t pos(int64_t r, int64_t c) const {
    return ((r % sh) * sw + c % sw) * sub + (r / sh) * wph + c / sw;
  }
};

// Where input column u, u + sw, u + 2*sw, ... of a row goes, for u < sw:
// padded column u + left, i.e. column phase (u + left) % sw from index
// (u + left) / sw on; off[u] is that start relative to the row's phase 0,
// cnt[u] how many columns there are. A function of the shape only.
struct ColumnSplit {
  std::vector<int64_t> off, cnt;
  ColumnSplit(const PlaneShape& s, int64_t W, int64_t left) : off(s.sw), cnt(s.sw) {
    for (int64_t u = 0; u < s.sw; ++u) {
      off[u] = ((u + left) % s.sw) * s.sub + (u + left) / s.sw;
      cnt[u] = u < W ? (W - u + s.sw - 1) / s.sw : 0;
    }
  }
};

// The plane `src` (H x W, in T) into `buf` (shape s, zeroed first), its
// element (h, w) at padded position (h + top, w + left); cs = ColumnSplit(s,
// W, left). Each row is dealt to its column phases: at stride 1 converted
// in place, at stride 2 loaded and converted two vectors at a time and split
// in registers (deinterleave2), at larger strides converted into `row` and
// copied element by element. (Per plane this used to cost a few integer
// divisions per row and a scalar strided copy: the fill alone took 2-5 ns
// per output of a stride-2 depthwise layer, the multiply-adds 0.6-1.4.)
template <typename T>
void fill_plane(const T* src, int64_t H, int64_t W, int64_t top, int64_t left,
                const PlaneShape& s, const ColumnSplit& cs, at::opmath_type<T>* buf,
                at::opmath_type<T>* row) {
  using A = at::opmath_type<T>;
  using AVec = at::vec::Vectorized<A>;
  constexpr int64_t V = AVec::size();
  std::fill(buf, buf + s.size(), A(0));
  int64_t ph = top % s.sh, ri = top / s.sh;  // row phase and index of padded row h + top
  for (int64_t h = 0; h < H; ++h) {
    A* dst = buf + ph * s.sw * s.sub + ri * s.wph;  // column phase 0 of the row
    if (++ph == s.sh) {
      ph = 0;
      ++ri;
    }
    if (s.sw == 1) {
      load_row(src + h * W, dst + left, W);
      continue;
    }
    if (s.sw == 2) {  // masked loads and stores at the row's end
      A* d0 = dst + cs.off[0];
      A* d1 = dst + cs.off[1];
      for (int64_t m = 0; 2 * m < W; m += V) {
        // straight from src: through `row`, each load waited for the masked
        // store before it (no store forwarding), 34% of this function's time
        AVec lo, hi;
        cpu::VecIO<T>::load(src + h * W + 2 * m, std::min(W - 2 * m, 2 * V), lo, hi);
        const auto [even, odd] = at::vec::deinterleave2(lo, hi);
        even.store(d0 + m, static_cast<int>(std::min(cs.cnt[0] - m, V)));
        if (cs.cnt[1] > m) odd.store(d1 + m, static_cast<int>(std::min(cs.cnt[1] - m, V)));
      }
      continue;
    }
    load_row(src + h * W, row, W);
    for (int64_t u = 0; u < s.sw; ++u) {
      A* d = dst + cs.off[u];
      const A* r = row + u;
      for (int64_t m = 0; m < cs.cnt[u]; ++m) d[m] = r[m * s.sw];
    }
  }
}

// kFlat: output (oh, ow) reads element oh*rs + ow + toff[t] of each plane
// (rs: its phases' row length), so an output plane is one run over
// e = oh*rs + ow, e < OH*rs, whose columns ow >= OW are computed and thrown
// away: a 14x14 plane (rs 16) fills 7 steps of 32 lanes 88% full, where its
// rows would fill 14 of 32. The run reads up to rs - 1 elements past the
// plane: each plane has rs elements of slack after it. Results go through
// a float buffer.
//
// The run [0, E) of R output planes at once, a step of 2 vectors at a time:
// init[r] + sum over input planes ci < nin and taps t of
// wblk[(ci * kk + t) * R + r] * planes[ci * psize + toff[t] + e], the 2R
// sums kept in registers (each load of an input feeds R outputs), stored to
// obuf + r * E + e.
template <int R, typename A>
TF_ALWAYS_INLINE void block_run(const A* planes, int64_t psize, int64_t nin, const int64_t* toff,
                                int64_t kk, const A* wblk, const A* init, int64_t E, A* obuf) {
  using AVec = at::vec::Vectorized<A>;
  // a plain loop (see tap_dots)
  for (int64_t o = 0; o < E; o += 2 * AVec::size()) {
    const int64_t c = std::min<int64_t>(2 * AVec::size(), E - o);
    AVec acc[2 * R];
    for (int r = 0; r < R; ++r) acc[2 * r] = acc[2 * r + 1] = AVec(init[r]);
    for (int64_t ci = 0; ci < nin; ++ci) {
      const A* bi = planes + ci * psize + o;
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
    for (int r = 0; r < R; ++r) cpu::AccIO<A>::store(obuf + r * E + o, acc[2 * r], acc[2 * r + 1], c);
  }
}

constexpr int64_t kBlock = 4;  // output planes per block_run pass

// block_run with R = rcount (1 to kBlock) fixed at compile time
template <typename A>
TF_ALWAYS_INLINE void block_run_n(int64_t rcount, const A* planes, int64_t psize, int64_t nin,
                                  const int64_t* toff, int64_t kk, const A* wblk,
                                  const A* init, int64_t E, A* obuf) {
  switch (rcount) {
    case 1: block_run<1>(planes, psize, nin, toff, kk, wblk, init, E, obuf); return;
    case 2: block_run<2>(planes, psize, nin, toff, kk, wblk, init, E, obuf); return;
    case 3: block_run<3>(planes, psize, nin, toff, kk, wblk, init, E, obuf); return;
    default: block_run<4>(planes, psize, nin, toff, kk, wblk, init, E, obuf);
  }
}

// The kFlat run of R (1 to kBlock) output planes (e < E = rows * rs) through
// obuf (plane r at r * E), then each plane's rows (their first OWn columns)
// stored to out(r), an (rows, OWn) plane of T.
template <typename T, typename A, typename Out>
TF_ALWAYS_INLINE void flat_block(int64_t R, const A* planes, int64_t psize, int64_t nin,
                                 int64_t rs, const int64_t* toff, int64_t kk, const A* wblk,
                                 const A* init, int64_t rows, int64_t OWn, A* obuf,
                                 const Out& out) {
  const int64_t E = rows * rs;
  block_run_n(R, planes, psize, nin, toff, kk, wblk, init, E, obuf);
  for (int64_t r = 0; r < R; ++r) {
    T* o = out(r);
    for (int64_t h = 0; h < rows; ++h) store_row<T>(obuf + r * E + h * rs, o + h * OWn, OWn);
  }
}

// toff[i * KW + j]: where tap (i, j)'s run starts in a plane
inline std::vector<int64_t> tap_offsets(const Geometry& g, const PlaneShape& s) {
  std::vector<int64_t> toff(g.kk());
  for (int64_t i = 0; i < g.KH; ++i) {
    for (int64_t j = 0; j < g.KW; ++j) toff[i * g.KW + j] = s.pos(i * g.dh, j * g.dw);
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
  const Geometry& g = p.g;
  const T* x = p.x.const_data_ptr<T>();
  const T* w = p.w.const_data_ptr<T>();
  const T* b = p.bias.defined() ? p.bias.const_data_ptr<T>() : nullptr;
  T* out = p.out.mutable_data_ptr<T>();
  const int64_t cin_g = g.cin_g(), cout_g = g.cout_g(), kk = g.kk(), OH = g.OH, OW = g.OW;
  const int64_t nblk = (cout_g + kBlock - 1) / kBlock;
  const PlaneShape s(g.H + g.pt + g.pb, g.W + g.pl + g.pr, g.sh, g.sw);
  const std::vector<int64_t> toff = tap_offsets(g, s);
  const ColumnSplit cs(s, g.W, g.pl);
  const int64_t psize = s.size() + s.wph, E = OH * s.wph;  // computed flat (kFlat)
  at::parallel_for(0, g.N * g.groups * nblk, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> planes(cin_g * psize), row(g.W), wblk(cin_g * kk * kBlock), init(kBlock),
        obuf(kBlock * E);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t blk = t % nblk, gi = (t / nblk) % g.groups, n = t / nblk / g.groups;
      // the blocks of one (sample, group) are consecutive tasks: fill once
      for (int64_t ci = 0; ci < cin_g && (t == begin || blk == 0); ++ci) {
        fill_plane(x + (n * g.Cin + gi * cin_g + ci) * g.H * g.W, g.H, g.W, g.pt, g.pl, s, cs,
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
      flat_block<T>(R, planes.data(), psize, cin_g, s.wph, toff.data(), kk, wblk.data(),
                    init.data(), OH, OW, obuf.data(),
                    [&](int64_t r) TF_INLINE_LAMBDA { return o + g.pos(c0 + r) * OH * OW; });
    }
  });
}

// grad_input, split by output phase (sub-pixel): with the flipped kernel
// wf[i, j] = w[KH-1-i, KW-1-j], dx[h, w] = sum over the group's outputs and
// the taps (i, j) for which dy[oh, ow] exists with oh*sh = h + i*dh - top,
// ow*sw = w + j*dw - left (top = (KH-1)*dh - pt, left = (KW-1)*dw - pl) of
// wf[i, j] * dy[oh, ow]. For dx's rows h = y*sh + a and columns
// w = x*sw + b, tap (i, j) contributes only if (a + i*dh - top) and
// (b + j*dw - left) divide by the strides, at dy[y + qi, x + qj] (qi, qj
// their quotients): each of the sh*sw phases (a, b) of dx is a stride-1
// correlation of the compact dy plane with its own taps, computed as one
// flat run (kFlat) over a copy of dy padded by PT rows and PL columns. At
// stride 1 that is the whole plane and every tap; at stride 2 each phase has
// about a quarter of the taps, where a correlation of the zero-stuffed dy
// (the previous kernel) multiplied three zeros for every product that
// counted. One task per (sample, group, block of up to kBlock input
// channels).
struct DinputPhases {
  struct Phase {
    int64_t rows = 0, cols = 0, E = 0, t0 = 0, kk = 0, obuf = 0;
  };
  std::vector<Phase> ph;         // index a * sw + b
  std::vector<int64_t> tap, toff;  // per phase from t0: flipped tap i * KW + j, its offset
  int64_t PT = 0, PL = 0, rows = 0, rs = 0, psize = 0, ebuf = 0;

  // tap quotient (num / s, exact) along one dimension, or false
  static bool quot(int64_t num, int64_t s, int64_t& q) {
    if (((num % s) + s) % s != 0) return false;
    q = num / s;
    return true;
  }

  // the smallest and largest quotient over phases [0, s) and taps [0, K)
  static void quot_range(int64_t K, int64_t d, int64_t s, int64_t off, int64_t& lo,
                         int64_t& hi) {
    bool any = false;
    for (int64_t a = 0; a < s; ++a) {
      for (int64_t i = 0; i < K; ++i) {
        int64_t q;
        if (!quot(a + i * d - off, s, q)) continue;
        lo = any ? std::min(lo, q) : q;
        hi = any ? std::max(hi, q) : q;
        any = true;
      }
    }
  }

  explicit DinputPhases(const Geometry& g) : ph(g.sh * g.sw) {
    const int64_t top = (g.KH - 1) * g.dh - g.pt, left = (g.KW - 1) * g.dw - g.pl;
    int64_t qi_min = 0, qi_max = 0, qj_min = 0, qj_max = 0;
    quot_range(g.KH, g.dh, g.sh, top, qi_min, qi_max);
    quot_range(g.KW, g.dw, g.sw, left, qj_min, qj_max);
    const int64_t HA = (g.H + g.sh - 1) / g.sh, WB = (g.W + g.sw - 1) / g.sw;
    PT = std::max<int64_t>(0, -qi_min);
    PL = std::max<int64_t>(0, -qj_min);
    rows = PT + std::max(g.OH, HA + qi_max);
    rs = PL + std::max(g.OW, WB + qj_max);
    psize = rows * rs + rs;  // a row of slack: the runs read past the last row
    for (int64_t a = 0; a < g.sh; ++a) {
      for (int64_t b = 0; b < g.sw; ++b) {
        Phase& p = ph[a * g.sw + b];
        p.rows = g.H > a ? (g.H - a + g.sh - 1) / g.sh : 0;
        p.cols = g.W > b ? (g.W - b + g.sw - 1) / g.sw : 0;
        p.E = p.rows * rs;
        p.t0 = static_cast<int64_t>(tap.size());
        p.obuf = ebuf;
        ebuf += p.E;
        for (int64_t i = 0; i < g.KH; ++i) {
          int64_t qi, qj;
          if (!quot(a + i * g.dh - top, g.sh, qi)) continue;
          for (int64_t j = 0; j < g.KW; ++j) {
            if (!quot(b + j * g.dw - left, g.sw, qj)) continue;
            tap.push_back(i * g.KW + j);
            toff.push_back((qi + PT) * rs + qj + PL);
          }
        }
        p.kk = static_cast<int64_t>(tap.size()) - p.t0;
      }
    }
  }
};

template <typename T>
void direct_dinput_kernel(const DirectParams& p) {
  using A = at::opmath_type<T>;
  using AVec = at::vec::Vectorized<A>;
  constexpr int64_t V = AVec::size();
  const Geometry& g = p.g;
  const T* dy = p.dy.const_data_ptr<T>();
  const T* w = p.w.const_data_ptr<T>();
  T* dx = p.dx.mutable_data_ptr<T>();
  const int64_t cin_g = g.cin_g(), cout_g = g.cout_g(), kk = g.kk();
  const int64_t H = g.H, W = g.W, OH = g.OH, OW = g.OW;
  const int64_t nblk = (cin_g + kBlock - 1) / kBlock;
  const DinputPhases dp(g);
  const int64_t rs = dp.rs, psize = dp.psize;
  at::parallel_for(0, g.N * g.groups * nblk, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> planes(cout_g * psize), wblk(cout_g * kk * kBlock), init(kBlock, A(0)),
        obuf(kBlock * dp.ebuf);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t blk = t % nblk, gi = (t / nblk) % g.groups, n = t / nblk / g.groups;
      const int64_t i0 = blk * kBlock, R = std::min(kBlock, cin_g - i0);
      // the blocks of one (sample, group) are consecutive tasks: fill once
      for (int64_t co = 0; co < cout_g && (t == begin || blk == 0); ++co) {
        const T* dyc = dy + (n * g.Cout + g.pos(gi * cout_g + co)) * OH * OW;
        A* buf = planes.data() + co * psize;
        std::fill(buf, buf + psize, A(0));
        for (int64_t oh = 0; oh < OH; ++oh) {
          load_row(dyc + oh * OW, buf + (oh + dp.PT) * rs + dp.PL, OW);
        }
      }
      // per phase, [(co * phase kk + tap) * R + r] from cout_g * t0 * R on
      for (const auto& ph : dp.ph) {
        A* wp = wblk.data() + cout_g * ph.t0 * R;
        for (int64_t co = 0; co < cout_g; ++co) {
          const T* wc = w + (gi * cout_g + co) * cin_g * kk;
          for (int64_t r = 0; r < R; ++r) {
            for (int64_t k = 0; k < ph.kk; ++k) {
              wp[(co * ph.kk + k) * R + r] =
                  static_cast<A>(wc[(i0 + r) * kk + kk - 1 - dp.tap[ph.t0 + k]]);
            }
          }
        }
      }
      for (const auto& ph : dp.ph) {
        if (ph.E == 0) continue;
        block_run_n(R, planes.data(), psize, cout_g, dp.toff.data() + ph.t0, ph.kk,
                    wblk.data() + cout_g * ph.t0 * R, init.data(), ph.E,
                    obuf.data() + R * ph.obuf);
      }
      // phase (a, b) of plane r: obuf + R * phase.obuf + r * phase.E, rows rs apart
      const auto phase_row = [&](int64_t a, int64_t b, int64_t r, int64_t y) TF_INLINE_LAMBDA {
        const auto& ph = dp.ph[a * g.sw + b];
        return obuf.data() + R * ph.obuf + r * ph.E + y * rs;
      };
      for (int64_t r = 0; r < R; ++r) {
        T* d = dx + (n * g.Cin + gi * cin_g + i0 + r) * H * W;
        for (int64_t h = 0, a = 0, y = 0; h < H; ++h, a = a + 1 == g.sh ? 0 : a + 1,
                     y += a == 0) {  // row h = y * sh + a
          T* drow = d + h * W;
          if (g.sw == 1) {
            store_row<T>(phase_row(a, 0, r, y), drow, W);
          } else if (g.sw == 2) {  // the two column phases interleaved
            const A* ev = phase_row(a, 0, r, y);
            const A* od = phase_row(a, 1, r, y);
            const int64_t c0 = dp.ph[a * 2].cols, c1 = dp.ph[a * 2 + 1].cols;
            for (int64_t x = 0; 2 * x < W; x += V) {
              const auto [lo, hi] = at::vec::interleave2(
                  AVec::loadu(ev + x, static_cast<int>(std::min(c0 - x, V))),
                  AVec::loadu(od + x, static_cast<int>(std::max<int64_t>(0, std::min(c1 - x, V)))));
              cpu::VecIO<T>::store(drow + 2 * x, lo, hi, std::min(W - 2 * x, 2 * V));
            }
          } else {
            for (int64_t b = 0; b < g.sw; ++b) {
              const A* src = phase_row(a, b, r, y);
              for (int64_t x = 0; x * g.sw + b < W; ++x) drow[x * g.sw + b] = static_cast<T>(src[x]);
            }
          }
        }
      }
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

// grad_weight: one unit of work per block of up to kOut output channels of
// a group. Per sample, the group's input planes are copied and padded as
// the forward reads them and each output's dy plane is converted once;
// then, per (input channel, tap), the products of dy and the plane's tap
// run (kFlat: dy's rows spaced wph apart with zeros between) are added to
// two vector partial sums per weight, which run over all samples and are
// reduced at the end (a fixed order per unit: the thread count changes no
// bit). A thread takes its units a block at a time, samples outermost, so
// that it reads x and dy a sample's consecutive channels at a time: unit by
// unit, a depthwise layer's small planes were read one per sample, C*H*W
// elements apart, and the weight gradient of MobileNetV2's 576-channel
// 14 -> 7 layer took twice the forward's time.
// The zeros of the flat run meet input elements that this tap does not
// read; where one of those is inf or NaN, 0 * inf would make the sum NaN
// where torch's is finite, so a unit whose result is not finite is computed
// again a row at a time, reading only what each tap reads.
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
  const PlaneShape s(g.H + g.pt + g.pb, g.W + g.pl + g.pr, g.sh, g.sw);
  const std::vector<int64_t> toff = tap_offsets(g, s);
  const ColumnSplit cs(s, g.W, g.pl);
  const int64_t psize = s.size() + s.wph, E = OH * s.wph;
  constexpr int64_t kOut = 8;
  const int64_t nblk = (cout_g + kOut - 1) / kOut;
  // partial sums per unit (two vectors per weight); units per block: their
  // partial sums within 64 KB
  const int64_t upart = 2 * V * kOut * cin_g * kk;
  const int64_t ublock = std::clamp<int64_t>(int64_t{16384} / upart, 1, 16);
  at::parallel_for(0, g.groups * nblk, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> planes(cin_g * psize), row(g.W), dyf(E), dyr, part(ublock * upart);
    // units [u0, u1): partial sums from samples [0, N) into part; flat runs
    // over dyf, else rows of dyr (OH x OW)
    const auto accumulate = [&](int64_t u0, int64_t u1, bool flat) TF_INLINE_LAMBDA {
      std::fill(part.begin(), part.begin() + (u1 - u0) * upart, A(0));
      for (int64_t n = 0; n < g.N; ++n) {
        for (int64_t u = u0; u < u1; ++u) {
          const int64_t gi = u / nblk, c0 = gi * cout_g + (u % nblk) * kOut;
          const int64_t R = std::min(kOut, (gi + 1) * cout_g - c0);
          // a group's blocks are consecutive units: fill once per sample
          for (int64_t ci = 0; ci < cin_g && (u == u0 || u % nblk == 0); ++ci) {
            fill_plane(x + (n * g.Cin + gi * cin_g + ci) * g.H * g.W, g.H, g.W, g.pt, g.pl, s,
                       cs, planes.data() + ci * psize, row.data());
          }
          A* pu = part.data() + (u - u0) * upart;
          for (int64_t r = 0; r < R; ++r) {
            const T* dyc = dy + (n * g.Cout + g.pos(c0 + r)) * OH * OW;
            if (flat) {
              for (int64_t oh = 0; oh < OH; ++oh) {
                load_row(dyc + oh * OW, dyf.data() + oh * s.wph, OW);
              }
            } else {
              load_row(dyc, dyr.data(), OH * OW);
            }
            for (int64_t ci = 0; ci < cin_g; ++ci) {
              for (int64_t t0 = 0; t0 < kk; t0 += kTapBlock) {
                tap_dots_n(std::min(kTapBlock, kk - t0), planes.data() + ci * psize,
                           toff.data() + t0, flat ? dyf.data() : dyr.data(), flat ? 1 : OH,
                           flat ? E : OW, s.wph, pu + 2 * V * ((r * cin_g + ci) * kk + t0));
              }
            }
          }
        }
      }
    };
    // unit u's sums into dw; whether they are all finite
    const auto reduce = [&](int64_t u, const A* pu) TF_INLINE_LAMBDA {
      const int64_t gi = u / nblk, c0 = gi * cout_g + (u % nblk) * kOut;
      const int64_t R = std::min(kOut, (gi + 1) * cout_g - c0);
      bool finite = true;
      for (int64_t e = 0; e < R * cin_g * kk; ++e) {
        const A* pe = pu + 2 * V * e;
        const A v = cpu::reduce_sum(AVec::loadu(pe) + AVec::loadu(pe + V));
        dw[c0 * cin_g * kk + e] = v;
        finite = finite && std::isfinite(v);
      }
      return finite;
    };
    for (int64_t u0 = begin; u0 < end; u0 += ublock) {
      const int64_t u1 = std::min(end, u0 + ublock);
      accumulate(u0, u1, true);
      int64_t redo = 0;  // bit k: unit u0 + k is not finite (a rare path: inf or NaN input)
      for (int64_t u = u0; u < u1; ++u) {
        if (!reduce(u, part.data() + (u - u0) * upart)) redo |= int64_t{1} << (u - u0);
      }
      for (int64_t u = u0; u < u1; ++u) {
        if (((redo >> (u - u0)) & 1) == 0) continue;
        dyr.resize(OH * OW);
        accumulate(u, u + 1, false);
        reduce(u, part.data());
      }
    }
  });
}

// ------------------------------------------------------------ channels_last
// Depthwise convolutions (one input and one output channel per group) without
// a shuffle, on channels_last (NHWC) tensors read and written where they lie.
// A pixel's channels are contiguous, so every pass vectorizes over channels,
// and the index work (which taps fall inside the image) is done once per
// row for the pixels whose taps all lie inside it (span_sum) and once per
// pixel for the rest (pixel_sum): no copy, no padded plane. conv.cpp's
// path_of says where they run: the float16/bfloat16 backward, where
// oneDNN's speed depends on the CPU's instruction set (on the 2-core Xeon
// with AVX512_BF16 and AVX512_FP16, batch 32, 576 channels 14x14, 3x3: its
// bfloat16 grad_input at stride 2 took 46 ms, float32 1.8, and float16 took
// 19-137 ms in every backward pass, where a VM without those instructions
// had run the same bfloat16 layer's forward+backward in 3-8 ms), and every
// pass with asymmetric padding, which torch's convolution does not take.
// Channel c's weights are gathered first into wt[t * C + c] (tap
// t = i * KW + j, the accumulate type).

template <typename T>
std::vector<at::opmath_type<T>> taps_by_channel(const T* w, int64_t C, int64_t kk) {
  std::vector<at::opmath_type<T>> wt(kk * C);
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t t = 0; t < kk; ++t) {
      wt[t * C + c] = static_cast<at::opmath_type<T>>(w[c * kk + t]);
    }
  }
  return wt;
}

// One pixel's C channels: dst[c] = init[c] (0 without init) + sum over
// k < m of wt[woff[k] + c] * src[off[k] + c], the taps in the order given.
// Two steps of channels at a time: four independent sums.
template <typename T>
TF_ALWAYS_INLINE void pixel_sum(const T* src, const int64_t* off, const int64_t* woff, int64_t m,
                                const at::opmath_type<T>* wt, const at::opmath_type<T>* init,
                                int64_t C, T* dst) {
  using IO = cpu::VecIO<T>;
  using A = at::opmath_type<T>;
  using AVec = typename IO::AVec;
  constexpr int64_t S = IO::kStep, V = IO::kSize;
  int64_t c = 0;
  for (; c + 2 * S <= C; c += 2 * S) {
    AVec a0(A(0)), b0(A(0)), a1(A(0)), b1(A(0));
    if (init != nullptr) {
      a0 = AVec::loadu(init + c);
      b0 = AVec::loadu(init + c + V);
      a1 = AVec::loadu(init + c + S);
      b1 = AVec::loadu(init + c + S + V);
    }
    for (int64_t k = 0; k < m; ++k) {
      AVec xa0, xb0, xa1, xb1;
      IO::load(src + off[k] + c, xa0, xb0);
      IO::load(src + off[k] + c + S, xa1, xb1);
      const A* wk = wt + woff[k] + c;
      a0 = at::vec::fmadd(AVec::loadu(wk), xa0, a0);
      b0 = at::vec::fmadd(AVec::loadu(wk + V), xb0, b0);
      a1 = at::vec::fmadd(AVec::loadu(wk + S), xa1, a1);
      b1 = at::vec::fmadd(AVec::loadu(wk + S + V), xb1, b1);
    }
    IO::store(dst + c, a0, b0);
    IO::store(dst + c + S, a1, b1);
  }
  cpu::for_each_step<S>(C - c, [&](int64_t j, int64_t n) TF_INLINE_LAMBDA {
    const int64_t cj = c + j;
    AVec a(A(0)), b(A(0));
    if (init != nullptr) cpu::AccIO<A>::load(init + cj, n, a, b);
    for (int64_t k = 0; k < m; ++k) {
      AVec xa, xb, wa, wb;
      IO::load(src + off[k] + cj, n, xa, xb);
      cpu::AccIO<A>::load(wt + woff[k] + cj, n, wa, wb);
      a = at::vec::fmadd(wa, xa, a);
      b = at::vec::fmadd(wb, xb, b);
    }
    IO::store(dst + cj, a, b, n);
  });
}

// pixel_sum over `count` pixels whose taps all lie inside the image, so that
// their offsets differ by a fixed step: pixel t reads src[s0 + t * sstep +
// rel[k] + c] and writes dst[t * dstep + c]. Two pixels at a time share each
// weight load (four independent sums also where C is one step or less).
template <typename T>
TF_ALWAYS_INLINE void span_sum(const T* src, int64_t s0, int64_t sstep, const int64_t* rel,
                               const int64_t* woff, int64_t m, const at::opmath_type<T>* wt,
                               const at::opmath_type<T>* init, int64_t C, T* dst,
                               int64_t dstep, int64_t count) {
  using IO = cpu::VecIO<T>;
  using A = at::opmath_type<T>;
  using AVec = typename IO::AVec;
  constexpr int64_t S = IO::kStep;
  int64_t t = 0;
  for (; t + 2 <= count; t += 2) {
    const T* p0 = src + s0 + t * sstep;
    const T* p1 = p0 + sstep;
    T* d0 = dst + t * dstep;
    cpu::for_each_step<S>(C, [&](int64_t c, int64_t n) TF_INLINE_LAMBDA {
      AVec a0(A(0)), b0(A(0)), a1, b1;
      if (init != nullptr) cpu::AccIO<A>::load(init + c, n, a0, b0);
      a1 = a0;
      b1 = b0;
      for (int64_t k = 0; k < m; ++k) {
        AVec wa, wb, xa, xb;
        cpu::AccIO<A>::load(wt + woff[k] + c, n, wa, wb);
        IO::load(p0 + rel[k] + c, n, xa, xb);
        a0 = at::vec::fmadd(wa, xa, a0);
        b0 = at::vec::fmadd(wb, xb, b0);
        IO::load(p1 + rel[k] + c, n, xa, xb);
        a1 = at::vec::fmadd(wa, xa, a1);
        b1 = at::vec::fmadd(wb, xb, b1);
      }
      IO::store(d0 + c, a0, b0, n);
      IO::store(d0 + dstep + c, a1, b1, n);
    });
  }
  if (t < count) pixel_sum(src + s0 + t * sstep, rel, woff, m, wt, init, C, dst + t * dstep);
}

// Outputs [lo, hi) of a row whose column taps all lie inside the image
// (lo == hi if none): the taps' columns grow with j, so j = 0 and KW - 1
// bound them.
inline void inner_columns(const Geometry& g, int64_t& lo, int64_t& hi) {
  int64_t lo2, hi2;
  valid_range(-g.pl, g.sw, g.W, g.OW, lo, hi);
  valid_range((g.KW - 1) * g.dw - g.pl, g.sw, g.W, g.OW, lo2, hi2);
  lo = std::max(lo, lo2);
  hi = std::max(lo, std::min(hi, hi2));
}

// rows (of pixels, each C elements) per parallel task: about 32K elements
inline int64_t nhwc_grain(int64_t pixels_per_row, int64_t C) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, pixels_per_row * C));
}

// out[n, oh, ow, c] = bias[c] + sum over the taps inside the image of
// w[c, i, j] x[n, oh*sh - pt + i*dh, ow*sw - pl + j*dw, c]. (float16 and
// bfloat16 rows of x converted to float once per task, in a cache of the
// rows an output row reads, made the bfloat16 forward slower, 4.1 -> 5.1 ms
// at MobileNetV2's 144@56 layer, batch 32: twice the bytes read per tap.)
template <typename T>
void nhwc_forward_kernel(const DirectParams& p) {
  using A = at::opmath_type<T>;
  const Geometry& g = p.g;
  const int64_t C = g.Cout, kk = g.kk();
  const T* x = p.x.const_data_ptr<T>();
  T* out = p.out.mutable_data_ptr<T>();
  const std::vector<A> wt = taps_by_channel(p.w.const_data_ptr<T>(), C, kk);
  std::vector<A> init;
  if (p.bias.defined()) {
    const T* b = p.bias.const_data_ptr<T>();
    init.assign(b, b + C);
  }
  const A* bias = init.empty() ? nullptr : init.data();
  int64_t olo, ohi;
  inner_columns(g, olo, ohi);
  at::parallel_for(0, g.N * g.OH, nhwc_grain(g.OW, C), [&](int64_t begin, int64_t end) {
    std::vector<int64_t> off(kk), woff(kk), rel(kk), rwoff(kk), tapj(kk);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / g.OH, oh = r % g.OH;
      int64_t mr = 0;  // the taps of the row's valid input rows; rel: from column 0
      for (int64_t i = 0; i < g.KH; ++i) {
        const int64_t ih = oh * g.sh - g.pt + i * g.dh;
        if (ih < 0 || ih >= g.H) continue;
        for (int64_t j = 0; j < g.KW; ++j) {
          rel[mr] = ((n * g.H + ih) * g.W + j * g.dw) * C;
          tapj[mr] = j;
          rwoff[mr++] = (i * g.KW + j) * C;
        }
      }
      if (olo < ohi) {
        span_sum(x, (olo * g.sw - g.pl) * C, g.sw * C, rel.data(), rwoff.data(), mr, wt.data(),
                 bias, C, out + (r * g.OW + olo) * C, C, ohi - olo);
      }
      for (int64_t ow = 0; ow < g.OW; ++ow) {
        if (ow == olo && olo < ohi) ow = ohi;
        if (ow >= g.OW) break;
        int64_t m = 0;
        for (int64_t k = 0; k < mr; ++k) {
          const int64_t iw = ow * g.sw - g.pl + tapj[k] * g.dw;
          if (iw < 0 || iw >= g.W) continue;
          off[m] = rel[k] + (ow * g.sw - g.pl) * C;
          woff[m++] = rwoff[k];
        }
        pixel_sum(x, off.data(), woff.data(), m, wt.data(), bias, C, out + (r * g.OW + ow) * C);
      }
    }
  });
}

// dx[n, h, w, c] = sum over the taps (i, j) and outputs (oh, ow) with
// oh*sh = h + pt - i*dh, ow*sw = w + pl - j*dw of w[c, i, j] dy[n, oh, ow, c]
// (gather form: each element's sum in a fixed order)
template <typename T>
void nhwc_dinput_kernel(const DirectParams& p) {
  using A = at::opmath_type<T>;
  const Geometry& g = p.g;
  const int64_t C = g.Cin, kk = g.kk();
  const T* dy = p.dy.const_data_ptr<T>();
  T* dx = p.dx.mutable_data_ptr<T>();
  const std::vector<A> wt = taps_by_channel(p.w.const_data_ptr<T>(), C, kk);
  // at unit column stride, inputs [wlo, whi) of a row have every column
  // tap's output inside dy: w + pl - j*dw in [0, OW) for j = 0 and KW - 1
  int64_t wlo = 0, whi = 0;
  if (g.sw == 1) {
    wlo = std::max<int64_t>(0, (g.KW - 1) * g.dw - g.pl);
    whi = std::max(wlo, std::min(g.W, g.OW - g.pl));
  }
  at::parallel_for(0, g.N * g.H, nhwc_grain(g.W, C), [&](int64_t begin, int64_t end) {
    std::vector<int64_t> off(kk), woff(kk), rel(kk), rwoff(kk), tapj(kk);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / g.H, h = r % g.H;
      int64_t mr = 0;  // the taps of the row's valid dy rows; rel: from column w = 0
      for (int64_t i = 0; i < g.KH; ++i) {
        int64_t oh;
        if (!output_index(h + g.pt - i * g.dh, g.sh, g.OH, oh)) continue;
        for (int64_t j = 0; j < g.KW; ++j) {
          rel[mr] = ((n * g.OH + oh) * g.OW + g.pl - j * g.dw) * C;
          tapj[mr] = j;
          rwoff[mr++] = (i * g.KW + j) * C;
        }
      }
      if (wlo < whi) {
        span_sum(dy, wlo * C, C, rel.data(), rwoff.data(), mr, wt.data(),
                 static_cast<const A*>(nullptr), C, dx + (r * g.W + wlo) * C, C, whi - wlo);
      }
      for (int64_t w = 0; w < g.W; ++w) {
        if (w == wlo && wlo < whi) w = whi;
        if (w >= g.W) break;
        int64_t m = 0;
        for (int64_t k = 0; k < mr; ++k) {
          const int64_t u = w + g.pl - tapj[k] * g.dw;  // ow * sw, if the tap reaches dy
          int64_t ow;
          if (!output_index(u, g.sw, g.OW, ow)) continue;
          off[m] = rel[k] + (ow - u) * C + w * C;
          woff[m++] = rwoff[k];
        }
        pixel_sum(dy, off.data(), woff.data(), m, wt.data(), static_cast<const A*>(nullptr), C,
                  dx + (r * g.W + w) * C);
      }
    }
  });
}

// dw over a run of outputs of one row and one kernel row i, for every
// column tap at once (KW of them, fixed): Pi[j * C + c] += sum over ow in
// [lo, hi) of dy[ow, c] x[ow * sw + j * dw - pl, c], every tap inside the
// row. Each dy vector is loaded (and converted) once for the KW taps, whose
// sums stay in registers along the run.
template <int KW, typename T>
TF_ALWAYS_INLINE void dweight_taps(const T* dyr, const T* xr, int64_t lo, int64_t hi,
                                   int64_t sw, int64_t dil, int64_t pl, int64_t C,
                                   at::opmath_type<T>* Pi) {
  using IO = cpu::VecIO<T>;
  using A = at::opmath_type<T>;
  using AVec = typename IO::AVec;
  cpu::for_each_step<IO::kStep>(C, [&](int64_t c, int64_t nc) TF_INLINE_LAMBDA {
    AVec a[KW], b[KW];
    for (int j = 0; j < KW; ++j) a[j] = b[j] = AVec(A(0));
    for (int64_t ow = lo; ow < hi; ++ow) {
      AVec da, db;
      IO::load(dyr + ow * C + c, nc, da, db);
      const T* xp = xr + (ow * sw - pl) * C + c;
      for (int j = 0; j < KW; ++j) {
        AVec xa, xb;
        IO::load(xp + j * dil * C, nc, xa, xb);
        a[j] = at::vec::fmadd(da, xa, a[j]);
        b[j] = at::vec::fmadd(db, xb, b[j]);
      }
    }
    for (int j = 0; j < KW; ++j) {
      AVec pa, pb;
      cpu::AccIO<A>::load(Pi + j * C + c, nc, pa, pb);
      cpu::AccIO<A>::store(Pi + j * C + c, pa + a[j], pb + b[j], nc);
    }
  });
}

// dw[c, 0, i, j] = sum over n, oh, ow of dy[n, oh, ow, c] x[n, ih, iw, c].
// The (n, oh) rows are cut into chunks by the shape alone (at most 64, each
// of at least about 2^20 multiply-adds where there are enough, their partial
// sums at most 16 MB), each chunk's sums kept apart (tap-major) and then
// added in chunk order: the result does not depend on the thread count.
// Kernels 3, 5 or 7 wide take the outputs whose column taps all lie inside
// the image through dweight_taps; the rest (and other widths) go tap by tap.
// (At MobileNetV2's 960@7 layer, batch 32, the chunks' partial sums had cost
// more than the products: 56 chunks, 1.9 MB, for 0.3 ms of work.)
template <typename T>
void nhwc_dweight_kernel(const DirectParams& p) {
  using IO = cpu::VecIO<T>;
  using A = at::opmath_type<T>;
  using AVec = typename IO::AVec;
  const Geometry& g = p.g;
  const int64_t C = g.Cin, kk = g.kk(), rows = g.N * g.OH, S = kk * C;
  const T* x = p.x.const_data_ptr<T>();
  const T* dy = p.dy.const_data_ptr<T>();
  A* dw = p.dw.mutable_data_ptr<A>();
  const int64_t row_work = std::max<int64_t>(1, g.OW * kk * C);
  int64_t per = std::max((rows + 63) / 64, (int64_t{1} << 20) / row_work);
  per = std::max<int64_t>(1, std::min(per, rows));
  while (per < rows && ((rows + per - 1) / per) * S * int64_t{sizeof(A)} > (int64_t{16} << 20)) {
    per *= 2;
  }
  const int64_t chunks = (rows + per - 1) / per;
  // outputs [olo, ohi) of a row go through dweight_taps
  int64_t olo = 0, ohi = 0;
  if (g.KW == 3 || g.KW == 5 || g.KW == 7) inner_columns(g, olo, ohi);
  const bool inner = olo < ohi;
  std::vector<A> part(chunks * S);
  // Pt[c] += sum over ow in [lo, hi) of dy[ow, c] x[ow * sw + col, c]
  const auto tap_run = [&](const T* dyr, const T* xr, int64_t col, int64_t lo, int64_t hi,
                           A* Pt) TF_INLINE_LAMBDA {
    if (lo >= hi) return;
    const int64_t xs = g.sw * C;
    cpu::for_each_step<IO::kStep>(C, [&](int64_t c, int64_t nc) TF_INLINE_LAMBDA {
      AVec a0(A(0)), b0(A(0)), a1(A(0)), b1(A(0));
      const T* d = dyr + lo * C + c;
      const T* xp = xr + (lo * g.sw + col) * C + c;
      int64_t ow = lo;
      for (; ow + 2 <= hi; ow += 2, d += 2 * C, xp += 2 * xs) {
        AVec da, db, xa, xb;
        IO::load(d, nc, da, db);
        IO::load(xp, nc, xa, xb);
        a0 = at::vec::fmadd(da, xa, a0);
        b0 = at::vec::fmadd(db, xb, b0);
        IO::load(d + C, nc, da, db);
        IO::load(xp + xs, nc, xa, xb);
        a1 = at::vec::fmadd(da, xa, a1);
        b1 = at::vec::fmadd(db, xb, b1);
      }
      if (ow < hi) {
        AVec da, db, xa, xb;
        IO::load(d, nc, da, db);
        IO::load(xp, nc, xa, xb);
        a0 = at::vec::fmadd(da, xa, a0);
        b0 = at::vec::fmadd(db, xb, b0);
      }
      AVec pa, pb;
      cpu::AccIO<A>::load(Pt + c, nc, pa, pb);
      cpu::AccIO<A>::store(Pt + c, pa + (a0 + a1), pb + (b0 + b1), nc);
    });
  };
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ch = begin; ch < end; ++ch) {
      A* P = part.data() + ch * S;
      std::fill(P, P + S, A(0));
      for (int64_t r = ch * per; r < std::min(rows, (ch + 1) * per); ++r) {
        const int64_t n = r / g.OH, oh = r % g.OH;
        const T* dyr = dy + r * g.OW * C;
        for (int64_t i = 0; i < g.KH; ++i) {
          const int64_t ih = oh * g.sh - g.pt + i * g.dh;
          if (ih < 0 || ih >= g.H) continue;
          const T* xr = x + (n * g.H + ih) * g.W * C;
          A* Pi = P + i * g.KW * C;
          if (inner) {
            if (g.KW == 3) {
              dweight_taps<3>(dyr, xr, olo, ohi, g.sw, g.dw, g.pl, C, Pi);
            } else if (g.KW == 5) {
              dweight_taps<5>(dyr, xr, olo, ohi, g.sw, g.dw, g.pl, C, Pi);
            } else {
              dweight_taps<7>(dyr, xr, olo, ohi, g.sw, g.dw, g.pl, C, Pi);
            }
          }
          for (int64_t j = 0; j < g.KW; ++j) {
            const int64_t col = j * g.dw - g.pl;  // input column of ow: ow * sw + col
            int64_t lo, hi;
            valid_range(col, g.sw, g.W, g.OW, lo, hi);
            if (inner) {  // what dweight_taps left: the outputs outside [olo, ohi)
              tap_run(dyr, xr, col, lo, std::min(hi, olo), Pi + j * C);
              tap_run(dyr, xr, col, std::max(lo, ohi), hi, Pi + j * C);
            } else {
              tap_run(dyr, xr, col, lo, hi, Pi + j * C);
            }
          }
        }
      }
    }
  });
  // the chunks' sums in chunk order, then from tap-major to dw's [c][t]
  std::vector<A> sum(S);
  at::parallel_for(0, S, 1 << 12, [&](int64_t begin, int64_t end) {
    cpu::for_each_step<IO::kStep>(end - begin, [&](int64_t e0, int64_t ne) TF_INLINE_LAMBDA {
      const int64_t e = begin + e0;
      AVec a(A(0)), b(A(0));
      for (int64_t ch = 0; ch < chunks; ++ch) {
        AVec pa, pb;
        cpu::AccIO<A>::load(part.data() + ch * S + e, ne, pa, pb);
        a = a + pa;
        b = b + pb;
      }
      cpu::AccIO<A>::store(sum.data() + e, a, b, ne);
    });
  });
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t t = 0; t < kk; ++t) dw[c * kk + t] = sum[t * C + c];
  }
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
// The direct kernels compute NCHW (the NHWC ones above take channels_last
// depthwise input where path_of gives it to them): other channels_last
// input goes to torch's convolution where it can, which takes it as it is.
// Through the direct kernels (a copy to contiguous and back around each
// pass), MobileNetV2's depthwise layers took 3-10x oneDNN's channels_last
// time in every pass (batch 32, float32 and bfloat16; 0.8-1.2x in bfloat16
// grad_weight).
bool use_direct_cpu(const Geometry& g, at::ScalarType dtype, bool torch_alternative,
                    bool channels_last) {
  if (torch_alternative && channels_last) return false;
  if (g.cin_g() == 1) return true;
  const bool low = dtype == at::kHalf || dtype == at::kBFloat16;
  return g.kk() > 1 && g.cin_g() <= (torch_alternative && !low ? 8 : 16);
}

// A float16/bfloat16 weight gradient with at most 8 groups: im2col + the
// float32 GEMM measured 1.3-2.9x faster than oneDNN's bfloat16 one (2-core
// Xeon without AVX512_BF16; groups 1, 2, 3 and 7: AlexNet, DeepLabv3, DRN,
// ShuffleNet v1, RegNet shapes), 0.66x at 32 groups (ResNeXt-50 stage 4);
// float32 was even or slower. On a Xeon with AVX512_BF16, AVX512_FP16 and
// AMX, oneDNN's bfloat16 weight gradient took 0.08-0.6x the time of ours at
// those shapes (DeepLabv3 512@33 dilation 2: 10.8 against 24.2 ms; RegNet
// 168@28 groups 7, batch 32: 8.3 against 33.6), so bfloat16 stays ours only
// where the CPU lacks that instruction (cpu::bf16_instruction). There its
// float16 weight gradient took 0.6-32 s at any group count, both layouts
// (DeepLabv3: 7.3 s against our 31 ms; ResNeXt-50 stage 3 channels_last:
// 1.4 s), so float16 is ours at every group count.
bool own_dweight_cpu(const Geometry& g, at::ScalarType dtype) {
  return dtype == at::kHalf ||
      (dtype == at::kBFloat16 && g.groups <= 8 && !cpu::bf16_instruction());
}

void nhwc_forward_cpu(const DirectParams& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(),
                                  "conv2d_nhwc_cpu", [&] { nhwc_forward_kernel<scalar_t>(p); });
}

void nhwc_dinput_cpu(const DirectParams& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dy.scalar_type(),
                                  "conv2d_nhwc_dinput_cpu",
                                  [&] { nhwc_dinput_kernel<scalar_t>(p); });
}

void nhwc_dweight_cpu(const DirectParams& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dy.scalar_type(),
                                  "conv2d_nhwc_dweight_cpu",
                                  [&] { nhwc_dweight_kernel<scalar_t>(p); });
}

const Launchers kCpu{im2col_cpu,         col2im_cpu,        use_direct_cpu,
                     own_dweight_cpu,    direct_forward_cpu, direct_dinput_cpu,
                     direct_dweight_cpu, nhwc_forward_cpu,   nhwc_dinput_cpu,
                     nhwc_dweight_cpu};

}  // namespace

TORCH_LIBRARY_IMPL(torchfuse, CPU, m) {
  m.impl("conv2d", &conv2d_op<kCpu>);
  m.impl("conv2d_backward", &conv2d_backward_op<kCpu>);
}

}  // namespace torchfuse::conv
