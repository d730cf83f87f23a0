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

using cpu::VecIO;

// Rows handled per parallel task: about 32K elements of work each.
int64_t row_grain(int64_t N) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(N, 1));
}

// sum(a[j] * b[j]) over n elements, vectorised with four accumulators (which
// also shortens the float32 rounding chains on long rows).
template <typename T>
at::opmath_type<T> dot(const T* a, const T* b, int64_t n) {
  using IO = VecIO<T>;
  using AVec = typename IO::AVec;
  constexpr int64_t K = IO::kSize;
  AVec s0(0), s1(0), s2(0), s3(0);
  int64_t j = 0;
  for (; j + 4 * K <= n; j += 4 * K) {
    s0 = at::vec::fmadd(IO::load(a + j), IO::load(b + j), s0);
    s1 = at::vec::fmadd(IO::load(a + j + K), IO::load(b + j + K), s1);
    s2 = at::vec::fmadd(IO::load(a + j + 2 * K), IO::load(b + j + 2 * K), s2);
    s3 = at::vec::fmadd(IO::load(a + j + 3 * K), IO::load(b + j + 3 * K), s3);
  }
  for (; j + K <= n; j += K) {
    s0 = at::vec::fmadd(IO::load(a + j), IO::load(b + j), s0);
  }
  if (j < n) {
    s1 = at::vec::fmadd(IO::load(a + j, n - j), IO::load(b + j, n - j), s1);
  }
  return at::vec::vec_reduce_all<at::opmath_type<T>>(
      [](AVec& u, AVec& v) { return u + v; }, (s0 + s1) + (s2 + s3));
}

// Applies f(j, count) to [0, n) in steps of one vector, then the tail.
template <int64_t K, typename F>
inline void for_each_vec(int64_t n, const F& f) {
  int64_t j = 0;
  for (; j + K <= n; j += K) f(j, K);
  if (j < n) f(j, n - j);
}

template <typename T>
void fwd_cpu_kernel(const FwdParams& p) {
  using IO = VecIO<T>;
  using A = typename IO::A;
  using AVec = typename IO::AVec;
  constexpr int64_t K = IO::kSize;
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
      if (res != nullptr) {
        // summed is stored in T and normalised as stored (rounded), exactly
        // as rms_norm(input + residual) would see it.
        T* s = summed + r * N;
        const T* q = res + r * N;
        for_each_vec<K>(N, [&](int64_t j, int64_t c) {
          IO::store(s + j, IO::load(src + j, c) + IO::load(q + j, c), c);
        });
        src = s;
      }
      const A ss = dot(src, src, N);
      const A rs = A(1) / std::sqrt(ss / static_cast<A>(N) + eps);
      rstd[r] = rs;
      const AVec vrs(rs);
      T* o = out + r * N;
      if (w != nullptr) {
        for_each_vec<K>(N, [&](int64_t j, int64_t c) {
          IO::store(o + j, IO::load(src + j, c) * vrs * AVec::loadu(w + j, c), c);
        });
      } else {
        for_each_vec<K>(N, [&](int64_t j, int64_t c) {
          IO::store(o + j, IO::load(src + j, c) * vrs, c);
        });
      }
    }
  });
}

template <typename T>
void bwd_cpu_kernel(const BwdParams& p) {
  using IO = VecIO<T>;
  using A = typename IO::A;
  using AVec = typename IO::AVec;
  constexpr int64_t K = IO::kSize;
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
    A g_dot_x;
    if (w != nullptr) {
      AVec s(0);
      for_each_vec<K>(N, [&](int64_t j, int64_t c) {
        s = at::vec::fmadd(
            IO::load(dyr + j, c) * AVec::loadu(w + j, c), IO::load(xr + j, c), s);
      });
      g_dot_x = at::vec::vec_reduce_all<A>(
          [](AVec& u, AVec& v) { return u + v; }, s);
    } else {
      g_dot_x = dot(dyr, xr, N);
    }
    const AVec vrs(rs);
    const AVec vc(g_dot_x * rs * rs * rs / static_cast<A>(N));
    const T* dsr = ds != nullptr ? ds + r * N : nullptr;
    for_each_vec<K>(N, [&](int64_t j, int64_t c) {
      const AVec d = IO::load(dyr + j, c);
      const AVec xv = IO::load(xr + j, c);
      const AVec g = w != nullptr ? d * AVec::loadu(w + j, c) : d;
      AVec o = g * vrs - xv * vc;
      if (dsr != nullptr) o = o + IO::load(dsr + j, c);
      IO::store(dxr + j, o, c);
      if (acc != nullptr) {
        (AVec::loadu(acc + j, c) + d * xv * vrs).store(acc + j, c);
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

std::tuple<at::Tensor, at::Tensor> rms_norm_cpu(
    const at::Tensor& input,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight,
    double eps) {
  return forward(input, normalized_shape, weight, eps, fwd_cpu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_cpu(
    const at::Tensor& input,
    const at::Tensor& residual,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight,
    double eps) {
  return add_forward(input, residual, normalized_shape, weight, eps, fwd_cpu);
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(
    const at::Tensor& grad_out,
    const std::optional<at::Tensor>& grad_summed,
    const at::Tensor& input,
    const at::Tensor& rstd,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight,
    bool weight_grad) {
  return backward(
      grad_out, grad_summed, input, rstd, normalized_shape, weight,
      weight_grad, bwd_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchfuse, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("add_rms_norm", &add_rms_norm_cpu);
  m.impl("rms_norm_backward", &rms_norm_backward_cpu);
}

}  // namespace torchfuse::rms_norm
