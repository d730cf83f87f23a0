// Channel shuffle and cat + shuffle: argument checks (torch's messages and
// exception types), layout choice and allocation, shared by the CPU
// (channel_shuffle_cpu.cpp) and CUDA (channel_shuffle_cuda.cu) kernels.
#include "channel_shuffle.h"

#include "../common/checks.h"

#include <ATen/Functions.h>

namespace torchfuse::channel_shuffle {

namespace {

// The layout both sides of the op use: channels_last(_3d) when the input is
// laid out that way (no layout copy, output in the same format), contiguous
// otherwise (a non-dense input is copied once).
at::MemoryFormat layout_of(const at::Tensor& t) {
  const auto fmt = t.suggest_memory_format();
  if ((t.dim() == 4 && fmt == at::MemoryFormat::ChannelsLast) ||
      (t.dim() == 5 && fmt == at::MemoryFormat::ChannelsLast3d)) {
    return fmt;
  }
  return at::MemoryFormat::Contiguous;
}

bool is_channels_last(at::MemoryFormat fmt) {
  return fmt == at::MemoryFormat::ChannelsLast ||
      fmt == at::MemoryFormat::ChannelsLast3d;
}

void check_input(const at::Tensor& input, const char* arg) {
  TORCH_CHECK(
      input.dim() > 2, "channel_shuffle expects ", arg,
      " with > 2 dims, but got ", arg, " with sizes ", input.sizes());
}

void check_groups(int64_t C, int64_t groups) {
  TORCH_CHECK(
      groups > 0,
      "Number of groups to divide channels in must be positive. Value of "
      "groups:", groups);
  TORCH_CHECK(
      C % groups == 0, "Number of channels must be divisible by groups. Got ",
      C, " channels and ", groups, " groups.");
}

// Fills O and I from a tensor of the op's shape in layout `fmt`.
void set_dims(Params& p, const at::Tensor& like, at::MemoryFormat fmt) {
  const int64_t N = like.size(0);
  const int64_t S = prod(like.sizes().slice(2));
  if (is_channels_last(fmt)) {
    p.O = N * S;
    p.I = 1;
  } else {
    p.O = N;
    p.I = S;
  }
}

// The distance in elements between consecutive rows o of t viewed as
// (O, C_t, I) in layout fmt (see set_dims), or -1 where no such view with
// dense rows exists. Dims of size 1 place no constraint on their stride.
int64_t outer_stride(const at::Tensor& t, at::MemoryFormat fmt) {
  const int64_t dims = t.dim(), N = t.size(0), Ct = t.size(1);
  if (!is_channels_last(fmt)) {
    // rows are samples: channel planes dense, then channels dense
    int64_t expect = 1;
    for (int64_t d = dims - 1; d >= 1; --d) {
      if (t.size(d) != 1 && t.stride(d) != expect) return -1;
      expect *= t.size(d);
    }
    return N > 1 ? t.stride(0) : expect;
  }
  // rows are pixels (n, spatial...): channels dense (stride 1), pixels a
  // common stride P apart in order, samples S pixels apart
  if (Ct > 1 && t.stride(1) != 1) return -1;
  int64_t P = -1, S = 1;
  for (int64_t d = dims - 1; d >= 2; --d) {
    if (t.size(d) == 1) continue;
    if (P < 0) P = t.stride(d);
    if (t.stride(d) != P * S) return -1;
    S *= t.size(d);
  }
  if (P < 0) return N > 1 ? t.stride(0) : Ct;  // one pixel per sample
  if (N > 1 && t.stride(0) != P * S) return -1;
  return P;
}

// Appends t to p's pieces: where it lies when its rows are dense, else a
// dense copy in layout fmt.
void add_piece(Params& p, const at::Tensor& t, at::MemoryFormat fmt) {
  int64_t os = outer_stride(t, fmt);
  if (os < 0 || os < t.size(1) * p.I) {  // no view, or rows that overlap
    p.pieces.push_back(t.contiguous(fmt));
    os = outer_stride(p.pieces.back(), fmt);
  } else {
    p.pieces.push_back(t);
  }
  p.ostride.push_back(os);
}

bool empty_work(const Params& p) {
  return p.O == 0 || p.C == 0 || p.I == 0;
}

}  // namespace

at::Tensor shuffle_forward(const at::Tensor& input, int64_t groups, Launcher launch) {
  check_input(input, "input");
  const int64_t C = input.size(1);
  check_groups(C, groups);
  const auto fmt = layout_of(input);
  Params p;
  p.shuffled = at::empty(input.sizes(), input.options().memory_format(fmt));
  p.C = C;
  p.groups = groups;
  set_dims(p, input, fmt);
  if (empty_work(p)) return p.shuffled;
  if (groups == 1 || groups == C) {  // the identity permutation
    p.shuffled.copy_(input);
    return p.shuffled;
  }
  add_piece(p, input, fmt);
  launch(p);
  return p.shuffled;
}

at::Tensor cat_forward(at::TensorList tensors, int64_t groups, Launcher launch) {
  TORCH_CHECK_VALUE(
      !tensors.empty(), "cat_shuffle(): expected a non-empty list of tensors");
  const at::Tensor& first = tensors[0];
  check_input(first, "tensors[0]");
  // channels_last when every piece is laid out so (pieces dense in both
  // formats, e.g. of one channel, do not count against it; pieces of no
  // channels do not count) and one is not plain contiguous; else contiguous.
  const auto cl_fmt = first.dim() == 5 ? at::MemoryFormat::ChannelsLast3d
                                       : at::MemoryFormat::ChannelsLast;
  bool all_cl = first.dim() == 4 || first.dim() == 5;
  bool any_cl = false;
  int64_t C = 0;
  for (size_t k = 0; k < tensors.size(); ++k) {
    const at::Tensor& t = tensors[k];
    TORCH_CHECK(
        t.dim() == first.dim(),
        "cat_shuffle(): tensors must have the same number of dimensions: got ",
        first.dim(), " and ", t.dim(), " for tensors[", k, "]");
    for (int64_t d = 0; d < t.dim(); ++d) {
      TORCH_CHECK(
          d == 1 || t.size(d) == first.size(d),
          "cat_shuffle(): sizes of tensors must match except in dimension 1. "
          "Expected size ", first.size(d), " but got size ", t.size(d),
          " for tensors[", k, "] in dimension ", d);
    }
    TORCH_CHECK(
        t.device() == first.device(),
        "cat_shuffle(): expected all tensors on the same device, but got "
        "tensors[0] on ", first.device(), " and tensors[", k, "] on ",
        t.device());
    TORCH_CHECK(
        t.scalar_type() == first.scalar_type(),
        "cat_shuffle(): expected all tensors of the same dtype, but got "
        "tensors[0] of ", first.scalar_type(), " and tensors[", k, "] of ",
        t.scalar_type());
    C += t.size(1);
    if (t.size(1) == 0) continue;  // holds nothing: no vote
    const bool cl = is_channels_last(layout_of(t));
    all_cl = all_cl && (cl || t.is_contiguous(cl_fmt));
    any_cl = any_cl || cl;
  }
  check_groups(C, groups);
  const auto fmt = all_cl && any_cl ? cl_fmt : at::MemoryFormat::Contiguous;
  std::vector<int64_t> sizes = first.sizes().vec();
  sizes[1] = C;
  Params p;
  p.shuffled = at::empty(sizes, first.options().memory_format(fmt));
  p.C = C;
  p.groups = groups;
  set_dims(p, p.shuffled, fmt);
  if (empty_work(p)) return p.shuffled;
  for (const auto& t : tensors) {
    if (t.size(1) > 0) add_piece(p, t, fmt);
  }
  launch(p);
  return p.shuffled;
}

std::vector<at::Tensor> cat_backward(
    const at::Tensor& grad_out,
    at::IntArrayRef split_sizes,
    int64_t groups,
    Launcher launch) {
  check_input(grad_out, "grad_out");
  TORCH_CHECK_VALUE(
      !split_sizes.empty(),
      "cat_shuffle_backward(): split_sizes must not be empty");
  int64_t C = 0;
  for (auto s : split_sizes) {
    TORCH_CHECK(
        s >= 0, "cat_shuffle_backward(): split_sizes must be non-negative, "
        "got ", split_sizes);
    C += s;
  }
  TORCH_CHECK(
      C == grad_out.size(1), "cat_shuffle_backward(): split_sizes ",
      split_sizes, " must sum to the channels of grad_out (", grad_out.size(1),
      ")");
  check_groups(C, groups);
  const auto fmt = layout_of(grad_out);
  std::vector<at::Tensor> grads;
  Params p;
  for (auto s : split_sizes) {
    std::vector<int64_t> sizes = grad_out.sizes().vec();
    sizes[1] = s;
    grads.push_back(at::empty(sizes, grad_out.options().memory_format(fmt)));
  }
  p.shuffled = grad_out.contiguous(fmt);
  p.C = C;
  p.groups = groups;
  p.to_shuffled = false;
  set_dims(p, grad_out, fmt);
  for (const auto& t : grads) {
    if (t.size(1) > 0) add_piece(p, t, fmt);  // dense: where they lie
  }
  if (!empty_work(p)) launch(p);
  return grads;
}

}  // namespace torchfuse::channel_shuffle
