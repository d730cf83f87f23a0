// 2-D convolution (dilated, grouped, depthwise) with an optional channel
// shuffle of its output fused into the stores: host-side logic shared by the
// CPU and CUDA kernels.
//
// conv.cpp holds the op entry points (checks, geometry, the GEMMs through
// ATen on strided views, buffers); the device files provide the launchers
// below: the passes that are not GEMMs (im2col, col2im and the direct
// kernels).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <array>
#include <tuple>

namespace torchfuse::conv {

// Shapes and hyper-parameters of one call. Padding is split into its
// leading (pt, pl) and trailing (pb, pr) parts, so that padding="same" with
// an even kernel (torch pads one more at the end) needs no padded copy.
struct Geometry {
  int64_t N = 0, Cin = 0, H = 0, W = 0;
  int64_t Cout = 0, KH = 0, KW = 0, OH = 0, OW = 0;
  int64_t sh = 1, sw = 1, pt = 0, pl = 0, pb = 0, pr = 0, dh = 1, dw = 1;
  int64_t groups = 1, shuffle = 1;

  int64_t cin_g() const { return Cin / groups; }
  int64_t cout_g() const { return Cout / groups; }
  int64_t L() const { return OH * OW; }
  int64_t kk() const { return KH * KW; }
  // Where output channel c of the convolution is stored: its position after
  // channel_shuffle(., shuffle) (the identity for shuffle == 1).
  int64_t pos(int64_t c) const {
    const int64_t m = Cout / shuffle;
    return (c % m) * shuffle + c / m;
  }
};

// The output index o with o * s == u and 0 <= o < count, if there is one:
// input row (column) h of a gather sums tap i at u = h + pt - i * dh, which
// lands on an output only at multiples of the stride (col2im, grad_input).
C10_HOST_DEVICE inline bool output_index(int64_t u, int64_t s, int64_t count, int64_t& o) {
  if (u < 0 || u % s != 0) return false;
  o = u / s;
  return o < count;
}

// im2col for samples [0, nb) of x (nb, Cin, H, W) contiguous:
//   col[n * ns + r * rs + l] = x[n, c, oh*sh - pt + i*dh, ow*sw - pl + j*dw]
// (zero outside the image) with r = (c * KH + i) * KW + j, l = oh * OW + ow.
// col's dtype is x's or the accumulate type (float32 / float64). With
// extra = 1, each group's rows are followed by one row the launcher leaves
// alone (the forward's row of ones for the bias): row r of channel c is
// stored as row r + (c / (Cin / groups)) * extra.
struct Im2colParams {
  at::Tensor x, col;
  int64_t nb = 0, ns = 0, rs = 0, extra = 0;
  Geometry g;
};

// col2im, gather form (each input element sums its KH*KW window entries in a
// fixed order: deterministic): dx[n, c, h, w] = sum over (i, j) with
// h + pt - i*dh = oh*sh and w + pl - j*dw = ow*sw in range of
// col[n, (c * KH + i) * KW + j, oh * OW + ow]. col (nb, Cin*KH*KW, L) and
// dx (nb, Cin, H, W) contiguous, the same dtype.
struct Col2imParams {
  at::Tensor col, dx;
  int64_t nb = 0;
  Geometry g;
};

// Direct kernels (no im2col, no GEMM) for the convolutions whose groups
// have few input channels: depthwise ones above all. The launcher set says
// which it takes (use_direct, told the dtype, whether torch's own
// convolution is the alternative, i.e. no shuffle and symmetric padding,
// else it is im2col + GEMM, and whether the input is channels_last): the
// CPU kernels take every depthwise convolution and any other with a kernel
// larger than 1x1 whose groups have at most 16 input channels (8 in
// float32/float64 when torch's convolution is the alternative), except
// channels_last input that torch's convolution can take; the CUDA ones
// depthwise convolutions (one input channel per group) with at most 8
// outputs per group. Accumulation in the accumulate type; all tensors
// contiguous.
//   forward:   out[n, pos(c), .] = bias[c] + sum over ci, (i, j) of
//              w[c, ci, i, j] x[n, group(c) * cin_g + ci, ...]
//   dinput:    dx[n, ., h, w] = sum over the group's outputs c and (i, j) of
//              w[c, ci, i, j] dy[n, pos(c), oh, ow]
//   dweight:   dw[c, ci, i, j] = sum_n,oh,ow dy[n, pos(c), oh, ow] x[n, ...]
//              (dw in the accumulate type; a fixed summation order)
struct DirectParams {
  at::Tensor x, w, bias, out;   // forward: x, w, bias (optional), out
  at::Tensor dy, dx, dw;        // backward
  Geometry g;
};

struct Launchers {
  void (*im2col)(const Im2colParams&);
  void (*col2im)(const Col2imParams&);
  bool (*use_direct)(const Geometry&, at::ScalarType dtype, bool torch_alternative,
                     bool channels_last);
  // For a convolution given to torch's: whether its weight gradient is still
  // computed here (im2col + the accumulate-type GEMM).
  bool (*own_dweight)(const Geometry&, at::ScalarType dtype);
  void (*direct_forward)(const DirectParams&);
  void (*direct_dinput)(const DirectParams&);
  void (*direct_dweight)(const DirectParams&);
  // Depthwise convolutions (one input and one output channel per group)
  // without a shuffle on channels_last input, the same three passes over
  // channels_last (NHWC) x, dy, out and dx (dw as above); null where the
  // device has none (CUDA), and such input takes the paths above.
  void (*nhwc_forward)(const DirectParams&);
  void (*nhwc_dinput)(const DirectParams&);
  void (*nhwc_dweight)(const DirectParams&);
};

at::Tensor forward(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups,
    int64_t shuffle_groups,
    const Launchers& launch);

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out,
    const at::Tensor& input,
    const at::Tensor& weight,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups,
    int64_t shuffle_groups,
    std::array<bool, 3> output_mask,
    const Launchers& launch);

template <const Launchers& L>
at::Tensor conv2d_op(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups,
    int64_t shuffle_groups) {
  return forward(input, weight, bias, stride, padding, dilation, groups, shuffle_groups, L);
}

template <const Launchers& L>
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward_op(
    const at::Tensor& grad_out,
    const at::Tensor& input,
    const at::Tensor& weight,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups,
    int64_t shuffle_groups,
    std::array<bool, 3> output_mask) {
  return backward(grad_out, input, weight, stride, padding, dilation, groups, shuffle_groups,
                  output_mask, L);
}

}  // namespace torchfuse::conv
