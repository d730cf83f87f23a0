// GroupNorm CPU kernels (at::vec, at::parallel_for) and the CPU registration.
// Checks, allocation, formulas and the (N, C)-sized algebra: group_norm.cpp.
//
// Both layouts are read in place. Planar (contiguous) input: statistics per
// contiguous chunk of a group, per-channel sums per plane chunk, elementwise
// passes per plane chunk with the channel's coefficients broadcast.
// channels_last input: rows of C channels; statistics and per-channel sums
// per chunk of rows of one sample (all groups at once, with per-channel
// accumulators), elementwise passes row by row with coefficient vectors;
// rows shorter than two vector steps are walked flat, with the coefficients
// and accumulators tiled (flat_period).
// Every chunking is a function of the shape only, and partial results are
// combined in a fixed order: results do not depend on the thread count.
//
// channels_last therefore reads x twice in the forward (statistics, then the
// output) and x and dy twice in the backward, where the contiguous fused
// kernels read them once. A cache-resident channels_last variant was tried
// (a task = a few whole groups of one sample: S rows of w channels at row
// stride C, every pass back to back; also with the rows first copied to a
// contiguous scratch): on the 2-core EPYC it was 1.2-7x slower than the
// streaming passes here, in separate runs (2x320x64x64 float32 forward
// 0.37 -> 1.6-2.5 ms):
// runs of a few dozen bytes per row defeat the prefetchers, and row strides
// that are multiples of 256 bytes map the rows to few cache sets.
// Tried again on the 2-core Xeon (2 MiB L2 per core), 2026-12-04, with wide
// blocks (whole groups, 64-byte multiples where they fit, scratch up to
// 0.5-2 MiB per task) copied to a contiguous scratch, statistics and output
// from there: forward float32 1.2-3x slower than these passes (2x320x64x64
// 0.65 -> 1.06-1.41 ms, 8x256x56x56 1.6 -> 2.2-2.6). Even a whole sample per
// task (2x1280x16x16, W = C, no copy) took 0.16-0.18 ms against 0.13: timed
// per pass (rdtsc), its first pass alone read at about 23 GB/s per core, as
// the statistics pass here does, and its output pass cost what the
// elementwise pass here costs with its extra read of x, so the saved read was
// hidden behind the stores. The gap to contiguous input is that second read
// of x where a sample does not fit in L2 (2x320x64x64: the elementwise pass
// 0.35 ms against 0.18 for the contiguous kernel's cache-resident one).
#include "group_norm.h"

#include "../common/checks.h"
#include "../common/cpu_vec.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <tuple>
#include <utility>
#include <type_traits>
#include <vector>

