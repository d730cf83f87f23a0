// Channel shuffle and cat + shuffle: host-side logic shared by the CPU and
// CUDA kernels.
//
// Both ops move whole channels between one "shuffled" tensor S of C channels
// and a list of "pieces" P_0..P_{K-1} whose channel counts sum to C (their
// concatenation along dim 1). With cpg = C / groups, concatenated channel c
// lands in shuffled channel
//     s(c) = (c % cpg) * groups + c / cpg,
// i.e. the (groups, cpg) channel matrix is transposed. channel_shuffle is the
// one-piece case. Every tensor is viewed in one layout as (O, C_t, I):
//   * contiguous:     O = N,              I = prod(spatial)  (whole planes move)
//   * channels_last:  O = N * prod(spatial), I = 1           (channels innermost)
// The kernels are templated on the element size only: a permutation does not
// look at values, so every dtype torch has is covered.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace torchfuse::channel_shuffle {

struct Params {
  // (O, C_k, I) each: dense within a row of C_k * I elements, rows ostride[k]
  // elements apart (C_k * I for a dense piece; more for a view that narrows
  // dim 1 of a larger tensor, as ShuffleNetV2's chunk of its input, which
  // is read where it lies rather than copied)
  std::vector<at::Tensor> pieces;
  std::vector<int64_t> ostride;
  at::Tensor shuffled;             // (O, C, I), dense
  int64_t O = 0, C = 0, I = 0, groups = 1;
  // true: pieces -> shuffled (forward); false: shuffled -> pieces (backward
  // of cat_shuffle: each piece's gradient written in one pass).
  bool to_shuffled = true;
};

using Launcher = void (*)(const Params&);

at::Tensor shuffle_forward(const at::Tensor& input, int64_t groups, Launcher launch);

at::Tensor cat_forward(at::TensorList tensors, int64_t groups, Launcher launch);

std::vector<at::Tensor> cat_backward(
    const at::Tensor& grad_out,
    at::IntArrayRef split_sizes,
    int64_t groups,
    Launcher launch);

template <Launcher launch>
at::Tensor channel_shuffle_op(const at::Tensor& input, int64_t groups) {
  return shuffle_forward(input, groups, launch);
}

template <Launcher launch>
at::Tensor cat_shuffle_op(at::TensorList tensors, int64_t groups) {
  return cat_forward(tensors, groups, launch);
}

template <Launcher launch>
std::vector<at::Tensor> cat_shuffle_backward_op(
    const at::Tensor& grad_out,
    at::IntArrayRef split_sizes,
    int64_t groups) {
  return cat_backward(grad_out, split_sizes, groups, launch);
}

}  // namespace torchfuse::channel_shuffle
