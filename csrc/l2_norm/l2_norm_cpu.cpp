// L2 normalization / cosine_linear CPU kernels (at::vec, at::parallel_for)
// and the CPU registration. Checks, layout and formulas: l2_norm.cpp / .h.
//
// Row layout (inner == 1): a task is one row, reduced with cpu::dot.
// Column layout (inner > 1, e.g. NCHW with dim=1): a task is a block of B
// consecutive inner positions of one outer index; the B sums of squares stay
// in four vector registers while the task walks the C channels, and the
// second pass re-reads the (C x B) block from cache.
// Weight gradients accumulate per fixed chunk of tasks (the chunking depends
// only on the shape) and are summed in a fixed order: bitwise identical run
// to run and for any thread count.
#include "l2_norm.h"

#include "../common/cpu_vec.h"

#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>


namespace torchfuse::l2_norm {

namespace {

using cpu::AccIO;
using cpu::dot;
using cpu::for_each_step;
using cpu::reduce_sum;
using cpu::scale_row;
using cpu::VecIO;

// Tasks per parallel chunk: about 32K elements of work each.
int64_t grain_for(int64_t work_per_task) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(work_per_task, 1));
}

template <typename A>
inline A inv_clamped(A n, A eps) {
  return A(1) / (n < eps ? eps : n);  // NaN norm stays NaN, as clamp_min
}

// Runs f(task, acc) over [0, ntasks). Without a weight gradient acc is null;
// with one, tasks are split into a fixed number of chunks (a function of the
// shape only), each chunk accumulating into its own row of C values, and the
// rows are summed into dweight in a fixed order.
template <typename A, typename F>
void run_tasks(int64_t ntasks, int64_t grain, int64_t C, const at::Tensor& dweight, const F& f) {
  if (!dweight.defined()) {
    at::parallel_for(0, ntasks, grain, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) f(t, static_cast<A*>(nullptr));
    });
    return;
  }
  const int64_t budget = int64_t{1} << 22;  // accumulator elements (16 MiB)
  const int64_t chunks =
      std::max<int64_t>(1, std::min<int64_t>({ntasks, 64, budget / std::max<int64_t>(C, 1)}));
  at::Tensor partial = at::zeros({chunks, C}, dweight.options());
  A* part = partial.mutable_data_ptr<A>();
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t t0 = c * ntasks / chunks, t1 = (c + 1) * ntasks / chunks;
      for (int64_t t = t0; t < t1; ++t) f(t, part + c * C);
    }
  });
  A* dw = dweight.mutable_data_ptr<A>();
  at::parallel_for(0, C, 4096, [&](int64_t jb, int64_t je) {
    for (int64_t j = jb; j < je; ++j) dw[j] = part[j];
    for (int64_t c = 1; c < chunks; ++c) {
      const A* pc = part + c * C;
      for (int64_t j = jb; j < je; ++j) dw[j] += pc[j];
    }
  });
}

// B = 2 * kStep consecutive elements as four accumulate vectors.
template <typename T>
struct Block {
  using IO = VecIO<T>;
  using A = typename IO::A;
  using AVec = typename IO::AVec;
  static constexpr int64_t S = IO::kStep;
  static constexpr int64_t B = 2 * S;
  AVec v[4];

  TF_ALWAYS_INLINE void load(const T* q, int64_t n) {
    if (n == B) {
      IO::load(q, v[0], v[1]);
      IO::load(q + S, v[2], v[3]);
    } else {
      IO::load(q, std::min(n, S), v[0], v[1]);
      if (n > S) {
        IO::load(q + S, n - S, v[2], v[3]);
      } else {
        v[2] = v[3] = AVec(A(0));
      }
    }
  }
  TF_ALWAYS_INLINE void store(T* q, int64_t n) const {
    IO::store(q, v[0], v[1], std::min(n, S));
    if (n > S) IO::store(q + S, v[2], v[3], n - S);
  }
  TF_ALWAYS_INLINE void load_acc(const A* q, int64_t n) {
    AccIO<A>::load(q, std::min(n, S), v[0], v[1]);
    if (n > S) {
      AccIO<A>::load(q + S, n - S, v[2], v[3]);
    } else {
      v[2] = v[3] = AVec(A(0));
    }
  }
  TF_ALWAYS_INLINE void store_acc(A* q, int64_t n) const {
    AccIO<A>::store(q, v[0], v[1], std::min(n, S));
    if (n > S) AccIO<A>::store(q + S, v[2], v[3], n - S);
  }
};