namespace torchfuse::group_norm {

namespace {

using cpu::AccIO;
using cpu::for_each_step;
using cpu::reduce_sum;
using cpu::VecIO;

// Elements per chunk. Contiguous statistics: L1-sized, one group. The
// channels_last chunks span all channels of a sample's rows, with O(C) scalar
// work per chunk: L2-sized, so that it stays small beside the vector work.
constexpr int64_t kStatChunk = 4096;
constexpr int64_t kStatChunkCl = 65536;
constexpr int64_t kReduceChunk = 65536;
constexpr int64_t kBlock = 16384;        // elements per elementwise task
constexpr int64_t kRows = 16;            // channels_last: statistics rows per register block,
                                         // fewest rows per elementwise task

template <Act ACT, typename V>
TF_ALWAYS_INLINE V act_fwd(const V& y) {
  if constexpr (ACT == Act::kRelu) {
    return at::vec::maximum(y, V(0));
  } else if constexpr (ACT == Act::kSilu) {
    // exp_inline (cpu_vec.h): within 2.7e-7 relative for float on AVX-512,
    // ATen's exp_u20 elsewhere (the exact exp for double). Written as torch's
    // silu, y / (1 + exp(-y)), so that -inf gives NaN and +inf gives inf as
    // there. The division stays: rcp14 + one Newton step (+ a fix-up for an
    // infinite denominator) in its place made the bfloat16 SiLU forward 4-17%
    // slower on the 2-core Xeon, both layouts (2026-12-04, builds alternated
    // 2x; 2x320x64x64 0.60-0.61 -> 0.67-0.70 ms contiguous). So the divider
    // does not limit these passes, though perf (cpu-clock sampling only on
    // this VM, which skids) put many samples right after vdivps.
    return y / (V(1) + cpu::exp_inline(y.neg()));
  } else {
    return y;
  }
}

// dy * act'(y)
template <Act ACT, typename V>
TF_ALWAYS_INLINE V act_grad(const V& dy, const V& y) {
  if constexpr (ACT == Act::kRelu) {
    return V::blendv(V(0), dy, y > V(0));
  } else if constexpr (ACT == Act::kSilu) {
    const V s = V(1) / (V(1) + cpu::exp_inline(y.neg()));
    return dy * s * (V(1) + y * (V(1) - s));
  } else {
    return dy;
  }
}

// kBackward's dx = p[3] * g + p[4] * d + p[5].
template <typename V>
TF_ALWAYS_INLINE V dx_of(const V& g, const V& d, const V* p) {
  return at::vec::fmadd(p[3], g, at::vec::fmadd(p[4], d, p[5]));
}

template <Mode MODE, Act ACT, typename V>
TF_ALWAYS_INLINE V pointwise_op(const V& x, const V& dy, const V* p) {
  const V d = x - p[0];
  if constexpr (MODE == Mode::kForward) {
    return act_fwd<ACT>(at::vec::fmadd(d, p[1], p[2]));
  } else {
    return dx_of(act_grad<ACT>(dy, at::vec::fmadd(d, p[1], p[2])), d, p);
  }
}

template <Mode MODE, Act ACT, typename V>
TF_ALWAYS_INLINE void reduce_op(const V& x, const V& dy, const V* p, V* q) {
  const V d = x - p[0];
  if constexpr (MODE == Mode::kCorrect) {
    q[0] = d;
  } else {
    const V g = act_grad<ACT>(dy, at::vec::fmadd(d, p[1], p[2]));
    q[0] = g;
    q[1] = g * at::vec::fmadd(d, p[3], p[4]);
  }
}

// Zeroes the lanes of a (first, second) pair beyond the first n elements.
template <typename V>
TF_ALWAYS_INLINE void mask_pair(V& a, V& b, int64_t n) {
  constexpr int64_t kSize = V::size();
  if (n >= 2 * kSize) return;
  a = V::set(V(0), a, std::min(n, kSize));
  b = V::set(V(0), b, std::max<int64_t>(0, n - kSize));
}

// ---------------------------------------- channels_last, C below two steps
// Row by row, every row of C channels costs its loop, its coefficient loads
// and, when C is not a multiple of the step, a masked partial step; for a
// row shorter than two steps that overhead dominates: float32 forward,
// 2x4x200x200 channels_last 0.30-0.46 ms against 0.06-0.07 for contiguous
// input with SiLU; with SiLU, 2x8x128x128 0.26-0.33 ms against 0.05
// contiguous and eager's 0.17-0.19. Such
// samples are walked flat instead, in full steps, with the coefficients (and
// the per-channel accumulators) laid out with a period Pa: a multiple of
// lcm(C, step) and of at least 4 steps, so that an accumulator slot is not
// reused by the very next step. The element at flat offset o of a sample has
// channel (o % Pa) % C. Only the last step of a flat range is partial.
// Measured on the 2-core Xeon, 2026-12-08, flat against row, forward and
// forward+backward, float32 and bfloat16:
//   C = 4, 8 (Pa 128; row and flat builds in alternating processes):
//     2.2-8.7x faster (2x4x200x200 float32 SiLU forward+backward 2.9-3.1
//     -> 0.57-0.64 ms);
//   and from here on both paths alternated in one process, 7 rounds,
//   medians:
//   Pa 128-224 (C = 16, 24, 28, 40): 1.01-2.0x, but C = 48 0.74-1.32x;
//   Pa 288-480 (C = 9, 15, 18, 22, 36, 44, 60): 0.91-2.2x, mostly faster;
//   Pa 800-992 (C = 31, 62, 100, 200): 0.66-1.07x, mostly slower
//     (probably the patterns, NP of them, crowding L1; not measured).
// Hence C < 2 steps and Pa <= kMaxPeriod.
constexpr int64_t kMaxPeriod = 512;

template <int64_t kS>
int64_t flat_period(int64_t C) {
  if (C % kS == 0 || C >= 2 * kS) return 0;
  const int64_t P = std::lcm(C, kS);
  const int64_t Pa = P * ((4 * kS + P - 1) / P);
  return Pa <= kMaxPeriod ? Pa : 0;
}

// dst[q] = v[q % C] for q in [0, len).
template <typename A>
void tile_channels(const A* v, int64_t C, A* dst, int64_t len) {
  for (int64_t q = 0; q < len; ++q) dst[q] = v[q % C];
}

// f(o, count, phase) over the flat offsets [o0, o1) of one sample in steps of
// kS (the last one partial), phase = o % Pa. A window [phase, phase + kS)
// lies within [0, Pa + kS): patterns and accumulators have Pa + kS slots.
template <int64_t kS, typename F>
TF_ALWAYS_INLINE void for_each_phase_step(int64_t o0, int64_t o1, int64_t Pa, const F& f) {
  int64_t ph = o0 % Pa;
  for_each_step<kS>(o1 - o0, [&](int64_t j, int64_t c) TF_INLINE_LAMBDA {
    f(o0 + j, c, ph);
    ph += kS;
    if (ph >= Pa) ph -= Pa;
  });
}

// acc[ph .. ph + c) += (a, b), the first c lanes.
template <typename A>
TF_ALWAYS_INLINE void add_at(A* acc, int64_t c, const at::vec::Vectorized<A>& a,
                             const at::vec::Vectorized<A>& b) {
  at::vec::Vectorized<A> u, v;
  AccIO<A>::load(acc, c, u, v);
  AccIO<A>::store(acc, u + a, v + b, c);
}

// Per-channel sums out[0 .. C) from phase accumulators acc[0 .. Pa + kS)
// (the wrapped tail folded onto the head first), in a fixed order.
template <typename A>
void fold_phases(A* acc, int64_t Pa, int64_t kS, int64_t C, A* out) {
  for (int64_t q = 0; q < kS; ++q) acc[q] += acc[Pa + q];
  std::fill(out, out + C, A(0));
  for (int64_t q = 0; q < Pa; ++q) out[q % C] += acc[q];
}

// p0[i], p1[i] = the c coefficients at base + i * stride, for i < NP: one
// row step's (row path: base = sample's params + c0, stride N * C) or one
// flat step's (TiledCoefs).
template <int NP, typename A>
TF_ALWAYS_INLINE void load_coefs(const A* base, int64_t stride, int64_t c,
                                 at::vec::Vectorized<A>* p0, at::vec::Vectorized<A>* p1) {
  for (int i = 0; i < NP; ++i) AccIO<A>::load(base + i * stride, c, p0[i], p1[i]);
}

// The flat walk's coefficients: the NP per-channel arrays of one sample
// (params (NP, N, C)) tiled over W = Pa + kS slots each, tiled again only
// when the sample changes.
template <typename A, int NP>
struct TiledCoefs {
  int64_t W;
  std::vector<A> pat;
  int64_t sample = -1;
  TiledCoefs(int64_t Pa, int64_t kS) : W(Pa + kS), pat(Pa > 0 ? NP * W : 0) {}
  void set(const A* prm, int64_t NC, int64_t C, int64_t n) {
    if (n == sample) return;
    for (int i = 0; i < NP; ++i) tile_channels(prm + i * NC + n * C, C, &pat[i * W], W);
    sample = n;
  }
  // One full step at phase ph.
  TF_ALWAYS_INLINE void load(int64_t ph, at::vec::Vectorized<A>* p0,
                             at::vec::Vectorized<A>* p1) const {
    load_coefs<NP>(pat.data() + ph, W, 2 * at::vec::Vectorized<A>::size(), p0, p1);
  }
};

// ------------------------------------------------------------- statistics
// Two-pass centred statistics of cnt contiguous elements (cache-resident for
// the second pass): (mean, sum of squared deviations), in float64.
template <typename T>
std::pair<double, double> chunk_stats(const T* base, int64_t cnt) {
  using IO = VecIO<T>;
  using A = typename IO::A;
  using V = typename IO::AVec;
  constexpr int64_t kS = IO::kStep;
  V s0(0), s1(0);
  for_each_step<kS>(cnt, [&](int64_t j, int64_t c) TF_INLINE_LAMBDA {
    V a, b;
    IO::load(base + j, c, a, b);
    s0 = s0 + a;
    s1 = s1 + b;
  });
  const A m0 = reduce_sum(s0 + s1) / static_cast<A>(cnt);
  const V vm(m0);
  V e0(0), e1(0), q0(0), q1(0);
  for_each_step<kS>(cnt, [&](int64_t j, int64_t c) TF_INLINE_LAMBDA {
    V a, b;
    IO::load(base + j, c, a, b);
    a = a - vm;
    b = b - vm;
    mask_pair(a, b, c);
    e0 = e0 + a;
    e1 = e1 + b;
    q0 = at::vec::fmadd(a, a, q0);
    q1 = at::vec::fmadd(b, b, q1);
  });
  const double n = static_cast<double>(cnt), sd = reduce_sum(e0 + e1);
  return {static_cast<double>(m0) + sd / n, static_cast<double>(reduce_sum(q0 + q1)) - sd * sd / n};
}

// Adds (a, b) - (ma, mb) to the sums (u, v) and its squares to (p, q).
template <typename V>
TF_ALWAYS_INLINE void add_centred(V a, V b, const V& ma, const V& mb, V& u, V& v, V& p, V& q) {
  a = a - ma;
  b = b - mb;
  u = u + a;
  v = v + b;
  p = at::vec::fmadd(a, a, p);
  q = at::vec::fmadd(b, b, q);
}

// Statistics sums over the flat offsets [o0, o1) of one channels_last sample
// xs, into phase accumulators fa (3 arrays of W = Pa + kS): !CENTRED:
// fa[0] += x; CENTRED: fa[1] += x - m, fa[2] += (x - m)^2 with m = fa[0],
// the channels' rough means tiled. Whole periods go in blocks of kRows with
// the sums in registers, as the row path's blocks; the partial periods at
// either end step by step. (A first version accumulated every step in L1:
// float32 forward without activation 1.5-2.0x slower than the row path at
// 4x16x64x64 and 2x48x64x64; with the blocks 4x16x64x64 is 1.27x faster than
// the row path, 2x48x64x64 still 0.74x.)
template <typename T, bool CENTRED>
void flat_stat_sums(const T* xs, int64_t o0, int64_t o1, int64_t Pa, typename VecIO<T>::A* fa) {
  using IO = VecIO<T>;
  using A = typename IO::A;
  using V = typename IO::AVec;
  constexpr int64_t kS = IO::kStep;
  const int64_t W = Pa + kS;
  auto step = [&](int64_t o, int64_t c, int64_t ph) TF_INLINE_LAMBDA {
    V a, b;
    IO::load(xs + o, c, a, b);
    if constexpr (CENTRED) {
      V ma, mb;
      AccIO<A>::load(fa + ph, kS, ma, mb);
      a = a - ma;
      b = b - mb;
      add_at(fa + W + ph, c, a, b);
      add_at(fa + 2 * W + ph, c, a * a, b * b);
    } else {
      add_at(fa + ph, c, a, b);
    }
  };
  const int64_t h = std::min(o1, (o0 + Pa - 1) / Pa * Pa), e = std::max(h, o1 / Pa * Pa);
  for_each_phase_step<kS>(o0, h, Pa, step);
  // Periods per block: kRows, fewer for long periods (a block within L1).
  const int64_t bp = std::clamp<int64_t>(4096 / Pa, 2, kRows);
  for (int64_t pa = h; pa < e; pa += bp * Pa) {
    const int64_t pb = std::min(e, pa + bp * Pa);
    for (int64_t j = 0; j < Pa; j += kS) {
      V a, b, u(0), v(0);
      if constexpr (CENTRED) {
        V ma, mb, p(0), q(0);
        AccIO<A>::load(fa + j, kS, ma, mb);
        for (int64_t o = pa + j; o < pb; o += Pa) {
          IO::load(xs + o, a, b);
          add_centred(a, b, ma, mb, u, v, p, q);
        }
        add_at(fa + W + j, kS, u, v);
        add_at(fa + 2 * W + j, kS, p, q);
      } else {
        for (int64_t o = pa + j; o < pb; o += Pa) {
          IO::load(xs + o, a, b);
          u = u + a;
          v = v + b;
        }
        add_at(fa + j, kS, u, v);
      }
    }
  }
  for_each_phase_step<kS>(e, o1, Pa, step);
}

template <typename T>
void stats_kernel(const StatsParams& sp) {
  using IO = VecIO<T>;
  using A = typename IO::A;
  using V = typename IO::AVec;
  constexpr int64_t kS = IO::kStep;
  const Geometry& g = sp.geo;
  const int64_t M = g.D * g.S, K = sp.K;
  const T* x = sp.x.const_data_ptr<T>();
  double* mk = sp.mean_k.mutable_data_ptr<double>();
  double* m2k = sp.m2_k.mutable_data_ptr<double>();

  auto write = [&](int64_t idx, A m0, A sd, A sq, int64_t cnt) {
    const double c = static_cast<double>(cnt), s = sd;
    mk[idx] = static_cast<double>(m0) + s / c;
    m2k[idx] = static_cast<double>(sq) - s * s / c;
  };

  if (!g.cl) {
    const int64_t L = sp.L;
    at::parallel_for(0, g.N * g.G * K, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t k = t % K;
        const auto [mean, m2] = chunk_stats(x + (t / K) * M + k * L, std::min(L, M - k * L));
        mk[t] = mean;
        m2k[t] = m2;
      }
    });
    return;
  }

