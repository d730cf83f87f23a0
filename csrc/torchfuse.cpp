// The torchfuse op catalogue: every schema, in one place.
//
// Kernels live beside their op (csrc/<op>/<op>.cpp for CPU, csrc/<op>/<op>.cu
// for CUDA) and register themselves with TORCH_LIBRARY_IMPL, so a CPU-only
// build simply leaves the .cu files out. Fake (meta) kernels and autograd
// formulas are registered from Python (python/torchfuse/_ops/<op>.py).
#include <torch/library.h>

TORCH_LIBRARY(torchfuse, m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};

  // --- RMSNorm (csrc/rms_norm) -------------------------------------------
  // rstd has the leading (un-normalized) dims of input, in float32 (float64
  // for float64 input). weight may be of any floating dtype.
  m.def(
      "rms_norm(Tensor input, int[] normalized_shape, Tensor? weight, "
      "float eps) -> (Tensor out, Tensor rstd)",
      tags);
  m.def(
      "add_rms_norm(Tensor input, Tensor residual, int[] normalized_shape, "
      "Tensor? weight, float eps) -> (Tensor out, Tensor summed, Tensor rstd)",
      tags);
  // grad_summed (optional) is added to grad_input in the same pass: the
  // gradient reaching the residual stream of add_rms_norm. grad_weight is an
  // empty tensor unless weight_grad is true.
  m.def(
      "rms_norm_backward(Tensor grad_out, Tensor? grad_summed, Tensor input, "
      "Tensor rstd, int[] normalized_shape, Tensor? weight, bool weight_grad) "
      "-> (Tensor grad_input, Tensor grad_weight)",
      tags);
  // --- GroupNorm (csrc/group_norm) ------------------------------------------
  // activation: "none", "relu" or "silu", applied in the same pass. mean and
  // rstd: (N, num_groups) in float32 (float64 for float64 input); out (and
  // grad_input) in input's memory format (contiguous or channels_last(_3d)).
  m.def(
      "group_norm(Tensor input, int num_groups, Tensor? weight, Tensor? bias, "
      "float eps, str activation) -> (Tensor out, Tensor mean, Tensor rstd)",
      tags);
  // The activation is differentiated from y recomputed out of input, mean,
  // rstd, weight and bias. grad_weight / grad_bias are empty tensors unless
  // weight_grad / bias_grad.
  m.def(
      "group_norm_backward(Tensor grad_out, Tensor input, Tensor mean, "
      "Tensor rstd, int num_groups, Tensor? weight, Tensor? bias, "
      "str activation, bool weight_grad, bool bias_grad) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)",
      tags);
  // --- Channel shuffle (csrc/channel_shuffle) ------------------------------
  // Any dtype (a permutation). cat_shuffle = channel_shuffle(cat(tensors, 1),
  // groups) in one pass; its backward writes every piece's gradient in one
  // pass (split_sizes: the pieces' channel counts).
  m.def("channel_shuffle(Tensor input, int groups) -> Tensor", tags);
  m.def("cat_shuffle(Tensor[] tensors, int groups) -> Tensor", tags);
  m.def(
      "cat_shuffle_backward(Tensor grad_out, int[] split_sizes, int groups) "
      "-> Tensor[]",
      tags);

  // --- 2-D convolution with a fused channel shuffle (csrc/conv) -------------
  // input (N, C, H, W), weight (out, C / groups, kH, kW); stride and dilation
  // of 1 or 2 ints; padding of 1, 2 or 4 ints (top, left, bottom, right).
  // out (N, out, OH, OW) contiguous = channel_shuffle(conv2d(...),
  // shuffle_groups), the shuffle applied in the GEMM's / kernel's stores.
  m.def(
      "conv2d(Tensor input, Tensor weight, Tensor? bias, int[] stride, "
      "int[] padding, int[] dilation, int groups, int shuffle_groups) -> Tensor",
      tags);
  // output_mask: which of (grad_input, grad_weight, grad_bias) to compute;
  // the others are empty tensors. grad_bias is (out,) in weight's dtype.
  m.def(
      "conv2d_backward(Tensor grad_out, Tensor input, Tensor weight, "
      "int[] stride, int[] padding, int[] dilation, int groups, "
      "int shuffle_groups, bool[3] output_mask) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)",
      tags);

  // --- Local / spatial response norm (csrc/lrn) ----------------------------
  // Only input is saved; the backward recomputes the window sums.
  m.def(
      "local_response_norm(Tensor input, int size, float alpha, float beta, "
      "float k) -> Tensor",
      tags);
  m.def(
      "local_response_norm_backward(Tensor grad_out, Tensor input, int size, "
      "float alpha, float beta, float k) -> Tensor",
      tags);
  m.def(
      "spatial_response_norm(Tensor input, int size, float alpha, float beta, "
      "float k) -> Tensor",
      tags);
  m.def(
      "spatial_response_norm_backward(Tensor grad_out, Tensor input, int size, "
      "float alpha, float beta, float k) -> Tensor",
      tags);

  // --- L2 normalization, cosine_linear (csrc/l2_norm) -----------------------
  // out = input / max(norm, eps) * weight (broadcast along dim); norm is the
  // unclamped 2-norm along dim: input's shape without dim, in float32
  // (float64 for float64 input). weight may be of any floating dtype.
  m.def(
      "l2_norm(Tensor input, Tensor? weight, int dim, float eps) "
      "-> (Tensor out, Tensor norm)",
      tags);
  // grad_weight is an empty tensor unless weight_grad is true.
  m.def(
      "l2_norm_backward(Tensor grad_out, Tensor input, Tensor norm, "
      "Tensor? weight, int dim, float eps, bool weight_grad) "
      "-> (Tensor grad_input, Tensor grad_weight)",
      tags);
  // out = (input @ weight.T) / max(|input_i|, eps) / max(|weight_j|, eps) + bias;
  // input_norm (input.shape[:-1]) and weight_norm (out_features): unclamped
  // row norms in the accumulate type.
  m.def(
      "cosine_linear(Tensor input, Tensor weight, Tensor? bias, float eps) "
      "-> (Tensor out, Tensor input_norm, Tensor weight_norm)",
      tags);
  // grad_bias is an empty tensor unless bias_grad is true.
  m.def(
      "cosine_linear_backward(Tensor grad_out, Tensor input, Tensor weight, "
      "Tensor input_norm, Tensor weight_norm, float eps, bool bias_grad) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)",
      tags);

  // --- Gram matrices, style loss (csrc/gram) ----------------------------------
  // out (N, C, C) = F F^T / (C L) (normalize) with F = input.reshape(N, C, L),
  // in input's dtype; the GEMM accumulates in float32 (float64 for float64).
  m.def("gram_matrix(Tensor input, bool normalize) -> Tensor", tags);
  m.def(
      "gram_matrix_backward(Tensor grad_out, Tensor input, bool normalize) "
      "-> Tensor",
      tags);
  // mse_loss(gram_matrix(input, True), target_gram, reduction) with diff =
  // gram - target_gram ((N, C, C), accumulate type) saved for the backward.
  // loss: 0-dim in the accumulate type for "mean" / "sum", (N, C, C) in
  // input's dtype for "none". target_gram: (C, C), (1, C, C) or (N, C, C).
  m.def(
      "style_loss(Tensor input, Tensor target_gram, str reduction) "
      "-> (Tensor loss, Tensor diff)",
      tags);
  // grad_input / grad_target are empty tensors unless input_grad /
  // target_grad; grad_target is (N, C, C) in the accumulate type (summed to
  // target_gram's shape by the caller).
  m.def(
      "style_loss_backward(Tensor grad_loss, Tensor input, Tensor diff, "
      "str reduction, bool input_grad, bool target_grad) "
      "-> (Tensor grad_input, Tensor grad_target)",
      tags);
}
