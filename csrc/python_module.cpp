// The Python module torchfuse._C (built by setup.py only; the CMake/libtorch
// library has no Python). Importing it loads this shared object, which runs
// every static op registration; everything is reachable through
// torch.ops.torchfuse.
//
// The module also has direct entries for the ops whose cost on small tensors
// is the call path rather than the kernel: channel_shuffle, cat_shuffle,
// group_norm, l2_norm and conv2d.
// A call through torch.ops binds the Python arguments against the schema and
// runs the op boxed; torchfuse.functional's own checks and routing add more,
// and a gradient recorded through a Python autograd.Function more again
// (1x232x14x14 bfloat16 channel_shuffle forward+backward: 101 us that way,
// 58 through this entry, eager torch 50; README). A direct entry takes the plain case
// whole: exact torch.Tensor arguments (no subclass, no torch function mode;
// cat_shuffle: one dtype), an int `groups`, a device with a kernel. It calls
// the op's typed handle through the dispatcher below the Autograd key
// (device kernels, fake/meta tensors and dispatch modes are reached as
// before); when autograd must record the call, through a C++
// autograd::Function whose backward is again one of the shuffle ops (the
// inverse shuffle, cat_shuffle_backward; the norms' backward ops), called
// below the Autograd key unless the backward itself is recorded
// (create_graph: then through the shuffles' own registered autograd, or the
// norms' differentiable Python backward, so double backward works as before). Any
// other call returns None, and the caller takes its usual path, which raises
// the usual errors. torchfuse.functional uses them outside torch.compile.
#ifdef TORCHFUSE_PYTHON_MODULE

#include "common/cpu_vec.h"

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <Python.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/python_variable.h>

#include <array>
#include <functional>
#include <optional>
#include <unordered_map>
#include <string>
#include <tuple>
#include <vector>

namespace {

// The GIL released while the op runs (as torch's own bindings do), taken
// back before an error is translated into a Python exception.
struct ReleaseGil {
  PyThreadState* state = PyEval_SaveThread();
  ~ReleaseGil() { PyEval_RestoreThread(state); }
};

// The op's typed handle and whether it has a kernel for a device type.
template <typename Sig>
struct Op {
  c10::TypedOperatorHandle<Sig> handle;
  bool cpu, cuda;

  explicit Op(const char* name)
      : handle(c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>()),
        cpu(handle.hasKernelForDispatchKey(c10::DispatchKey::CPU)),
        cuda(handle.hasKernelForDispatchKey(c10::DispatchKey::CUDA)) {}

