// GroupNorm: the small (N, G) / (N, C)-sized algebra between the streaming
// passes, written once for the host and the device.
//
// Every step is a function of one work item (a group (n, g), or a plane
// (n, c)) over raw pointers, so the CPU runs it as a plain loop over the
// items (group_norm_cpu.cpp) and CUDA as one thread per item
// (group_norm_cuda.cu): the same formulas in the same order, so the CPU tests
// check the arithmetic the GPU does. All of it in float64; the outputs are
// rounded once to the accumulate type A (float, or double for float64 input).
//
// Forward (after the statistics pass wrote each chunk's mean and centred sum
// of squares):
//   kFwdCoefs (n, g):     combine the chunks -> mean, rstd; per channel
//                         out = act((x - hi) * a + sh), a = rstd * w,
//                         sh = b - lo * a, with hi the float mean rounded to
//                         A and lo = mean - hi its low part.
// Backward (mean, rstd as saved; see group_norm.cpp for the formulas):
//   kCorrectParams (n, g): kCorrect coefficients (d = x - mean, only in the
//                          groups whose mean is more than kMeanTol standard
//                          deviations from zero);
//   kChunkSums (n, c):     sums over the reduction chunks of each partial sum
//                          -> sums (nq, N, C);
//   kGradParams (n, g):    off = -(low part of the mean) * rstd (from the
//                          kCorrect sums when `corrected`, else 0);
//                          kGrad coefficients;
//   kApplyParams (n, g):   kBackward coefficients from the kGrad sums;
//   kParamGrads (c):       dweight and dbias of channel c (sums over the
//                          samples, in order). One item per channel: on the
//                          GPU, where an item is a thread, the G items with
//                          n == 0 of kApplyParams that did it before summed
//                          N * D values each (GroupNorm(1, 512) at batch 128:
//                          65536 serial steps on one thread).
#pragma once

#include <math.h>

#include <cstdint>

#if defined(__CUDACC__)
#define TF_HD __host__ __device__ inline
#else
#define TF_HD inline
#endif

