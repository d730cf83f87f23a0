// GroupNorm (+ fused activation): argument checks, layout, allocation and
// the order of the passes, shared by the CPU (group_norm_cpu.cpp) and CUDA
// (group_norm_cuda.cu) kernels; the (N, C)-sized algebra between the passes
// is group_norm_algebra.h, run by each device's launcher.
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
#include "../common/layout.h"

#include <ATen/DeviceGuard.h>
#include <ATen/Functions.h>
#include <ATen/TensorOperators.h>

#include <algorithm>
#include <type_traits>
#include <utility>

namespace torchfuse::group_norm {

namespace {

bool has(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined();
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
  g.cl = kept_format(input) != at::MemoryFormat::Contiguous;
  return g;
}

// weight / bias as a contiguous (C,) tensor of the accumulate type, or undefined.
at::Tensor acc_param(const std::optional<at::Tensor>& t, const at::Tensor& input) {
  return has(t) ? t->to(acc_type(input)).contiguous() : at::Tensor();
}

// ---------------------------------------------------------------- algebra
// Between the streaming passes: combining the partial statistics, the
// per-channel coefficients and the parameter gradients, on (N, G) or
// (N, C)-sized data, in float64 (group_norm_algebra.h), each step run by the
// device's `algebra` launcher: host loops on CPU, one small kernel per step
// on CUDA (the forward needs one, the backward five: float32 statistics on
// CUDA always take the kCorrect pass, as deciding on the host would need a
// device sync). Earlier versions did this with ATen ops: about 90
// dispatcher calls per forward (torch.profiler, 2x1280x16x16 channels_last
// float32 on CPU: 117 of the op's 351 us), each a kernel launch on CUDA.

template <typename A>
void run_alg(const Launchers& L, AlgStep s, const AlgView<A>& v) {
  if constexpr (std::is_same_v<A, double>) {
    L.algebra64(s, v);
  } else {
    L.algebra(s, v);
  }
}

template <typename A>
const A* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<A>() : nullptr;
}

template <typename A>
AlgView<A> alg_view(const Geometry& g, const at::Tensor& weight, const at::Tensor& bias) {
  AlgView<A> v;
  v.N = g.N;
  v.C = g.C;
  v.G = g.G;
  v.D = g.D;
  v.Md = static_cast<double>(g.D * g.S);
  v.w = ptr_or_null<A>(weight);
  v.b = ptr_or_null<A>(bias);
  return v;
}

struct Coefs {
  at::Tensor params, mean, rstd;  // (3, N, C), (N, G), (N, G): accumulate type
};

// The forward's coefficients from the chunk statistics (chunks of `full`
// elements, the last of `last`).
template <typename A>
Coefs fwd_coefs(
    const StatsParams& sp, double full, double last, double eps, const at::Tensor& weight,
    const at::Tensor& bias, const Launchers& L) {
  const Geometry& g = sp.geo;
  const auto opts = sp.x.options().dtype(c10::CppTypeToScalarType<A>::value);
  Coefs cf{at::empty({3, g.N, g.C}, opts), at::empty({g.N, g.G}, opts),
           at::empty({g.N, g.G}, opts)};
  AlgView<A> v = alg_view<A>(g, weight, bias);
  v.K = sp.K;
  v.eps = eps;
  v.full = full;
  v.last = last;
  v.mean_k = sp.mean_k.const_data_ptr<double>();
  v.m2_k = sp.m2_k.const_data_ptr<double>();
  v.mean = cf.mean.mutable_data_ptr<A>();
  v.rstd = cf.rstd.mutable_data_ptr<A>();
  v.params = cf.params.mutable_data_ptr<A>();
  run_alg(L, AlgStep::kFwdCoefs, v);
  return cf;
}

// The streaming passes of the backward (kCorrect where needed, kGrad,
// kBackward) with the algebra between them. Returns (dweight, dbias) as
// float64 (C,) views of one buffer.
template <typename A>
std::pair<at::Tensor, at::Tensor> staged_backward(
    ReduceParams& rp, PointwiseParams& pp, const at::Tensor& mean, const at::Tensor& rstd,
    const at::Tensor& weight, const at::Tensor& bias, const Launchers& L) {
  const Geometry& g = rp.geo;
  const auto opts = rp.x.options().dtype(c10::CppTypeToScalarType<A>::value);
  const auto f64 = rp.x.options().dtype(at::kDouble);
  const at::Tensor m = mean.contiguous(), r = rstd.contiguous();
  const at::Tensor sums = at::empty({2, g.N, g.C}, f64);
  const at::Tensor off = at::empty({g.N, g.G}, f64);
  const at::Tensor grads = at::empty({2, g.C}, f64);
  AlgView<A> v = alg_view<A>(g, weight, bias);
  v.K = rp.K;
  v.mean = const_cast<A*>(m.const_data_ptr<A>());  // read only in the backward
  v.rstd = const_cast<A*>(r.const_data_ptr<A>());
  v.sums = sums.mutable_data_ptr<double>();
  v.off = off.mutable_data_ptr<double>();
  v.dw = grads.mutable_data_ptr<double>();
  v.db = v.dw + g.C;
  auto step = [&](AlgStep s, int np) {
    at::Tensor p = at::empty({np, g.N, g.C}, opts);
    v.params = p.mutable_data_ptr<A>();
    run_alg(L, s, v);
    return p;
  };
  auto reduce = [&](Mode mode, at::Tensor params, int nq) {
    rp.mode = mode;
    rp.params = std::move(params);
    rp.partial = at::empty({nq, g.N, rp.K, g.C}, opts);
    L.reduce(rp);
    v.partial = rp.partial.const_data_ptr<A>();
    v.nq = nq;
    v.params = nullptr;
    run_alg(L, AlgStep::kChunkSums, v);
  };
  bool correct = false;
  if constexpr (std::is_same_v<A, float>) {
    correct = L.always_correct;
    for (int64_t ng = 0; !correct && ng < g.N * g.G; ++ng) correct = alg::needs_correction(v, ng);
  }
  if (correct) reduce(Mode::kCorrect, step(AlgStep::kCorrectParams, 2), 1);
  v.corrected = correct;
  const int64_t kept_bytes = rp.x.numel() * static_cast<int64_t>(sizeof(A));
  const bool reduced = rp.x.scalar_type() == at::kHalf || rp.x.scalar_type() == at::kBFloat16;
  if (rp.act == Act::kSilu && reduced && L.keep_grad_bytes > 0 &&
      kept_bytes <= L.keep_grad_bytes) {
    rp.kept = at::empty({rp.x.numel()}, opts);
    pp.kept = rp.kept;
  }
  reduce(Mode::kGrad, step(AlgStep::kGradParams, 5), 2);
  pp.params = step(AlgStep::kApplyParams, 6);
  run_alg(L, AlgStep::kParamGrads, v);
  L.pointwise(pp);
  return {grads[0], grads[1]};
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
  // The CUDA launches (the algebra kernels among them) go to input's device.
  const c10::OptionalDeviceGuard device_guard(at::device_of(input));
  const Act act = parse_activation(activation, op);
  const Geometry g = check_args(op, input, num_groups, weight, bias);
  const at::MemoryFormat fmt = kept_format(input);
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
  double full = 0, last = 0;  // elements in every chunk but the last, in the last
  if (!g.cl) {
    sp.L = launch.chunk_len(launch.stat_chunk, M);
    sp.K = (M + sp.L - 1) / sp.L;
    full = static_cast<double>(sp.L);
    last = static_cast<double>(M - (sp.K - 1) * sp.L);
  } else {
    const int64_t width = launch.cl_per_group ? g.D : g.C;
    sp.R = launch.chunk_len(std::max<int64_t>(1, launch.stat_chunk_cl / width), g.S);
    sp.K = (g.S + sp.R - 1) / sp.R;
    full = static_cast<double>(sp.R * g.D);
    last = static_cast<double>((g.S - (sp.K - 1) * sp.R) * g.D);
  }
  const auto f64 = input.options().dtype(at::kDouble);
  sp.mean_k = at::empty({g.N, g.G, sp.K}, f64);
  sp.m2_k = at::empty({g.N, g.G, sp.K}, f64);
  launch.stats(sp);

  // Stage 2: combine the chunks, per-channel coefficients; stage 3: out.
  const at::Tensor w = acc_param(weight, input), b = acc_param(bias, input);
  const Coefs cf = acc_type(input) == at::kDouble
                       ? fwd_coefs<double>(sp, full, last, eps, w, b, launch)
                       : fwd_coefs<float>(sp, full, last, eps, w, b, launch);
  PointwiseParams pp;
  pp.x = x;
  pp.out = out;
  pp.geo = g;
  pp.mode = Mode::kForward;
  pp.act = act;
  pp.params = cf.params;
  launch.pointwise(pp);
  return {out, cf.mean, cf.rstd};
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
  // The CUDA launches (the algebra kernels among them) go to input's device.
  const c10::OptionalDeviceGuard device_guard(at::device_of(input));
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

  const at::MemoryFormat fmt = kept_format(input);
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
  if (g.cl) rp.R = std::max(rp.R, launch.reduce_rows_cl);
  rp.R = launch.chunk_len(rp.R, g.S);
  rp.K = (g.S + rp.R - 1) / rp.R;
  PointwiseParams pp;
  pp.x = x;
  pp.dy = dy;
  pp.out = dx;
  pp.geo = g;
  pp.mode = Mode::kBackward;
  pp.act = act;
  const at::Tensor w = acc_param(weight, input), b = acc_param(bias, input);
  const auto [dw, db] =
      acc_type(input) == at::kDouble
          ? staged_backward<double>(rp, pp, mean, rstd, w, b, launch)
          : staged_backward<float>(rp, pp, mean, rstd, w, b, launch);
  return finish(dw, db);
}

}  // namespace torchfuse::group_norm