  bool has_kernel(const at::Tensor& t) const {
    const c10::DeviceType d = t.device().type();
    return (d == c10::DeviceType::CPU && cpu) || (d == c10::DeviceType::CUDA && cuda);
  }
};

// A plain tensor argument this entry can take, or nullptr.
const at::Tensor* plain_tensor(PyObject* obj) {
  // An exact torch.Tensor (or Parameter) has no __torch_function__ of its
  // own; a torch function mode would still want to see the call.
  if (!THPVariable_CheckExact(obj) || at::impl::torch_function_mode_enabled()) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(obj);
  return t.defined() ? &t : nullptr;
}

std::optional<int64_t> plain_int(PyObject* obj) {
  if (!PyLong_CheckExact(obj)) return std::nullopt;
  const long long v = PyLong_AsLongLong(obj);
  if (v == -1 && PyErr_Occurred()) {
    PyErr_Clear();  // out of range: the usual path reports it
    return std::nullopt;
  }
  return static_cast<int64_t>(v);
}

using ShuffleSig = at::Tensor(const at::Tensor&, int64_t);
using CatSig = at::Tensor(at::TensorList, int64_t);
using CatBackwardSig = std::vector<at::Tensor>(const at::Tensor&, at::IntArrayRef, int64_t);

const Op<ShuffleSig>& shuffle_op() {
  static const Op<ShuffleSig> op("torchfuse::channel_shuffle");
  return op;
}

const Op<CatSig>& cat_op() {
  static const Op<CatSig> op("torchfuse::cat_shuffle");
  return op;
}

const Op<CatBackwardSig>& cat_backward_op() {
  static const Op<CatBackwardSig> op("torchfuse::cat_shuffle_backward");
  return op;
}

// A float or int (not bool) argument, or nullopt.
std::optional<double> plain_float(PyObject* obj) {
  if (PyFloat_CheckExact(obj)) return PyFloat_AS_DOUBLE(obj);
  if (const std::optional<int64_t> v = plain_int(obj)) return static_cast<double>(*v);
  return std::nullopt;
}

// op(args...) below the Autograd key, or, when the backward is being
// recorded (create_graph), through the op's own autograd.
template <typename Sig, typename... Args>
auto call_op(const Op<Sig>& op, bool below_autograd, const Args&... args) {
  if (below_autograd) {
    at::AutoDispatchBelowAutograd guard;
    return op.handle.call(args...);
  }
  return op.handle.call(args...);
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct ChannelShuffleFn : public torch::autograd::Function<ChannelShuffleFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, int64_t groups) {
    at::Tensor out = call_op(shuffle_op(), true, input, groups);
    // channel_shuffle(., C / groups) undoes channel_shuffle(., groups) (any
    // groups value is the identity on zero channels); groups was checked.
    const int64_t C = input.size(1);
    ctx->saved_data["inverse"] = C > 0 ? C / groups : int64_t{1};
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const int64_t inverse = ctx->saved_data["inverse"].toInt();
    return {call_op(shuffle_op(), !c10::GradMode::is_enabled(), grads[0], inverse),
            at::Tensor()};
  }
};

struct CatShuffleFn : public torch::autograd::Function<CatShuffleFn> {
  static at::Tensor forward(AutogradContext* ctx, at::TensorList tensors, int64_t groups) {
    at::Tensor out = call_op(cat_op(), true, tensors, groups);
    std::vector<int64_t> sizes;
    sizes.reserve(tensors.size());
    for (const at::Tensor& t : tensors) sizes.push_back(t.size(1));
    ctx->saved_data["split_sizes"] = sizes;
    ctx->saved_data["groups"] = groups;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const std::vector<int64_t> sizes = ctx->saved_data["split_sizes"].toIntVector();
    variable_list out = call_op(cat_backward_op(), !c10::GradMode::is_enabled(), grads[0],
                                at::IntArrayRef(sizes), ctx->saved_data["groups"].toInt());
    out.emplace_back();  // groups
    return out;
  }
};

bool needs_grad(const at::Tensor& t) {
  return t.requires_grad() && c10::GradMode::is_enabled();
}

const at::Tensor& first(const at::Tensor& t) {
  return t;
}

template <typename... Ts>
const at::Tensor& first(const std::tuple<at::Tensor, Ts...>& t) {
  return std::get<0>(t);
}

// The tail of every entry: the op's (first) output for args, through Fn (a
// C++ autograd node taking the op's arguments in the op's order) when
// `grad`, else below the Autograd key; the GIL released meanwhile.
template <typename Fn, typename Sig, typename... Args>
PyObject* run_entry(const Op<Sig>& op, bool grad, const Args&... args) {
  at::Tensor out;
  {
    ReleaseGil no_gil;
    out = grad ? Fn::apply(args...) : first(call_op(op, true, args...));
  }
  return THPVariable_Wrap(std::move(out));
}

// channel_shuffle(input, groups) -> Tensor or None
PyObject* channel_shuffle(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 2) Py_RETURN_NONE;
  const at::Tensor* input = plain_tensor(args[0]);
  const std::optional<int64_t> groups = plain_int(args[1]);
  if (input == nullptr || !groups || !shuffle_op().has_kernel(*input)) Py_RETURN_NONE;
  return run_entry<ChannelShuffleFn>(shuffle_op(), needs_grad(*input), *input, *groups);
  END_HANDLE_TH_ERRORS
}

