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

#include <cmath>
#include <type_traits>
#include <vector>

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

// ---------------------------------------------------------------- algebra
// Between the streaming passes: combining the partial statistics, the
// per-channel coefficients and the parameter gradients, all on (N, G) or
// (N, C)-sized data, in float64, with the formulas of the file header.
// CUDA: ATen ops, so the data stays on the device. CPU: scalar loops over
// host memory. As ATen ops (about 90 dispatcher calls per forward, counted by
// torch.profiler at 2x1280x16x16 channels_last float32) they took 117 of the
// op's 351 us there under the profiler; with these loops the op took 243 us.

struct Coefs {
  at::Tensor params, mean, rstd;  // (3, N, C), (N, G), (N, G): accumulate type
};

// The forward's inputs to the coefficients: the chunk statistics (chunks of
// `full` elements, the last of `last`) and the op's arguments.
struct CoefArgs {
  const StatsParams& sp;
  double full, last, eps;
  const std::optional<at::Tensor>&weight, &bias;
  const at::Tensor& input;
};

Coefs aten_coefs(const CoefArgs& ca) {
  const StatsParams& sp = ca.sp;
  const at::Tensor& input = ca.input;
  const Geometry& g = sp.geo;
  at::Tensor cnt = at::full({sp.K}, ca.full, input.options().dtype(at::kDouble));
  cnt.select(0, sp.K - 1).fill_(ca.last);
  const double Md = static_cast<double>(g.D * g.S);
  const at::Tensor mean = (sp.mean_k * cnt).sum(2) / Md;
  const at::Tensor m2 = (sp.m2_k + cnt * (sp.mean_k - mean.unsqueeze(2)).square()).sum(2);
  const at::Tensor rstd = (m2 / Md + ca.eps).rsqrt();
  const at::Tensor mean_hi = mean.to(acc_type(input));
  const at::Tensor mean_lo = mean - mean_hi.to(at::kDouble);
  // out = act((x - mean_hi) * a + sh), a = rstd * w, sh = b - mean_lo * a.
  const at::Tensor a = per_channel(rstd, g) * param64(ca.weight, input, 1.0, g.C);
  const at::Tensor sh = param64(ca.bias, input, 0.0, g.C) - per_channel(mean_lo, g) * a;
  return {stack_params({per_channel(mean_hi.to(at::kDouble), g), a, sh}, input), mean_hi,
          rstd.to(acc_type(input))};
}

// weight / bias as float64 host values, or `fill` for every channel.
std::vector<double> host_param(const std::optional<at::Tensor>& t, int64_t C, double fill) {
  if (!has(t)) return std::vector<double>(static_cast<size_t>(C), fill);
  const at::Tensor d = t->to(at::kDouble).contiguous();
  const double* p = d.const_data_ptr<double>();
  return std::vector<double>(p, p + C);
}

template <typename A>
Coefs host_coefs_t(const CoefArgs& ca) {
  const StatsParams& sp = ca.sp;
  const double full = ca.full, last = ca.last;
  const Geometry& g = sp.geo;
  const int64_t C = g.C, G = g.G, D = g.D, K = sp.K, NC = g.N * C;
  const auto opts = ca.input.options().dtype(acc_type(ca.input));
  Coefs cf{at::empty({3, g.N, C}, opts), at::empty({g.N, G}, opts), at::empty({g.N, G}, opts)};
  const std::vector<double> w = host_param(ca.weight, C, 1.0), b = host_param(ca.bias, C, 0.0);
  const double* mk = sp.mean_k.const_data_ptr<double>();
  const double* m2k = sp.m2_k.const_data_ptr<double>();
  A* p = cf.params.mutable_data_ptr<A>();
  A* mean = cf.mean.mutable_data_ptr<A>();
  A* rstd = cf.rstd.mutable_data_ptr<A>();
  const double Md = static_cast<double>(D * g.S);
  for (int64_t ng = 0; ng < g.N * G; ++ng) {
    const double* mg = mk + ng * K;
    const double* qg = m2k + ng * K;
    const auto [mu, r] = combine_chunks(
        K, Md, ca.eps, [&](int64_t k) { return mg[k]; }, [&](int64_t k) { return qg[k]; },
        [&](int64_t k) { return k + 1 < K ? full : last; });
    const A hi = static_cast<A>(mu);
    const double lo = mu - static_cast<double>(hi);
    mean[ng] = hi;
    rstd[ng] = static_cast<A>(r);
    const int64_t n = ng / G, c0 = (ng % G) * D;
    for (int64_t c = c0; c < c0 + D; ++c) {
      const double a = r * w[c];
      const int64_t i = n * C + c;
      p[i] = hi;
      p[NC + i] = static_cast<A>(a);
      p[2 * NC + i] = static_cast<A>(b[c] - lo * a);
    }
  }
  return cf;
}

