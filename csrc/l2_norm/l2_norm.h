// L2 normalization (SSD L2Norm, F.normalize with p=2) and cosine-normalized
// linear layers: host-side logic shared by the CPU and CUDA kernels.
//
// The op entry points (argument checks, layout, allocation) are written once
// in l2_norm.cpp and parameterised by device launchers, so the CPU and CUDA
// registrations differ only in the loops they run.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace torchfuse::l2_norm {

// The normalized dimension as a contiguous (outer, C, inner) view: inner == 1
// is the "row" layout (dim last in memory, e.g. dim=1 of a channels_last
// tensor, or dim=-1), inner > 1 the "column" layout (dim=1 of NCHW).
//   out[o, c, i] = x[o, c, i] / max(norm[o, i], eps) * weight[c]
// norm (outer * inner, accumulate type) is the unclamped 2-norm, saved for
// the backward. out undefined: compute norm only (cosine_linear's row norms).
struct FwdParams {
  at::Tensor x, weight, out, norm;
  int64_t outer = 0, C = 0, inner = 0;
  double eps = 0;
};

// r = 1 / max(norm, eps); m = norm >= eps (the clamp passes gradient).
//   prescaled == false (l2_norm):  g = dy * weight
//     dx = r * g - x * (m ? r^3 * sum_c(g * x) : 0)
//     dweight[c] = sum_{o,i} dy * x * r         (when dweight is defined)
//   prescaled == true (cosine_linear; dy already carries the factor r, no
//   weight):  dx = dy - x * (m ? r^2 * sum_c(dy * x) : 0)
struct BwdParams {
  at::Tensor dy, x, norm, weight, dx, dweight;
  int64_t outer = 0, C = 0, inner = 0;
  double eps = 0;
  bool prescaled = false;
};

// dst[i, j] = src[i, j] / max(nrow[i], eps) / max(ncol[j], eps) + bias[j]
// (bias may be undefined); src and dst (M, O) of the same dtype (may alias),
// nrow, ncol and bias in the accumulate type.
struct ScaleParams {
  at::Tensor src, dst, nrow, ncol, bias;
  int64_t M = 0, O = 0;
  double eps = 0;
};

struct Launchers {
  void (*fwd)(const FwdParams&);
  void (*bwd)(const BwdParams&);
  void (*scale)(const ScaleParams&);
};

std::tuple<at::Tensor, at::Tensor> forward(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    int64_t dim,
    double eps,
    const Launchers& launch);

std::tuple<at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out,
    const at::Tensor& input,
    const at::Tensor& norm,
    const std::optional<at::Tensor>& weight,
    int64_t dim,
    double eps,
    bool weight_grad,
    const Launchers& launch);

std::tuple<at::Tensor, at::Tensor, at::Tensor> cosine_forward(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    double eps,
    const Launchers& launch);

std::tuple<at::Tensor, at::Tensor, at::Tensor> cosine_backward(
    const at::Tensor& grad_out,
    const at::Tensor& input,
    const at::Tensor& weight,
    const at::Tensor& input_norm,
    const at::Tensor& weight_norm,
    double eps,
    bool bias_grad,
    const Launchers& launch);

// The op entry points for one device, ready for m.impl.
template <const Launchers& L>
std::tuple<at::Tensor, at::Tensor> l2_norm_op(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    int64_t dim,
    double eps) {
  return forward(input, weight, dim, eps, L);
}

template <const Launchers& L>
std::tuple<at::Tensor, at::Tensor> l2_norm_backward_op(
    const at::Tensor& grad_out,
    const at::Tensor& input,
    const at::Tensor& norm,
    const std::optional<at::Tensor>& weight,
    int64_t dim,
    double eps,
    bool weight_grad) {
  return backward(grad_out, input, norm, weight, dim, eps, weight_grad, L);
}

template <const Launchers& L>
std::tuple<at::Tensor, at::Tensor, at::Tensor> cosine_linear_op(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    double eps) {
  return cosine_forward(input, weight, bias, eps, L);
}

template <const Launchers& L>
std::tuple<at::Tensor, at::Tensor, at::Tensor> cosine_linear_backward_op(
    const at::Tensor& grad_out,
    const at::Tensor& input,
    const at::Tensor& weight,
    const at::Tensor& input_norm,
    const at::Tensor& weight_norm,
    double eps,
    bool bias_grad) {
  return cosine_backward(
      grad_out, input, weight, input_norm, weight_norm, eps, bias_grad, L);
}

}  // namespace torchfuse::l2_norm