// cat_shuffle(tensors, groups) -> Tensor or None; tensors a list or tuple
PyObject* cat_shuffle(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 2 || !(PyList_CheckExact(args[0]) || PyTuple_CheckExact(args[0]))) {
    Py_RETURN_NONE;
  }
  const std::optional<int64_t> groups = plain_int(args[1]);
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(args[0]);
  PyObject** items = PySequence_Fast_ITEMS(args[0]);
  if (!groups || n == 0) Py_RETURN_NONE;
  std::vector<at::Tensor> tensors;
  tensors.reserve(static_cast<size_t>(n));
  bool grad = false;
  for (Py_ssize_t i = 0; i < n; ++i) {
    const at::Tensor* t = plain_tensor(items[i]);
    // Mixed dtypes are promoted by the usual path first.
    if (t == nullptr || !cat_op().has_kernel(*t) || (i > 0 && t->dtype() != tensors[0].dtype())) {
      Py_RETURN_NONE;
    }
    grad = grad || needs_grad(*t);
    tensors.push_back(*t);
  }
  return run_entry<CatShuffleFn>(cat_op(), grad, at::TensorList(tensors), *groups);
  END_HANDLE_TH_ERRORS
}

// ------------------------------------------------------------ group_norm
using Opt = std::optional<at::Tensor>;
using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using GroupNormSig = Tensor3(const at::Tensor&, int64_t, const Opt&, const Opt&, double,
                             c10::string_view);
using GroupNormBackwardSig = Tensor3(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const at::Tensor&, int64_t, const Opt&, const Opt&,
                                     c10::string_view, bool, bool);

const Op<GroupNormSig>& group_norm_op() {
  static const Op<GroupNormSig> op("torchfuse::group_norm");
  return op;
}

const Op<GroupNormBackwardSig>& group_norm_backward_op() {
  static const Op<GroupNormBackwardSig> op("torchfuse::group_norm_backward");
  return op;
}

// Each op's backward written with differentiable torch ops (Python), set at
// import by its torchfuse._ops module: the C++ autograd nodes call it under
// create_graph=True, as the ops' Python autograd registrations do. New
// references, never freed.
std::unordered_map<std::string, PyObject*>& double_backwards() {
  static std::unordered_map<std::string, PyObject*> fns;
  return fns;
}

struct Gil {
  PyGILState_STATE state = PyGILState_Ensure();
  ~Gil() { PyGILState_Release(state); }
};

PyObject* wrap_or_none(const at::Tensor& t) {
  if (t.defined()) return THPVariable_Wrap(t);
  Py_RETURN_NONE;
}

// The Python arguments of a differentiable backward, built under the GIL.
using PyArgs = std::vector<PyObject*>;

// fn(*args) for the op `name`'s differentiable backward, which returns a
// tuple of `nret` tensors or None (undefined here). Steals args' references.
std::vector<at::Tensor> python_backward(const std::string& name,
                                        const std::function<PyArgs()>& make_args,
                                        size_t nret) {
  Gil gil;
  const auto it = double_backwards().find(name);
  TORCH_CHECK(it != double_backwards().end(), name,
              ": double backward needs torchfuse._ops imported");
  PyArgs args = make_args();
  PyObject* res = nullptr;
  bool ok = true;
  for (PyObject* a : args) ok = ok && a != nullptr;
  if (ok) res = PyObject_Vectorcall(it->second, args.data(), args.size(), nullptr);
  for (PyObject* a : args) Py_XDECREF(a);
  if (res == nullptr) {
    // Keep the Python exception with the C++ one: the autograd engine may
    // rethrow it on another thread (CUDA backward runs on device threads).
    python_error error;
    error.persist();
    throw std::move(error);
  }
  std::vector<at::Tensor> out(nret);
  const bool tuple = PyTuple_Check(res) && static_cast<size_t>(PyTuple_GET_SIZE(res)) == nret;
  for (size_t i = 0; tuple && i < nret; ++i) {
    PyObject* item = PyTuple_GET_ITEM(res, static_cast<Py_ssize_t>(i));
    if (THPVariable_Check(item)) out[i] = THPVariable_Unpack(item);
  }
  Py_DECREF(res);
  TORCH_CHECK(tuple, name, ": the differentiable backward must return ", nret, " values");
  return out;
}