  const int64_t C = g.C, D = g.D, G = g.G, S = g.S, R = sp.R;
  const int64_t Pa = flat_period<kS>(C), W = Pa + kS;
  at::parallel_for(0, g.N * K, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> acc(C), mv(C), s1(C), s2(C), m0(G);
    std::vector<A> fa(Pa > 0 ? 3 * W : 0);  // flat: sums, deviations, squares
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / K, k = t % K;
      const int64_t r0 = k * R, r1 = std::min(S, r0 + R);
      const int64_t row_end = Pa > 0 ? r0 : r1;  // the row path's rows: none when flat
      const T* xs = x + n * S * C;
      std::fill(acc.begin(), acc.end(), A(0));
      if (Pa > 0) {
        std::fill(fa.begin(), fa.begin() + W, A(0));
        flat_stat_sums<T, false>(xs, r0 * C, r1 * C, Pa, fa.data());
        fold_phases(fa.data(), Pa, kS, C, acc.data());
      }
      for (int64_t ra = r0; ra < row_end; ra += kRows) {
        const int64_t rb = std::min(r1, ra + kRows);
        for_each_step<kS>(C, [&](int64_t c0, int64_t c) TF_INLINE_LAMBDA {
          V a, b, u(0), v(0), su, sv;
          for (int64_t r = ra; r < rb; ++r) {
            IO::load(xs + r * C + c0, c, a, b);
            u = u + a;
            v = v + b;
          }
          AccIO<A>::load(acc.data() + c0, c, su, sv);
          AccIO<A>::store(acc.data() + c0, su + u, sv + v, c);
        });
      }
      const int64_t cnt = (r1 - r0) * D;
      for (int64_t gi = 0; gi < G; ++gi) {
        A s = 0;
        for (int64_t c = gi * D; c < (gi + 1) * D; ++c) s += acc[c];
        m0[gi] = s / static_cast<A>(cnt);
        std::fill(mv.begin() + gi * D, mv.begin() + (gi + 1) * D, m0[gi]);
      }
      std::fill(s1.begin(), s1.end(), A(0));
      std::fill(s2.begin(), s2.end(), A(0));
      if (Pa > 0) {
        A* mp = fa.data();  // the first pass's sums are folded: reuse for the means
        tile_channels(mv.data(), C, mp, W);
        std::fill(fa.begin() + W, fa.end(), A(0));
        flat_stat_sums<T, true>(xs, r0 * C, r1 * C, Pa, mp);
        fold_phases(mp + W, Pa, kS, C, s1.data());
        fold_phases(mp + 2 * W, Pa, kS, C, s2.data());
      }
      for (int64_t ra = r0; ra < row_end; ra += kRows) {
        const int64_t rb = std::min(r1, ra + kRows);
        for_each_step<kS>(C, [&](int64_t c0, int64_t c) TF_INLINE_LAMBDA {
          V a, b, ma, mb, u(0), v(0), p(0), q(0), su, sv;
          AccIO<A>::load(mv.data() + c0, c, ma, mb);
          for (int64_t r = ra; r < rb; ++r) {
            IO::load(xs + r * C + c0, c, a, b);
            add_centred(a, b, ma, mb, u, v, p, q);
          }
          AccIO<A>::load(s1.data() + c0, c, su, sv);
          AccIO<A>::store(s1.data() + c0, su + u, sv + v, c);
          AccIO<A>::load(s2.data() + c0, c, su, sv);
          AccIO<A>::store(s2.data() + c0, su + p, sv + q, c);
        });
      }
      for (int64_t gi = 0; gi < G; ++gi) {
        A sd = 0, sq = 0;
        for (int64_t c = gi * D; c < (gi + 1) * D; ++c) {
          sd += s1[c];
          sq += s2[c];
        }
        write((n * G + gi) * K + k, m0[gi], sd, sq, cnt);
      }
    }
  });
}

