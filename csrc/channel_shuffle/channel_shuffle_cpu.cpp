// Channel shuffle and cat + shuffle: CPU kernels and the CPU registration.
// Checks, layouts and the channel map: channel_shuffle.{h,cpp}.
//
//   * I > 1 (contiguous layout): each (o, channel) is one copy of a plane;
//     one piece: the source channel stepped along with the destination;
//     several: the channel map resolved once per call into a table of base
//     address and outer stride of both sides per channel;
//   * I == 1 (channels_last): per outer row, a transpose of C elements moved
//     as integers of the element's size (vectorized interleaves for small
//     groups or small cpg, else a table of s(c) per channel).
#include "channel_shuffle.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace torchfuse::channel_shuffle {

namespace {

// Parallel tasks move at least kTaskBytes: smaller tensors run on one thread
// (waking a second one costs more than it saves).
constexpr int64_t kTaskBytes = int64_t{1} << 16;

// at::parallel_for's grain for items of item_bytes each.
int64_t task_grain(int64_t item_bytes) {
  return std::max<int64_t>(1, kTaskBytes / std::max<int64_t>(item_bytes, 1));
}

struct Entry {
  char* dst;
  const char* src;
  int64_t dst_stride;  // bytes between consecutive o
  int64_t src_stride;
};

struct Elem16 {
  uint64_t lo, hi;
};

// I == 1 (channels_last): each outer row of C elements is transposed from
// (groups, cpg) to (cpg, groups). When every piece boundary is a multiple of
// cpg (always so for channel_shuffle; ShuffleNetV2's two halves for
// cat_shuffle), each group is a contiguous run of cpg elements of one piece,
// and a row is an interleave of `groups` streams, or, seen the other way, a
// de-interleave of records of cpg elements. For F = groups or F = cpg in
// {2, 3, 4, 8} those are loops with F as a compile-time constant that the
// compiler vectorizes with in-register permutes. Measured on the 2-core
// EPYC, 2 threads, 64x116x28x28 float32 g=2: 3.45 ms with the per-element
// table below, 1.09-1.11 ms vectorized (torch's channels_last kernel in the
// same runs: 1.16-1.5 ms).
// Elsewhere (the inverse of a shuffle with a large cpg, unaligned pieces):
// per-element offsets from a table.

// d[i * F + f] = s[f][i], i < n
template <typename E, int F>
inline void interleave(const std::array<const E*, F>& src, E* __restrict__ d, int64_t n) {
  const std::array<const E*, F> s = src;
  for (int64_t i = 0; i < n; ++i) {
#pragma GCC unroll 8
    for (int f = 0; f < F; ++f) d[i * F + f] = s[f][i];
  }
}

// d[f][i] = s[i * F + f], i < n. F = 2, 3, 4: record by record, the mirror
// of interleave. F = 8: one stream at a time (strided loads from the row, in
// L1; contiguous stores), where GCC 12's record-by-record code was slow.
// Measured on the 2-core Xeon, 2 threads, builds alternated 5x: the inverse
// of a channels_last channel_shuffle 1x384x28x28 g=8 (F = 8), float32 46 ->
// 33 us, bfloat16 43 -> 26 us. Stream by stream for F = 3 was 1.2x slower
// (1x240x28x28 g=3 inverse), for F = 2 and 4 mixed (0.83-1.18x).
template <typename E, int F>
inline void deinterleave(const E* __restrict__ s, const std::array<E*, F>& dst, int64_t n) {
  if constexpr (F == 8) {
    for (int f = 0; f < F; ++f) {
      E* __restrict__ d = dst[f];
      for (int64_t i = 0; i < n; ++i) d[i] = s[i * F + f];
    }
  } else {
    const std::array<E*, F> d = dst;
    for (int64_t i = 0; i < n; ++i) {
#pragma GCC unroll 8
      for (int f = 0; f < F; ++f) d[f][i] = s[i * F + f];
    }
  }
}

// The pieces of the concatenation: base address, channels, first
// concatenated channel and row stride (elements) of piece k.
struct Pieces {
  std::vector<char*> base;
  std::vector<int64_t> ck, c0, os;
  bool aligned = true;  // every piece boundary a multiple of cpg
};

Pieces pieces_of(const Params& p) {
  Pieces pc;
  const int64_t cpg = p.C / p.groups;
  int64_t acc = 0;
  for (size_t k = 0; k < p.pieces.size(); ++k) {
    const at::Tensor& t = p.pieces[k];
    const int64_t n = t.size(1);
    pc.base.push_back(static_cast<char*>(t.data_ptr()));
    pc.ck.push_back(n);
    pc.c0.push_back(acc);
    pc.os.push_back(p.ostride[k]);
    pc.aligned = pc.aligned && n % cpg == 0;
    acc += n;
  }
  return pc;
}

// Row o of piece k, and of the shuffled tensor (I == 1).
template <typename E>
E* piece_row(const Pieces& pc, size_t k, int64_t o) {
  return reinterpret_cast<E*>(pc.base[k]) + o * pc.os[k];
}

// f(o, shuffled row o) for every outer row, in parallel.
template <typename E, typename Fn>
void for_each_row(const Params& p, const Fn& f) {
  E* sh = static_cast<E*>(p.shuffled.data_ptr());
  const int64_t C = p.C, grain = task_grain(C * static_cast<int64_t>(sizeof(E)));
  at::parallel_for(0, p.O, grain, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) f(o, sh + o * C);
  });
}