// Column-layout tasks span NB blocks of B = 2 * kStep inner positions: the
// forward 512 contiguous bytes per channel (long enough runs for the
// hardware prefetcher while the task's C x NB*B tile stays in L2 for the
// second pass); the backward, which re-reads two tensors, 256 bytes for
// float32/float64 and 512 for float16/bfloat16. Measured on the 2-core EPYC
// (SSD conv4_3, N=8): float32 forward 3.5 -> 2.6 ms going from 256 to 512
// bytes; float32 backward 5.3-6.0 ms at 256 bytes, 7.2 ms at 512; bfloat16
// backward 12.7 ms at 128 bytes, 6.0 at 256, 4.5 at 512. Software
// prefetching of the strided channel rows did not help.
template <typename T, int64_t bytes>
constexpr int blocks_for() {
  constexpr int64_t b = Block<T>::B * static_cast<int64_t>(sizeof(T));
  return b >= bytes ? 1 : static_cast<int>(bytes / b);
}

template <typename T, int NB>
void col_fwd(const FwdParams& p);
template <typename T, int NB>
void col_bwd(const BwdParams& p);

// ---------------------------------------------------------- short rows
// Rows of at most 8 elements (F.normalize over 3-vectors, normals,
// quaternions; channels_last input with few channels): the vector steps of a
// row cost far more than the row. With C a compile-time constant the row is
// a few scalar operations (the same formulas, accumulated in A) and the loop
// over rows is left to the compiler. Measured on the 2-core Xeon,
// 2026-12-08, F.normalize(x, dim=-1) over 4M elements, vector path -> this:
// float32 C = 3 forward 4.6 -> 1.5 ms, forward+backward 15.2 -> 4.3; C = 5..8
// forward 2.4-3.6 -> 1.1-1.2, forward+backward 7.1-10.7 -> 4.5-4.9; bfloat16 C = 3
// 6.7 -> 2.9 and 17.2 -> 8.3, C = 5, 6 1.1-1.5x faster, but C = 8 1.05-1.16x
// slower (the scalar conversions): half types stop at 6.
template <typename T>
constexpr int64_t kShortRow = std::is_same_v<T, at::opmath_type<T>> ? 8 : 6;

// f(std::integral_constant<int, C>) for C in [1, kShortRow<T>]: true; false
// (and nothing called) otherwise.
template <typename T, typename F>
bool dispatch_short_row(int64_t C, const F& f) {
  if (C < 1 || C > kShortRow<T>) return false;
  switch (C) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
  return true;
}

// ------------------------------------------------------------------ forward
template <typename T>
void fwd_kernel(const FwdParams& p) {
  using A = typename VecIO<T>::A;
  const int64_t C = p.C, inner = p.inner;
  const T* x = p.x.const_data_ptr<T>();
  const A* w = p.weight.defined() ? p.weight.const_data_ptr<A>() : nullptr;
  T* out = p.out.defined() ? p.out.mutable_data_ptr<T>() : nullptr;
  A* norm = p.norm.mutable_data_ptr<A>();
  const A eps = static_cast<A>(p.eps);

  if (inner == 1 && dispatch_short_row<T>(C, [&](auto kc) {
        constexpr int K = decltype(kc)::value;
        run_tasks<A>(p.outer, grain_for(K), K, at::Tensor(), [&](int64_t r, A*) {
          A v[K], ss = 0;
          for (int c = 0; c < K; ++c) {
            v[c] = static_cast<A>(x[r * K + c]);
            ss += v[c] * v[c];
          }
          const A n = std::sqrt(ss);
          norm[r] = n;
          if (out == nullptr) return;
          const A k = inv_clamped(n, eps);
          for (int c = 0; c < K; ++c) {
            out[r * K + c] = static_cast<T>(w != nullptr ? v[c] * k * w[c] : v[c] * k);
          }
        });
      })) {
    return;
  }
  if (inner == 1) {
    run_tasks<A>(p.outer, grain_for(C), C, at::Tensor(), [&](int64_t r, A*) {
      const T* src = x + r * C;
      const A n = std::sqrt(dot(src, src, C));
      norm[r] = n;
      if (out == nullptr) return;
      scale_row(src, out + r * C, C, inv_clamped(n, eps), w);
    });
    return;
  }
  col_fwd<T, blocks_for<T, 512>()>(p);
}

