// Gram matrices and the Gram-matrix style loss: host-side logic shared by
// the CPU and CUDA kernels.
//
// The op entry points (checks, operand views, the GEMMs, allocation) are
// written once in gram.cpp and parameterised by device launchers: the two
// passes over the (N, C, C) Gram matrices that surround the GEMMs.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace torchfuse::gram {

enum class Reduction { None, Mean, Sum };

// The style loss's pass over the Gram matrices, after the GEMM:
//   d[n, i, j] = gram[n, i, j] - target[t_batched ? n : 0, i, j]
//   none: out[n, i, j] = d^2 (input's dtype)
//   mean / sum: out (0-dim, accumulate type) = sum d^2 (/ (N C C) for mean),
//   summed in a fixed order (per-row partial sums, then the rows in order).
// gram (N, C, C) in the input's dtype, target and d in the accumulate type;
// all contiguous.
struct LossParams {
  at::Tensor gram, target, d, out;
  int64_t N = 0, C = 0;
  bool t_batched = false;
  Reduction reduction = Reduction::Mean;
};

// The pass before the backward GEMM: with w = a * g (g: undefined = 1, a
// 0-dim tensor, or (N, C, C) elementwise; accumulate type),
//   s[n, i, j] = w[n, i, j] + w[n, j, i]          (input's dtype)
//   dtarget[n, i, j] = -coef * w[n, i, j]          (when dtarget is defined)
// a is grad_out (input's dtype; gram_matrix_backward) or the saved difference
// d (accumulate type; style_loss_backward). All (N, C, C), contiguous.
struct SymParams {
  at::Tensor a, g, s, dtarget;
  int64_t N = 0, C = 0;
  double coef = 1;
};

struct Launchers {
  void (*loss)(const LossParams&);
  void (*sym)(const SymParams&);
};

at::Tensor gram_forward(const at::Tensor& input, bool normalize, const Launchers& launch);

at::Tensor gram_backward(
    const at::Tensor& grad_out,
    const at::Tensor& input,
    bool normalize,
    const Launchers& launch);

std::tuple<at::Tensor, at::Tensor> loss_forward(
    const at::Tensor& input,
    const at::Tensor& target_gram,
    c10::string_view reduction,
    const Launchers& launch);

std::tuple<at::Tensor, at::Tensor> loss_backward(
    const at::Tensor& grad_loss,
    const at::Tensor& input,
    const at::Tensor& diff,
    c10::string_view reduction,
    bool input_grad,
    bool target_grad,
    const Launchers& launch);

// The op entry points for one device, ready for m.impl.
template <const Launchers& L>
at::Tensor gram_matrix_op(const at::Tensor& input, bool normalize) {
  return gram_forward(input, normalize, L);
}

template <const Launchers& L>
at::Tensor gram_matrix_backward_op(
    const at::Tensor& grad_out,
    const at::Tensor& input,
    bool normalize) {
  return gram_backward(grad_out, input, normalize, L);
}

template <const Launchers& L>
std::tuple<at::Tensor, at::Tensor> style_loss_op(
    const at::Tensor& input,
    const at::Tensor& target_gram,
    c10::string_view reduction) {
  return loss_forward(input, target_gram, reduction, L);
}

template <const Launchers& L>
std::tuple<at::Tensor, at::Tensor> style_loss_backward_op(
    const at::Tensor& grad_loss,
    const at::Tensor& input,
    const at::Tensor& diff,
    c10::string_view reduction,
    bool input_grad,
    bool target_grad) {
  return loss_backward(grad_loss, input, diff, reduction, input_grad, target_grad, L);
}

}  // namespace torchfuse::gram