// groups == F: row o is the interleave of the groups' runs; group g starts
// at local channel c - c0[k] of the piece k that holds channel c = g * cpg.
template <typename E, int F>
void rows_groups(const Params& p, const Pieces& pc) {
  const int64_t cpg = p.C / F;
  std::array<size_t, F> gk;
  std::array<int64_t, F> goff;
  for (int g = 0; g < F; ++g) {
    const int64_t c = g * cpg;
    size_t k = 0;
    while (c >= pc.c0[k] + pc.ck[k]) ++k;
    gk[g] = k;
    goff[g] = c - pc.c0[k];
  }
  for_each_row<E>(p, [&](int64_t o, E* srow) {
    std::array<E*, F> run;
    for (int g = 0; g < F; ++g) run[g] = piece_row<E>(pc, gk[g], o) + goff[g];
    if (p.to_shuffled) {
      std::array<const E*, F> src;
      std::copy(run.begin(), run.end(), src.begin());
      interleave<E, F>(src, srow, cpg);
    } else {
      deinterleave<E, F>(srow, run, cpg);
    }
  });
}

// cpg == F: piece k's row holds ck / F records of F elements (groups
// c0 / F ...); element f of record r goes to shuffled position f * G + r.
template <typename E, int F>
void rows_records(const Params& p, const Pieces& pc) {
  const int64_t G = p.groups;
  for_each_row<E>(p, [&](int64_t o, E* srow) {
    for (size_t k = 0; k < pc.ck.size(); ++k) {
      E* prow = piece_row<E>(pc, k, o);
      const int64_t g0 = pc.c0[k] / F, n = pc.ck[k] / F;
      std::array<E*, F> col;
      for (int f = 0; f < F; ++f) col[f] = srow + f * G + g0;
      if (p.to_shuffled) {
        deinterleave<E, F>(prow, col, n);
      } else {
        std::array<const E*, F> src;
        std::copy(col.begin(), col.end(), src.begin());
        interleave<E, F>(src, prow, n);
      }
    }
  });
}

// Any geometry: every piece's row is walked in order while the shuffled row
// (C elements, in L1) is indexed through soff (s(c) per concatenated channel).
template <typename E>
void rows_table(const Params& p, const Pieces& pc) {
  TORCH_CHECK(p.C <= std::numeric_limits<int32_t>::max(), "channel_shuffle: too many channels");
  const int64_t C = p.C, cpg = C / p.groups;
  std::vector<int32_t> soff(C);
  for (int64_t c = 0; c < C; ++c) {
    soff[c] = static_cast<int32_t>((c % cpg) * p.groups + c / cpg);
  }
  for_each_row<E>(p, [&](int64_t o, E* srow) {
    for (size_t k = 0; k < pc.ck.size(); ++k) {
      E* prow = piece_row<E>(pc, k, o);
      const int32_t* off = soff.data() + pc.c0[k];
      const int64_t n = pc.ck[k];
      if (p.to_shuffled) {
        for (int64_t j = 0; j < n; ++j) srow[off[j]] = prow[j];
      } else {
        for (int64_t j = 0; j < n; ++j) prow[j] = srow[off[j]];
      }
    }
  });
}

