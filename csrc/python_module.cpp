// The Python module torchfuse._C (built by setup.py only; the CMake/libtorch
// library has no Python). Importing it loads this shared object, which runs
// every static op registration; everything is reachable through
// torch.ops.torchfuse.
//
// The module also has direct entries for the ops whose cost on small tensors
// is the call path rather than the kernel: channel_shuffle and cat_shuffle.
// A call through torch.ops binds the Python arguments against the schema and
// runs the op boxed; torchfuse.functional's own checks and routing add more.
// A direct entry takes the plain case whole: exact torch.Tensor arguments
// (no subclass, no torch function mode; cat_shuffle: one dtype), an int
// `groups`, no gradient to
// record (grad mode off or no input requiring grad), a device with a kernel.
// It then calls the op's typed handle through the dispatcher below the
// Autograd key (device kernels, fake/meta tensors and dispatch modes are
// reached as before) and returns the result. Any other call returns None,
// and the caller takes its usual path, which raises the usual errors.
// torchfuse.functional uses them outside torch.compile only.
#ifdef TORCHFUSE_PYTHON_MODULE

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <Python.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>
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
  if (!t.defined() || (t.requires_grad() && c10::GradMode::is_enabled())) return nullptr;
  return &t;
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

template <typename Sig, typename... Args>
PyObject* call_below_autograd(const Op<Sig>& op, const Args&... args) {
  at::Tensor out;
  {
    ReleaseGil no_gil;
    at::AutoDispatchBelowAutograd below_autograd;
    out = op.handle.call(args...);
  }
  return THPVariable_Wrap(std::move(out));
}

// channel_shuffle(input, groups) -> Tensor or None
PyObject* channel_shuffle(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  static const Op<at::Tensor(const at::Tensor&, int64_t)> op("torchfuse::channel_shuffle");
  if (nargs != 2) Py_RETURN_NONE;
  const at::Tensor* input = plain_tensor(args[0]);
  const std::optional<int64_t> groups = plain_int(args[1]);
  if (input == nullptr || !groups || !op.has_kernel(*input)) Py_RETURN_NONE;
  return call_below_autograd(op, *input, *groups);
  END_HANDLE_TH_ERRORS
}

// cat_shuffle(tensors, groups) -> Tensor or None; tensors a list or tuple
PyObject* cat_shuffle(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  static const Op<at::Tensor(at::TensorList, int64_t)> op("torchfuse::cat_shuffle");
  if (nargs != 2 || !(PyList_CheckExact(args[0]) || PyTuple_CheckExact(args[0]))) {
    Py_RETURN_NONE;
  }
  const std::optional<int64_t> groups = plain_int(args[1]);
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(args[0]);
  PyObject** items = PySequence_Fast_ITEMS(args[0]);
  if (!groups || n == 0) Py_RETURN_NONE;
  std::vector<at::Tensor> tensors;
  tensors.reserve(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    const at::Tensor* t = plain_tensor(items[i]);
    // Mixed dtypes are promoted by the usual path first.
    if (t == nullptr || !op.has_kernel(*t) || (i > 0 && t->dtype() != tensors[0].dtype())) {
      Py_RETURN_NONE;
    }
    tensors.push_back(*t);
  }
  return call_below_autograd(op, at::TensorList(tensors), *groups);
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
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "torchfuse compiled ops", -1, methods};
  return PyModule_Create(&module_def);
}
}

#endif  // TORCHFUSE_PYTHON_MODULE