// ------------------------------------------------------------ elementwise
// One contiguous run of n elements of a single channel (coefficients p
// broadcast): out = the MODE's elementwise formula.
template <typename T, Mode MODE, Act ACT>
void plane_apply(const T* x, const T* dy, T* out, int64_t n,
                 const typename VecIO<T>::AVec* p) {
  using IO = VecIO<T>;
  using V = typename IO::AVec;
  for_each_step<IO::kStep>(n, [&](int64_t j, int64_t c) TF_INLINE_LAMBDA {
    V x0, x1, d0(0), d1(0);
    IO::load(x + j, c, x0, x1);
    if constexpr (MODE == Mode::kBackward) IO::load(dy + j, c, d0, d1);
    IO::store(out + j, pointwise_op<MODE, ACT>(x0, d0, p), pointwise_op<MODE, ACT>(x1, d1, p), c);
  });
}

// kBackward from a stored g (kept, accumulate type) for one step of c
// elements: dx = p[3] * g + p[4] * (x - p[0]) + p[5].
template <typename T>
TF_ALWAYS_INLINE void dx_kept_step(const T* x, const typename VecIO<T>::A* gk, T* dx, int64_t c,
                                   const typename VecIO<T>::AVec* p0,
                                   const typename VecIO<T>::AVec* p1) {
  using IO = VecIO<T>;
  using V = typename IO::AVec;
  V x0, x1, g0, g1;
  IO::load(x, c, x0, x1);
  AccIO<typename IO::A>::load(gk, c, g0, g1);
  IO::store(dx, dx_of(g0, x0 - p0[0], p0), dx_of(g1, x1 - p1[0], p1), c);
}

// The same over n contiguous elements of one channel (coefficients p
// broadcast), as plane_apply. A plain loop, as LRN's square_row.
template <typename T>
TF_ALWAYS_INLINE void dx_kept_run(const T* x, const typename VecIO<T>::A* gk, T* dx, int64_t n,
                                  const typename VecIO<T>::AVec* p) {
  constexpr int64_t kS = VecIO<T>::kStep;
  for (int64_t j = 0; j < n; j += kS) {
    dx_kept_step(x + j, gk + j, dx + j, std::min(kS, n - j), p, p);
  }
}

