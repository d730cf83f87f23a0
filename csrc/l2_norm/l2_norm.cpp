// L2 normalization and cosine_linear: argument checks, memory layout,
// allocation, shared by the CPU (l2_norm_cpu.cpp) and CUDA (l2_norm_cuda.cu)
// kernels. Formulas: l2_norm.h.
//
// l2_norm never copies a contiguous or dim-last (e.g. channels_last with
// dim=1) input: both are viewed as a contiguous (outer, C, inner) tensor, and
// the output is allocated in the input's memory format.
//
// cosine_linear computes the row norms of input and weight in fused kernels,
// runs the GEMM on the raw operands (at::mm: the platform BLAS / cuBLAS) and
// applies 1/|x_i| * 1/|w_j| (+ bias) in an epilogue pass over the GEMM's
// output: no normalized copy of input or weight is materialised. The
// backward scales grad_out the same way (H = dy / (|x_i| |w_j|)), runs two
// GEMMs (P = H w, Q = H^T x) and finishes each gradient with one fused row
// pass: dx_i = P_i - x_i (x_i . P_i) / |x_i|^2 (likewise dw).
//
// float16 runs all of this on float32 copies: raw dot products overflow its
// range (65504) as soon as |x_i| |w_j| does, e.g. 512 features of 16 each
// (out = inf where the cosine is 1), and H underflows when the norms are
// large. bfloat16 has float32's range and runs as is.
#include "l2_norm.h"

#include "../common/checks.h"

#include <ATen/Functions.h>

#include <vector>

namespace torchfuse::l2_norm {

namespace {

at::Tensor acc_tensor(const std::optional<at::Tensor>& t, const at::Tensor& input) {
  if (!t.has_value() || !t->defined()) return {};
  return t->to(acc_type(input)).contiguous().view({-1});
}

bool has(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined();
}

// How the input is walked: a contiguous (outer, C, inner) working tensor.
struct View {
  int64_t d = 0;          // wrapped dim
  bool scalar = false;    // 0-dim input, seen as one element
  bool moved = false;     // working tensor = input.movedim(d, -1)
  int64_t outer = 0, C = 0, inner = 0;
  std::vector<int64_t> stat_shape;  // input's shape without dim d