struct GroupNormFn : public torch::autograd::Function<GroupNormFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, int64_t groups,
                            const Opt& weight, const Opt& bias, double eps,
                            const std::string& act) {
    auto [out, mean, rstd] = call_op(group_norm_op(), true, input, groups, weight, bias, eps,
                                     c10::string_view(act));
    ctx->save_for_backward({input, mean, rstd, weight.value_or(at::Tensor()),
                            bias.value_or(at::Tensor())});
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["act"] = act;
    ctx->saved_data["need"] = std::vector<bool>{
        input.requires_grad(), weight && weight->requires_grad(), bias && bias->requires_grad()};
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &mean = saved[1], &rstd = saved[2], &w = saved[3],
                     &b = saved[4];
    const int64_t groups = ctx->saved_data["groups"].toInt();
    const std::string act = ctx->saved_data["act"].toStringRef();
    const c10::List<bool> need = ctx->saved_data["need"].toBoolList();
    const bool need_w = w.defined() && need[1], need_b = b.defined() && need[2];
    Tensor3 g;
    if (c10::GradMode::is_enabled()) {  // create_graph: stay differentiable
      const double eps = ctx->saved_data["eps"].toDouble();
      const auto r = python_backward(
          "group_norm",
          [&] {
            return PyArgs{wrap_or_none(grads[0]), wrap_or_none(x), wrap_or_none(w),
                          wrap_or_none(b), PyLong_FromLongLong(groups), PyFloat_FromDouble(eps),
                          PyUnicode_FromString(act.c_str())};
          },
          3);
      g = {r[0], r[1], r[2]};
    } else {
      g = call_op(group_norm_backward_op(), true, grads[0], x, mean, rstd, groups,
                  w.defined() ? Opt(w) : Opt(), b.defined() ? Opt(b) : Opt(),
                  c10::string_view(act), need_w, need_b);
    }
    // One gradient per forward argument: input, groups, weight, bias, eps, act.
    return {need[0] ? std::get<0>(g) : at::Tensor(), at::Tensor(),
            need_w ? std::get<1>(g) : at::Tensor(), need_b ? std::get<2>(g) : at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

bool is_float_type(const at::Tensor& t) {
  const at::ScalarType s = t.scalar_type();
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

// None, or a plain tensor for an optional argument; false: not the plain case.
bool optional_tensor(PyObject* obj, Opt& out) {
  if (obj == Py_None) return true;
  const at::Tensor* t = plain_tensor(obj);
  if (t == nullptr) return false;
  out = *t;
  return true;
}

// group_norm(input, num_groups, weight, bias, eps, activation) -> out or None.
// Declined (the usual path then checks and raises as torch does): anything
// but floating input of 2+ dims, num_groups > 0, a float or int eps, an
// activation of None, "relu" or "silu", and more than one value per
// channel group; and every case of _C's other entries.
PyObject* group_norm(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 6) Py_RETURN_NONE;
  const at::Tensor* input = plain_tensor(args[0]);
  const std::optional<int64_t> groups = plain_int(args[1]);
  Opt weight, bias;
  if (input == nullptr || !groups || *groups <= 0 || !optional_tensor(args[2], weight) ||
      !optional_tensor(args[3], bias) || !group_norm_op().has_kernel(*input) ||
      !is_float_type(*input) || input->dim() < 2) {
    Py_RETURN_NONE;
  }
  const std::optional<double> eps_arg = plain_float(args[4]);
  if (!eps_arg) Py_RETURN_NONE;
  const double eps = *eps_arg;
  std::string act = "none";
  if (args[5] != Py_None) {
    if (!PyUnicode_CheckExact(args[5])) Py_RETURN_NONE;
    const char* a = PyUnicode_AsUTF8(args[5]);
    if (a == nullptr) throw python_error();
    act = a;
    if (act != "relu" && act != "silu") Py_RETURN_NONE;
  }
  // torch's "more than 1 value per channel" check (a ValueError there)
  int64_t values = input->size(0) * input->size(1) / *groups;
  for (int64_t d = 2; d < input->dim(); ++d) values *= input->size(d);
  if (values == 1) Py_RETURN_NONE;
  const bool grad = needs_grad(*input) || (weight && needs_grad(*weight)) ||
                    (bias && needs_grad(*bias));
  return run_entry<GroupNormFn>(group_norm_op(), grad, *input, *groups, weight, bias, eps, act);
  END_HANDLE_TH_ERRORS
}

// --------------------------------------------------------------- l2_norm
using Tensor2 = std::tuple<at::Tensor, at::Tensor>;
using L2NormSig = Tensor2(const at::Tensor&, const Opt&, int64_t, double);
using L2NormBackwardSig = Tensor2(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const Opt&, int64_t, double, bool);

const Op<L2NormSig>& l2_norm_op() {
  static const Op<L2NormSig> op("torchfuse::l2_norm");
  return op;
}

const Op<L2NormBackwardSig>& l2_norm_backward_op() {
  static const Op<L2NormBackwardSig> op("torchfuse::l2_norm_backward");
  return op;
}

struct L2NormFn : public torch::autograd::Function<L2NormFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const Opt& weight,
                            int64_t dim, double eps) {
    auto [out, norm] = call_op(l2_norm_op(), true, input, weight, dim, eps);
    ctx->save_for_backward({input, norm, weight.value_or(at::Tensor())});
    ctx->saved_data["dim"] = dim;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["need"] =
        std::vector<bool>{input.requires_grad(), weight && weight->requires_grad()};
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &norm = saved[1], &w = saved[2];
    const int64_t dim = ctx->saved_data["dim"].toInt();
    const double eps = ctx->saved_data["eps"].toDouble();
    const c10::List<bool> need = ctx->saved_data["need"].toBoolList();
    const bool need_w = w.defined() && need[1];
    at::Tensor gx, gw;
    if (c10::GradMode::is_enabled()) {  // create_graph: stay differentiable
      const auto r = python_backward(
          "l2_norm",
          [&] {
            return PyArgs{wrap_or_none(grads[0]), wrap_or_none(x), wrap_or_none(w),
                          PyLong_FromLongLong(dim), PyFloat_FromDouble(eps)};
          },
          2);
      gx = r[0];
      gw = r[1];
    } else {
      std::tie(gx, gw) = call_op(l2_norm_backward_op(), true, grads[0], x, norm,
                                 w.defined() ? Opt(w) : Opt(), dim, eps, need_w);
    }
    // One gradient per forward argument: input, weight, dim, eps.
    return {need[0] ? gx : at::Tensor(), need_w ? gw : at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// l2_norm(input, weight, dim, eps) -> out or None. Declined: anything but a
// floating input, weight None or a plain tensor, an int dim, a float or int
// eps (the op checks shapes and dim's range itself, as on the usual path).
PyObject* l2_norm(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 4) Py_RETURN_NONE;
  const at::Tensor* input = plain_tensor(args[0]);
  Opt weight;
  const std::optional<int64_t> dim = plain_int(args[2]);
  const std::optional<double> eps = plain_float(args[3]);
  if (input == nullptr || !optional_tensor(args[1], weight) || !dim || !eps ||
      !l2_norm_op().has_kernel(*input) || !is_float_type(*input)) {
    Py_RETURN_NONE;
  }
  const bool grad = needs_grad(*input) || (weight && needs_grad(*weight));
  return run_entry<L2NormFn>(l2_norm_op(), grad, *input, weight, *dim, *eps);
  END_HANDLE_TH_ERRORS
}

// ---------------------------------------------------------------- conv2d
using IntList = std::vector<int64_t>;
using ConvSig = at::Tensor(const at::Tensor&, const at::Tensor&, const Opt&, at::IntArrayRef,
                           at::IntArrayRef, at::IntArrayRef, int64_t, int64_t);
using ConvBackwardSig = Tensor3(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t,
                                int64_t, std::array<bool, 3>);

const Op<ConvSig>& conv_op() {
  static const Op<ConvSig> op("torchfuse::conv2d");
  return op;
}

const Op<ConvBackwardSig>& conv_backward_op() {
  static const Op<ConvBackwardSig> op("torchfuse::conv2d_backward");
  return op;
}

PyObject* int_list(const IntList& v) {
  PyObject* l = PyList_New(static_cast<Py_ssize_t>(v.size()));
  for (size_t i = 0; l != nullptr && i < v.size(); ++i) {
    PyList_SET_ITEM(l, static_cast<Py_ssize_t>(i), PyLong_FromLongLong(v[i]));
  }
  return l;
}

struct ConvFn : public torch::autograd::Function<ConvFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input,
                            const at::Tensor& weight, const Opt& bias, const IntList& stride,
                            const IntList& padding, const IntList& dilation, int64_t groups,
                            int64_t shuffle) {
    at::Tensor out = call_op(conv_op(), true, input, weight, bias, at::IntArrayRef(stride),
                             at::IntArrayRef(padding), at::IntArrayRef(dilation), groups,
                             shuffle);
    ctx->save_for_backward({input, weight});
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["shuffle"] = shuffle;
    ctx->saved_data["need"] = std::vector<bool>{input.requires_grad(), weight.requires_grad(),
                                                bias && bias->requires_grad()};
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1];
    const IntList stride = ctx->saved_data["stride"].toIntVector();
    const IntList padding = ctx->saved_data["padding"].toIntVector();
    const IntList dilation = ctx->saved_data["dilation"].toIntVector();
    const int64_t groups = ctx->saved_data["groups"].toInt();
    const int64_t shuffle = ctx->saved_data["shuffle"].toInt();
    const c10::List<bool> need = ctx->saved_data["need"].toBoolList();
    const std::array<bool, 3> mask{need[0], need[1], need[2]};
    variable_list out(8);  // one per forward argument
    if (!(mask[0] || mask[1] || mask[2]) || !grads[0].defined()) return out;
    Tensor3 g;
    if (c10::GradMode::is_enabled()) {  // create_graph: stay differentiable
      const auto r = python_backward(
          "conv2d",
          [&] {
            return PyArgs{wrap_or_none(grads[0]), wrap_or_none(x), wrap_or_none(w),
                          int_list(stride), int_list(padding), int_list(dilation),
                          PyLong_FromLongLong(groups), PyLong_FromLongLong(shuffle),
                          PyTuple_Pack(3, mask[0] ? Py_True : Py_False,
                                       mask[1] ? Py_True : Py_False,
                                       mask[2] ? Py_True : Py_False)};
          },
          3);
      g = {r[0], r[1], r[2]};
    } else {
      g = call_op(conv_backward_op(), true, grads[0], x, w, at::IntArrayRef(stride),
                  at::IntArrayRef(padding), at::IntArrayRef(dilation), groups, shuffle, mask);
    }
    if (mask[0]) out[0] = std::get<0>(g);
    if (mask[1]) out[1] = std::get<1>(g);
    if (mask[2]) out[2] = std::get<2>(g);
    return out;
  }
};