// Column layout, forward: a task is NB * B consecutive inner positions.
template <typename T, int NB>
void col_fwd(const FwdParams& p) {
  using Blk = Block<T>;
  using A = typename Blk::A;
  using AVec = typename Blk::AVec;
  constexpr int64_t B = Blk::B;
  constexpr int64_t W = NB * B;
  const int64_t C = p.C, inner = p.inner;
  const T* x = p.x.const_data_ptr<T>();
  const A* w = p.weight.defined() ? p.weight.const_data_ptr<A>() : nullptr;
  T* out = p.out.mutable_data_ptr<T>();
  A* norm = p.norm.mutable_data_ptr<A>();
  const A eps = static_cast<A>(p.eps);
  const int64_t per_outer = (inner + W - 1) / W;
  const AVec veps(eps), one(A(1));
  run_tasks<A>(p.outer * per_outer, grain_for(C * W), C, at::Tensor(), [&](int64_t t, A*) {
    const int64_t o = t / per_outer, i0 = (t % per_outer) * W;
    const int64_t n = std::min(W, inner - i0);
    const int nb = static_cast<int>((n + B - 1) / B);
    const T* base = x + o * C * inner + i0;
    Blk ss[NB];
    for (auto& b : ss) {
      for (auto& s : b.v) s = AVec(A(0));
    }
    for (int64_t c = 0; c < C; ++c) {
      for (int u = 0; u < nb; ++u) {
        Blk b;
        b.load(base + c * inner + u * B, std::min(B, n - u * B));
        for (int k = 0; k < 4; ++k) ss[u].v[k] = at::vec::fmadd(b.v[k], b.v[k], ss[u].v[k]);
      }
    }
    for (int u = 0; u < nb; ++u) {
      for (auto& s : ss[u].v) s = s.sqrt();
      ss[u].store_acc(norm + o * inner + i0 + u * B, std::min(B, n - u * B));
      // 1 / max(norm, eps); maximum propagates NaN, as clamp_min does.
      for (auto& s : ss[u].v) s = one / at::vec::maximum(s, veps);
    }
    T* obase = out + o * C * inner + i0;
    for (int64_t c = 0; c < C; ++c) {
      const AVec wc(w != nullptr ? w[c] : A(1));
      for (int u = 0; u < nb; ++u) {
        const int64_t m = std::min(B, n - u * B);
        Blk b;
        b.load(base + c * inner + u * B, m);
        for (int k = 0; k < 4; ++k) b.v[k] = b.v[k] * ss[u].v[k] * wc;
        b.store(obase + c * inner + u * B, m);
      }
    }
  });
}