  // The working (contiguous) form of a tensor shaped like the input.
  at::Tensor work(const at::Tensor& t) const {
    if (scalar) return t.reshape({1});
    if (moved) return t.movedim(d, -1).contiguous();
    return t.contiguous();
  }
  // A fresh working-form output, returned to the input's shape and layout.
  at::Tensor result(const at::Tensor& out_work) const {
    if (scalar) return out_work.view(at::IntArrayRef{});
    if (moved) return out_work.movedim(-1, d);
    return out_work;
  }
};

View make_view(const at::Tensor& input, int64_t dim) {
  View v;
  const int64_t nd = input.dim();
  const int64_t n = nd > 0 ? nd : 1;  // a 0-dim input takes dim 0 or -1
  TORCH_CHECK_INDEX(  // IndexError, as torch
      dim >= -n && dim < n, "Dimension out of range: dim=", dim, " (expected to be in range of [",
      -n, ", ", n - 1, "] for input of ", nd, " dimensions)");
  v.d = dim < 0 ? dim + n : dim;
  if (nd == 0) {
    v.scalar = true;
    v.outer = v.C = v.inner = 1;
    return v;
  }
  const auto sizes = input.sizes();
  v.C = sizes[v.d];
  v.outer = prod(sizes.slice(0, v.d));
  v.inner = prod(sizes.slice(v.d + 1));
  for (int64_t k = 0; k < nd; ++k) {
    if (k != v.d) v.stat_shape.push_back(sizes[k]);
  }
  if (!input.is_contiguous() && v.d != nd - 1 &&
      input.movedim(v.d, -1).is_contiguous()) {
    v.moved = true;  // e.g. channels_last with dim=1: C is innermost
    v.outer = prod(v.stat_shape);
    v.inner = 1;
  }
  return v;
}

void check_weight(
    const char* op,
    const std::optional<at::Tensor>& weight,
    const at::Tensor& input,
    int64_t C) {
  if (!has(weight)) return;
  check_floating(*weight, op, "weight");
  TORCH_CHECK(
      weight->dim() == 1 && weight->size(0) == C, op,
      ": expected weight of shape [", C, "] (input.size(dim)), but got weight of shape ",
      weight->sizes());
  check_same_device(*weight, input, op, "weight");
}

void check_stat(
    const char* op,
    const at::Tensor& stat,
    const at::Tensor& input,
    at::IntArrayRef shape,
    const char* arg) {
  check_same_device(stat, input, op, arg);
  TORCH_CHECK(
      stat.scalar_type() == acc_type(input), op, ": expected ", arg, " of dtype ",
      acc_type(input), ", but got ", stat.scalar_type());
  TORCH_CHECK(
      stat.sizes().equals(shape), op, ": expected ", arg, " of shape ", shape,
      ", but got ", stat.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> forward(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    int64_t dim,
    double eps,
    const Launchers& launch) {
  const char* op = "l2_norm";
  check_floating(input, op, "input");
  const View v = make_view(input, dim);
  check_weight(op, weight, input, v.C);
  FwdParams p;
  p.x = v.work(input);
  p.weight = acc_tensor(weight, input);
  p.out = at::empty(p.x.sizes(), input.options());
  p.norm = at::empty(v.stat_shape, input.options().dtype(acc_type(input)));
  p.outer = v.outer;
  p.C = v.C;
  p.inner = v.inner;
  p.eps = eps;
  if (p.x.numel() > 0) {
    launch.fwd(p);
  } else {
    p.norm.zero_();  // the norm over no elements
  }
  return {v.result(p.out), p.norm};
}

std::tuple<at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out,
    const at::Tensor& input,
    const at::Tensor& norm,
    const std::optional<at::Tensor>& weight,
    int64_t dim,
    double eps,
    bool weight_grad,
    const Launchers& launch) {
  const char* op = "l2_norm_backward";
  check_floating(input, op, "input");
  const View v = make_view(input, dim);
  check_weight(op, weight, input, v.C);
  check_same_device(grad_out, input, op, "grad_out");
  check_same_dtype(grad_out, input, op, "grad_out");
  check_same_shape(grad_out, input, op, "grad_out");
  check_stat(op, norm, input, v.stat_shape, "norm");
  TORCH_CHECK(!weight_grad || has(weight), op, ": weight_grad=True needs a weight");
  BwdParams p;
  p.dy = v.work(grad_out);
  p.x = v.work(input);
  p.norm = norm.contiguous();
  p.weight = acc_tensor(weight, input);
  p.dx = at::empty(p.x.sizes(), input.options());
  p.outer = v.outer;
  p.C = v.C;
  p.inner = v.inner;
  p.eps = eps;
  if (weight_grad) p.dweight = at::empty({v.C}, input.options().dtype(acc_type(input)));
  if (p.x.numel() > 0) {
    launch.bwd(p);
  } else if (weight_grad) {
    p.dweight.zero_();
  }
  at::Tensor grad_weight = weight_grad ? p.dweight.to(weight->scalar_type())
                                       : at::empty({0}, input.options());
  return {v.result(p.dx), grad_weight};
}

namespace {

struct CosDims {
  int64_t M, K, O;
  std::vector<int64_t> lead;  // input.shape[:-1]
};

CosDims check_cosine(
    const char* op,
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias) {
  check_floating(input, op, "input");
  check_floating(weight, op, "weight");
  TORCH_CHECK(
      input.dim() >= 1, op, ": expected input of at least 1 dimension, but got a 0-dim tensor");
  TORCH_CHECK(
      weight.dim() == 2, op, ": expected weight of shape (out_features, in_features), but got ",
      weight.sizes());
  TORCH_CHECK(
      input.size(-1) == weight.size(1), op, ": input.size(-1) (", input.size(-1),
      ") must equal weight.size(1) (", weight.size(1), "); input of shape ", input.sizes(),
      ", weight of shape ", weight.sizes());
  check_same_device(weight, input, op, "weight");
  check_same_dtype(weight, input, op, "weight");
  if (has(bias)) {
    TORCH_CHECK(
        bias->dim() == 1 && bias->size(0) == weight.size(0), op,
        ": expected bias of shape [", weight.size(0), "], but got ", bias->sizes());
    check_same_device(*bias, input, op, "bias");
    check_same_dtype(*bias, input, op, "bias");
  }
  CosDims d;
  d.K = input.size(-1);
  d.O = weight.size(0);
  d.lead = input.sizes().slice(0, input.dim() - 1).vec();
  d.M = prod(d.lead);
  return d;
}

// Row norms of a contiguous (rows, K) tensor into norm (rows).
void row_norms(const at::Tensor& x, const at::Tensor& norm, const Launchers& launch) {
  if (x.size(0) == 0) return;
  if (x.size(1) == 0) {
    norm.zero_();
    return;
  }
  FwdParams p;
  p.x = x;
  p.norm = norm;
  p.outer = x.size(0);
  p.C = x.size(1);
  p.inner = 1;
  launch.fwd(p);
}

// dx = dy - x (x . dy) / |x|^2 per row (prescaled backward), for (rows, K).
at::Tensor row_backward(
    const at::Tensor& dy,
    const at::Tensor& x,
    const at::Tensor& norm,
    double eps,
    const Launchers& launch) {
  at::Tensor dx = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return dx;
  BwdParams p;
  p.dy = dy.contiguous();
  p.x = x;
  p.norm = norm;
  p.dx = dx;
  p.outer = x.size(0);
  p.C = x.size(1);
  p.inner = 1;
  p.eps = eps;
  p.prescaled = true;
  launch.bwd(p);
  return dx;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> cosine_forward(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    double eps,
    const Launchers& launch) {
  const CosDims d = check_cosine("cosine_linear", input, weight, bias);
  if (input.scalar_type() == at::kHalf) {
    std::optional<at::Tensor> bias32;
    if (bias.has_value() && bias->defined()) bias32 = bias->to(at::kFloat);
    auto [out, nx, nw] = cosine_forward(input.to(at::kFloat), weight.to(at::kFloat), bias32,
                                        eps, launch);
    return {out.to(at::kHalf), nx, nw};
  }
  const at::Tensor x = input.reshape({d.M, d.K}).contiguous();
  const at::Tensor w = weight.contiguous();
  const auto acc = input.options().dtype(acc_type(input));
  at::Tensor nx = at::empty({d.M}, acc);
  at::Tensor nw = at::empty({d.O}, acc);
  row_norms(x, nx, launch);
  row_norms(w, nw, launch);
  // raw dot products, (M, O); the epilogue indexes it row-major (mm returns
  // it so today; contiguous() keeps that true, at no cost when it is)
  at::Tensor out = at::mm(x, w.t()).contiguous();
  if (out.numel() > 0) {
    ScaleParams s;
    s.src = out;
    s.dst = out;  // the epilogue runs in place on the GEMM's output
    s.nrow = nx;
    s.ncol = nw;
    s.bias = acc_tensor(bias, input);
    s.M = d.M;
    s.O = d.O;
    s.eps = eps;
    launch.scale(s);
  }
  std::vector<int64_t> out_shape = d.lead;
  out_shape.push_back(d.O);
  return {out.view(out_shape), nx.view(d.lead), nw};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cosine_backward(
    const at::Tensor& grad_out,
    const at::Tensor& input,
    const at::Tensor& weight,
    const at::Tensor& input_norm,
    const at::Tensor& weight_norm,
    double eps,
    bool bias_grad,
    const Launchers& launch) {
  const char* op = "cosine_linear_backward";
  const CosDims d = check_cosine(op, input, weight, std::nullopt);
  std::vector<int64_t> out_shape = d.lead;
  out_shape.push_back(d.O);
  check_same_device(grad_out, input, op, "grad_out");
  check_same_dtype(grad_out, input, op, "grad_out");
  TORCH_CHECK(
      grad_out.sizes().equals(out_shape), op, ": expected grad_out of shape ",
      at::IntArrayRef(out_shape), ", but got ", grad_out.sizes());
  check_stat(op, input_norm, input, d.lead, "input_norm");
  check_stat(op, weight_norm, input, {d.O}, "weight_norm");
  if (input.scalar_type() == at::kHalf) {  // see the top of this file
    auto [gx, gw, gb] = cosine_backward(grad_out.to(at::kFloat), input.to(at::kFloat),
                                        weight.to(at::kFloat), input_norm, weight_norm, eps,
                                        bias_grad, launch);
    return {gx.to(at::kHalf), gw.to(at::kHalf), gb.to(at::kHalf)};
  }

  const at::Tensor x = input.reshape({d.M, d.K}).contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor g = grad_out.reshape({d.M, d.O}).contiguous();
  const at::Tensor nx = input_norm.reshape({d.M}).contiguous();
  const at::Tensor nw = weight_norm.contiguous();
  // H = dy / (max(|x_i|, eps) max(|w_j|, eps))
  at::Tensor h = at::empty({d.M, d.O}, input.options());
  if (h.numel() > 0) {
    ScaleParams s;
    s.src = g;
    s.dst = h;
    s.nrow = nx;
    s.ncol = nw;
    s.M = d.M;
    s.O = d.O;
    s.eps = eps;
    launch.scale(s);
  }
  const at::Tensor gx = row_backward(at::mm(h, w), x, nx, eps, launch);
  const at::Tensor gw = row_backward(at::mm(h.t(), x), w, nw, eps, launch);
  at::Tensor gb = bias_grad
      ? at::sum(g, {0}, false, acc_type(input)).to(input.scalar_type())
      : at::empty({0}, input.options());
  return {gx.view(input.sizes()), gw, gb};
}

}  // namespace torchfuse::l2_norm