Coefs host_coefs(const CoefArgs& ca) {
  return acc_type(ca.input) == at::kDouble ? host_coefs_t<double>(ca) : host_coefs_t<float>(ca);
}

struct BackwardArgs {
  const Geometry& g;
  const at::Tensor &mean, &rstd;
  const std::optional<at::Tensor>&weight, &bias;
  const at::Tensor& input;
};

// The backward's algebra, used by staged_backward in this order:
//   correct_params(): kCorrect coefficients, or undefined to skip that pass;
//   set_correction(partial of kCorrect): the mean's low part per group;
//   grad_params(): kGrad coefficients;
//   apply_params(partial of kGrad): kBackward coefficients;
//   dweight(), dbias(): (C,) float64.
class AtenBackward {
 public:
  explicit AtenBackward(const BackwardArgs& a)
      : g_(a.g),
        input_(a.input),
        Md_(static_cast<double>(a.g.D * a.g.S)),
        m64_(a.mean.to(at::kDouble)),
        r64_(a.rstd.to(at::kDouble)),
        mean_c_(per_channel(m64_, a.g)),
        rstd_c_(per_channel(r64_, a.g)),
        w_(param64(a.weight, a.input, 1.0, a.g.C)),
        b_(param64(a.bias, a.input, 0.0, a.g.C)),
        off_c_(at::zeros({a.g.N, a.g.C}, a.input.options().dtype(at::kDouble))) {}

  // Always run for float32 statistics (deciding on the host would need a
  // device sync); groups that need no correction are skipped by the kernel.
  at::Tensor correct_params() const {
    if (acc_type(input_) != at::kFloat) return {};
    const at::Tensor need = ((m64_ * r64_).abs() > kMeanTol).to(at::kDouble);
    return stack_params({mean_c_, per_channel(need, g_)}, input_);
  }

  void set_correction(const at::Tensor& partial) {
    const at::Tensor lo = group_sum(partial[0].to(at::kDouble).sum(1), g_) / Md_;
    off_c_ = -per_channel(lo * r64_, g_);
  }

  at::Tensor grad_params() {
    a_ = rstd_c_ * w_;
    sh_ = off_c_ * w_ + b_;
    return stack_params({mean_c_, a_, sh_, rstd_c_, off_c_}, input_);
  }

  // dx = k1 * g + k2 * (x - mean) + k3, k1 = a.
  at::Tensor apply_params(const at::Tensor& partial) {
    const at::Tensor sums = partial.to(at::kDouble).sum(2);  // (2, N, C)
    sg_ = sums[0];
    sgx_ = sums[1];
    const at::Tensor mg = per_channel(group_sum(sg_ * w_, g_) / Md_, g_);
    const at::Tensor mgx = per_channel(group_sum(sgx_ * w_, g_) / Md_, g_);
    const at::Tensor k2 = -rstd_c_ * mgx * rstd_c_;
    const at::Tensor k3 = -rstd_c_ * (mg + mgx * off_c_);
    return stack_params({mean_c_, a_, sh_, a_, k2, k3}, input_);
  }

  at::Tensor dweight() const { return sgx_.sum(0); }
  at::Tensor dbias() const { return sg_.sum(0); }

 private:
  Geometry g_;
  at::Tensor input_;
  double Md_;
  at::Tensor m64_, r64_, mean_c_, rstd_c_, w_, b_, off_c_, a_, sh_, sg_, sgx_;
};