// A Python list of plain ints, or false.
bool plain_int_list(PyObject* obj, IntList& out) {
  if (!PyList_CheckExact(obj)) return false;
  const Py_ssize_t n = PyList_GET_SIZE(obj);
  out.resize(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    const std::optional<int64_t> v = plain_int(PyList_GET_ITEM(obj, i));
    if (!v) return false;
    out[static_cast<size_t>(i)] = *v;
  }
  return true;
}

// conv2d(input, weight, bias, stride, padding, dilation, groups,
// shuffle_groups) -> out or None, as torchfuse.functional.conv2d calls it
// after its own argument handling (stride, padding and dilation as lists of
// ints). Declined: anything but a floating 4-D input, a plain weight, bias
// None or a plain tensor, plain int lists and ints (the op checks the rest,
// as on the usual path).
PyObject* conv2d(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 8) Py_RETURN_NONE;
  const at::Tensor* input = plain_tensor(args[0]);
  const at::Tensor* weight = plain_tensor(args[1]);
  Opt bias;
  IntList stride, padding, dilation;
  const std::optional<int64_t> groups = plain_int(args[6]);
  const std::optional<int64_t> shuffle = plain_int(args[7]);
  if (input == nullptr || weight == nullptr || !optional_tensor(args[2], bias) ||
      !plain_int_list(args[3], stride) || !plain_int_list(args[4], padding) ||
      !plain_int_list(args[5], dilation) || !groups || !shuffle ||
      !conv_op().has_kernel(*input) || !is_float_type(*input) || input->dim() != 4) {
    Py_RETURN_NONE;
  }
  const bool grad = needs_grad(*input) || needs_grad(*weight) || (bias && needs_grad(*bias));
  return run_entry<ConvFn>(conv_op(), grad, *input, *weight, bias, stride, padding, dilation,
                           *groups, *shuffle);
  END_HANDLE_TH_ERRORS
}

