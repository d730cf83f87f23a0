// Channel shuffle and cat + shuffle: CPU kernels and the CPU registration.
// Checks, layouts and the channel map: channel_shuffle.{h,cpp}.
//
// The channel map is resolved once per call into a table. Then
//   * I > 1 (contiguous layout): each (o, channel) is one memcpy of a plane
//     (table: base address and outer stride of both sides per channel);
//   * I == 1 (channels_last): per outer row, a gather/scatter of C elements
//     moved as integers of the element's size (table: s(c) per channel).
#include "channel_shuffle.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

namespace torchfuse::channel_shuffle {

namespace {

struct Entry {
  char* dst;
  const char* src;
  int64_t dst_stride;  // bytes between consecutive o
  int64_t src_stride;
};

struct Elem16 {
  uint64_t lo, hi;
};

// I == 1: per outer row, every piece's row is walked in order while the
// shuffled row (C elements, in L1) is indexed through soff (s(c) per
// concatenated channel c): contiguous on the piece side, a gather or scatter
// within one small row on the other.
template <typename E>
void rows(const Params& p, const std::vector<int32_t>& soff) {
  const int64_t C = p.C, O = p.O;
  const int K = static_cast<int>(p.pieces.size());
  std::vector<E*> base(K);
  std::vector<int64_t> ck(K), c0(K);
  int64_t acc = 0;
  for (int k = 0; k < K; ++k) {
    base[k] = static_cast<E*>(p.pieces[k].data_ptr());
    ck[k] = p.pieces[k].size(1);
    c0[k] = acc;
    acc += ck[k];
  }
  E* sh = static_cast<E*>(p.shuffled.data_ptr());
  const bool fwd = p.to_shuffled;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(C, 1));
  at::parallel_for(0, O, grain, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      E* srow = sh + o * C;
      for (int k = 0; k < K; ++k) {
        E* prow = base[k] + o * ck[k];
        const int32_t* off = soff.data() + c0[k];
        const int64_t n = ck[k];
        if (fwd) {
          for (int64_t j = 0; j < n; ++j) srow[off[j]] = prow[j];
        } else {
          for (int64_t j = 0; j < n; ++j) prow[j] = srow[off[j]];
        }
      }
    }
  });
}

// memcpy of one plane (a few KB) as explicit vector moves. Measured on the
// 2-core EPYC build machine, 64x116x28x28 g=2: bfloat16 0.38 ms against 0.57
// ms with std::memcpy (glibc), float32 the same (1.2 ms).
inline void copy_plane(char* dst, const char* src, int64_t n) {
  using V = at::vec::Vectorized<uint8_t>;
  constexpr int64_t S = V::size();
  auto* d = reinterpret_cast<uint8_t*>(dst);
  const auto* s = reinterpret_cast<const uint8_t*>(src);
  int64_t j = 0;
  for (; j + 4 * S <= n; j += 4 * S) {
    const V a = V::loadu(s + j), b = V::loadu(s + j + S);
    const V c = V::loadu(s + j + 2 * S), e = V::loadu(s + j + 3 * S);
    a.store(d + j);
    b.store(d + j + S);
    c.store(d + j + 2 * S);
    e.store(d + j + 3 * S);
  }
  for (; j + S <= n; j += S) V::loadu(s + j).store(d + j);
  if (j < n) std::memcpy(d + j, s + j, n - j);
}

void copy_planes(const std::vector<Entry>& table, int64_t O, int64_t plane_bytes) {
  const int64_t C = static_cast<int64_t>(table.size());
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(plane_bytes, 1));
  at::parallel_for(0, O * C, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = r / C, c = r % C;
      const Entry& e = table[c];
      copy_plane(e.dst + o * e.dst_stride, e.src + o * e.src_stride, plane_bytes);
    }
  });
}

void launch_cpu(const Params& p) {
  const int64_t esize = p.shuffled.element_size();
  const int64_t cpg = p.C / p.groups;
  const int64_t plane = p.I * esize;
  // piece index and local channel of every concatenated channel
  std::vector<char*> base;
  std::vector<int64_t> piece_c;
  std::vector<int> piece_of(p.C);
  std::vector<int64_t> local(p.C);
  int64_t c0 = 0;
  for (size_t k = 0; k < p.pieces.size(); ++k) {
    base.push_back(static_cast<char*>(p.pieces[k].data_ptr()));
    const int64_t ck = p.pieces[k].size(1);
    piece_c.push_back(ck);
    for (int64_t j = 0; j < ck; ++j) {
      piece_of[c0 + j] = static_cast<int>(k);
      local[c0 + j] = j;
    }
    c0 += ck;
  }
  char* sh = static_cast<char*>(p.shuffled.data_ptr());
  std::vector<Entry> table(p.I > 1 ? p.C : 0);
  for (int64_t c = 0; c < p.C; ++c) {
    const int64_t s = (c % cpg) * p.groups + c / cpg;
    const int k = piece_of[c];
    char* pc = base[k] + local[c] * plane;
    char* sc = sh + s * plane;
    const int64_t ps = piece_c[k] * plane, ss = p.C * plane;
    if (p.I == 1) break;
    // Indexed by destination channel, so that the writes of a row are in order.
    if (p.to_shuffled) {
      table[s] = Entry{sc, pc, ss, ps};
    } else {
      table[c] = Entry{pc, sc, ps, ss};
    }
  }
  if (p.I > 1) {
    copy_planes(table, p.O, plane);
    return;
  }
  TORCH_CHECK(p.C <= std::numeric_limits<int32_t>::max(), "channel_shuffle: too many channels");
  std::vector<int32_t> soff(p.C);
  for (int64_t c = 0; c < p.C; ++c) {
    soff[c] = static_cast<int32_t>((c % cpg) * p.groups + c / cpg);
  }
  switch (esize) {
    case 1: return rows<uint8_t>(p, soff);
    case 2: return rows<uint16_t>(p, soff);
    case 4: return rows<uint32_t>(p, soff);
    case 8: return rows<uint64_t>(p, soff);
    case 16: return rows<Elem16>(p, soff);
    default: TORCH_CHECK(false, "channel_shuffle: unsupported element size ", esize);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(torchfuse, CPU, m) {
  m.impl("channel_shuffle", &channel_shuffle_op<launch_cpu>);
  m.impl("cat_shuffle", &cat_shuffle_op<launch_cpu>);
  m.impl("cat_shuffle_backward", &cat_shuffle_backward_op<launch_cpu>);
}

}  // namespace torchfuse::channel_shuffle