template <typename A>
class HostBackward {
 public:
  explicit HostBackward(const BackwardArgs& a)
      : g_(a.g),
        opts_(a.input.options().dtype(acc_type(a.input))),
        Md_(static_cast<double>(a.g.D * a.g.S)),
        w_(host_param(a.weight, a.g.C, 1.0)),
        b_(host_param(a.bias, a.g.C, 0.0)),
        m_(host_stat(a.mean)),
        r_(host_stat(a.rstd)),
        off_(m_.size(), 0.0),
        sg_(static_cast<size_t>(a.g.N * a.g.C)),
        sgx_(sg_.size()) {}

  // Undefined when no group's mean is far enough from zero (the pass is
  // then not run at all).
  at::Tensor correct_params() const {
    if constexpr (std::is_same_v<A, double>) return {};
    std::vector<char> need(m_.size());
    bool any = false;
    for (size_t i = 0; i < m_.size(); ++i) {
      need[i] = std::abs(m_[i] * r_[i]) > kMeanTol;
      any = any || need[i];
    }
    if (!any) return {};
    return fill_params(2, [&](int64_t ng, int64_t, A* v) {
      v[0] = static_cast<A>(m_[ng]);
      v[1] = need[ng] ? A(1) : A(0);
    });
  }

  void set_correction(const at::Tensor& partial) {
    for (int64_t ng = 0; ng < g_.N * g_.G; ++ng) {
      const int64_t n = ng / g_.G, c0 = (ng % g_.G) * g_.D;
      double lo = 0;
      for (int64_t c = c0; c < c0 + g_.D; ++c) lo += chunk_sum(partial, 0, n, c);
      off_[ng] = -(lo / Md_) * r_[ng];
    }
  }

  at::Tensor grad_params() const {
    return fill_params(5, [&](int64_t ng, int64_t c, A* v) {
      y_params(ng, c, v);
      v[3] = static_cast<A>(r_[ng]);
      v[4] = static_cast<A>(off_[ng]);
    });
  }

  at::Tensor apply_params(const at::Tensor& partial) {
    const int64_t C = g_.C;
    for (int64_t n = 0; n < g_.N; ++n) {
      for (int64_t c = 0; c < C; ++c) {
        sg_[n * C + c] = chunk_sum(partial, 0, n, c);
        sgx_[n * C + c] = chunk_sum(partial, 1, n, c);
      }
    }
    std::vector<double> mg(m_.size()), mgx(m_.size());
    for (int64_t ng = 0; ng < g_.N * g_.G; ++ng) {
      const int64_t n = ng / g_.G, c0 = (ng % g_.G) * g_.D;
      double u = 0, v = 0;
      for (int64_t c = c0; c < c0 + g_.D; ++c) {
        u += sg_[n * C + c] * w_[c];
        v += sgx_[n * C + c] * w_[c];
      }
      mg[ng] = u / Md_;
      mgx[ng] = v / Md_;
    }
    return fill_params(6, [&](int64_t ng, int64_t c, A* v) {
      const double r = r_[ng];
      y_params(ng, c, v);
      v[3] = v[1];
      v[4] = static_cast<A>(-r * mgx[ng] * r);
      v[5] = static_cast<A>(-r * (mg[ng] + mgx[ng] * off_[ng]));
    });
  }

  at::Tensor dweight() const { return channel_sum(sgx_); }
  at::Tensor dbias() const { return channel_sum(sg_); }

 private:
  std::vector<double> host_stat(const at::Tensor& t) const {
    const at::Tensor c = t.contiguous();
    const A* p = c.const_data_ptr<A>();
    return std::vector<double>(p, p + g_.N * g_.G);
  }

  // partial (NQ, N, K, C): sum over the K chunks of sum q, sample n, channel c.
  double chunk_sum(const at::Tensor& partial, int64_t q, int64_t n, int64_t c) const {
    const int64_t K = partial.size(2);
    const A* p = partial.const_data_ptr<A>() + ((q * g_.N + n) * K) * g_.C + c;
    double s = 0;
    for (int64_t k = 0; k < K; ++k) s += static_cast<double>(p[k * g_.C]);
    return s;
  }

  // The coefficients of y = (x - mean) * rstd * w + (off * w + b), shared by
  // kGrad and kBackward: v[0 .. 3).
  void y_params(int64_t ng, int64_t c, A* v) const {
    v[0] = static_cast<A>(m_[ng]);
    v[1] = static_cast<A>(r_[ng] * w_[c]);
    v[2] = static_cast<A>(off_[ng] * w_[c] + b_[c]);
  }