namespace torchfuse::group_norm {

// Whether |mean| * rstd is large enough for the float32 mean's rounding to
// matter (see group_norm.cpp).
constexpr double kMeanTol = 4.0;

// Chunk statistics combined in float64, in chunk order, into the group's
// mean and 1 / sqrt(var + eps). mean_k[k], m2_k[k]: chunk k's mean and
// centred sum of squares; every chunk holds `full` elements but the last,
// which holds `last`; M: the group's elements.
struct MeanRstd {
  double mean, rstd;
};

TF_HD MeanRstd combine_chunks(
    int64_t K, double M, double eps, const double* mean_k, const double* m2_k, double full,
    double last) {
  double mu = 0, m2 = 0;
  for (int64_t k = 0; k < K; ++k) mu += (k + 1 < K ? full : last) * mean_k[k];
  mu /= M;
  for (int64_t k = 0; k < K; ++k) {
    const double d = mean_k[k] - mu;
    m2 += m2_k[k] + (k + 1 < K ? full : last) * d * d;
  }
  return {mu, 1.0 / sqrt(m2 / M + eps)};
}

enum class AlgStep : int {
  kFwdCoefs,
  kCorrectParams,
  kChunkSums,
  kGradParams,
  kApplyParams,
  kParamGrads
};

// The pointers one step reads and writes (unused ones may be null). All
// arrays are contiguous; params is (np, N, C) with np the step's number of
// coefficients; partial is (nq, N, K, C) as the reduction kernels write it.
template <typename A>
struct AlgView {
  int64_t N = 0, C = 0, G = 0, D = 0;
  int64_t K = 0;        // chunks: of the statistics (forward), of the reductions (backward)
  double Md = 0;        // elements per group
  double eps = 0;       // forward
  double full = 0, last = 0;  // forward: elements per statistics chunk, in the last
  const A* w = nullptr;  // (C,) or null (1)
  const A* b = nullptr;  // (C,) or null (0)
  const double* mean_k = nullptr;  // (N, G, K): forward
  const double* m2_k = nullptr;    // (N, G, K): forward
  A* mean = nullptr;  // (N, G): written by the forward, read by the backward
  A* rstd = nullptr;  // (N, G)
  A* params = nullptr;
  const A* partial = nullptr;
  int nq = 0;               // kChunkSums: partial sums to add up
  double* sums = nullptr;   // (2, N, C)
  double* off = nullptr;    // (N, G)
  bool corrected = false;   // kGradParams: sums[0] holds the kCorrect sums
  double* dw = nullptr;     // (C,) or null: kParamGrads
  double* db = nullptr;     // (C,) or null
};

namespace alg {

template <typename A>
TF_HD double weight(const AlgView<A>& v, int64_t c) {
  return v.w != nullptr ? static_cast<double>(v.w[c]) : 1.0;
}

template <typename A>
TF_HD double bias(const AlgView<A>& v, int64_t c) {
  return v.b != nullptr ? static_cast<double>(v.b[c]) : 0.0;
}

// Coefficient q of channel c of sample n.
template <typename A>
TF_HD A& param(const AlgView<A>& v, int q, int64_t n, int64_t c) {
  return v.params[(q * v.N + n) * v.C + c];
}

template <typename A>
TF_HD void fwd_coefs(const AlgView<A>& v, int64_t ng) {
  const MeanRstd s = combine_chunks(
      v.K, v.Md, v.eps, v.mean_k + ng * v.K, v.m2_k + ng * v.K, v.full, v.last);
  const A hi = static_cast<A>(s.mean);
  const double lo = s.mean - static_cast<double>(hi);
  v.mean[ng] = hi;
  v.rstd[ng] = static_cast<A>(s.rstd);
  const int64_t n = ng / v.G, c0 = (ng % v.G) * v.D;
  for (int64_t c = c0; c < c0 + v.D; ++c) {
    const double a = s.rstd * weight(v, c);
    param(v, 0, n, c) = hi;
    param(v, 1, n, c) = static_cast<A>(a);
    param(v, 2, n, c) = static_cast<A>(bias(v, c) - lo * a);
  }
}

template <typename A>
TF_HD bool needs_correction(const AlgView<A>& v, int64_t ng) {
  return fabs(static_cast<double>(v.mean[ng]) * static_cast<double>(v.rstd[ng])) > kMeanTol;
}

template <typename A>
TF_HD void correct_params(const AlgView<A>& v, int64_t ng) {
  const A need = needs_correction(v, ng) ? A(1) : A(0);
  const int64_t n = ng / v.G, c0 = (ng % v.G) * v.D;
  for (int64_t c = c0; c < c0 + v.D; ++c) {
    param(v, 0, n, c) = v.mean[ng];
    param(v, 1, n, c) = need;
  }
}

template <typename A>
TF_HD void chunk_sums(const AlgView<A>& v, int64_t nc) {
  const int64_t NC = v.N * v.C, n = nc / v.C, c = nc % v.C;
  for (int q = 0; q < v.nq; ++q) {
    const A* p = v.partial + ((q * v.N + n) * v.K) * v.C + c;
    double s = 0;
    for (int64_t k = 0; k < v.K; ++k) s += static_cast<double>(p[k * v.C]);
    v.sums[q * NC + nc] = s;
  }
}

// The coefficients of y = (x - mean) * rstd * w + (off * w + b), shared by
// kGrad and kBackward: p[0 .. 3).
template <typename A>
TF_HD void y_params(const AlgView<A>& v, int64_t ng, int64_t n, int64_t c) {
  const double w = weight(v, c);
  param(v, 0, n, c) = v.mean[ng];
  param(v, 1, n, c) = static_cast<A>(static_cast<double>(v.rstd[ng]) * w);
  param(v, 2, n, c) = static_cast<A>(v.off[ng] * w + bias(v, c));
}

template <typename A>
TF_HD void grad_params(const AlgView<A>& v, int64_t ng) {
  const int64_t n = ng / v.G, c0 = (ng % v.G) * v.D;
  const double r = static_cast<double>(v.rstd[ng]);
  double off = 0;
  if (v.corrected) {
    double lo = 0;
    for (int64_t c = c0; c < c0 + v.D; ++c) lo += v.sums[n * v.C + c];
    off = -(lo / v.Md) * r;
  }
  v.off[ng] = off;
  for (int64_t c = c0; c < c0 + v.D; ++c) {
    y_params(v, ng, n, c);
    param(v, 3, n, c) = static_cast<A>(r);
    param(v, 4, n, c) = static_cast<A>(off);
  }
}

// dx = k1 * g + k2 * (x - mean) + k3 with k1 = rstd * w,
// k2 = -rstd^2 * mean_group(w g xhat'), k3 = -rstd * (mean_group(w g) +
// mean_group(w g xhat') * off), where sums[0] = sum g and sums[1] =
// sum g * (d * rstd + off) per (n, c).
template <typename A>
TF_HD void apply_params(const AlgView<A>& v, int64_t ng) {
  const int64_t NC = v.N * v.C, n = ng / v.G, c0 = (ng % v.G) * v.D;
  const double* sg = v.sums;
  const double* sgx = v.sums + NC;
  double u = 0, t = 0;
  for (int64_t c = c0; c < c0 + v.D; ++c) {
    u += sg[n * v.C + c] * weight(v, c);
    t += sgx[n * v.C + c] * weight(v, c);
  }
  const double mg = u / v.Md, mgx = t / v.Md;
  const double r = static_cast<double>(v.rstd[ng]), off = v.off[ng];
  for (int64_t c = c0; c < c0 + v.D; ++c) {
    y_params(v, ng, n, c);
    param(v, 3, n, c) = param(v, 1, n, c);
    param(v, 4, n, c) = static_cast<A>(-r * mgx * r);
    param(v, 5, n, c) = static_cast<A>(-r * (mg + mgx * off));
  }
}

template <typename A>
TF_HD void param_grads(const AlgView<A>& v, int64_t c) {
  const double* sg = v.sums;
  const double* sgx = v.sums + v.N * v.C;
  double w_sum = 0, b_sum = 0;
  for (int64_t m = 0; m < v.N; ++m) {
    w_sum += sgx[m * v.C + c];
    b_sum += sg[m * v.C + c];
  }
  if (v.dw != nullptr) v.dw[c] = w_sum;
  if (v.db != nullptr) v.db[c] = b_sum;
}

}  // namespace alg

// Work items of a step: planes for kChunkSums, channels for kParamGrads,
// groups otherwise.
template <typename A>
TF_HD int64_t alg_items(AlgStep s, const AlgView<A>& v) {
  if (s == AlgStep::kChunkSums) return v.N * v.C;
  return s == AlgStep::kParamGrads ? v.C : v.N * v.G;
}

template <typename A>
TF_HD void alg_step(AlgStep s, const AlgView<A>& v, int64_t i) {
  switch (s) {
    case AlgStep::kFwdCoefs:
      alg::fwd_coefs(v, i);
      break;
    case AlgStep::kCorrectParams:
      alg::correct_params(v, i);
      break;
    case AlgStep::kChunkSums:
      alg::chunk_sums(v, i);
      break;
    case AlgStep::kGradParams:
      alg::grad_params(v, i);
      break;
    case AlgStep::kApplyParams:
      alg::apply_params(v, i);
      break;
    case AlgStep::kParamGrads:
      alg::param_grads(v, i);
      break;
  }
}

}  // namespace torchfuse::group_norm
