// Gram matrices and the style loss: argument checks, operand views, the
// GEMMs and allocation, shared by the CPU (gram_cpu.cpp) and CUDA
// (gram_cuda.cu) kernels. Formulas: gram.h.
//
// With F = input.reshape(N, C, L) and s = 1 / (C L) (normalize) or 1:
//   gram_matrix        G = s F F^T: one GEMM (at::baddbmm: the platform BLAS
//                      / cuBLAS) with s as its alpha, so the raw products
//                      (up to L times larger) are never rounded to float16.
//   its backward       dF = s (dG + dG^T) F: the symmetrizing pass (sym),
//                      then one GEMM; autograd's bmm backward runs two GEMMs
//                      (dG F and F^T dG) and adds a transposed copy.
//   style_loss         G as above, then one pass (loss) for d = G - T, its
//                      squares and their sum; d is saved (N C C values, in
//                      the accumulate type) for the backward.
//   its backward       w = g d (g: grad_loss), dF = s k (w + w^T) F with k
//                      = 2 / (N C C) for mean, 2 otherwise: sym, then one
//                      GEMM with s k as alpha (the small factors never
//                      underflow float16 on the way); dtarget = -k w.
// Layouts: F is a view of the input, never a copy, when the input is
// contiguous or channels-last-like (channels innermost: then F^T = (N, L, C)
// is contiguous and the GEMMs take it transposed); dF comes back in the same
// layout. The symmetric G is computed in full (one GEMM call; the upper
// triangle alone would need several smaller ones).
#include "gram.h"

#include "../common/checks.h"

#include <ATen/Functions.h>

#include <limits>
#include <vector>