// ----------------------------------------------------------------- backward
template <typename T>
void bwd_kernel(const BwdParams& p) {
  using IO = VecIO<T>;
  using A = typename IO::A;
  using AVec = typename IO::AVec;
  constexpr int64_t S = IO::kStep;
  const int64_t C = p.C, inner = p.inner;
  const T* dy = p.dy.const_data_ptr<T>();
  const T* x = p.x.const_data_ptr<T>();
  const A* norm = p.norm.const_data_ptr<A>();
  const A* w = p.weight.defined() ? p.weight.const_data_ptr<A>() : nullptr;
  T* dx = p.dx.mutable_data_ptr<T>();
  const A eps = static_cast<A>(p.eps);
  const bool pre = p.prescaled;

  if (inner == 1 && dispatch_short_row<T>(C, [&](auto kc) {
        constexpr int K = decltype(kc)::value;
        run_tasks<A>(p.outer, grain_for(K), K, p.dweight, [&](int64_t r, A* acc) {
          A g[K], xv[K], dv[K], d = 0;
          for (int c = 0; c < K; ++c) {
            dv[c] = static_cast<A>(dy[r * K + c]);
            xv[c] = static_cast<A>(x[r * K + c]);
            g[c] = w != nullptr ? dv[c] * w[c] : dv[c];
            d += g[c] * xv[c];
          }
          const A n = norm[r];
          const A rs = inv_clamped(n, eps);
          const A k = n >= eps ? (pre ? rs * rs * d : rs * rs * rs * d) : A(0);
          const A vg = pre ? A(1) : rs;
          for (int c = 0; c < K; ++c) dx[r * K + c] = static_cast<T>(g[c] * vg - xv[c] * k);
          if (acc != nullptr) {
            for (int c = 0; c < K; ++c) acc[c] += dv[c] * xv[c] * rs;
          }
        });
      })) {
    return;
  }
  if (inner == 1) {
    run_tasks<A>(p.outer, grain_for(C), C, p.dweight, [&](int64_t r, A* acc) {
      const T* dyr = dy + r * C;
      const T* xr = x + r * C;
      T* dxr = dx + r * C;
      const A n = norm[r];
      const A rs = inv_clamped(n, eps);
      const A d = dot(dyr, xr, w, C);
      const bool pass = n >= eps;  // the clamp passes the gradient
      const A k = pass ? (pre ? rs * rs * d : rs * rs * rs * d) : A(0);
      const AVec vk(k), vg(pre ? A(1) : rs), vr(rs);
      for_each_step<S>(C, [&](int64_t j, int64_t c) TF_INLINE_LAMBDA {
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
        IO::store(dxr + j, g0 * vg - x0 * vk, g1 * vg - x1 * vk, c);
        if (acc != nullptr) {
          AVec a0, a1;
          AccIO<A>::load(acc + j, c, a0, a1);
          AccIO<A>::store(acc + j, at::vec::fmadd(d0 * x0, vr, a0),
                          at::vec::fmadd(d1 * x1, vr, a1), c);
        }
      });
    });
    return;
  }
  TORCH_INTERNAL_ASSERT(!pre, "prescaled backward is row-only");
  col_bwd<T, blocks_for<T, sizeof(T) == 2 ? 512 : 256>()>(p);
}