// Software prefetch of the step kPrefetch elements ahead of p, one hint per
// 64-byte line (past the end of the data it is a no-op: prefetches do not
// fault). For the kGrad pass, which streams x and dy from memory with an
// activation's exp per element: the hardware prefetchers alone left it
// latency-bound. Measured on the 2-core EPYC, in process with a runtime
// switch, 5 alternating rounds, SiLU backward float32 (fused kernel):
// 2x320x64x64 1.60 -> 1.31 ms, 2x640x32x32 0.60 -> 0.52, 1x512x64x64
// 1.14 -> 0.93; bfloat16 2x320x64x64 1.06 -> 1.00; 2048 elements ahead was no
// better. The same hints in the channels_last row loops made them 0-13%
// slower: not used there.
constexpr int64_t kPrefetch = 1024;

template <typename T>
TF_ALWAYS_INLINE void prefetch_step(const T* p) {
  constexpr int64_t kBytes = VecIO<T>::kStep * static_cast<int64_t>(sizeof(T));
  // Integer arithmetic: the address may lie past the end of the buffer.
  const uintptr_t q = reinterpret_cast<uintptr_t>(p) + kPrefetch * sizeof(T);
  for (int64_t b = 0; b < kBytes; b += 64) {
    __builtin_prefetch(reinterpret_cast<const void*>(q + static_cast<uintptr_t>(b)));
  }
}

// The MODE's per-channel sums over one contiguous run of n elements of a
// single channel, into q[0 .. num_sums(MODE)). kGrad with gout: also stores
// each element's g = dy * act'(y) there (accumulate type).
template <typename T, Mode MODE, Act ACT>
void plane_sums(const T* x, const T* dy, int64_t n, const typename VecIO<T>::AVec* p,
                typename VecIO<T>::A* q, typename VecIO<T>::A* gout = nullptr) {
  using IO = VecIO<T>;
  using V = typename IO::AVec;
  constexpr int NQ = num_sums(MODE);
  V acc0[NQ], acc1[NQ];
  for (int i = 0; i < NQ; ++i) acc0[i] = acc1[i] = V(0);
  for_each_step<IO::kStep>(n, [&](int64_t j, int64_t c) TF_INLINE_LAMBDA {
    V x0, x1, d0(0), d1(0), q0[NQ], q1[NQ];
    if constexpr (MODE == Mode::kGrad) {
      prefetch_step(x + j);
      prefetch_step(dy + j);
    }
    IO::load(x + j, c, x0, x1);
    if constexpr (MODE == Mode::kGrad) IO::load(dy + j, c, d0, d1);
    reduce_op<MODE, ACT>(x0, d0, p, q0);
    reduce_op<MODE, ACT>(x1, d1, p, q1);
    if constexpr (MODE == Mode::kGrad) {
      if (gout != nullptr) AccIO<typename IO::A>::store(gout + j, q0[0], q1[0], c);
    }
    for (int i = 0; i < NQ; ++i) {
      mask_pair(q0[i], q1[i], c);
      acc0[i] = acc0[i] + q0[i];
      acc1[i] = acc1[i] + q1[i];
    }
  });
  for (int i = 0; i < NQ; ++i) q[i] = reduce_sum(acc0[i] + acc1[i]);
}

// KEPT (kBackward only): g from pp.kept instead of dy (ACT unused).
template <typename T, Mode MODE, Act ACT, bool KEPT = false>
void pointwise_kernel(const PointwiseParams& pp) {
  using IO = VecIO<T>;
  using A = typename IO::A;
  using V = typename IO::AVec;
  constexpr int64_t kS = IO::kStep;
  constexpr int NP = num_params(MODE);
  const Geometry& g = pp.geo;
  const int64_t C = g.C, S = g.S, NC = g.N * g.C;
  const T* x = pp.x.const_data_ptr<T>();
  const T* dy = MODE == Mode::kBackward && !KEPT ? pp.dy.const_data_ptr<T>() : nullptr;
  const A* gk = KEPT ? pp.kept.const_data_ptr<A>() : nullptr;
  T* out = pp.out.mutable_data_ptr<T>();
  const A* prm = pp.params.const_data_ptr<A>();

  auto step = [&](int64_t off, int64_t c, const V* p0, const V* p1) TF_INLINE_LAMBDA {
    if constexpr (KEPT) {
      dx_kept_step(x + off, gk + off, out + off, c, p0, p1);
      return;
    }
    V x0, x1, d0(0), d1(0);
    IO::load(x + off, c, x0, x1);
    if constexpr (MODE == Mode::kBackward) IO::load(dy + off, c, d0, d1);
    IO::store(out + off, pointwise_op<MODE, ACT>(x0, d0, p0),
              pointwise_op<MODE, ACT>(x1, d1, p1), c);
  };

  if (!g.cl) {
    const int64_t nb = (S + kBlock - 1) / kBlock;
    at::parallel_for(0, NC * nb, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t plane = t / nb, j0 = (t % nb) * kBlock;
        const int64_t j1 = std::min(S, j0 + kBlock);
        V p[NP];
        for (int i = 0; i < NP; ++i) p[i] = V(prm[i * NC + plane]);
        const int64_t base = plane * S + j0;
        if constexpr (KEPT) {
          dx_kept_run(x + base, gk + base, out + base, j1 - j0, p);
        } else {
          plane_apply<T, MODE, ACT>(x + base, dy == nullptr ? nullptr : dy + base, out + base,
                                    j1 - j0, p);
        }
      }
    });
    return;
  }
  // channels_last with C below two steps: flat (see flat_period).
  if (const int64_t Pa = flat_period<kS>(C); Pa > 0) {
    const int64_t SC = S * C, nb = (SC + kBlock - 1) / kBlock;
    at::parallel_for(0, g.N * nb, 1, [&](int64_t begin, int64_t end) {
      TiledCoefs<A, NP> tc(Pa, kS);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / nb, o0 = (t % nb) * kBlock;
        tc.set(prm, NC, C, n);
        for_each_phase_step<kS>(o0, std::min(SC, o0 + kBlock), Pa,
                                [&](int64_t o, int64_t c, int64_t ph) TF_INLINE_LAMBDA {
          V p0[NP], p1[NP];
          tc.load(ph, p0, p1);
          step(n * SC + o, c, p0, p1);
        });
      }
    });
    return;
  }
  // Row by row, in memory order; each step reloads its coefficients (L1
  // hits), rather than blocks of 16 rows swept channel step by channel step
  // with the coefficients in registers. With the per-channel sums below made
  // the same way and the elementwise helpers forced inline, the
  // channels_last backward on the 2-core EPYC went, best of three
  // alternating processes, 2x320x64x64 float32 1.10 -> 0.78 ms, 8x256x56x56
  // bfloat16 with SiLU 4.17 -> 3.09 ms (no case slower beyond the VM's
  // noise).
  const int64_t grain = std::max<int64_t>(kRows, kBlock / C);
  at::parallel_for(0, g.N * S, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const A* pn = prm + (r / S) * C;
      for_each_step<kS>(C, [&](int64_t c0, int64_t c) TF_INLINE_LAMBDA {
        V p0[NP], p1[NP];
        load_coefs<NP>(pn + c0, NC, c, p0, p1);
        step(r * C + c0, c, p0, p1);
      });
    }
  });
}

