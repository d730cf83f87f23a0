// Channel shuffle and cat + shuffle: CUDA kernels and the CUDA registration.
// Checks, layouts and the channel map: channel_shuffle.{h,cpp}.
//
// One grid-stride kernel walks the destination flat, V elements per thread,
// and computes each source address from the channel map (no device table,
// so nothing is copied from the host):
//   * plane mode (contiguous layout, I > 1): the V elements share a channel,
//     so both the load and the store are one V-element access;
//   * channel mode (channels_last, I == 1): the V elements are V consecutive
//     destination channels of one outer row: V scalar gathers (coalesced
//     across the warp) and one V-element store.
// V is the widest power of two up to 16 bytes that the shape and the base
// addresses allow (vec_ok): a bfloat16 14x14 plane (I = 196) moves 4
// elements (8 bytes) per access instead of falling back to one.
// Kernels are templated on the element size only (1, 2, 4, 8, 16 bytes),
// which covers every dtype. 32-bit indexing when the tensor allows it, else
// 64-bit. Up to kMaxPieces pieces travel as a kernel argument; more pieces
// take a two-pass path (cat, then shuffle; or shuffle, then split).
#include "channel_shuffle.h"

#include "../common/cuda_utils.cuh"

#include <ATen/Functions.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

namespace torchfuse::channel_shuffle {
namespace {

using namespace torchfuse::cuda;

constexpr int kMaxPieces = 8;
constexpr int kThreads = 256;

struct PieceTable {
  char* ptr[kMaxPieces];
  int64_t ostride[kMaxPieces];    // elements between consecutive rows o
  int64_t begin[kMaxPieces + 1];  // channel offsets in the concatenation
  int n;
};

struct alignas(16) Elem16 {
  uint64_t lo, hi;
};

template <typename index_t>
__device__ __forceinline__ int find_piece(const PieceTable& t, index_t c) {
  int k = 0;
  while (k + 1 < t.n && c >= static_cast<index_t>(t.begin[k + 1])) ++k;
  return k;
}

// Source address of concatenated channel c, row o, offset i (forward).
template <typename T, typename index_t>
__device__ __forceinline__ const T* piece_addr(
    const PieceTable& t, index_t o, index_t c, index_t i, index_t I) {
  const int k = find_piece(t, c);
  const index_t b = static_cast<index_t>(t.begin[k]);
  return reinterpret_cast<const T*>(t.ptr[k]) +
      (o * static_cast<index_t>(t.ostride[k]) + (c - b) * I + i);
}

// kToShuffled: destination = shuffled (channel s), source = the pieces.
// else:        destination = the pieces (concatenated channel c), source = shuffled.
template <typename T, int V, bool kPlane, bool kToShuffled, typename index_t>
__global__ void shuffle_kernel(
    // indexed in place, not copied to local memory (CUDA 11.7+, sm_70+; the
    // CUDA 13 toolkit this builds with starts at sm_75)
    const __grid_constant__ PieceTable pieces,
    T* shuffled,
    index_t C,
    index_t I,
    index_t cpg,
    index_t groups,
    index_t nvec) {
  const index_t step = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t v = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       v < nvec; v += step) {
    const index_t e = v * V;
    index_t i, ch, o;
    if constexpr (kPlane) {
      i = e % I;
      const index_t row = e / I;
      ch = row % C;
      o = row / C;
    } else {
      i = 0;
      ch = e % C;
      o = e / C;
    }
    if constexpr (kToShuffled) {
      T* dst = shuffled + ((o * C + ch) * I + i);
      if constexpr (kPlane) {
        const index_t c = (ch % groups) * cpg + ch / groups;
        store_vec<T, V>(dst, load_vec<T, V>(piece_addr<T>(pieces, o, c, i, I)));
      } else {
        Vec<T, V> out;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const index_t s = ch + j;
          const index_t c = (s % groups) * cpg + s / groups;
          out.v[j] = *piece_addr<T>(pieces, o, c, index_t(0), index_t(1));
        }
        store_vec<T, V>(dst, out);
      }
    } else {
      // The V destination channels lie in one piece (V divides every C_k).
      T* dst = const_cast<T*>(piece_addr<T>(pieces, o, ch, i, I));
      if constexpr (kPlane) {
        const index_t s = (ch % cpg) * groups + ch / cpg;
        store_vec<T, V>(dst, load_vec<T, V>(shuffled + ((o * C + s) * I + i)));
      } else {
        Vec<T, V> out;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const index_t c = ch + j;
          const index_t s = (c % cpg) * groups + c / cpg;
          out.v[j] = shuffled[o * C + s];
        }
        store_vec<T, V>(dst, out);
      }
    }
  }
}

template <typename T, int V, bool kPlane, bool kToShuffled, typename index_t>
void launch_kernel(const PieceTable& table, const Params& p) {
  const int64_t nvec = p.O * p.C * p.I / V;
  const int64_t blocks = std::min<int64_t>(
      ceil_div(nvec, kThreads), static_cast<int64_t>(num_sms()) * 16);
  auto stream = at::cuda::getCurrentCUDAStream();
  shuffle_kernel<T, V, kPlane, kToShuffled, index_t>
      <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          table, static_cast<T*>(p.shuffled.data_ptr()),
          static_cast<index_t>(p.C), static_cast<index_t>(p.I),
          static_cast<index_t>(p.C / p.groups), static_cast<index_t>(p.groups),
          static_cast<index_t>(nvec));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int V, bool kPlane, bool kToShuffled>
