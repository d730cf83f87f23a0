// Gram matrices / style loss: the CPU passes around the GEMMs (at::vec,
// at::parallel_for) and the CPU registration. Checks, views, GEMMs and
// formulas: gram.cpp / gram.h.
#include "gram.h"

#include "../common/cpu_vec.h"

#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace torchfuse::gram {

namespace {

using cpu::AccIO;
using cpu::for_each_step;
using cpu::reduce_sum;
using cpu::VecIO;

// Rows of C elements per parallel task: about 16K elements each.
int64_t row_grain(int64_t C) {
  return std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(C, 1));
}

template <typename T>
void loss_kernel(const LossParams& p) {
  using IO = VecIO<T>;
  using A = typename IO::A;
  using AVec = typename IO::AVec;
  const int64_t C = p.C, rows = p.N * C;
  const T* g = p.gram.const_data_ptr<T>();
  const A* t = p.target.const_data_ptr<A>();
  A* d = p.d.mutable_data_ptr<A>();
  const bool none = p.reduction == Reduction::None;
  T* out = none ? p.out.mutable_data_ptr<T>() : nullptr;
  // one partial sum per row, added in row order below: the same result
  // whatever the number of threads
  std::vector<A> part(none ? 0 : rows);
  at::parallel_for(0, rows, row_grain(C), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / C, i = r - n * C;
      const T* gr = g + r * C;
      const A* tr = t + (p.t_batched ? n * C * C : 0) + i * C;
      A* dr = d + r * C;
      AVec s0(0), s1(0);
      for_each_step<IO::kStep>(C, [&](int64_t j, int64_t c) TF_INLINE_LAMBDA {
        AVec a, b, ta, tb;
        IO::load(gr + j, c, a, b);
        AccIO<A>::load(tr + j, c, ta, tb);
        a = a - ta;
        b = b - tb;
        AccIO<A>::store(dr + j, a, b, c);
        if (none) {
          IO::store(out + r * C + j, a * a, b * b, c);
        } else {
          // loads past c read zeros on both sides: those lanes add 0
          s0 = at::vec::fmadd(a, a, s0);
          s1 = at::vec::fmadd(b, b, s1);
        }
      });
      if (!none) part[r] = reduce_sum(s0 + s1);
    }
  });
  if (none) return;
  double total = 0;  // in order, in double: rows * C terms at most
  for (int64_t r = 0; r < rows; ++r) total += static_cast<double>(part[r]);
  if (p.reduction == Reduction::Mean) total /= static_cast<double>(rows) * static_cast<double>(C);
  p.out.fill_(total);
}

// s[n, i, j] = w[n, i, j] + w[n, j, i], w = a * g; dtarget = -coef * w.
// In kSymTile x kSymTile tiles, a task per (sample, row of tiles): the
// transposed reads w[n, j, i] of a tile stay within kSymTile lines, reused
// by the tile's next rows. Row by row over whole columns instead (C = 512:
// 512 lines a row) ran 0.4 ms for one 512 x 512 matrix on the 2-core Xeon.
constexpr int64_t kSymTile = 32;

template <typename T, typename TA>
void sym_kernel(const SymParams& p) {
  using A = at::opmath_type<T>;
  const int64_t C = p.C, tiles = (C + kSymTile - 1) / kSymTile;
  const TA* a = p.a.const_data_ptr<TA>();
  const A* g = p.g.defined() ? p.g.const_data_ptr<A>() : nullptr;
  const bool g_full = g != nullptr && p.g.dim() > 0;
  const A g0 = g != nullptr && !g_full ? g[0] : A(1);
  T* s = p.s.mutable_data_ptr<T>();
  A* dt = p.dtarget.defined() ? p.dtarget.mutable_data_ptr<A>() : nullptr;
  const A coef = static_cast<A>(p.coef);
  auto w = [&](int64_t idx) TF_INLINE_LAMBDA {
    return static_cast<A>(a[idx]) * (g_full ? g[idx] : g0);
  };
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / (kSymTile * C));
  at::parallel_for(0, p.N * tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / tiles, i0 = (task - n * tiles) * kSymTile;
      const int64_t i1 = std::min(C, i0 + kSymTile), base = n * C * C;
      for (int64_t j0 = 0; j0 < C; j0 += kSymTile) {
        const int64_t j1 = std::min(C, j0 + kSymTile);
        for (int64_t i = i0; i < i1; ++i) {
          for (int64_t j = j0; j < j1; ++j) {
            const A wij = w(base + i * C + j);
            s[base + i * C + j] = static_cast<T>(wij + w(base + j * C + i));
            if (dt != nullptr) dt[base + i * C + j] = -coef * wij;
          }
        }
      }
    }
  });
}

void loss_cpu(const LossParams& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, p.gram.scalar_type(), "style_loss_cpu",
      [&] { loss_kernel<scalar_t>(p); });
}

void sym_cpu(const SymParams& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, p.s.scalar_type(), "gram_sym_cpu", [&] {
        using A = at::opmath_type<scalar_t>;
        if (p.a.scalar_type() == p.s.scalar_type()) {
          sym_kernel<scalar_t, scalar_t>(p);
        } else {
          TORCH_CHECK(p.a.scalar_type() == c10::CppTypeToScalarType<A>::value,
                      "gram: unexpected dtype ", p.a.scalar_type());
          sym_kernel<scalar_t, A>(p);
        }
      });
}

const Launchers kCpu{loss_cpu, sym_cpu};

}  // namespace

TORCH_LIBRARY_IMPL(torchfuse, CPU, m) {
  m.impl("gram_matrix", &gram_matrix_op<kCpu>);
  m.impl("gram_matrix_backward", &gram_matrix_backward_op<kCpu>);
  m.impl("style_loss", &style_loss_op<kCpu>);
  m.impl("style_loss_backward", &style_loss_backward_op<kCpu>);
}

}  // namespace torchfuse::gram