// ------------------------------------------------------ per-channel sums
template <typename T, Mode MODE, Act ACT>
void reduce_kernel(const ReduceParams& rp) {
  using IO = VecIO<T>;
  using A = typename IO::A;
  using V = typename IO::AVec;
  constexpr int64_t kS = IO::kStep;
  constexpr int NP = num_params(MODE);
  constexpr int NQ = num_sums(MODE);
  constexpr bool kDy = MODE == Mode::kGrad;
  const Geometry& g = rp.geo;
  const int64_t N = g.N, C = g.C, S = g.S, NC = N * C, K = rp.K, R = rp.R;
  const T* x = rp.x.const_data_ptr<T>();
  const T* dy = kDy ? rp.dy.const_data_ptr<T>() : nullptr;
  const A* prm = rp.params.const_data_ptr<A>();
  A* part = rp.partial.mutable_data_ptr<A>();
  A* kp = kDy && rp.kept.defined() ? rp.kept.mutable_data_ptr<A>() : nullptr;
  auto at_part = [&](int q, int64_t n, int64_t k) { return part + ((q * N + n) * K + k) * C; };

  if (!g.cl) {
    at::parallel_for(0, NC * K, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t plane = t / K, k = t % K;
        const int64_t n = plane / C, ch = plane % C;
        if (MODE == Mode::kCorrect && prm[NC + plane] == A(0)) {
          at_part(0, n, k)[ch] = A(0);
          continue;
        }
        V p[NP];
        for (int i = 0; i < NP; ++i) p[i] = V(prm[i * NC + plane]);
        const int64_t s0 = k * R, s1 = std::min(S, s0 + R);
        const int64_t base = plane * S + s0;
        A q[NQ];
        plane_sums<T, MODE, ACT>(x + base, kDy ? dy + base : nullptr, s1 - s0, p, q,
                                 kp == nullptr ? nullptr : kp + base);
        for (int i = 0; i < NQ; ++i) at_part(i, n, k)[ch] = q[i];
      }
    });
    return;
  }

  // One step of c elements at flat offset off of x (dy, kept): the MODE's sums
  // added to sums[q * stride .. + c) for each q.
  auto sum_step = [&](int64_t off, int64_t c, const V* p0, const V* p1, A* sums,
                      int64_t stride) TF_INLINE_LAMBDA {
    V x0, x1, d0(0), d1(0), q0[NQ], q1[NQ];
    IO::load(x + off, c, x0, x1);
    if constexpr (kDy) IO::load(dy + off, c, d0, d1);
    reduce_op<MODE, ACT>(x0, d0, p0, q0);
    reduce_op<MODE, ACT>(x1, d1, p1, q1);
    if constexpr (kDy) {
      if (kp != nullptr) AccIO<A>::store(kp + off, q0[0], q1[0], c);
    }
    for (int q = 0; q < NQ; ++q) add_at(sums + q * stride, c, q0[q], q1[q]);
  };
  const int64_t Pa = flat_period<kS>(C), W = Pa + kS;
  at::parallel_for(0, N * K, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> acc(NQ * C);
    TiledCoefs<A, NP> tc(Pa, kS);            // flat: coefficients
    std::vector<A> fs(Pa > 0 ? NQ * W : 0);  // flat: phase sums
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / K, k = t % K;
      const A* pn = prm + n * C;
      std::fill(acc.begin(), acc.end(), A(0));
      bool skip = false;
      if constexpr (MODE == Mode::kCorrect) {
        skip = std::all_of(pn + NC, pn + NC + C, [](A v) { return v == A(0); });
      }
      const int64_t s0 = k * R, s1 = skip ? s0 : std::min(S, s0 + R);
      const int64_t row_end = Pa > 0 ? s0 : s1;  // the row path's rows: none when flat
      if (Pa > 0 && s1 > s0) {
        tc.set(prm, NC, C, n);
        std::fill(fs.begin(), fs.end(), A(0));
        const int64_t base = n * S * C;
        for_each_phase_step<kS>(s0 * C, s1 * C, Pa, [&](int64_t o, int64_t c, int64_t ph)
                                                      TF_INLINE_LAMBDA {
          V p0[NP], p1[NP];
          tc.load(ph, p0, p1);
          sum_step(base + o, c, p0, p1, fs.data() + ph, W);
        });
        for (int q = 0; q < NQ; ++q) fold_phases(&fs[q * W], Pa, kS, C, &acc[q * C]);
      }
      // Otherwise row by row, in memory order, the sums in acc (L1). Measured on the
      // 2-core EPYC, both variants interleaved in one process, backward:
      // 0.96-1.53x the speed of blocks of 16 rows swept channel step by
      // channel step with the sums in registers (8x256x56x56 bfloat16
      // 5.7 -> 4.5 ms, 2x320x64x64 float32 2.6 -> 1.8 ms, while the VM ran
      // slow). The statistics kernel keeps its 16-row blocks: there row by
      // row was 1.15-1.55x slower.
      for (int64_t s = s0; s < row_end; ++s) {
        const int64_t row = (n * S + s) * C;
        for_each_step<kS>(C, [&](int64_t c0, int64_t c) TF_INLINE_LAMBDA {
          V p0[NP], p1[NP];
          load_coefs<NP>(pn + c0, NC, c, p0, p1);
          sum_step(row + c0, c, p0, p1, acc.data() + c0, C);
        });
      }
      if constexpr (MODE == Mode::kCorrect) {
        // Groups that need no correction contribute zero (their flag is 0).
        for (int64_t ch = 0; ch < C; ++ch) {
          if (pn[NC + ch] == A(0)) acc[ch] = A(0);
        }
      }
      for (int q = 0; q < NQ; ++q) {
        std::copy(acc.begin() + q * C, acc.begin() + (q + 1) * C, at_part(q, n, k));
      }
    }
  });
}

