// 2-D convolution with a fused channel shuffle: argument checks, geometry,
// the GEMMs and buffers, shared by the CPU (conv_cpu.cpp) and CUDA
// (conv_cuda.cu) kernels. Layout: the kernels compute NCHW (a channels_last
// input is copied to contiguous and the output copied back; torch's own
// convolution, below, takes it as it is).
//
// General case (im2col + GEMM, as Caffe): for a chunk of nb samples, the
// im2col launcher writes col (nb, groups * (Kg + aug), L), Kg = Cin/groups *
// KH * KW, L = OH * OW; then per group one batched GEMM (at::baddbmm: the
// platform BLAS / cuBLAS) writes out[n, c, :] = W[c] . col[n, group rows].
// A 1x1 kernel with stride 1 and no padding skips im2col (col = input).
//   bias: with im2col, each group's rows get one more row of ones (aug = 1,
//   written once per buffer) and the weight one more column holding the
//   bias, so the bias costs no pass over the output; without im2col the
//   output is filled with the bias and the GEMM adds to it (beta = 1).
//   shuffle: output channel c is stored at position pos(c) (conv.h). The
//   channels of one group that fall in one shuffle group are stored every
//   `shuffle` channels, so the GEMM writes them through a view with row
//   stride shuffle * L: each group's GEMM is split at the shuffle groups'
//   boundaries, and the shuffle costs no memory pass.
// Groups with few input channels (launch.use_direct: on CPU at most 16 input
// channels per group, 8 in float32/float64 without a shuffle; on CUDA
// depthwise with at most 8 outputs per group): the direct kernels of the
// launchers, the shuffle in their index arithmetic; on CPU not for
// channels_last input that torch's convolution can take. The rest, when
// there is no shuffle to fuse, is torch's own convolution (Path below).
// Backward: grad_input = col2im(W^T dy) (same pieces, dy read through the
// same strided views); grad_weight = sum over chunks of dy (Cout, nb L) .
// col^T, accumulated in float32 (float64 for float64): im2col writes col
// (Kg, nb, L) in that dtype and dy's chunk is copied into it;
// grad_bias = dy summed over (N, OH, OW) in that dtype, un-shuffled.
#include "conv.h"

#include "../common/checks.h"
#include "../common/layout.h"

#include <ATen/Functions.h>

#include <algorithm>
#include <vector>