// Calls f(std::integral_constant<int, F>{}) for F in {2, 3, 4, 8}; false
// for any other value.
template <typename Fn>
bool with_small(int64_t v, const Fn& f) {
  switch (v) {
    case 2: f(std::integral_constant<int, 2>{}); return true;
    case 3: f(std::integral_constant<int, 3>{}); return true;
    case 4: f(std::integral_constant<int, 4>{}); return true;
    case 8: f(std::integral_constant<int, 8>{}); return true;
    default: return false;
  }
}

template <typename E>
void rows(const Params& p, const Pieces& pc) {
  if (pc.aligned) {
    if (with_small(p.groups, [&](auto f) { rows_groups<E, decltype(f)::value>(p, pc); })) return;
    if (with_small(p.C / p.groups, [&](auto f) { rows_records<E, decltype(f)::value>(p, pc); })) {
      return;
    }
  }
  rows_table<E>(p, pc);
}

// Copies n bytes in fixed-size moves of W bytes (what the compiler emits for
// a memcpy of constant size: one vector load and store).
template <int W>
inline void move(char* d, const char* s) {
  std::memcpy(d, s, W);
}

// n < 32 bytes as two moves of the largest power of two <= n, the second
// ending at n (they may overlap: src and dst do not).
inline void copy_small(char* d, const char* s, int64_t n) {
  if (n >= 16) {
    move<16>(d, s);
    move<16>(d + n - 16, s + n - 16);
  } else if (n >= 8) {
    move<8>(d, s);
    move<8>(d + n - 8, s + n - 8);
  } else if (n >= 4) {
    move<4>(d, s);
    move<4>(d + n - 4, s + n - 4);
  } else if (n >= 2) {
    move<2>(d, s);
    move<2>(d + n - 2, s + n - 2);
  } else if (n == 1) {
    *d = *s;
  }
}

// One plane (tens of bytes to a few KB) in 32-byte moves, the tail as one
// move ending at n. Measured on the 2-core EPYC (AVX-512 build), 2 threads,
// each against torch's channel_shuffle in the same process, N = 64: the
// previous copy (64-byte Vectorized<uint8_t> moves, glibc memcpy for the
// tail, a division per plane) ran at 0.59-0.97x torch (64x464x7x7
// bfloat16: 138 us against 82); this one at 0.94-1.34x (64x464x7x7
// bfloat16 48 us against 65, float32 86 against 100). With the glibc tail
// and the division still in place, 64- and 16-byte moves were slower than
// 32-byte ones in most cases (a few within 5% either way).
inline void copy_plane(char* dst, const char* src, int64_t n) {
  constexpr int64_t W = 32;
  if (n < W) return copy_small(dst, src, n);
  int64_t j = 0;
  for (; j + 4 * W <= n; j += 4 * W) {
    move<W>(dst + j, src + j);
    move<W>(dst + j + W, src + j + W);
    move<W>(dst + j + 2 * W, src + j + 2 * W);
    move<W>(dst + j + 3 * W, src + j + 3 * W);
  }
  for (; j + W <= n; j += W) move<W>(dst + j, src + j);
  if (j < n) move<W>(dst + n - W, src + n - W);
}

void copy_planes(const std::vector<Entry>& table, int64_t O, int64_t plane_bytes) {
  const int64_t C = static_cast<int64_t>(table.size());
  at::parallel_for(0, O * C, task_grain(plane_bytes), [&](int64_t begin, int64_t end) {
    int64_t o = begin / C, c = begin % C;  // stepped, not divided, per plane
    for (int64_t r = begin; r < end; ++r) {
      const Entry& e = table[c];
      copy_plane(e.dst + o * e.dst_stride, e.src + o * e.src_stride, plane_bytes);
      if (++c == C) {
        c = 0;
        ++o;
      }
    }
  });
}