// _set_double_backward(name, fn)
PyObject* set_double_backward(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  const char* name = nullptr;
  PyObject* fn = nullptr;
  if (!PyArg_ParseTuple(args, "sO", &name, &fn)) return nullptr;
  Py_INCREF(fn);
  PyObject*& slot = double_backwards()[name];
  Py_XDECREF(slot);
  slot = fn;
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"channel_shuffle",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(channel_shuffle)), METH_FASTCALL,
     "channel_shuffle(input, groups): the op below the Autograd key, or None (see "
     "csrc/python_module.cpp)"},
    {"cat_shuffle", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(cat_shuffle)),
     METH_FASTCALL,
     "cat_shuffle(tensors, groups): the op below the Autograd key, or None (see "
     "csrc/python_module.cpp)"},
    {"group_norm", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(group_norm)),
     METH_FASTCALL,
     "group_norm(input, num_groups, weight, bias, eps, activation): the op's output, or None "
     "(see csrc/python_module.cpp)"},
    {"l2_norm", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(l2_norm)),
     METH_FASTCALL,
     "l2_norm(input, weight, dim, eps): the op's output, or None (see csrc/python_module.cpp)"},
    {"conv2d", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(conv2d)),
     METH_FASTCALL,
     "conv2d(input, weight, bias, stride, padding, dilation, groups, shuffle_groups): the op's "
     "output, or None (see csrc/python_module.cpp)"},
    {"_set_double_backward", set_double_backward, METH_VARARGS,
     "_set_double_backward(op name, fn): the differentiable backward the op's C++ autograd "
     "node calls under create_graph"},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "torchfuse compiled ops", -1, methods};
  PyObject* m = PyModule_Create(&module_def);
  // Whether the CPU kernels' bfloat16 stores use AVX512_BF16 (cpu_vec.h).
  if (m != nullptr &&
      PyModule_AddObject(m, "cpu_bf16_instruction",
                         PyBool_FromLong(torchfuse::cpu::bf16_instruction())) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
}

#endif  // TORCHFUSE_PYTHON_MODULE