// Column layout, backward: a task is NB * B consecutive inner positions.
template <typename T, int NB>
void col_bwd(const BwdParams& p) {
  using Blk = Block<T>;
  using A = typename Blk::A;
  using AVec = typename Blk::AVec;
  constexpr int64_t B = Blk::B;
  constexpr int64_t W = NB * B;
  const int64_t C = p.C, inner = p.inner;
  const T* dy = p.dy.const_data_ptr<T>();
  const T* x = p.x.const_data_ptr<T>();
  const A* norm = p.norm.const_data_ptr<A>();
  const A* w = p.weight.defined() ? p.weight.const_data_ptr<A>() : nullptr;
  T* dx = p.dx.mutable_data_ptr<T>();
  const A eps = static_cast<A>(p.eps);
  const int64_t per_outer = (inner + W - 1) / W;
  const AVec veps(eps), one(A(1)), zero(A(0));
  run_tasks<A>(p.outer * per_outer, grain_for(C * W), C, p.dweight, [&](int64_t t, A* acc) {
    const int64_t o = t / per_outer, i0 = (t % per_outer) * W;
    const int64_t n = std::min(W, inner - i0);
    const int nb = static_cast<int>((n + B - 1) / B);
    const int64_t off = o * C * inner + i0;
    Blk d[NB];
    for (auto& b : d) {
      for (auto& s : b.v) s = AVec(A(0));
    }
    for (int64_t c = 0; c < C; ++c) {
      const AVec wc(w != nullptr ? w[c] : A(1));
      for (int u = 0; u < nb; ++u) {
        const int64_t m = std::min(B, n - u * B);
        Blk g, xb;
        g.load(dy + off + c * inner + u * B, m);
        xb.load(x + off + c * inner + u * B, m);
        for (int k = 0; k < 4; ++k) d[u].v[k] = at::vec::fmadd(g.v[k] * wc, xb.v[k], d[u].v[k]);
      }
    }
    Blk rs[NB], kk[NB];
    for (int u = 0; u < nb; ++u) {
      Blk nbk;
      nbk.load_acc(norm + o * inner + i0 + u * B, std::min(B, n - u * B));
      for (int k = 0; k < 4; ++k) {
        rs[u].v[k] = one / at::vec::maximum(nbk.v[k], veps);
        // r^3 * dot where norm >= eps, else 0 (the clamp blocks the gradient)
        const AVec full = rs[u].v[k] * rs[u].v[k] * rs[u].v[k] * d[u].v[k];
        kk[u].v[k] = AVec::blendv(zero, full, nbk.v[k] >= veps);
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      const AVec wc(w != nullptr ? w[c] : A(1));
      AVec s(A(0));
      for (int u = 0; u < nb; ++u) {
        const int64_t m = std::min(B, n - u * B);
        Blk g, xb, o_;
        g.load(dy + off + c * inner + u * B, m);
        xb.load(x + off + c * inner + u * B, m);
        for (int k = 0; k < 4; ++k) {
          o_.v[k] = g.v[k] * wc * rs[u].v[k] - xb.v[k] * kk[u].v[k];
          // lanes past m are zero in g and x, so they add nothing
          s = at::vec::fmadd(g.v[k] * xb.v[k], rs[u].v[k], s);
        }
        o_.store(dx + off + c * inner + u * B, m);
      }
      if (acc != nullptr) acc[c] += reduce_sum(s);
    }
  });
}

// ------------------------------------------------------------------ epilogue
template <typename T>
void scale_kernel(const ScaleParams& p) {
  using IO = VecIO<T>;
  using A = typename IO::A;
  using AVec = typename IO::AVec;
  constexpr int64_t S = IO::kStep;
  const int64_t M = p.M, O = p.O;
  const T* src = p.src.const_data_ptr<T>();
  T* dst = p.dst.mutable_data_ptr<T>();
  const A* nrow = p.nrow.const_data_ptr<A>();
  const A* ncol = p.ncol.const_data_ptr<A>();
  const A* bias = p.bias.defined() ? p.bias.const_data_ptr<A>() : nullptr;
  const A eps = static_cast<A>(p.eps);
  std::vector<A> rcol(O);
  for (int64_t j = 0; j < O; ++j) rcol[j] = inv_clamped(ncol[j], eps);
  const A* rc = rcol.data();
  at::parallel_for(0, M, grain_for(O), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const AVec vr(inv_clamped(nrow[i], eps));
      const T* s = src + i * O;
      T* d = dst + i * O;
      for_each_step<S>(O, [&](int64_t j, int64_t c) TF_INLINE_LAMBDA {
        AVec a0, a1, r0, r1;
        IO::load(s + j, c, a0, a1);
        AccIO<A>::load(rc + j, c, r0, r1);
        a0 = a0 * vr * r0;
        a1 = a1 * vr * r1;
        if (bias != nullptr) {
          AVec b0, b1;
          AccIO<A>::load(bias + j, c, b0, b1);
          a0 = a0 + b0;
          a1 = a1 + b1;
        }
        IO::store(d + j, a0, a1, c);
      });
    }
  });
}

void fwd_cpu(const FwdParams& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, p.x.scalar_type(), "l2_norm_cpu",
      [&] { fwd_kernel<scalar_t>(p); });
}

void bwd_cpu(const BwdParams& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, p.x.scalar_type(), "l2_norm_backward_cpu",
      [&] { bwd_kernel<scalar_t>(p); });
}

void scale_cpu(const ScaleParams& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, p.src.scalar_type(), "cosine_linear_scale_cpu",
      [&] { scale_kernel<scalar_t>(p); });
}

const Launchers kCpu{fwd_cpu, bwd_cpu, scale_cpu};

}  // namespace

TORCH_LIBRARY_IMPL(torchfuse, CPU, m) {
  m.impl("l2_norm", &l2_norm_op<kCpu>);
  m.impl("l2_norm_backward", &l2_norm_backward_op<kCpu>);
  m.impl("cosine_linear", &cosine_linear_op<kCpu>);
  m.impl("cosine_linear_backward", &cosine_linear_backward_op<kCpu>);
}

}  // namespace torchfuse::l2_norm