// One piece (channel_shuffle, its inverse): destination channel d comes from
// source channel (d % A) * B + d / A, with (A, B) = (groups, cpg) to the
// shuffled tensor and (cpg, groups) from it; stepped per plane, no table.
// With the table (C entries, a division each, built on every call) the
// batch-1 ShuffleNet shapes ran at 0.64-0.96x torch's channel_shuffle on the
// 2-core Xeon (1x464x7x7 float32: 7.2 us against torch's 3.8); without it
// 1.2-2.2x faster than with it (that one 3.2 us), builds alternated 3x;
// batch 64 unchanged. The table built without divisions (c / cpg, c % cpg
// stepped) was still 0.58-0.92x the speed of this at batch 1 (4 alternations):
// the allocation and the indirection cost too, so several pieces keep it.
// src_row, dst_row: bytes between consecutive o.
void copy_planes_one(const char* src, int64_t src_row, char* dst, int64_t dst_row, int64_t O,
                     int64_t C, int64_t A, int64_t plane_bytes) {
  const int64_t B = C / A;
  at::parallel_for(0, O * C, task_grain(plane_bytes), [&](int64_t begin, int64_t end) {
    int64_t o = begin / C, d = begin % C, q = d / A, r = d % A;
    for (int64_t t = begin; t < end; ++t) {
      copy_plane(dst + o * dst_row + d * plane_bytes,
                 src + o * src_row + (r * B + q) * plane_bytes, plane_bytes);
      if (++r == A) {
        r = 0;
        ++q;
      }
      if (++d == C) {
        d = q = r = 0;
        ++o;
      }
    }
  });
}

void launch_cpu(const Params& p) {
  const int64_t esize = p.shuffled.element_size();
  const Pieces pc = pieces_of(p);
  if (p.I == 1) {
    switch (esize) {
      case 1: return rows<uint8_t>(p, pc);
      case 2: return rows<uint16_t>(p, pc);
      case 4: return rows<uint32_t>(p, pc);
      case 8: return rows<uint64_t>(p, pc);
      case 16: return rows<Elem16>(p, pc);
      default: TORCH_CHECK(false, "channel_shuffle: unsupported element size ", esize);
    }
  }
  // One entry per plane, indexed by destination channel so that the writes
  // of a row are in order.
  const int64_t cpg = p.C / p.groups, plane = p.I * esize;
  char* sh = static_cast<char*>(p.shuffled.data_ptr());
  const int64_t ss = p.C * plane;
  if (pc.base.size() == 1) {
    const int64_t ps = pc.os[0] * esize;
    if (p.to_shuffled) return copy_planes_one(pc.base[0], ps, sh, ss, p.O, p.C, p.groups, plane);
    return copy_planes_one(sh, ss, pc.base[0], ps, p.O, p.C, cpg, plane);
  }
  std::vector<Entry> table(p.C);
  for (size_t k = 0; k < pc.ck.size(); ++k) {
    const int64_t ps = pc.os[k] * esize;
    for (int64_t j = 0; j < pc.ck[k]; ++j) {
      const int64_t c = pc.c0[k] + j, s = (c % cpg) * p.groups + c / cpg;
      char* pch = pc.base[k] + j * plane;
      char* sch = sh + s * plane;
      if (p.to_shuffled) {
        table[s] = Entry{sch, pch, ss, ps};
      } else {
        table[c] = Entry{pch, sch, ps, ss};
      }
    }
  }
  copy_planes(table, p.O, plane);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchfuse, CPU, m) {
  m.impl("channel_shuffle", &channel_shuffle_op<launch_cpu>);
  m.impl("cat_shuffle", &cat_shuffle_op<launch_cpu>);
  m.impl("cat_shuffle_backward", &cat_shuffle_backward_op<launch_cpu>);
}

}  // namespace torchfuse::channel_shuffle