// ----------------------------------------------- whole-group (cache-sized)
template <typename T, Act ACT>
void fused_fwd_kernel(const FusedParams& fp) {
  using IO = VecIO<T>;
  using A = typename IO::A;
  using V = typename IO::AVec;
  const Geometry& g = fp.geo;
  const int64_t M = g.D * g.S, S = g.S, D = g.D, L = kStatChunk;
  const int64_t K = (M + L - 1) / L;
  const T* x = fp.x.const_data_ptr<T>();
  T* out = fp.out.mutable_data_ptr<T>();
  const A* w = fp.weight.defined() ? fp.weight.const_data_ptr<A>() : nullptr;
  const A* b = fp.bias.defined() ? fp.bias.const_data_ptr<A>() : nullptr;
  A* mean = fp.mean.mutable_data_ptr<A>();
  A* rstd = fp.rstd.mutable_data_ptr<A>();
  at::parallel_for(0, g.N * g.G, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> mean_k(K), m2_k(K);
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t base = ng * M, c0 = (ng % g.G) * D;
      for (int64_t k = 0; k < K; ++k) {
        std::tie(mean_k[k], m2_k[k]) = chunk_stats(x + base + k * L, std::min(L, M - k * L));
      }
      const auto [mu, r] = combine_chunks(
          K, static_cast<double>(M), fp.eps, mean_k.data(), m2_k.data(), static_cast<double>(L),
          static_cast<double>(M - (K - 1) * L));
      const A hi = static_cast<A>(mu);
      const double lo = mu - static_cast<double>(hi);
      mean[ng] = hi;
      rstd[ng] = static_cast<A>(r);
      for (int64_t c = c0; c < c0 + D; ++c) {
        const double a = r * (w != nullptr ? static_cast<double>(w[c]) : 1.0);
        const double sh = (b != nullptr ? static_cast<double>(b[c]) : 0.0) - lo * a;
        const V p[3] = {V(hi), V(static_cast<A>(a)), V(static_cast<A>(sh))};
        const int64_t off = base + (c - c0) * S;
        plane_apply<T, Mode::kForward, ACT>(x + off, nullptr, out + off, S, p);
      }
    }
  });
}

template <typename T, Act ACT>
void fused_bwd_kernel(const FusedParams& fp) {
  using IO = VecIO<T>;
  using A = typename IO::A;
  using V = typename IO::AVec;
  const Geometry& g = fp.geo;
  const int64_t M = g.D * g.S, S = g.S, D = g.D, NC = g.N * g.C;
  const double Md = static_cast<double>(M);
  const T* x = fp.x.const_data_ptr<T>();
  const T* dy = fp.dy.const_data_ptr<T>();
  T* dx = fp.out.mutable_data_ptr<T>();
  const A* w = fp.weight.defined() ? fp.weight.const_data_ptr<A>() : nullptr;
  const A* b = fp.bias.defined() ? fp.bias.const_data_ptr<A>() : nullptr;
  const A* mean = fp.mean.const_data_ptr<A>();
  const A* rstd = fp.rstd.const_data_ptr<A>();
  A* sums = fp.sums.mutable_data_ptr<A>();
  // SiLU: the first pass keeps g = dy * silu'(y) (accumulate type, the
  // group's M elements, cache-resident) for the second, which then evaluates
  // no second sigmoid and does not read dy again.
  constexpr bool kKeep = ACT == Act::kSilu;
  at::parallel_for(0, g.N * g.G, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> kept(kKeep ? static_cast<size_t>(M) : 0);
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t base = ng * M, n = ng / g.G, c0 = (ng % g.G) * D;
      const A hi = mean[ng];
      const double r = static_cast<double>(rstd[ng]);
      double off = 0;  // -(mean's low part) * rstd, as group_norm.cpp
      if (!std::is_same_v<A, double> && std::abs(static_cast<double>(hi) * r) > kMeanTol) {
        const V p[2] = {V(hi), V(1)};
        double lo = 0;
        for (int64_t c = 0; c < D; ++c) {
          A q;
          plane_sums<T, Mode::kCorrect, Act::kNone>(x + base + c * S, nullptr, S, p, &q);
          lo += static_cast<double>(q);
        }
        off = -(lo / Md) * r;
      }
      double sgw = 0, sgxw = 0;
      for (int64_t c = c0; c < c0 + D; ++c) {
        const double wc = w != nullptr ? static_cast<double>(w[c]) : 1.0;
        const double bc = b != nullptr ? static_cast<double>(b[c]) : 0.0;
        const V p[5] = {V(hi), V(static_cast<A>(r * wc)), V(static_cast<A>(off * wc + bc)),
                        V(static_cast<A>(r)), V(static_cast<A>(off))};
        const int64_t o = base + (c - c0) * S;
        A q[2];
        plane_sums<T, Mode::kGrad, ACT>(x + o, dy + o, S, p, q,
                                        kKeep ? kept.data() + (c - c0) * S : nullptr);
        sums[n * g.C + c] = q[0];
        sums[NC + n * g.C + c] = q[1];
        sgw += wc * static_cast<double>(q[0]);
        sgxw += wc * static_cast<double>(q[1]);
      }
      const double mg = sgw / Md, mgx = sgxw / Md;
      const A k2 = static_cast<A>(-r * mgx * r), k3 = static_cast<A>(-r * (mg + mgx * off));
      for (int64_t c = c0; c < c0 + D; ++c) {
        const double wc = w != nullptr ? static_cast<double>(w[c]) : 1.0;
        const double bc = b != nullptr ? static_cast<double>(b[c]) : 0.0;
        const V p[6] = {V(hi), V(static_cast<A>(r * wc)), V(static_cast<A>(off * wc + bc)),
                        V(static_cast<A>(r * wc)), V(k2), V(k3)};
        const int64_t o = base + (c - c0) * S;
        if constexpr (kKeep) {
          dx_kept_run(x + o, kept.data() + (c - c0) * S, dx + o, S, p);  // g as kept
        } else {
          plane_apply<T, Mode::kBackward, ACT>(x + o, dy + o, dx + o, S, p);
        }
      }
    }
  });
}

