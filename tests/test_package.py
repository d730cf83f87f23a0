"""Package-level behaviour: info(), the reference fallback on devices with no
kernel, and importing with the compiled extension missing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import torchfuse
from torchfuse import _ops

from conftest import randn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_info_reports_build_and_ops():
    d = torchfuse.info()
    assert d["version"] == torchfuse.__version__
    assert d["torch"] == torch.__version__
    assert d["extension_loaded"] is True, d["extension_error"]
    # what the extension's stores do, as torch sees the CPU
    expect_bf16 = (d["cpu_capability"] == "AVX512"
                   and getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
    assert d["cpu_bf16_instruction"] == expect_bf16
    for op in ("rms_norm", "add_rms_norm", "rms_norm_backward"):
        assert "cpu" in d["ops"][op]
        if d["cuda_compiled"]:
            assert "cuda" in d["ops"][op]
    out = subprocess.run(
        [sys.executable, "-m", "torchfuse.info"], capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": os.path.join(ROOT, "python")}, check=True,
    )
    assert "rms_norm" in out.stdout and "extension: loaded" in out.stdout


@pytest.mark.skipif("OpenMP" not in torch.__config__.parallel_info(),
                    reason="torch's parallel backend is not OpenMP")
def test_cpu_kernels_built_with_openmp():
    # at::parallel_for is header code: an extension compiled without -fopenmp
    # runs every CPU kernel on one thread, silently. The shared object must
    # call into the OpenMP runtime, and the build must say so.
    if os.environ.get("TORCHFUSE_NO_OPENMP") == "1":
        pytest.skip("built with TORCHFUSE_NO_OPENMP=1")
    assert torchfuse.info()["cpu_threads"] == "openmp"
    with open(torchfuse._C.__file__, "rb") as f:
        assert b"GOMP_parallel" in f.read()


@pytest.mark.skipif(shutil.which("nm") is None, reason="binutils' nm not found")
def test_cpu_vector_moves_are_inlined():
    """The CPU kernels' vector load/store helpers (cpu_vec.h VecIO/AccIO,
    l2_norm's Block) are meant to be inlined into their loops: GCC 12
    outlined them more than once, and each time the hot loops spilled their
    vectors through memory on every call (l2_norm's float32 backward ran
    about 3x slower, see README). No out-of-line copy may be left."""
    so = torchfuse._ops._C.__file__
    out = subprocess.run(["nm", "-C", "--defined-only", so], capture_output=True, text=True,
                         check=True).stdout
    # a member function of one of them (not a function taking their types)
    member = re.compile(r"(cpu::VecIO|cpu::AccIO|::Block)<[^()]*>::\w+\(")
    outlined = [line for line in out.splitlines() if member.search(line)]
    assert not outlined, "\n".join(outlined[:10])
    # Nor a lambda defined inside a parallel task (the for_each_step bodies of
    # the channels_last kernels, TF_INLINE_LAMBDA), where GCC 12 outlined
    # group_norm's elementwise step and that pass ran twice as long. The
    # for_each_step bodies in helpers outside a task are not told apart from
    # the tasks themselves by name, so this does not check them.
    inner = re.compile(r"torchfuse::.*::operator\(\)\(long, long\) const::\{lambda\(")
    outlined = [line for line in out.splitlines() if inner.search(line)]
    assert not outlined, "\n".join(outlined[:10])


def test_fallback_warns_once_and_matches(monkeypatch):
    monkeypatch.setitem(_ops.KERNELS, "rms_norm", frozenset())
    monkeypatch.setattr(_ops, "_warned", set())
    x = randn(3, 10)
    with pytest.warns(RuntimeWarning, match="reference"):
        out = torchfuse.functional.rms_norm(x, (10,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only once per (op, device)
        torchfuse.functional.rms_norm(x, (10,))
    torch.testing.assert_close(out, torchfuse.reference.rms_norm(x, (10,)))


def test_strict_mode_raises(monkeypatch):
    monkeypatch.setitem(_ops.KERNELS, "add_rms_norm", frozenset())
    monkeypatch.setattr(_ops, "STRICT", True)
    with pytest.raises(RuntimeError, match="TORCHFUSE_STRICT"):
        torchfuse.functional.add_rms_norm(randn(2, 4), randn(2, 4), (4,))


def test_import_without_extension(tmp_path):
    # A copy of the package without the compiled _C: import must work and the
    # functions must fall back to the reference.
    shutil.copytree(
        os.path.join(ROOT, "python", "torchfuse"), tmp_path / "torchfuse",
        ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"),
    )
    code = (
        "import warnings, torch, torchfuse\n"
        "d = torchfuse.info()\n"
        "assert not d['extension_loaded'] and d['ops'] == {}, d\n"
        "x = torch.randn(2, 8)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    y = torchfuse.nn.RMSNorm(8)(x)\n"
        "assert any('reference' in str(m.message) for m in w)\n"
        "torch.testing.assert_close(y, torch.nn.functional.rms_norm(x, (8,)))\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
    strict = subprocess.run(
        [sys.executable, "-c", "import torch, torchfuse; "
         "torchfuse.functional.rms_norm(torch.randn(2, 8), (8,))"],
        capture_output=True, text=True, env={**env, "TORCHFUSE_STRICT": "1"},
    )
    assert strict.returncode != 0 and "TORCHFUSE_STRICT" in strict.stderr


@pytest.mark.parametrize("built,cpu_has,loads", [
    ("AVX512", {"AVX512", "AVX2"}, True),
    ("AVX512", {"AVX2"}, False),
    ("AVX2", {"AVX2"}, True),
    ("AVX2", set(), False),
    ("DEFAULT", set(), True),
    (None, set(), True),
])
def test_isa_mismatch(built, cpu_has, loads):
    why = _ops.isa_mismatch(built, cpu_has)
    assert (why is None) == loads
    if not loads:
        assert built in why and "TORCHFUSE_CPU_CAPABILITY" in why


def test_build_for_another_cpu_is_not_loaded():
    """On a CPU without the vector ISA the CPU kernels were compiled for,
    torchfuse does not load the extension (whose kernels would die of an
    illegal instruction): it says why and falls back to the reference."""
    built = torchfuse.info()["cpu_capability"]
    if built not in ("AVX512", "AVX2"):
        pytest.skip(f"built for {built}: runs on any CPU")
    code = (
        "import warnings, torch\n"
        "torch.cpu._is_avx512_supported = lambda: False\n"
        "torch.cpu._is_avx2_supported = lambda: False\n"
        "import torchfuse\n"
        "d = torchfuse.info()\n"
        f"assert not d['extension_loaded'] and {built!r} in d['extension_error'], d\n"
        "x = torch.randn(2, 8)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    y = torchfuse.functional.rms_norm(x, (8,))\n"
        "assert any('illegal instruction' in str(m.message) for m in w)\n"
        "torch.testing.assert_close(y, torch.nn.functional.rms_norm(x, (8,)))\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "python")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
