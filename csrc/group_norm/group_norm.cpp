// GroupNorm (+ fused activation): argument checks, layout, allocation and
// the small (N, C)-sized algebra, shared by the CPU (group_norm_cpu.cpp) and
// CUDA (group_norm_cuda.cu) kernels.
//
//   mean, var over each (n, group) of M = D * S elements (biased variance)
//   xhat = (x - mean) * rstd,  rstd = 1 / sqrt(var + eps)
//   y = xhat * weight[c] + bias[c],  out = act(y)   (act: none, relu, silu)
// Backward, with g = dout * act'(y) (y recomputed from x and the saved
// statistics, nothing else saved):
//   dbias[c]   = sum_{n,s} g          dweight[c] = sum_{n,s} g * xhat
//   dx = rstd * (w g - mean_group(w g) - xhat * mean_group(w g xhat))
//
// Numerics. Statistics come from per-chunk two-pass (centred) sums combined
// in float64, so large-mean / small-variance input is handled. The saved mean
// is the float32 rounding of the exact mean; when that rounding matters
// (|mean| * rstd > kMeanTol: the mean is many standard deviations from zero)
// the kernels also use its low part, recomputed in the backward by a
// reduction that skips every other group without reading it.
#include "group_norm.h"

#include "../common/checks.h"

#include <ATen/Functions.h>
#include <ATen/TensorOperators.h>

