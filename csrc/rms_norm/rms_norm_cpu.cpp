// RMSNorm CPU kernels (at::vec, at::parallel_for) and the CPU registration.
// Checks, allocation and formulas: rms_norm.cpp.
#include "rms_norm.h"

#include "../common/cpu_vec.h"

#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

namespace torchfuse::rms_norm {

namespace {

using cpu::AccIO;
using cpu::dot;
using cpu::reduce_sum;
using cpu::scale_row;
using cpu::for_each_step;
using cpu::VecIO;

// Rows handled per parallel task: about 32K elements of work each.
int64_t row_grain(int64_t N) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(N, 1));
}

template <typename T>
void fwd_cpu_kernel(const FwdParams& p) {
  using IO = VecIO<T>;
  using A = typename IO::A;
  using AVec = typename IO::AVec;
  constexpr int64_t S = IO::kStep;
  const int64_t N = p.N;
  const T* x = p.x.const_data_ptr<T>();
  const T* res = p.residual.defined() ? p.residual.const_data_ptr<T>() : nullptr;
  T* summed = p.summed.defined() ? p.summed.mutable_data_ptr<T>() : nullptr;
  const A* w = p.weight.defined() ? p.weight.const_data_ptr<A>() : nullptr;
  T* out = p.out.mutable_data_ptr<T>();
  A* rstd = p.rstd.mutable_data_ptr<A>();
  const A eps = static_cast<A>(p.eps);

  at::parallel_for(0, p.M, row_grain(N), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* src = x + r * N;
      A ss;
      if (res != nullptr) {
        // summed is stored in T and normalised as stored (rounded), exactly
        // as rms_norm(input + residual) would see it; its squares are summed
        // in the same pass.
        T* s = summed + r * N;
        const T* q = res + r * N;
        AVec s0(0), s1(0);
        for_each_step<S>(N, [&](int64_t j, int64_t c) TF_INLINE_LAMBDA {
          AVec a, b, ra, rb;
          IO::load(src + j, c, a, b);
          IO::load(q + j, c, ra, rb);
          a = a + ra;
          b = b + rb;
          IO::round(a, b);
          IO::store(s + j, a, b, c);
          s0 = at::vec::fmadd(a, a, s0);
          s1 = at::vec::fmadd(b, b, s1);
        });
        ss = reduce_sum(s0 + s1);
        src = s;
      } else {
        ss = dot(src, src, N);
      }
      const A rs = A(1) / std::sqrt(ss / static_cast<A>(N) + eps);
      rstd[r] = rs;
      scale_row(src, out + r * N, N, rs, w);
    }
  });
}

template <typename T>
void bwd_cpu_kernel(const BwdParams& p) {
  using IO = VecIO<T>;
  using A = typename IO::A;
  using AVec = typename IO::AVec;
  constexpr int64_t S = IO::kStep;
  const int64_t M = p.M, N = p.N;
  const T* dy = p.dy.const_data_ptr<T>();
  const T* ds = p.dsummed.defined() ? p.dsummed.const_data_ptr<T>() : nullptr;
  const T* x = p.x.const_data_ptr<T>();
  const A* rstd = p.rstd.const_data_ptr<A>();
  const A* w = p.weight.defined() ? p.weight.const_data_ptr<A>() : nullptr;
  T* dx = p.dx.mutable_data_ptr<T>();

  // One row: dx, and (when acc is given) acc += dy * x * rstd.
  auto row = [&](int64_t r, A* acc) {
    const T* dyr = dy + r * N;
    const T* xr = x + r * N;
    T* dxr = dx + r * N;
    const A rs = rstd[r];
    const A g_dot_x = dot(dyr, xr, w, N);
    const AVec vrs(rs);
    const AVec vc(g_dot_x * rs * rs * rs / static_cast<A>(N));
    const T* dsr = ds != nullptr ? ds + r * N : nullptr;
    for_each_step<S>(N, [&](int64_t j, int64_t c) TF_INLINE_LAMBDA {
      AVec d0, d1, x0, x1;
      IO::load(dyr + j, c, d0, d1);
      IO::load(xr + j, c, x0, x1);
      AVec g0 = d0, g1 = d1;
      if (w != nullptr) {
        AVec w0, w1;
        AccIO<A>::load(w + j, c, w0, w1);
        g0 = d0 * w0;
        g1 = d1 * w1;
      }
      AVec o0 = g0 * vrs - x0 * vc;
      AVec o1 = g1 * vrs - x1 * vc;
      if (dsr != nullptr) {
        AVec s0, s1;
        IO::load(dsr + j, c, s0, s1);
        o0 = o0 + s0;
        o1 = o1 + s1;
      }
      IO::store(dxr + j, o0, o1, c);
      if (acc != nullptr) {
        AVec a0, a1;
        AccIO<A>::load(acc + j, c, a0, a1);
        AccIO<A>::store(acc + j, at::vec::fmadd(d0 * x0, vrs, a0),
                        at::vec::fmadd(d1 * x1, vrs, a1), c);
      }
    });
  };

  if (!p.dweight.defined()) {
    at::parallel_for(0, M, row_grain(N), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) row(r, nullptr);
    });
    return;
  }
  // The weight gradient: rows split into a fixed number of chunks (a function
  // of M and N only, so the result is bitwise the same whatever the thread
  // count), one float accumulator row per chunk, then a fixed-order sum.
  const int64_t budget = int64_t{1} << 22;  // accumulator elements (16 MiB)
  const int64_t chunks =
      std::max<int64_t>(1, std::min<int64_t>({M, 64, budget / N}));
  at::Tensor partial = at::zeros({chunks, N}, p.dweight.options());
  A* part = partial.mutable_data_ptr<A>();
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t r0 = c * M / chunks, r1 = (c + 1) * M / chunks;
      for (int64_t r = r0; r < r1; ++r) row(r, part + c * N);
    }
  });
  A* dw = p.dweight.mutable_data_ptr<A>();
  at::parallel_for(0, N, 4096, [&](int64_t jb, int64_t je) {
    for (int64_t j = jb; j < je; ++j) dw[j] = part[j];
    for (int64_t c = 1; c < chunks; ++c) {
      const A* pc = part + c * N;
      for (int64_t j = jb; j < je; ++j) dw[j] += pc[j];
    }
  });
}

void fwd_cpu(const FwdParams& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, p.x.scalar_type(), "rms_norm_cpu",
      [&] { fwd_cpu_kernel<scalar_t>(p); });
}

void bwd_cpu(const BwdParams& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, p.x.scalar_type(), "rms_norm_backward_cpu",
      [&] { bwd_cpu_kernel<scalar_t>(p); });
}

}  // namespace

TORCH_LIBRARY_IMPL(torchfuse, CPU, m) {
  m.impl("rms_norm", &rms_norm_op<fwd_cpu>);
  m.impl("add_rms_norm", &add_rms_norm_op<fwd_cpu>);
  m.impl("rms_norm_backward", &rms_norm_backward_op<bwd_cpu>);
}

}  // namespace torchfuse::rms_norm