// ------------------------------------------------------------- dispatch
void stats_cpu(const StatsParams& sp) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, sp.x.scalar_type(), "group_norm_stats_cpu",
      [&] { stats_kernel<scalar_t>(sp); });
}

void pointwise_cpu(const PointwiseParams& pp) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, pp.x.scalar_type(), "group_norm_pointwise_cpu", [&] {
        if (pp.kept.defined()) {
          pointwise_kernel<scalar_t, Mode::kBackward, Act::kNone, true>(pp);
          return;
        }
        with_act(pp.act, [&](auto act) {
          if (pp.mode == Mode::kForward) {
            pointwise_kernel<scalar_t, Mode::kForward, decltype(act)::value>(pp);
          } else {
            pointwise_kernel<scalar_t, Mode::kBackward, decltype(act)::value>(pp);
          }
        });
      });
}

void reduce_cpu(const ReduceParams& rp) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, rp.x.scalar_type(), "group_norm_reduce_cpu", [&] {
        if (rp.mode == Mode::kCorrect) {
          reduce_kernel<scalar_t, Mode::kCorrect, Act::kNone>(rp);
        } else {
          with_act(rp.act, [&](auto act) {
            reduce_kernel<scalar_t, Mode::kGrad, decltype(act)::value>(rp);
          });
        }
      });
}

void fused_fwd_cpu(const FusedParams& fp) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, fp.x.scalar_type(), "group_norm_fused_cpu", [&] {
        with_act(fp.act, [&](auto act) { fused_fwd_kernel<scalar_t, decltype(act)::value>(fp); });
      });
}

void fused_bwd_cpu(const FusedParams& fp) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, fp.x.scalar_type(), "group_norm_fused_backward_cpu", [&] {
        with_act(fp.act, [&](auto act) { fused_bwd_kernel<scalar_t, decltype(act)::value>(fp); });
      });
}

// The (N, C)-sized algebra: each step's items in order, on the calling thread
// (a few thousand items at most for real layers; the loops are what the
// steps were measured with, see group_norm.cpp).
template <typename A>
void algebra_cpu(AlgStep s, const AlgView<A>& v) {
  const int64_t items = alg_items(s, v);
  for (int64_t i = 0; i < items; ++i) alg_step(s, v, i);
}

}  // namespace

// Groups of up to 512 KiB (x, plus dy in the backward) are processed whole by
// one task each, so their second and third passes read from L2 (1 MiB here).
//
// keep_grad_bytes: the SiLU backward's g scratch (half/bfloat16 input), for
// the channels_last and large-group passes. Measured on the 2-core EPYC,
// backward with / without it, builds alternated process by process (after
// exp_inline): bfloat16 channels_last 2x1280x16x16 0.30-0.41 / 0.45-0.57 ms,
// 1x512x64x64 0.92-1.11 / 1.31-1.93, contiguous 2x4x300x300 (groups past the
// fused size) 0.23-0.27 / 0.37-0.38. For float32 it came out either way
// by shape and run (2x640x32x32 and 8x256x56x56 channels_last mostly
// slower with it): float32 and float64 recompute. Capped at kHeapScratchMax
// (checks.h): past it every call would map the scratch afresh, and the page
// faults made 1x128x512x512 float32 74 ms against 29 without. The cap was
// 32 MiB inclusive, and a scratch of exactly 32 MiB is mapped too:
// 1x128x256x256 bfloat16 took 12.2 ms (channels_last 16.3) with it against
// 3.8-4.0 (4.8) without, on the 2-core Xeon, 2026-12-07, glibc's thresholds
// fixed as bench/run.py does.
const Launchers kCpu{
    .stats = stats_cpu,
    .pointwise = pointwise_cpu,
    .reduce = reduce_cpu,
    .algebra = algebra_cpu<float>,
    .algebra64 = algebra_cpu<double>,
    .stat_chunk = kStatChunk,
    .stat_chunk_cl = kStatChunkCl,
    .cl_per_group = false,
    .reduce_chunk = kReduceChunk,
    .keep_grad_bytes = kHeapScratchMax,
    .fused_fwd = fused_fwd_cpu,
    .fused_bwd = fused_bwd_cpu,
    .fused_bytes = int64_t{1} << 19,
};

TORCH_LIBRARY_IMPL(torchfuse, CPU, m) {
  m.impl("group_norm", &group_norm_op<kCpu>);
  m.impl("group_norm_backward", &group_norm_backward_op<kCpu>);
}

}  // namespace torchfuse::group_norm