namespace torchfuse::group_norm {

namespace {

bool has(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined();
}

at::ScalarType acc_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Contiguous, or channels_last(_3d) when the input already is (and is not
// also contiguous, e.g. C == 1).
at::MemoryFormat layout_of(const at::Tensor& input) {
  if (input.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (input.dim() == 4 && input.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  if (input.dim() == 5 && input.is_contiguous(at::MemoryFormat::ChannelsLast3d)) {
    return at::MemoryFormat::ChannelsLast3d;
  }
  return at::MemoryFormat::Contiguous;
}

void check_param(
    const char* op,
    const char* arg,
    const std::optional<at::Tensor>& t,
    const at::Tensor& input,
    int64_t C) {
  if (!has(t)) return;
  check_floating(*t, op, arg);
  TORCH_CHECK(
      t->dim() == 1 && t->size(0) == C, op, ": Expected ", arg,
      " to be a vector of size equal to the number of channels in input, but "
      "got ", arg, " of shape ", t->sizes(), " and input of shape ",
      input.sizes());
  check_same_device(*t, input, op, arg);
  const auto it = input.scalar_type(), pt = t->scalar_type();
  const bool reduced = it == at::kHalf || it == at::kBFloat16;
  TORCH_CHECK(
      pt == it || (reduced && pt == at::kFloat), op, ": expected ", arg,
      " to have the dtype of input (", it,
      ") or float32 for float16/bfloat16 input, but got ", pt);
}

Geometry check_args(
    const char* op,
    const at::Tensor& input,
    int64_t num_groups,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias) {
  check_floating(input, op, "input");
  TORCH_CHECK(
      input.dim() >= 2, op,
      ": Expected at least 2 dimensions for input tensor but received ",
      input.dim());
  TORCH_CHECK(
      num_groups > 0, op, ": Expected num_groups to be greater than 0, got ",
      num_groups);
  Geometry g;
  g.N = input.size(0);
  g.C = input.size(1);
  g.S = prod(input.sizes().slice(2));
  g.G = num_groups;
  TORCH_CHECK(
      g.C % num_groups == 0, op,
      ": Expected number of channels in input to be divisible by num_groups, "
      "but got input of shape ", input.sizes(), " and num_groups=", num_groups);
  g.D = g.C / num_groups;
  // As torch: no channels or no spatial positions is an error even at N == 0.
  TORCH_CHECK(
      g.C > 0, op, ": Expected number of channels in input to be greater than 0, "
      "but got input of shape ", input.sizes());
  TORCH_CHECK(
      g.S > 0, op, ": Expected the spatial size of input (HxW) to be greater than "
      "0, but got input of shape ", input.sizes());
  check_param(op, "weight", weight, input, g.C);
  check_param(op, "bias", bias, input, g.C);
  g.cl = layout_of(input) != at::MemoryFormat::Contiguous;
  return g;
}

// (N, G) -> (N, C): each group's value repeated over its D channels.
at::Tensor per_channel(const at::Tensor& t, const Geometry& g) {
  return t.unsqueeze(2).expand({g.N, g.G, g.D}).reshape({g.N, g.C});
}

// (N, C) -> (N, G): summed over each group's channels (float64, fixed order).
at::Tensor group_sum(const at::Tensor& t, const Geometry& g) {
  return t.reshape({g.N, g.G, g.D}).sum(2);
}

// weight / bias as float64 (C,) rows broadcast over N, or the identity.
at::Tensor param64(
    const std::optional<at::Tensor>& t,
    const at::Tensor& input,
    double fill,
    int64_t C) {
  if (has(t)) return t->to(at::kDouble).reshape({1, C});
  return at::full({1, C}, fill, input.options().dtype(at::kDouble));
}

// weight / bias as a contiguous (C,) tensor of the accumulate type, or undefined.
at::Tensor acc_param(const std::optional<at::Tensor>& t, const at::Tensor& input) {
  return has(t) ? t->to(acc_type(input)).contiguous() : at::Tensor();
}

at::Tensor stack_params(at::TensorList ts, const at::Tensor& input) {
  return at::stack(ts).to(acc_type(input)).contiguous();
}

}  // namespace

Act parse_activation(std::string_view name, const char* op) {
  if (name == "none") return Act::kNone;
  if (name == "relu") return Act::kRelu;
  if (name == "silu") return Act::kSilu;
  TORCH_CHECK_VALUE(
      false, op, ": activation must be None, \"relu\" or \"silu\", but got \"",
      std::string(name), "\"");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& input,
    int64_t num_groups,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    double eps,
    std::string_view activation,
    const Launchers& launch) {
  const char* op = "group_norm";
  const Act act = parse_activation(activation, op);
  const Geometry g = check_args(op, input, num_groups, weight, bias);
  const at::MemoryFormat fmt = layout_of(input);
  const at::Tensor x = input.contiguous(fmt);
  at::Tensor out = at::empty(input.sizes(), input.options().memory_format(fmt));
  const auto stat_opts = input.options().dtype(acc_type(input));
  if (g.N * g.G == 0) {
    return {out, at::empty({g.N, g.G}, stat_opts), at::empty({g.N, g.G}, stat_opts)};
  }
  const int64_t M = g.D * g.S;  // > 0 (checked)

  const int64_t esize = static_cast<int64_t>(x.element_size());
  if (!g.cl && launch.fused_fwd != nullptr && M * esize <= launch.fused_bytes) {
    FusedParams fp;
    fp.x = x;
    fp.out = out;
    fp.weight = acc_param(weight, input);
    fp.bias = acc_param(bias, input);
    fp.mean = at::empty({g.N, g.G}, stat_opts);
    fp.rstd = at::empty({g.N, g.G}, stat_opts);
    fp.geo = g;
    fp.eps = eps;
    fp.act = act;
    launch.fused_fwd(fp);
    return {out, fp.mean, fp.rstd};
  }

  // Stage 1: per-chunk centred partial statistics.
  StatsParams sp;
  sp.x = x;
  sp.geo = g;
  at::Tensor cnt;  // elements per chunk, (K,) float64
  const auto f64 = input.options().dtype(at::kDouble);
  if (!g.cl) {
    sp.L = launch.stat_chunk;
    sp.K = (M + sp.L - 1) / sp.L;
    cnt = at::full({sp.K}, static_cast<double>(sp.L), f64);
    cnt.select(0, sp.K - 1).fill_(static_cast<double>(M - (sp.K - 1) * sp.L));
  } else {
    const int64_t width = launch.cl_per_group ? g.D : g.C;
    sp.R = std::max<int64_t>(1, launch.stat_chunk_cl / width);
    sp.K = (g.S + sp.R - 1) / sp.R;
    cnt = at::full({sp.K}, static_cast<double>(sp.R * g.D), f64);
    cnt.select(0, sp.K - 1).fill_(static_cast<double>((g.S - (sp.K - 1) * sp.R) * g.D));
  }
  sp.mean_k = at::empty({g.N, g.G, sp.K}, f64);
  sp.m2_k = at::empty({g.N, g.G, sp.K}, f64);
  launch.stats(sp);

  // Stage 2 (float64, fixed order): combine the chunks.
  const double Md = static_cast<double>(M);
  at::Tensor mean = (sp.mean_k * cnt).sum(2) / Md;
  at::Tensor m2 = (sp.m2_k + cnt * (sp.mean_k - mean.unsqueeze(2)).square()).sum(2);
  at::Tensor rstd = (m2 / Md + eps).rsqrt();
  const at::Tensor mean_hi = mean.to(acc_type(input));
  const at::Tensor mean_lo = mean - mean_hi.to(at::kDouble);

  // out = act((x - mean_hi) * a + sh), a = rstd * w, sh = b - mean_lo * a.
  const at::Tensor a = per_channel(rstd, g) * param64(weight, input, 1.0, g.C);
  const at::Tensor sh = param64(bias, input, 0.0, g.C) - per_channel(mean_lo, g) * a;
  PointwiseParams pp;
  pp.x = x;
  pp.out = out;
  pp.geo = g;
  pp.mode = Mode::kForward;
  pp.act = act;
  pp.params = stack_params({per_channel(mean_hi.to(at::kDouble), g), a, sh}, input);
  launch.pointwise(pp);
  return {out, mean_hi, rstd.to(acc_type(input))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out,
    const at::Tensor& input,
    const at::Tensor& mean,
    const at::Tensor& rstd,
    int64_t num_groups,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    std::string_view activation,
    bool weight_grad,
    bool bias_grad,
    const Launchers& launch) {
  const char* op = "group_norm_backward";
  const Act act = parse_activation(activation, op);
  const Geometry g = check_args(op, input, num_groups, weight, bias);
  check_same_device(grad_out, input, op, "grad_out");
  check_same_dtype(grad_out, input, op, "grad_out");
  check_same_shape(grad_out, input, op, "grad_out");
  for (const auto& [t, arg] : {std::pair{&mean, "mean"}, std::pair{&rstd, "rstd"}}) {
    check_same_device(*t, input, op, arg);
    TORCH_CHECK(
        t->scalar_type() == acc_type(input), op, ": expected ", arg,
        " of dtype ", acc_type(input), ", but got ", t->scalar_type());
    TORCH_CHECK(
        t->dim() == 2 && t->size(0) == g.N && t->size(1) == g.G, op,
        ": expected ", arg, " of shape [", g.N, ", ", g.G, "], but got ",
        t->sizes());
  }
  TORCH_CHECK(!weight_grad || has(weight), op, ": weight_grad=True needs a weight");
  TORCH_CHECK(!bias_grad || has(bias), op, ": bias_grad=True needs a bias");

  const at::MemoryFormat fmt = layout_of(input);
  const at::Tensor x = input.contiguous(fmt);
  const at::Tensor dy = grad_out.contiguous(fmt);
  at::Tensor dx = at::empty(input.sizes(), input.options().memory_format(fmt));
  const auto f64 = input.options().dtype(at::kDouble);
  auto finish = [&](const at::Tensor& dw, const at::Tensor& db) {
    // copy=true: dw and db may be views of one buffer; outputs must not alias.
    at::Tensor gw = weight_grad ? dw.to(weight->scalar_type(), false, true)
                                : at::empty({0}, input.options());
    at::Tensor gb = bias_grad ? db.to(bias->scalar_type(), false, true)
                              : at::empty({0}, input.options());
    return std::tuple<at::Tensor, at::Tensor, at::Tensor>{dx, gw, gb};
  };
  if (x.numel() == 0) {
    dx.zero_();
    return finish(at::zeros({g.C}, f64), at::zeros({g.C}, f64));
  }

  const int64_t esize = static_cast<int64_t>(x.element_size());
  if (!g.cl && launch.fused_bwd != nullptr && 2 * g.D * g.S * esize <= launch.fused_bytes) {
    FusedParams fp;
    fp.x = x;
    fp.dy = dy;
    fp.out = dx;
    fp.weight = acc_param(weight, input);
    fp.bias = acc_param(bias, input);
    fp.mean = mean.contiguous();
    fp.rstd = rstd.contiguous();
    fp.sums = at::empty({2, g.N, g.C}, input.options().dtype(acc_type(input)));
    fp.geo = g;
    fp.act = act;
    launch.fused_bwd(fp);
    const at::Tensor sums = fp.sums.to(at::kDouble).sum(1);  // fixed order over n
    return finish(sums[1], sums[0]);
  }

  ReduceParams rp;
  rp.x = x;
  rp.dy = dy;
  rp.geo = g;
  rp.act = act;
  rp.R = std::max<int64_t>(1, launch.reduce_chunk / (g.cl ? g.C : 1));
  rp.K = (g.S + rp.R - 1) / rp.R;
  const auto acc_opts = input.options().dtype(acc_type(input));

  const at::Tensor m64 = mean.to(at::kDouble);
  const at::Tensor r64 = rstd.to(at::kDouble);
  const at::Tensor mean_c = per_channel(m64, g);
  const at::Tensor rstd_c = per_channel(r64, g);
  const double Md = static_cast<double>(g.D * g.S);

  // The mean's low part, only for groups whose mean is far from zero in units
  // of the standard deviation (elsewhere the partials are zero and unread).
  at::Tensor off_c = at::zeros({g.N, g.C}, f64);
  if (acc_type(input) == at::kFloat) {
    const at::Tensor need = ((m64 * r64).abs() > kMeanTol).to(at::kDouble);
    rp.mode = Mode::kCorrect;
    rp.params = stack_params({mean_c, per_channel(need, g)}, input);
    rp.partial = at::empty({1, g.N, rp.K, g.C}, acc_opts);
    launch.reduce(rp);
    const at::Tensor lo = group_sum(rp.partial[0].to(at::kDouble).sum(1), g) / Md;
    off_c = -per_channel(lo * r64, g);
  }

  // Pass 1: per-channel sums of g and g * xhat.
  const at::Tensor w = param64(weight, input, 1.0, g.C);
  const at::Tensor b = param64(bias, input, 0.0, g.C);
  const at::Tensor a = rstd_c * w;
  const at::Tensor sh = off_c * w + b;
  rp.mode = Mode::kGrad;
  rp.params = stack_params({mean_c, a, sh, rstd_c, off_c}, input);
  rp.partial = at::empty({2, g.N, rp.K, g.C}, acc_opts);
  launch.reduce(rp);
  const at::Tensor sums = rp.partial.to(at::kDouble).sum(2);  // (2, N, C)
  const at::Tensor sg = sums[0], sgx = sums[1];

  // Pass 2: dx = k1 * g + k2 * (x - mean) + k3.
  const at::Tensor mg = per_channel(group_sum(sg * w, g) / Md, g);
  const at::Tensor mgx = per_channel(group_sum(sgx * w, g) / Md, g);
  const at::Tensor k1 = a;
  const at::Tensor k2 = -rstd_c * mgx * rstd_c;
  const at::Tensor k3 = -rstd_c * (mg + mgx * off_c);
  PointwiseParams pp;
  pp.x = x;
  pp.dy = dy;
  pp.out = dx;
  pp.geo = g;
  pp.mode = Mode::kBackward;
  pp.act = act;
  pp.params = stack_params({mean_c, a, sh, k1, k2, k3}, input);
  launch.pointwise(pp);
  return finish(sgx.sum(0), sg.sum(0));
}

}  // namespace torchfuse::group_norm