namespace torchfuse::conv {

namespace {

constexpr const char* kOp = "conv2d";
// Bytes of im2col buffer per chunk of samples (at least one sample).
constexpr int64_t kColBudget = kHeapScratchMax;

std::array<int64_t, 2> pair_arg(at::IntArrayRef v, const char* arg) {
  TORCH_CHECK(
      v.size() == 2 || v.size() == 1, kOp, ": expected ", arg,
      " to be a single integer or a list of 2 integers, but got ", v);
  return {v[0], v[v.size() - 1]};
}

Geometry geometry(
    const at::Tensor& input,
    const at::Tensor& weight,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups,
    int64_t shuffle) {
  TORCH_CHECK(
      input.dim() == 4, kOp, ": expected input of 4 dimensions (N, C, H, W), but got input "
      "of size ", input.sizes());
  TORCH_CHECK(
      weight.dim() == 4, kOp, ": expected weight of 4 dimensions (out_channels, "
      "in_channels / groups, kH, kW), but got weight of size ", weight.sizes());
  TORCH_CHECK(groups > 0, kOp, ": non-positive groups is not supported (groups=", groups, ")");
  const auto s = pair_arg(stride, "stride");
  const auto d = pair_arg(dilation, "dilation");
  TORCH_CHECK(s[0] > 0 && s[1] > 0, kOp, ": non-positive stride is not supported (stride=",
              stride, ")");
  TORCH_CHECK(d[0] > 0 && d[1] > 0, kOp, ": non-positive dilation is not supported (dilation=",
              dilation, ")");
  TORCH_CHECK(
      padding.size() == 1 || padding.size() == 2 || padding.size() == 4, kOp,
      ": expected padding to be a single integer, a list of 2 integers or a list of 4 "
      "(top, left, bottom, right), but got ", padding);
  for (auto p : padding) {
    TORCH_CHECK(p >= 0, kOp, ": negative padding is not supported (padding=", padding, ")");
  }
  TORCH_CHECK(
      input.numel() > 0 || input.size(0) == 0 || input.size(1) == 0, kOp,
      ": only zero batch or zero channel inputs are supported, but got input of size ",
      input.sizes());
  Geometry g;
  g.N = input.size(0);
  g.Cin = input.size(1);
  g.H = input.size(2);
  g.W = input.size(3);
  g.Cout = weight.size(0);
  g.KH = weight.size(2);
  g.KW = weight.size(3);
  g.sh = s[0];
  g.sw = s[1];
  // A kernel one tap high (wide) spans one row (column) at any dilation, so
  // the dilation along it changes nothing: 1 there. Torch's oneDNN float16
  // convolution (CPU, 2.14 on an AVX512_FP16 Xeon) segfaults on some 1-tap
  // kernels with a dilation above 1 along them (e.g. x (1, 4, 17, 1),
  // weight (3, 4, 1, 1), stride 3, padding 2, dilation (1, 2)). There, of
  // 750 random float16 convolutions 7 crashed, each with a 1-tap side
  // dilated; with that dilation made 1, none of 1100 (900 float16, 200
  // bfloat16; 800 of them forward and backward in both layouts). Each of
  // the 7 also had an output whose taps lie in the padding, which
  // platform_takes keeps from oneDNN anyway; the dilation of 1 is exact and
  // keeps oneDNN on the parameters it ran without a crash.
  g.dh = g.KH == 1 ? 1 : d[0];
  g.dw = g.KW == 1 ? 1 : d[1];
  if (padding.size() == 4) {
    g.pt = padding[0];
    g.pl = padding[1];
    g.pb = padding[2];
    g.pr = padding[3];
  } else {
    g.pt = g.pb = padding[0];
    g.pl = g.pr = padding[padding.size() - 1];
  }
  g.groups = groups;
  g.shuffle = shuffle;
  // As torch: at least one output channel per group (a weight of size 0 at
  // dimension 0 is divisible by groups but rejected).
  TORCH_CHECK(
      g.Cout >= groups, kOp, ": given groups=", groups, ", expected weight to be at least ",
      groups, " at dimension 0, but got weight of size ", weight.sizes(), " instead");
  TORCH_CHECK(
      g.Cout % groups == 0, kOp, ": given groups=", groups, ", expected weight to be "
      "divisible by ", groups, " at dimension 0, but got weight of size ", weight.sizes(),
      " instead");
  TORCH_CHECK(
      weight.size(1) * groups == g.Cin, kOp, ": given groups=", groups, ", weight of size ",
      weight.sizes(), ", expected input", input.sizes(), " to have ", weight.size(1) * groups,
      " channels, but got ", g.Cin, " channels instead");
  TORCH_CHECK(shuffle > 0, kOp, ": expected shuffle_groups to be positive, but got ", shuffle);
  TORCH_CHECK(
      g.Cout % shuffle == 0, kOp, ": expected the number of output channels (", g.Cout,
      ") to be divisible by shuffle_groups (", shuffle, ")");
  const int64_t ph = g.H + g.pt + g.pb, pw = g.W + g.pl + g.pr;
  const int64_t eh = g.dh * (g.KH - 1) + 1, ew = g.dw * (g.KW - 1) + 1;
  TORCH_CHECK(
      ph >= eh && pw >= ew, kOp, ": calculated padded input size per channel: (", ph, " x ",
      pw, "). Kernel size: (", eh, " x ", ew, "). Kernel size can't be greater than actual "
      "input size (input of size ", input.sizes(), ", weight of size ", weight.sizes(), ")");
  g.OH = (ph - eh) / g.sh + 1;
  g.OW = (pw - ew) / g.sw + 1;
  return g;
}

void check_tensors(const at::Tensor& input, const at::Tensor& weight) {
  check_floating(input, kOp, "input");
  check_same_device(weight, input, kOp, "weight");
  check_same_dtype(weight, input, kOp, "weight");
}

bool reads_input(const Geometry& g) {
  return g.KH == 1 && g.KW == 1 && g.sh == 1 && g.sw == 1 && g.pt == 0 && g.pl == 0 &&
      g.pb == 0 && g.pr == 0;
}

// grad_input in the input's memory format (an output not asked for is empty).
std::tuple<at::Tensor, at::Tensor, at::Tensor> in_layout(
    const at::Tensor& gx, const at::Tensor& gw, const at::Tensor& gb, at::MemoryFormat fmt) {
  return {gx.dim() == 4 ? gx.contiguous(fmt) : gx, gw, gb};
}

// Which code computes a convolution. Convolutions that no direct kernel
// takes and that have no shuffle to fuse (nor the asymmetric padding torch's
// convolution lacks) run torch's own convolution, oneDNN on the CPU and
// cuDNN on CUDA: on the 2-core Xeon, im2col + per-group GEMMs took 1.2-5.6x
// oneDNN's time in every pass at groups of 24-64 input channels (ResNeXt,
// RegNet; one exception, RegNet's bfloat16 weight gradient at 0.74x) and
// 0.7-1.9x it on dilated float32 convolutions (DeepLabv3, DRN). Empty
// convolutions stay here. own_dw: the launchers keep the weight gradient of
// some of those (launch.own_dweight).
// nhwc (with direct): a depthwise convolution (one output per group) without
// a shuffle on channels_last input, computed where its tensors lie by the
// launchers' NHWC kernels (CPU) instead of the NCHW direct ones: in the
// backward for float16 and bfloat16, and in every pass where torch's
// convolution cannot take it (asymmetric padding). Speed against oneDNN on
// the 2-core Xeon with AVX512_BF16/AVX512_FP16 (batch 32, five MobileNetV2 /
// ShuffleNetV2 depthwise shapes, per pass): bfloat16 grad_input 1.2-109x
// (oneDNN's strided one took 31-58 ms), grad_weight
// 0.93-1.67x; float16 grad_input 12.6-134x and grad_weight 80-186x; but
// bfloat16 forward 0.56-1.13x (oneDNN's is memory-bound there, ours not)
// and float32 0.51-1.66x by pass and shape, so those stay with torch.
struct Path {
  bool direct = false, platform = false, own_dw = false, nhwc = false;
};

// Along one axis (n input positions, k taps d apart, stride s, p positions
// of padding before, o outputs): whether some output's taps all fall in the
// padding. Only the outputs near either end can, so the loop skips from the
// first output whose taps all lie inside to the last one that does.
bool padding_only_output(int64_t n, int64_t k, int64_t s, int64_t d, int64_t p, int64_t o) {
  for (int64_t i = 0; i < o; ++i) {
    const int64_t first = i * s - p;
    if (first >= 0 && first + (k - 1) * d < n) {
      i = std::max(i, (n - 1 + p - (k - 1) * d) / s);  // the last output inside
      continue;
    }
    bool any = false;
    for (int64_t t = 0; t < k && !any; ++t) any = first + t * d >= 0 && first + t * d < n;
    if (!any) return true;
  }
  return false;
}

// Whether torch's CPU convolution (oneDNN) is given a shape: torch 2.14 on
// the 2-core Xeon with AVX512_BF16/AMX got some degenerate ones wrong, which
// stay with our kernels on CPU tensors. Of 800 random small bfloat16
// convolutions, 56 gave garbage (errors of 1 to 1e37 times the output's
// size, or NaN), each with an output one column wide from a column stride
// above 1 (float32 too, on inputs of one channel, which our kernels take
// anyway: x (2, 1, 20, 7) channels_last, weight (4, 1, 7, 7), stride (1, 2),
// padding (2, 0), dilation (3, 1): error 4e22 times the output). And 3
// segfaulted (a fourth shape in another run), each with an output row whose
// dilated taps all fall in the padding (x (2, 64, 2, 24), weight
// (16, 32, 2, 2), padding (1, 2), dilation (3, 2), groups 2). The other
// axis by symmetry, not seen failing.
bool platform_takes(const Geometry& g) {
  return !((g.OW == 1 && g.sw > 1) || (g.OH == 1 && g.sh > 1) ||
           padding_only_output(g.H, g.KH, g.sh, g.dh, g.pt, g.OH) ||
           padding_only_output(g.W, g.KW, g.sw, g.dw, g.pl, g.OW));
}

// fmt: the input's kept_format; cpu: the tensors are on the CPU (so torch's
// convolution is oneDNN: under the CUDA emulator too); backward: for the
// backward pass.
Path path_of(const Geometry& g, at::ScalarType dtype, at::MemoryFormat fmt, bool cpu,
             const Launchers& launch, bool backward) {
  Path p;
  const bool alt = g.shuffle == 1 && g.pt == g.pb && g.pl == g.pr && g.Cin > 0 &&
      (!cpu || platform_takes(g));
  const bool low = dtype == at::kHalf || dtype == at::kBFloat16;
  p.nhwc = launch.nhwc_forward != nullptr && fmt == at::MemoryFormat::ChannelsLast &&
      g.cin_g() == 1 && g.cout_g() == 1 && g.shuffle == 1 && g.N > 0 && g.Cout > 0 &&
      (!alt || (backward && low));
  if (p.nhwc) {
    p.direct = true;
    return p;
  }
  p.direct = launch.use_direct(g, dtype, alt, fmt == at::MemoryFormat::ChannelsLast);
  p.platform = alt && !p.direct && g.N > 0 && g.Cout > 0;
  p.own_dw = p.platform && launch.own_dweight(g, dtype);
  return p;
}

// the layout the path's kernels read and write (the operands are copied to
// it only where they differ)
at::MemoryFormat kernel_format(const Path& p) {
  return p.nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// Output rows [a, b) of one group that lie in one shuffle group: they are
// stored from position pos(a) on, every `shuffle` channels.
struct Piece {
  int64_t group, a, b;
};

std::vector<Piece> pieces(const Geometry& g) {
  std::vector<Piece> out;
  const int64_t m = g.Cout / g.shuffle, K = g.cout_g();
  for (int64_t gi = 0; gi < g.groups; ++gi) {
    int64_t a = gi * K;
    const int64_t end = (gi + 1) * K;
    while (a < end) {
      const int64_t b = g.shuffle == 1 ? end : std::min(end, (a / m + 1) * m);
      out.push_back({gi, a, b});
      a = b;
    }
  }
  return out;
}

// Rows [a, b) of the (N, Cout, L) tensor t for samples [n0, n0 + nb), as
// stored after the shuffle: (nb, b - a, L).
at::Tensor rows_view(const at::Tensor& t, const Geometry& g, const Piece& p, int64_t n0,
                     int64_t nb) {
  const int64_t L = g.L();
  return t.as_strided({nb, p.b - p.a, L}, {g.Cout * L, g.shuffle * L, 1},
                      t.storage_offset() + (n0 * g.Cout + g.pos(p.a)) * L);
}

int64_t chunk_of(int64_t per_sample_bytes, int64_t N) {
  return std::clamp<int64_t>(kColBudget / std::max<int64_t>(per_sample_bytes, 1), 1,
                             std::max<int64_t>(N, 1));
}

// A per-channel vector (Cout) between conv channel order and stored order:
// stored position p = i * shuffle + j holds channel j * m + i (m = Cout /
// shuffle). shuffled: conv order -> stored; unshuffled: stored -> conv.
at::Tensor shuffled(const at::Tensor& v, const Geometry& g) {
  if (g.shuffle == 1) return v;
  return v.view({g.shuffle, g.Cout / g.shuffle}).t().reshape({g.Cout});
}

at::Tensor unshuffled(const at::Tensor& v, const Geometry& g) {
  if (g.shuffle == 1) return v;
  return v.view({g.Cout / g.shuffle, g.shuffle}).t().reshape({g.Cout});
}

// The weight gradient's accumulator: gw itself where it has the accumulate
// type, else a buffer of that type (copied into gw afterwards).
at::Tensor weight_acc(const at::Tensor& gw, at::ScalarType acc) {
  return gw.scalar_type() == acc ? gw : at::empty(gw.sizes(), gw.options().dtype(acc));
}

}  // namespace

at::Tensor forward(
    const at::Tensor& input_,
    const at::Tensor& weight_,
    const std::optional<at::Tensor>& bias_,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups,
    int64_t shuffle,
    const Launchers& launch) {
  check_tensors(input_, weight_);
  const Geometry g = geometry(input_, weight_, stride, padding, dilation, groups, shuffle);
  at::Tensor bias;
  if (bias_.has_value() && bias_->defined()) {
    bias = *bias_;
    check_same_device(bias, input_, kOp, "bias");
    check_same_dtype(bias, input_, kOp, "bias");
    TORCH_CHECK(
        bias.dim() == 1 && bias.size(0) == g.Cout, kOp, ": given weight of size ",
        weight_.sizes(), ", expected bias to be 1-dimensional with ", g.Cout,
        " elements, but got bias of size ", bias.sizes(), " instead");
    bias = bias.contiguous();
  }
  const at::MemoryFormat fmt = kept_format(input_);
  const Path path = path_of(g, input_.scalar_type(), fmt, input_.is_cpu(), launch, false);
  if (path.platform) {
    return at::convolution(input_, weight_, bias, {g.sh, g.sw}, {g.pt, g.pl}, {g.dh, g.dw},
                           false, {0, 0}, g.groups).contiguous(fmt);
  }
  const at::MemoryFormat kfmt = kernel_format(path);
  const at::Tensor input = input_.contiguous(kfmt);
  const at::Tensor weight = weight_.contiguous();
  at::Tensor out = at::empty({g.N, g.Cout, g.OH, g.OW}, input.options().memory_format(kfmt));
  if (out.numel() == 0) return out.contiguous(fmt);

  if (path.direct) {
    DirectParams p;
    p.x = input;
    p.w = weight;
    p.bias = bias;
    p.out = out;
    p.g = g;
    (path.nhwc ? launch.nhwc_forward : launch.direct_forward)(p);
    return out.contiguous(fmt);
  }

  const int64_t Kg = g.cin_g() * g.kk(), L = g.L();
  const bool no_col = reads_input(g);
  const bool aug = bias.defined() && !no_col;
  const int64_t rowsg = Kg + (aug ? 1 : 0);
  at::Tensor w2 = weight.view({g.Cout, Kg});
  if (aug) w2 = at::cat({w2, bias.view({g.Cout, 1})}, 1);
  if (bias.defined() && no_col) {
    out.view({g.N, g.Cout, L}).copy_(shuffled(bias, g).view({1, g.Cout, 1}));
  }
  const std::vector<Piece> ps = pieces(g);
  const double beta = bias.defined() && no_col ? 1.0 : 0.0;

  at::Tensor col;
  int64_t nb = g.N;
  if (!no_col) {
    nb = chunk_of(g.groups * rowsg * L * input.element_size(), g.N);
    col = at::empty({nb, g.groups * rowsg, L}, input.options());
    if (aug) col.view({nb, g.groups, rowsg, L}).select(2, Kg).fill_(1);
  }
  const at::Tensor x3 = input.view({g.N, g.Cin, g.H * g.W});
  for (int64_t n0 = 0; n0 < g.N; n0 += nb) {
    const int64_t cnt = std::min(nb, g.N - n0);
    if (!no_col) {
      Im2colParams ip;
      ip.x = input.narrow(0, n0, cnt);
      ip.col = col;
      ip.nb = cnt;
      ip.ns = g.groups * rowsg * L;
      ip.rs = L;
      ip.extra = aug ? 1 : 0;
      ip.g = g;
      launch.im2col(ip);
    }
    for (const Piece& p : ps) {
      at::Tensor o = rows_view(out, g, p, n0, cnt);
      const at::Tensor c = no_col ? x3.narrow(0, n0, cnt).narrow(1, p.group * Kg, Kg)
                                  : col.narrow(0, 0, cnt).narrow(1, p.group * rowsg, rowsg);
      const at::Tensor w = w2.narrow(0, p.a, p.b - p.a).unsqueeze(0).expand(
          {cnt, p.b - p.a, rowsg});
      o.baddbmm_(w, c, beta, 1.0);
    }
  }
  return out.contiguous(fmt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out_,
    const at::Tensor& input_,
    const at::Tensor& weight_,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups,
    int64_t shuffle,
    std::array<bool, 3> mask,
    const Launchers& launch) {
  check_tensors(input_, weight_);
  const Geometry g = geometry(input_, weight_, stride, padding, dilation, groups, shuffle);
  check_same_device(grad_out_, input_, "conv2d_backward", "grad_out");
  check_same_dtype(grad_out_, input_, "conv2d_backward", "grad_out");
  TORCH_CHECK(
      grad_out_.dim() == 4 && grad_out_.size(0) == g.N && grad_out_.size(1) == g.Cout &&
          grad_out_.size(2) == g.OH && grad_out_.size(3) == g.OW,
      "conv2d_backward: expected grad_out of size [", g.N, ", ", g.Cout, ", ", g.OH, ", ",
      g.OW, "], but got ", grad_out_.sizes());
  const at::MemoryFormat fmt = kept_format(input_);
  const at::ScalarType acc = acc_type(input_);
  const at::Tensor gb =
      mask[2] ? unshuffled(grad_out_.sum({0, 2, 3}, false, acc), g).to(weight_.scalar_type())
              : at::empty({0}, weight_.options());
  // what is left to the kernels here
  std::array<bool, 2> ours{mask[0], mask[1]};
  at::Tensor gx, gw;
  const Path path = path_of(g, input_.scalar_type(), fmt, input_.is_cpu(), launch, true);
  if (path.platform && (mask[0] || mask[1])) {
    // torch's convolution_backward, except the weight gradients the launchers
    // keep (path.own_dw)
    const bool own_dw = mask[1] && path.own_dw;
    if (mask[0] || !own_dw) {
      auto [tx, tw, tb] = at::convolution_backward(
          grad_out_, input_, weight_, std::nullopt, {g.sh, g.sw}, {g.pt, g.pl},
          {g.dh, g.dw}, false, {0, 0}, g.groups, {mask[0], mask[1] && !own_dw, false});
      if (mask[0]) gx = tx.contiguous(fmt);
      if (mask[1] && !own_dw) gw = tw.contiguous();
    }
    ours = {false, own_dw};
  }
  const at::MemoryFormat kfmt = kernel_format(path);
  if (!gx.defined()) {
    gx = ours[0] ? at::empty(input_.sizes(), input_.options().memory_format(kfmt))
                 : at::empty({0}, input_.options());
  }
  if (!gw.defined()) {
    gw = ours[1] ? at::empty(weight_.sizes(), weight_.options())
                 : at::empty({0}, weight_.options());
  }
  // (OH, OW >= 1: geometry() checks the kernel fits; with Cin == 0, gx and gw
  // have no elements)
  if (g.N == 0 || g.Cout == 0) {
    if (ours[0]) gx.zero_();
    if (ours[1]) gw.zero_();
  }
  if (g.N == 0 || g.Cout == 0 || g.Cin == 0 || !(ours[0] || ours[1])) {
    return in_layout(gx, gw, gb, fmt);
  }
  // the kernels' operands (copies only where the layout differs)
  const at::Tensor input = input_.contiguous(kfmt);
  const at::Tensor weight = weight_.contiguous();
  const at::Tensor dy = grad_out_.contiguous(kfmt);

  if (path.direct) {
    DirectParams p;
    p.x = input;
    p.w = weight;
    p.dy = dy;
    p.g = g;
    if (ours[0]) {
      p.dx = gx;
      (path.nhwc ? launch.nhwc_dinput : launch.direct_dinput)(p);
    }
    if (ours[1]) {
      p.dw = weight_acc(gw, acc);
      (path.nhwc ? launch.nhwc_dweight : launch.direct_dweight)(p);
      if (!p.dw.is_same(gw)) gw.copy_(p.dw);
    }
    return in_layout(gx, gw, gb, fmt);
  }

  const int64_t Kg = g.cin_g() * g.kk(), L = g.L();
  const bool no_col = reads_input(g);
  const std::vector<Piece> ps = pieces(g);
  const at::Tensor w2 = weight.view({g.Cout, Kg});

  if (ours[0]) {
    const int64_t nb =
        no_col ? g.N : chunk_of(g.Cin * g.kk() * L * input.element_size(), g.N);
    at::Tensor dcol =
        no_col ? gx.view({g.N, g.Cin, L}) : at::empty({nb, g.Cin * g.kk(), L}, input.options());
    for (int64_t n0 = 0; n0 < g.N; n0 += nb) {
      const int64_t cnt = std::min(nb, g.N - n0);
      int64_t last_group = -1;
      for (const Piece& p : ps) {
        at::Tensor dc = (no_col ? dcol.narrow(0, n0, cnt) : dcol.narrow(0, 0, cnt))
                            .narrow(1, p.group * Kg, Kg);
        const at::Tensor wt = w2.narrow(0, p.a, p.b - p.a).t().unsqueeze(0).expand(
            {cnt, Kg, p.b - p.a});
        const double beta = p.group == last_group ? 1.0 : 0.0;
        dc.baddbmm_(wt, rows_view(dy, g, p, n0, cnt), beta, 1.0);
        last_group = p.group;
      }
      if (!no_col) {
        Col2imParams cp;
        cp.col = dcol;
        cp.dx = gx.narrow(0, n0, cnt);
        cp.nb = cnt;
        cp.g = g;
        launch.col2im(cp);
      }
    }
  }

  if (ours[1]) {
    const at::Tensor dwt = weight_acc(gw, acc);
    at::Tensor dw = dwt.view({g.Cout, Kg}).zero_();
    const int64_t per_sample = (g.Cin * g.kk() + g.Cout) * L * at::elementSize(acc);
    const int64_t nb = chunk_of(per_sample, g.N);
    at::Tensor col = at::empty({g.Cin * g.kk(), nb, L}, input.options().dtype(acc));
    at::Tensor dyb = at::empty({g.Cout, nb, L}, input.options().dtype(acc));
    for (int64_t n0 = 0; n0 < g.N; n0 += nb) {
      const int64_t cnt = std::min(nb, g.N - n0);
      // col rows r at r * (cnt L) + n * L: (Kg rows, cnt L columns) per group
      at::Tensor colc = col.view({-1}).narrow(0, 0, g.Cin * g.kk() * cnt * L);
      Im2colParams ip;
      ip.x = input.narrow(0, n0, cnt);
      ip.col = colc;
      ip.nb = cnt;
      ip.ns = L;
      ip.rs = cnt * L;
      ip.g = g;
      launch.im2col(ip);
      at::Tensor dyc = dyb.view({-1}).narrow(0, 0, g.Cout * cnt * L).view({g.Cout, cnt, L});
      for (const Piece& p : ps) {
        dyc.narrow(0, p.a, p.b - p.a).copy_(rows_view(dy, g, p, n0, cnt).transpose(0, 1));
      }
      const at::Tensor col2 = colc.view({g.Cin * g.kk(), cnt * L});
      const at::Tensor dy2 = dyc.view({g.Cout, cnt * L});
      for (int64_t gi = 0; gi < g.groups; ++gi) {
        const int64_t K = g.cout_g();
        dw.narrow(0, gi * K, K).addmm_(
            dy2.narrow(0, gi * K, K), col2.narrow(0, gi * Kg, Kg).t(), 1.0, 1.0);
      }
    }
    if (!dwt.is_same(gw)) gw.copy_(dwt);
  }
  return in_layout(gx, gw, gb, fmt);
}

}  // namespace torchfuse::conv
