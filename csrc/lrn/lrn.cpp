// Local/spatial response norm: argument checks, layout and allocation,
// shared by lrn_cpu.cpp and lrn_cuda.cu. Formulas: lrn.h.
#include "lrn.h"

#include "../common/checks.h"
#include "../common/layout.h"

#include <ATen/Functions.h>

namespace torchfuse::lrn {

namespace {

void check_common(const char* op, const at::Tensor& input, int64_t size) {
  check_floating(input, op, "input");
  TORCH_CHECK(size > 0, op, ": size (the window) should be greater than zero, but got size=",
              size);
}

void check_grad(const char* op, const at::Tensor& grad_out, const at::Tensor& input) {
  check_same_device(grad_out, input, op, "grad_out");
  check_same_dtype(grad_out, input, op, "grad_out");
  check_same_shape(grad_out, input, op, "grad_out");
}

// Runs the launcher and returns the result in the memory format torch would
// give: channels_last(_3d) input as it is, with no copies (spatial windows
// wider than kClSpatialMaxWindow excepted), anything else on contiguous
// copies.
at::Tensor run(Params& p, const at::Tensor& input, bool backward, Launcher launch) {
  const at::MemoryFormat fmt = kept_format(input);
  if (input.numel() == 0) {
    return at::empty(input.sizes(), input.options().memory_format(fmt));
  }
  if (fmt != at::MemoryFormat::Contiguous &&
      (!p.cols || p.lo + p.hi + 1 <= kClSpatialMaxWindow)) {
    at::Tensor out = at::empty(input.sizes(), input.options().memory_format(fmt));
    p.x = input;  // contiguous in fmt (kept_format checked it)
    if (backward) p.dy = p.dy.contiguous(fmt);
    p.out = out;
    p.channels_last = true;
    launch(p);
    return out;
  }
  at::Tensor out = at::empty(input.sizes(), input.options());
  p.x = input.contiguous();
  if (backward) p.dy = p.dy.contiguous();
  p.out = out;
  launch(p);
  return fmt == at::MemoryFormat::Contiguous ? out : out.contiguous(fmt);
}

Params lrn_params(const at::Tensor& input, int64_t size, double alpha, double beta,
                  double k) {
  Params p;
  p.B = input.size(0);
  p.R = input.size(1);
  p.W = prod(input.sizes().slice(2));
  p.lo = size / 2;
  p.hi = (size - 1) / 2;
  p.alpha_n = alpha / static_cast<double>(size);
  p.beta = beta;
  p.k = k;
  return p;
}

Params srn_params(const at::Tensor& input, int64_t size, double alpha, double beta,
                  double k) {
  Params p;
  p.B = input.size(0) * input.size(1);
  p.R = input.size(2);
  p.W = input.size(3);
  p.lo = (size - 1) / 2;
  p.hi = size / 2;
  p.cols = true;
  p.C = input.size(1);
  p.alpha_n = alpha / (static_cast<double>(size) * static_cast<double>(size));
  p.beta = beta;
  p.k = k;
  return p;
}

void check_lrn(const char* op, const at::Tensor& input, int64_t size) {
  // torch raises ValueError for fewer than 3 dims.
  TORCH_CHECK_VALUE(input.dim() >= 3, op,
                    ": Expected 3D or higher dimensionality input (got ", input.dim(),
                    " dimensions)");
  check_common(op, input, size);
}

void check_srn(const char* op, const at::Tensor& input, int64_t size) {
  TORCH_CHECK_VALUE(input.dim() == 4, op, ": Expected 4D input (N, C, H, W) (got ",
                    input.dim(), " dimensions)");
  check_common(op, input, size);
}

}  // namespace

at::Tensor lrn_forward(const at::Tensor& input, int64_t size, double alpha, double beta,
                       double k, Launcher launch) {
  check_lrn("local_response_norm", input, size);
  Params p = lrn_params(input, size, alpha, beta, k);
  return run(p, input, false, launch);
}

at::Tensor lrn_backward(const at::Tensor& grad_out, const at::Tensor& input, int64_t size,
                        double alpha, double beta, double k, Launcher launch) {
  const char* op = "local_response_norm_backward";
  check_lrn(op, input, size);
  check_grad(op, grad_out, input);
  Params p = lrn_params(input, size, alpha, beta, k);
  p.dy = grad_out;
  return run(p, input, true, launch);
}

at::Tensor srn_forward(const at::Tensor& input, int64_t size, double alpha, double beta,
                       double k, Launcher launch) {
  check_srn("spatial_response_norm", input, size);
  Params p = srn_params(input, size, alpha, beta, k);
  return run(p, input, false, launch);
}

at::Tensor srn_backward(const at::Tensor& grad_out, const at::Tensor& input, int64_t size,
                        double alpha, double beta, double k, Launcher launch) {
  const char* op = "spatial_response_norm_backward";
  check_srn(op, input, size);
  check_grad(op, grad_out, input);
  Params p = srn_params(input, size, alpha, beta, k);
  p.dy = grad_out;
  return run(p, input, true, launch);
}

}  // namespace torchfuse::lrn
