// RMSNorm: host-side logic shared by the CPU and CUDA kernels.
//
// The op entry points (argument checks, allocation, shape bookkeeping) are
// written once in rms_norm.cpp and parameterised by a device launcher, so the
// CPU and CUDA registrations differ only in the loops they run.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace torchfuse::rms_norm {

// All tensors contiguous; x/residual/out/summed of dtype T viewed as (M, N);
// weight (may be undefined) of the accumulate type, shape (N); rstd (M) of the
// accumulate type.
struct FwdParams {
  at::Tensor x, residual, weight, out, summed, rstd;
  int64_t M = 0, N = 0;
  double eps = 0;
};

// dy, dsummed (may be undefined), x: (M, N) dtype T; rstd (M); weight (may be
// undefined) accumulate type. dx (M, N) dtype T. When dweight is defined the
// launcher writes sum_rows(dy * x * rstd) into it (accumulate type, shape N).
struct BwdParams {
  at::Tensor dy, dsummed, x, rstd, weight, dx, dweight;
  int64_t M = 0, N = 0;
};

using FwdLauncher = void (*)(const FwdParams&);
using BwdLauncher = void (*)(const BwdParams&);

std::tuple<at::Tensor, at::Tensor> forward(
    const at::Tensor& input,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight,
    double eps,
    FwdLauncher launch);

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_forward(
    const at::Tensor& input,
    const at::Tensor& residual,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight,
    double eps,
    FwdLauncher launch);

std::tuple<at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out,
    const std::optional<at::Tensor>& grad_summed,
    const at::Tensor& input,
    const at::Tensor& rstd,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight,
    bool weight_grad,
    BwdLauncher launch);

// The op entry points for one device, ready for m.impl: the CPU and CUDA
// registrations instantiate these with their launchers.
template <FwdLauncher launch>
std::tuple<at::Tensor, at::Tensor> rms_norm_op(
    const at::Tensor& input,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight,
    double eps) {
  return forward(input, normalized_shape, weight, eps, launch);
}

template <FwdLauncher launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_op(
    const at::Tensor& input,
    const at::Tensor& residual,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight,
    double eps) {
  return add_forward(input, residual, normalized_shape, weight, eps, launch);
}

template <BwdLauncher launch>
std::tuple<at::Tensor, at::Tensor> rms_norm_backward_op(
    const at::Tensor& grad_out,
    const std::optional<at::Tensor>& grad_summed,
    const at::Tensor& input,
    const at::Tensor& rstd,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight,
    bool weight_grad) {
  return backward(
      grad_out, grad_summed, input, rstd, normalized_shape, weight,
      weight_grad, launch);
}

}  // namespace torchfuse::rms_norm