  // (np, N, C) accumulate-type coefficients; f(ng, c, v) fills v[0 .. np)
  // for channel c of group ng.
  template <typename F>
  at::Tensor fill_params(int np, const F& f) const {
    at::Tensor t = at::empty({np, g_.N, g_.C}, opts_);
    A* p = t.mutable_data_ptr<A>();
    const int64_t NC = g_.N * g_.C;
    A v[6];
    for (int64_t ng = 0; ng < g_.N * g_.G; ++ng) {
      const int64_t n = ng / g_.G, c0 = (ng % g_.G) * g_.D;
      for (int64_t c = c0; c < c0 + g_.D; ++c) {
        f(ng, c, v);
        for (int i = 0; i < np; ++i) p[i * NC + n * g_.C + c] = v[i];
      }
    }
    return t;
  }

  // (C,) float64: sum over the samples, in order.
  at::Tensor channel_sum(const std::vector<double>& s) const {
    at::Tensor t = at::zeros({g_.C}, opts_.dtype(at::kDouble));
    double* p = t.mutable_data_ptr<double>();
    for (int64_t n = 0; n < g_.N; ++n) {
      for (int64_t c = 0; c < g_.C; ++c) p[c] += s[n * g_.C + c];
    }
    return t;
  }

  Geometry g_;
  at::TensorOptions opts_;
  double Md_;
  std::vector<double> w_, b_, m_, r_, off_, sg_, sgx_;
};

// The three streaming passes of the backward (kCorrect where needed, kGrad,
// kBackward) with the algebra between them.
template <typename Alg>
void staged_backward(Alg& alg, ReduceParams& rp, PointwiseParams& pp, const Launchers& launch) {
  const Geometry& g = rp.geo;
  const auto opts = rp.x.options().dtype(acc_type(rp.x));
  if (const at::Tensor p = alg.correct_params(); p.defined()) {
    rp.mode = Mode::kCorrect;
    rp.params = p;
    rp.partial = at::empty({1, g.N, rp.K, g.C}, opts);
    launch.reduce(rp);
    alg.set_correction(rp.partial);
  }
  rp.mode = Mode::kGrad;
  rp.params = alg.grad_params();
  rp.partial = at::empty({2, g.N, rp.K, g.C}, opts);
  launch.reduce(rp);
  pp.params = alg.apply_params(rp.partial);
  launch.pointwise(pp);
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
  double full = 0, last = 0;  // elements in every chunk but the last, in the last
  if (!g.cl) {
    sp.L = launch.stat_chunk;
    sp.K = (M + sp.L - 1) / sp.L;
    full = static_cast<double>(sp.L);
    last = static_cast<double>(M - (sp.K - 1) * sp.L);
  } else {
    const int64_t width = launch.cl_per_group ? g.D : g.C;
    sp.R = std::max<int64_t>(1, launch.stat_chunk_cl / width);
    sp.K = (g.S + sp.R - 1) / sp.R;
    full = static_cast<double>(sp.R * g.D);
    last = static_cast<double>((g.S - (sp.K - 1) * sp.R) * g.D);
  }
  const auto f64 = input.options().dtype(at::kDouble);
  sp.mean_k = at::empty({g.N, g.G, sp.K}, f64);
  sp.m2_k = at::empty({g.N, g.G, sp.K}, f64);
  launch.stats(sp);

  // Stage 2: combine the chunks, per-channel coefficients; stage 3: out.
  const CoefArgs ca{sp, full, last, eps, weight, bias, input};
  const Coefs cf = input.is_cpu() ? host_coefs(ca) : aten_coefs(ca);
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
  PointwiseParams pp;
  pp.x = x;
  pp.dy = dy;
  pp.out = dx;
  pp.geo = g;
  pp.mode = Mode::kBackward;
  pp.act = act;
  const BackwardArgs args{g, mean, rstd, weight, bias, input};
  auto run = [&](auto alg) {
    staged_backward(alg, rp, pp, launch);
    return finish(alg.dweight(), alg.dbias());
  };
  if (!input.is_cpu()) return run(AtenBackward(args));
  if (acc_type(input) == at::kDouble) return run(HostBackward<double>(args));
  return run(HostBackward<float>(args));
}

}  // namespace torchfuse::group_norm
