// Loads libtorchfuse.so and calls torchfuse::rms_norm and
// torchfuse::rms_norm_backward through the dispatcher, checking them against
// the formula computed with ATen ops. Exits non-zero on any mismatch.
//
//   torchfuse_example [path/to/libtorchfuse.so]
#include <torch/torch.h>

#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>

namespace {

int failures = 0;

// max |got - want| <= rtol * max |want|
void expect_close(const char* what, const at::Tensor& got, const at::Tensor& want, double rtol) {
  const double err = (got.to(at::kDouble) - want.to(at::kDouble)).abs().max().item<double>();
  const double tol = rtol * want.abs().max().item<double>();
  std::printf("%-36s max error %.3g (tolerance %.3g) %s\n", what, err, tol,
              err <= tol ? "ok" : "FAILED");
  if (!(err <= tol)) ++failures;
}

}  // namespace

int main(int argc, char** argv) {
  const char* path = argc > 1 ? argv[1] : TORCHFUSE_LIBRARY;
  if (dlopen(path, RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    std::fprintf(stderr, "cannot load %s: %s\n", path, dlerror());
    return 2;
  }
  // Typed handles to the ops, looked up by name as any libtorch program can.
  auto rms_norm =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("torchfuse::rms_norm", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, at::IntArrayRef, const std::optional<at::Tensor>&, double)>();
  auto rms_norm_backward =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("torchfuse::rms_norm_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
              const at::Tensor&, at::IntArrayRef, const std::optional<at::Tensor>&, bool)>();
  std::printf("%s\n", c10::Dispatcher::singleton()
                          .findSchemaOrThrow("torchfuse::rms_norm", "")
                          .schema()
                          .operator_name()
                          .name.c_str());

  torch::manual_seed(0);
  const std::vector<int64_t> ns{4096};
  for (auto dtype : {at::kFloat, at::kBFloat16}) {
    const auto x = torch::randn({8, 4096}).to(dtype);
    const auto w = torch::randn({4096}).to(dtype);
    const auto dy = torch::randn({8, 4096}).to(dtype);
    const double eps = 1e-6;
    auto [out, rstd] = rms_norm.call(x, ns, w, eps);
    auto [dx, dw] = rms_norm_backward.call(dy, std::nullopt, x, rstd, ns, w, true);

    // The same with ATen autograd, in float64.
    auto x64 = x.to(at::kDouble).set_requires_grad(true);
    auto w64 = w.to(at::kDouble).set_requires_grad(true);
    auto ref = x64 * torch::rsqrt(x64.pow(2).mean(-1, true) + eps) * w64;
    ref.backward(dy.to(at::kDouble));
    // float32: well under 1e-4 relative; bfloat16: about one unit in the last
    // place (2^-7) at the largest magnitude.
    const double rtol = dtype == at::kFloat ? 2e-5 : 1e-2;
    const std::string tag = dtype == at::kFloat ? "float32" : "bfloat16";
    expect_close(("rms_norm " + tag).c_str(), out, ref.detach(), rtol);
    expect_close(("rms_norm_backward dx " + tag).c_str(), dx, x64.grad(), rtol);
    expect_close(("rms_norm_backward dweight " + tag).c_str(), dw, w64.grad(), rtol);
  }
  // Bad input surfaces as a c10::Error naming the argument.
  try {
    rms_norm.call(torch::randn({2, 3}), std::vector<int64_t>{4}, std::nullopt, 1e-6);
    std::printf("bad normalized_shape: no error FAILED\n");
    ++failures;
  } catch (const c10::Error& e) {
    const bool named = std::string(e.what_without_backtrace()).find("normalized_shape") !=
        std::string::npos;
    std::printf("bad normalized_shape raises c10::Error %s\n", named ? "ok" : "FAILED");
    failures += named ? 0 : 1;
  }
  std::printf(failures == 0 ? "all checks passed\n" : "%d check(s) FAILED\n", failures);
  return failures == 0 ? 0 : 1;
}
