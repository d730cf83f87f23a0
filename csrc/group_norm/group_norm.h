// GroupNorm (+ fused ReLU / SiLU): host-side logic shared by the CPU and CUDA
// kernels.
//
// The input is handled in one of two memory layouts, with no layout copy:
//   * "planar"  (contiguous):          element (n, c, s) at (n * C + c) * S + s
//   * "cl"      (channels_last(_3d)):  element (n, c, s) at (n * S + s) * C + c
// with S the product of the spatial sizes. Group g holds channels
// [g * D, (g + 1) * D), D = C / G.
//
// The device launchers stream over the data; everything on (N, C) or
// (N, G)-sized data (combining partial statistics, per-channel coefficients,
// parameter gradients) is the float64 algebra of group_norm_algebra.h, run
// by each device's `algebra` launcher (host loops on CPU, one thread per
// item on CUDA) in the order group_norm.cpp gives.
#pragma once

#include "group_norm_algebra.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cmath>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>

namespace torchfuse::group_norm {

enum class Act : int { kNone = 0, kRelu = 1, kSilu = 2 };

struct Geometry {
  int64_t N = 0, C = 0, S = 0, G = 0, D = 0;
  bool cl = false;  // channels_last(_3d) memory
};

// Statistics, stage 1. Each (n, g) is split into K chunks:
//   planar: chunk k = elements [k * L, min(M, (k + 1) * L)) of the group,
//           M = D * S contiguous elements;
//   cl:     chunk k = rows [k * R, min(S, (k + 1) * R)) of sample n.
// For every (n, g, k) the launcher writes, in float64, the chunk's mean
// (mean_k) and its centred sum of squares (m2_k), both computed by two passes
// over the chunk (rough mean, then sums of (x - rough) and its square).
struct StatsParams {
  at::Tensor x, mean_k, m2_k;  // mean_k, m2_k: (N, G, K) float64
  Geometry geo;
  int64_t K = 0, L = 0, R = 0;
};

// The streaming kernels evaluate, per element, with per-(n, c) coefficients
// p[i] (params: (NP, N, C), accumulate type) and d = x - p[0]:
//   kForward  (NP 3): out = act(d * p[1] + p[2])
//   kBackward (NP 6): y = d * p[1] + p[2]; g = dy * act'(y);
//                     dx = p[3] * g + p[4] * d + p[5]
//   kCorrect  (NP 2, NQ 1): q0 = d, only where p[1] != 0 (else the
//                     partial is 0 and the data is not read)
//   kGrad     (NP 5, NQ 2): y = d * p[1] + p[2]; g = dy * act'(y);
//                     q0 = g, q1 = g * (d * p[3] + p[4])
enum class Mode : int { kForward = 0, kBackward = 1, kCorrect = 2, kGrad = 3 };

constexpr int num_params(Mode m) {
  return m == Mode::kForward ? 3 : m == Mode::kBackward ? 6 : m == Mode::kCorrect ? 2 : 5;
}

constexpr int num_sums(Mode m) {
  return m == Mode::kCorrect ? 1 : 2;
}

// Calls f(std::integral_constant<Act, act>{}): the activation as a template
// argument of the kernels.
template <typename F>
void with_act(Act act, const F& f) {
  switch (act) {
    case Act::kRelu:
      f(std::integral_constant<Act, Act::kRelu>{});
      break;
    case Act::kSilu:
      f(std::integral_constant<Act, Act::kSilu>{});
      break;
    default:
      f(std::integral_constant<Act, Act::kNone>{});
  }
}

// Elementwise (kForward, kBackward): x, dy (kBackward) -> out, all in the
// same layout.
// kBackward with `kept` defined (see keep_grad_bytes): g is read from
// kept, as the kGrad pass stored it, instead of being recomputed from dy.
struct PointwiseParams {
  at::Tensor x, dy, out, params, kept;
  Geometry geo;
  Mode mode = Mode::kForward;
  Act act = Act::kNone;
};

// Per-channel reductions (kCorrect, kGrad): partial (NQ, N, K, C) in the
// accumulate type; chunk k covers spatial positions [k * R, min(S, (k+1) * R)).
// kGrad with `kept` defined (see keep_grad_bytes): also stores each
// element's g = dy * act'(y) there (accumulate type, x's layout, flat).
struct ReduceParams {
  at::Tensor x, dy, partial, params, kept;
  Geometry geo;
  int64_t K = 0, R = 0;
  Mode mode = Mode::kGrad;
  Act act = Act::kNone;
};

// Whole-group kernels for contiguous input whose groups fit in a core's
// cache: one task per (n, g) runs every pass over the group back to back, so
// the data is read from memory once. weight, bias: (C,) accumulate type or
// undefined; mean, rstd: (N, G) accumulate type (outputs of the forward,
// inputs of the backward).
//   forward: statistics as StatsParams (chunks of stat_chunk), combined in
//     float64, then out = act(...) as kForward.
//   backward: the kCorrect, kGrad and kBackward passes of one group; sums
//     (2, N, C) receives the per-(n, c) sums of g and g * xhat.
struct FusedParams {
  at::Tensor x, dy, out, weight, bias, mean, rstd, sums;
  Geometry geo;
  double eps = 0;
  Act act = Act::kNone;
};

struct Launchers {
  void (*stats)(const StatsParams&);
  void (*pointwise)(const PointwiseParams&);
  void (*reduce)(const ReduceParams&);
  // One step of the (N, C)-sized algebra (group_norm_algebra.h) over all its
  // items, for float (float32/float16/bfloat16 input) and double statistics.
  void (*algebra)(AlgStep, const AlgView<float>&);
  void (*algebra64)(AlgStep, const AlgView<double>&);
  int64_t stat_chunk;    // elements per statistics chunk (contiguous input)
  int64_t stat_chunk_cl; // elements per statistics chunk (channels_last)
  bool cl_per_group;     // cl statistics chunks count D (true) or C channels
  int64_t reduce_chunk;  // elements per reduction chunk (R * C, or R planar)
  // channels_last reduction: at least this many rows per chunk (the default
  // is reduce_chunk / C, for kernels whose task spans all C channels; CUDA
  // blocks span 32 of them).
  int64_t reduce_rows_cl = 0;
  // Chunks per group (statistics) or per plane/sample (reduction) grow past
  // stat_chunk / reduce_chunk so that there are at most this many (0: no
  // limit): the algebra combines a group's chunks on one thread.
  int64_t max_chunks = 0;
  // `want` elements (or rows) per chunk, grown to split `total` into at most
  // max_chunks chunks.
  int64_t chunk_len(int64_t want, int64_t total) const {
    return max_chunks > 0 ? std::max(want, (total + max_chunks - 1) / max_chunks) : want;
  }
  // SiLU backward of float16/bfloat16 input through the streaming passes:
  // when the scratch takes at most this many bytes (0: never), the kGrad pass
  // stores g in it (float32) for the kBackward pass, so that the conversions
  // and the sigmoid are evaluated once per element rather than twice. For
  // the CPU, where that evaluation bounds those passes; CUDA recomputes.
  int64_t keep_grad_bytes = 0;
  // float32 backward: run the kCorrect pass for every group (CUDA: deciding
  // which groups need it would read the statistics on the host, a device
  // sync) rather than only where alg::needs_correction says so (CPU).
  bool always_correct = false;
  void (*fused_fwd)(const FusedParams&) = nullptr;  // optional
  void (*fused_bwd)(const FusedParams&) = nullptr;
  int64_t fused_bytes = 0;  // largest group (bytes of x, plus dy) to fuse
};

Act parse_activation(std::string_view name, const char* op);

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& input,
    int64_t num_groups,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    double eps,
    std::string_view activation,
    const Launchers& launch);

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out,
    const at::Tensor& input,
    const at::Tensor& mean,
    const at::Tensor& rstd,
    int64_t num_groups,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    std::string_view activation,
    bool weight_grad,
    bool bias_grad,
    const Launchers& launch);

// The op entry points for one device, ready for m.impl.
template <const Launchers& L>
std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_op(
    const at::Tensor& input,
    int64_t num_groups,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    double eps,
    c10::string_view activation) {
  return forward(input, num_groups, weight, bias, eps,
                 std::string_view(activation.data(), activation.size()), L);
}

template <const Launchers& L>
std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_backward_op(
    const at::Tensor& grad_out,
    const at::Tensor& input,
    const at::Tensor& mean,
    const at::Tensor& rstd,
    int64_t num_groups,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    c10::string_view activation,
    bool weight_grad,
    bool bias_grad) {
  return backward(grad_out, input, mean, rstd, num_groups, weight, bias,
                  std::string_view(activation.data(), activation.size()),
                  weight_grad, bias_grad, L);
}

}  // namespace torchfuse::group_norm