void launch_index(const PieceTable& table, const Params& p) {
  // Every index the kernel forms is below the largest extent of the
  // shuffled tensor (numel) and of a piece (its rows ostride apart), plus
  // one step of the grid.
  int64_t extent = p.O * p.C * p.I;
  for (size_t k = 0; k < p.pieces.size(); ++k) {
    extent = std::max(extent, (p.O - 1) * p.ostride[k] + p.pieces[k].size(1) * p.I);
  }
  if (extent + static_cast<int64_t>(num_sms()) * 16 * kThreads * V <
      std::numeric_limits<int32_t>::max()) {
    launch_kernel<T, V, kPlane, kToShuffled, uint32_t>(table, p);
  } else {
    launch_kernel<T, V, kPlane, kToShuffled, int64_t>(table, p);
  }
}

template <typename T, int V>
void launch_mode(const PieceTable& table, const Params& p) {
  const bool plane = p.I > 1;
  if (plane && p.to_shuffled) return launch_index<T, V, true, true>(table, p);
  if (plane) return launch_index<T, V, true, false>(table, p);
  if (p.to_shuffled) return launch_index<T, V, false, true>(table, p);
  return launch_index<T, V, false, false>(table, p);
}

// Whether V-element accesses are valid: every vector stays in one channel
// (plane mode: V divides I) or row of C channels (channel mode: V divides C),
// and every base address they touch is aligned to V elements. Channel mode
// into the shuffled tensor reads the pieces by scalar gathers, so only the
// pieces that are written by vectors (plane mode; channel mode into the
// pieces, where V must also divide each piece's channels so that a vector
// stays in one piece) are checked.
template <typename T, int V>
bool vec_ok(const Params& p) {
  const int64_t bytes = static_cast<int64_t>(sizeof(T)) * V;
  if (!is_aligned(p.shuffled.data_ptr(), bytes)) return false;
  if ((p.I > 1 ? p.I : p.C) % V != 0) return false;
  if (p.I == 1 && p.to_shuffled) return true;
  for (size_t k = 0; k < p.pieces.size(); ++k) {
    const at::Tensor& t = p.pieces[k];
    if (!is_aligned(t.data_ptr(), bytes) || p.ostride[k] % V != 0) return false;
    if (p.I == 1 && t.size(1) % V != 0) return false;
  }
  return true;
}

template <typename T, int V>
void launch_widest(const PieceTable& table, const Params& p) {
  if constexpr (V > 1) {
    if (vec_ok<T, V>(p)) return launch_mode<T, V>(table, p);
    return launch_widest<T, V / 2>(table, p);
  } else {
    launch_mode<T, 1>(table, p);
  }
}

template <typename T>
void launch_typed(const Params& p) {
  PieceTable table{};
  table.n = static_cast<int>(p.pieces.size());
  int64_t c0 = 0;
  for (int k = 0; k < table.n; ++k) {
    const at::Tensor& t = p.pieces[k];
    table.ptr[k] = static_cast<char*>(t.data_ptr());
    table.ostride[k] = p.ostride[k];
    table.begin[k] = c0;
    c0 += t.size(1);
  }
  table.begin[table.n] = c0;
  launch_widest<T, vec_width<T>()>(table, p);
}

void launch_cuda(const Params& p) {
  const at::cuda::CUDAGuard guard(p.shuffled.device());
  if (static_cast<int>(p.pieces.size()) > kMaxPieces) {
    // Rare (more than kMaxPieces pieces): two passes through one tensor.
    const auto fmt = p.shuffled.suggest_memory_format();
    Params q = p;
    q.ostride = {p.C * p.I};  // the one piece is dense
    if (p.to_shuffled) {
      q.pieces = {at::cat(p.pieces, 1).contiguous(fmt)};
      return launch_cuda(q);
    }
    q.pieces = {at::empty_like(p.shuffled, p.shuffled.options().memory_format(fmt))};
    launch_cuda(q);
    int64_t c0 = 0;
    for (const auto& t : p.pieces) {
      const_cast<at::Tensor&>(t).copy_(q.pieces[0].narrow(1, c0, t.size(1)));
      c0 += t.size(1);
    }
    return;
  }
  switch (p.shuffled.element_size()) {
    case 1: return launch_typed<uint8_t>(p);
    case 2: return launch_typed<uint16_t>(p);
    case 4: return launch_typed<uint32_t>(p);
    case 8: return launch_typed<uint64_t>(p);
    case 16: return launch_typed<Elem16>(p);
    default:
      TORCH_CHECK(false, "channel_shuffle: unsupported element size ",
                  p.shuffled.element_size());
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(torchfuse, CUDA, m) {
  m.impl("channel_shuffle", &channel_shuffle_op<launch_cuda>);
  m.impl("cat_shuffle", &cat_shuffle_op<launch_cuda>);
  m.impl("cat_shuffle_backward", &cat_shuffle_backward_op<launch_cuda>);
}

}  // namespace torchfuse::channel_shuffle