namespace torchfuse::gram {

namespace {

// The input as GEMM operands: f (N, C, L) and ft (N, L, C), views of one
// buffer; cl: the buffer is (N, L, C) contiguous (channels innermost).
struct Operand {
  at::Tensor f, ft;
  bool cl = false;
  int64_t N = 0, C = 0, L = 0;
  std::vector<int64_t> moved_shape;  // (N, *spatial, C) when cl
};

void check_input(const at::Tensor& input, const char* op) {
  check_floating(input, op, "input");
  TORCH_CHECK(
      input.dim() >= 2, op, ": expected input of shape (N, C, *) with at least 2 dimensions, "
      "but got input of shape ", input.sizes());
}

Operand operand(const at::Tensor& input) {
  Operand o;
  o.N = input.size(0);
  o.C = input.size(1);
  o.L = prod(input.sizes().slice(2));
  if (!input.is_contiguous() && input.dim() >= 3) {
    const at::Tensor moved = input.movedim(1, -1);
    if (moved.is_contiguous()) {
      o.cl = true;
      o.moved_shape = moved.sizes().vec();
      o.ft = moved.view({o.N, o.L, o.C});
      o.f = o.ft.transpose(1, 2);
      return o;
    }
  }
  o.f = input.contiguous().view({o.N, o.C, o.L});
  o.ft = o.f.transpose(1, 2);
  return o;
}

double scale_of(const Operand& o, bool normalize) {
  if (!normalize) return 1.0;
  // C L == 0: 1 / 0 = inf; callers handle the empty cases before using it
  return 1.0 / (static_cast<double>(o.C) * static_cast<double>(o.L));
}

// G = s F F^T (N, C, C) in the input's dtype.
at::Tensor gram_of(const Operand& o, double s) {
  at::Tensor g = at::empty({o.N, o.C, o.C}, o.f.options());
  if (g.numel() == 0) return g;
  if (o.L == 0) {
    // (F F^T) / (C L) = 0 / 0 with normalize, as the reference computes it
    g.fill_(s == 1.0 ? 0.0 : std::numeric_limits<double>::quiet_NaN());
    return g;
  }
  g.baddbmm_(o.f, o.ft, /*beta=*/0, /*alpha=*/s);  // beta = 0: g's contents ignored
  return g;
}

// dF = alpha S F for symmetric S (N, C, C), in the input's shape and layout.
at::Tensor grad_of(const at::Tensor& input, const Operand& o, const at::Tensor& S, double alpha) {
  if (o.cl) {
    at::Tensor dft = at::empty({o.N, o.L, o.C}, o.f.options());
    if (dft.numel() > 0) dft.baddbmm_(o.ft, S, 0, alpha);  // (S F)^T = F^T S
    return dft.view(o.moved_shape).movedim(-1, 1);
  }
  at::Tensor df = at::empty({o.N, o.C, o.L}, o.f.options());
  if (df.numel() > 0) df.baddbmm_(S, o.f, 0, alpha);
  return df.view(input.sizes());
}

Reduction parse_reduction(c10::string_view r, const char* op) {
  const std::string_view v(r.data(), r.size());
  if (v == "mean") return Reduction::Mean;
  if (v == "sum") return Reduction::Sum;
  if (v == "none") return Reduction::None;
  TORCH_CHECK_VALUE(
      false, op, ": ", v, " is not a valid value for reduction (expected 'mean', 'sum' or "
      "'none')");
}

void check_gram_shaped(const at::Tensor& t, const Operand& o, const char* op, const char* arg) {
  TORCH_CHECK(
      t.dim() == 3 && t.size(0) == o.N && t.size(1) == o.C && t.size(2) == o.C, op,
      ": expected ", arg, " of shape [", o.N, ", ", o.C, ", ", o.C, "], but got ", t.sizes());
}

}  // namespace

at::Tensor gram_forward(const at::Tensor& input, bool normalize, const Launchers& launch) {
  (void)launch;  // the forward is one GEMM; the launchers serve the other entries
  check_input(input, "gram_matrix");
  const Operand o = operand(input);
  return gram_of(o, scale_of(o, normalize));
}

at::Tensor gram_backward(
    const at::Tensor& grad_out,
    const at::Tensor& input,
    bool normalize,
    const Launchers& launch) {
  const char* op = "gram_matrix_backward";
  check_input(input, op);
  const Operand o = operand(input);
  check_same_device(grad_out, input, op, "grad_out");
  check_same_dtype(grad_out, input, op, "grad_out");
  check_gram_shaped(grad_out, o, op, "grad_out");
  at::Tensor S = at::empty({o.N, o.C, o.C}, input.options());
  if (S.numel() > 0 && o.L > 0) {
    SymParams p;
    p.a = grad_out.contiguous();
    p.s = S;
    p.N = o.N;
    p.C = o.C;
    launch.sym(p);
  }
  return grad_of(input, o, S, scale_of(o, normalize));
}

std::tuple<at::Tensor, at::Tensor> loss_forward(
    const at::Tensor& input,
    const at::Tensor& target_gram,
    c10::string_view reduction,
    const Launchers& launch) {
  const char* op = "style_loss";
  check_input(input, op);
  check_floating(target_gram, op, "target_gram");
  check_same_device(target_gram, input, op, "target_gram");
  const Reduction red = parse_reduction(reduction, op);
  const Operand o = operand(input);
  const bool batched = target_gram.dim() == 3 && target_gram.size(0) != 1;
  TORCH_CHECK(
      (target_gram.dim() == 2 || target_gram.dim() == 3) &&
          target_gram.size(-1) == o.C && target_gram.size(-2) == o.C &&
          (!batched || target_gram.size(0) == o.N),
      op, ": expected target_gram of shape [C, C] or [N, C, C] with N = ", o.N, " and C = ", o.C,
      " (the Gram matrices of input of shape ", input.sizes(), "), but got ",
      target_gram.sizes());
  const auto acc = input.options().dtype(acc_type(input));
  const at::Tensor G = gram_of(o, scale_of(o, /*normalize=*/true));
  LossParams p;
  p.gram = G;
  p.target = target_gram.to(acc_type(input)).contiguous();
  p.t_batched = batched;
  p.d = at::empty({o.N, o.C, o.C}, acc);
  p.out = red == Reduction::None ? at::empty({o.N, o.C, o.C}, input.options())
                                 : at::empty({}, acc);
  p.N = o.N;
  p.C = o.C;
  p.reduction = red;
  if (o.N * o.C == 0) {  // torch's mse_loss: the mean of nothing is NaN, the sum 0
    if (red != Reduction::None) {
      p.out.fill_(red == Reduction::Mean ? std::numeric_limits<double>::quiet_NaN() : 0.0);
    }
    return {p.out, p.d};
  }
  launch.loss(p);
  return {p.out, p.d};
}

std::tuple<at::Tensor, at::Tensor> loss_backward(
    const at::Tensor& grad_loss,
    const at::Tensor& input,
    const at::Tensor& diff,
    c10::string_view reduction,
    bool input_grad,
    bool target_grad,
    const Launchers& launch) {
  const char* op = "style_loss_backward";
  check_input(input, op);
  const Reduction red = parse_reduction(reduction, op);
  const Operand o = operand(input);
  const auto acc = input.options().dtype(acc_type(input));
  check_same_device(diff, input, op, "diff");
  check_gram_shaped(diff, o, op, "diff");
  TORCH_CHECK(
      diff.scalar_type() == acc_type(input), op, ": expected diff of dtype ", acc_type(input),
      ", but got ", diff.scalar_type());
  check_same_device(grad_loss, input, op, "grad_loss");
  check_floating(grad_loss, op, "grad_loss");
  if (red == Reduction::None) {
    check_gram_shaped(grad_loss, o, op, "grad_loss");
  } else {
    TORCH_CHECK(
        grad_loss.dim() == 0, op, ": expected a 0-dim grad_loss for reduction='",
        std::string_view(reduction.data(), reduction.size()), "', but got shape ",
        grad_loss.sizes());
  }
  const double nc2 = static_cast<double>(o.N) * static_cast<double>(o.C) *
      static_cast<double>(o.C);
  const double k = red == Reduction::Mean ? 2.0 / nc2 : 2.0;
  SymParams p;
  p.a = diff.contiguous();
  p.g = grad_loss.to(acc_type(input)).contiguous();
  p.N = o.N;
  p.C = o.C;
  p.coef = k;
  // s is written whether or not input_grad (N C C values: no cost worth a
  // second kernel variant)
  p.s = at::empty({o.N, o.C, o.C}, input.options());
  if (target_grad) p.dtarget = at::empty({o.N, o.C, o.C}, acc);
  if (o.N * o.C > 0 && (input_grad || target_grad)) launch.sym(p);
  at::Tensor gx = at::empty({0}, input.options());
  if (input_grad) {
    // L == 0: an empty dF (grad_of runs no GEMM), whatever alpha
    gx = grad_of(input, o, p.s, k / (static_cast<double>(o.C) * static_cast<double>(o.L)));
  }
  at::Tensor gt = target_grad ? p.dtarget : at::empty({0}, acc);
  return {gx, gt};
}

}  // namespace torchfuse::gram
