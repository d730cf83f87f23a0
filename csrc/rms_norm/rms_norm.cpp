// RMSNorm: argument checks, allocation and shape bookkeeping, shared by the
// CPU (rms_norm_cpu.cpp) and CUDA (rms_norm_cuda.cu) kernels.
//
//   out     = x * rstd * weight,        rstd = 1 / sqrt(mean(x^2) + eps)
//   summed  = input + residual          (add_rms_norm; x = summed)
//   dx      = rstd * g - x * rstd^3 * mean(g * x) (+ grad_summed),  g = dy * weight
//   dweight = sum over rows of dy * x * rstd
//
// Statistics and the weight gradient accumulate in float32 (float64 for
// float64 input); rstd is saved in that type.
#include "rms_norm.h"

#include "../common/checks.h"

#include <ATen/Functions.h>

#include <limits>

namespace torchfuse::rms_norm {

namespace {

struct Dims {
  int64_t M, N;
};

Dims check_args(
    const char* op,
    const at::Tensor& input,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight) {
  check_floating(input, op, "input");
  const int64_t nd = static_cast<int64_t>(normalized_shape.size());
  TORCH_CHECK(
      nd > 0, op,
      ": Expected normalized_shape to be at least 1-dimensional, i.e., "
      "containing at least one element, but got normalized_shape = ",
      normalized_shape);
  // torch raises ValueError when input has fewer dims than normalized_shape.
  TORCH_CHECK_VALUE(
      input.dim() >= nd, op, ": Given normalized_shape=", normalized_shape,
      ", input must have at least ", nd, " dimensions, but got input of size ",
      input.sizes());
  TORCH_CHECK(
      input.sizes().slice(input.dim() - nd).equals(normalized_shape),
      op, ": Given normalized_shape=", normalized_shape,
      ", expected input with shape [*, ", normalized_shape,
      "], but got input of size ", input.sizes());
  if (weight.has_value() && weight->defined()) {
    check_floating(*weight, op, "weight");
    TORCH_CHECK(
        weight->sizes().equals(normalized_shape), op,
        ": Expected weight to be of same shape as normalized_shape, but got "
        "weight of shape ",
        weight->sizes(), " and normalized_shape = ", normalized_shape);
    check_same_device(*weight, input, op, "weight");
  }
  return {prod(input.sizes().slice(0, input.dim() - nd)),
          prod(normalized_shape)};
}

// weight as a flat contiguous tensor of the accumulate type (a no-op for a
// float32 weight with float32/half/bfloat16 input), or undefined.
at::Tensor acc_weight(
    const std::optional<at::Tensor>& weight,
    const at::Tensor& input) {
  if (!weight.has_value() || !weight->defined()) return {};
  return weight->to(acc_type(input)).contiguous().view({-1});
}

at::Tensor stat_tensor(const at::Tensor& input, int64_t nd) {
  return at::empty(
      input.sizes().slice(0, input.dim() - nd),
      input.options().dtype(acc_type(input)));
}

FwdParams make_fwd(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    Dims d,
    int64_t nd,
    double eps) {
  FwdParams p;
  p.x = input.contiguous();
  p.weight = acc_weight(weight, input);
  p.out = at::empty(input.sizes(), input.options());
  p.rstd = stat_tensor(input, nd);
  p.M = d.M;
  p.N = d.N;
  p.eps = eps;
  return p;
}

void run_fwd(const FwdParams& p, FwdLauncher launch) {
  if (p.M == 0) return;
  if (p.N == 0) {
    // mean over no elements: 0/0, as torch's composite gives.
    p.rstd.fill_(std::numeric_limits<double>::quiet_NaN());
    return;
  }
  launch(p);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> forward(
    const at::Tensor& input,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight,
    double eps,
    FwdLauncher launch) {
  const Dims d = check_args("rms_norm", input, normalized_shape, weight);
  FwdParams p = make_fwd(input, weight, d, normalized_shape.size(), eps);
  run_fwd(p, launch);
  return {p.out, p.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_forward(
    const at::Tensor& input,
    const at::Tensor& residual,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight,
    double eps,
    FwdLauncher launch) {
  const char* op = "add_rms_norm";
  const Dims d = check_args(op, input, normalized_shape, weight);
  check_same_device(residual, input, op, "residual");
  check_same_dtype(residual, input, op, "residual");
  check_same_shape(residual, input, op, "residual");
  FwdParams p = make_fwd(input, weight, d, normalized_shape.size(), eps);
  p.residual = residual.contiguous();
  p.summed = at::empty(input.sizes(), input.options());
  run_fwd(p, launch);
  return {p.out, p.summed, p.rstd};
}

std::tuple<at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out,
    const std::optional<at::Tensor>& grad_summed,
    const at::Tensor& input,
    const at::Tensor& rstd,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight,
    bool weight_grad,
    BwdLauncher launch) {
  const char* op = "rms_norm_backward";
  const Dims d = check_args(op, input, normalized_shape, weight);
  const int64_t nd = normalized_shape.size();
  check_same_device(grad_out, input, op, "grad_out");
  check_same_dtype(grad_out, input, op, "grad_out");
  check_same_shape(grad_out, input, op, "grad_out");
  const bool has_gs = grad_summed.has_value() && grad_summed->defined();
  if (has_gs) {
    check_same_device(*grad_summed, input, op, "grad_summed");
    check_same_dtype(*grad_summed, input, op, "grad_summed");
    check_same_shape(*grad_summed, input, op, "grad_summed");
  }
  check_same_device(rstd, input, op, "rstd");
  TORCH_CHECK(
      rstd.scalar_type() == acc_type(input), op, ": expected rstd of dtype ",
      acc_type(input), ", but got ", rstd.scalar_type());
  TORCH_CHECK(
      rstd.sizes().equals(input.sizes().slice(0, input.dim() - nd)), op,
      ": expected rstd of shape ", input.sizes().slice(0, input.dim() - nd),
      ", but got ", rstd.sizes());
  const bool has_w = weight.has_value() && weight->defined();
  TORCH_CHECK(
      !weight_grad || has_w, op, ": weight_grad=True needs a weight");

  BwdParams p;
  p.dy = grad_out.contiguous();
  if (has_gs) p.dsummed = grad_summed->contiguous();
  p.x = input.contiguous();
  p.rstd = rstd.contiguous();
  p.weight = acc_weight(weight, input);
  p.dx = at::empty(input.sizes(), input.options());
  p.M = d.M;
  p.N = d.N;
  if (weight_grad) {
    p.dweight = at::empty({d.N}, input.options().dtype(acc_type(input)));
  }
  if (d.M > 0 && d.N > 0) {
    launch(p);
  } else {
    p.dx.zero_();
    if (weight_grad) p.dweight.zero_();
  }
  at::Tensor grad_weight = weight_grad
      ? p.dweight.view(normalized_shape).to(weight->scalar_type())
      : at::empty({0}, input.options());
  return {p.dx, grad_weight};
}

}  // namespace torchfuse::rms_norm
