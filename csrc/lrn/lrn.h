// Local response normalization across channels (local_response_norm) and
// within a channel (spatial_response_norm): host-side logic shared by the CPU
// and CUDA kernels (checks and allocation in lrn.cpp).
//
// Both ops are one computation on x viewed as (B, R, W): a window over rows r
// (and, for the spatial op, over columns w) of x**2 gives S, and
//   s = k + alpha_n * S,   y = x * s^-beta
//   dx = dy * s^-beta - 2 * alpha_n * beta * x * sum_reflected_window(dy * y / s)
// local_response_norm: B = N, R = C, W = prod(spatial dims), no column window,
//   rows [c - size/2, c + (size-1)/2], alpha_n = alpha / size.
// spatial_response_norm: B = N*C, R = H, W = W, rows and columns
//   [h - (size-1)/2, h + size/2], alpha_n = alpha / size^2.
// The backward window is the forward one reflected (lo and hi swapped).
//
// channels_last input: x, dy and out stay in the
// input's memory format. local_response_norm: (B, W, R) in memory, the window
// runs along the contiguous R (channels) of each of the B * W positions.
// spatial_response_norm (windows up to kClSpatialMaxWindow): (N, R, W, C) in
// memory with B = N * C, the window over rows and columns of each channel.
#pragma once

#include <ATen/core/Tensor.h>

namespace torchfuse::lrn {

struct Params {
  at::Tensor x, dy, out;  // contiguous, dtype T; dy undefined in forward
  int64_t B = 0, R = 0, W = 0;
  int64_t lo = 0, hi = 0;  // forward window: rows [r - lo, r + hi]
  bool cols = false;       // spatial: the same window over columns
  bool channels_last = false;  // x, dy, out in channels_last order (see above)
  int64_t C = 0;               // spatial, channels_last: channels (B = N * C)
  double alpha_n = 0, beta = 0, k = 0;
};

using Launcher = void (*)(const Params&);

// Widest spatial window run in place on channels_last input (the kernels sum
// windows directly); wider ones run on contiguous copies.
constexpr int64_t kClSpatialMaxWindow = 16;

at::Tensor lrn_forward(const at::Tensor& input, int64_t size, double alpha,
                       double beta, double k, Launcher launch);
at::Tensor lrn_backward(const at::Tensor& grad_out, const at::Tensor& input,
                        int64_t size, double alpha, double beta, double k,
                        Launcher launch);
at::Tensor srn_forward(const at::Tensor& input, int64_t size, double alpha,
                       double beta, double k, Launcher launch);
at::Tensor srn_backward(const at::Tensor& grad_out, const at::Tensor& input,
                        int64_t size, double alpha, double beta, double k,
                        Launcher launch);

template <Launcher fwd>
at::Tensor lrn_op(const at::Tensor& input, int64_t size, double alpha,
                  double beta, double k) {
  return lrn_forward(input, size, alpha, beta, k, fwd);
}
template <Launcher bwd>
at::Tensor lrn_backward_op(const at::Tensor& grad_out, const at::Tensor& input,
                           int64_t size, double alpha, double beta, double k) {
  return lrn_backward(grad_out, input, size, alpha, beta, k, bwd);
}
template <Launcher fwd>
at::Tensor srn_op(const at::Tensor& input, int64_t size, double alpha,
                  double beta, double k) {
  return srn_forward(input, size, alpha, beta, k, fwd);
}
template <Launcher bwd>
at::Tensor srn_backward_op(const at::Tensor& grad_out, const at::Tensor& input,
                           int64_t size, double alpha, double beta, double k) {
  return srn_backward(grad_out, input, size, alpha, beta, k, bwd);
}

}  // namespace torchfuse::lrn
