"""The CUDA emulator (tools/cuda_emu) itself: each kind of defect it is there
to catch is caught, in kernels written with that defect (selftest.cu). Runs
with TORCHFUSE_CUDA_EMU=1 (make test-emu), which also runs every other test
file against the CUDA kernels."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import CUDA_EMU

pytestmark = pytest.mark.skipif(not CUDA_EMU, reason="TORCHFUSE_CUDA_EMU=1 (make test-emu) only")

ORDERS = ["forward", "reverse", "shuffle1"]
EMU_DIR = os.path.join(os.path.dirname(__file__), "..", "tools", "cuda_emu")


def _run(name, order="forward", extra_env=None):
    """Runs a self-test kernel in a fresh process under the given thread
    order (the emulator reads CUEMU_ORDER at each launch); returns its output
    or the error message."""
    code = (
        "import sys, torch\n"
        f"sys.path.insert(0, {EMU_DIR!r})\n"
        "import build\n"
        "torch.ops.load_library(build.build())\n"
        "try:\n"
        f"    print(torch.ops.cuemu_selftest.run({name!r}).tolist())\n"
        "except RuntimeError as e:\n"
        "    print('ERROR', str(e).splitlines()[0])\n"
    )
    env = dict(os.environ, CUEMU_ORDER=order, **(extra_env or {}))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=600, check=extra_env is None)
    if extra_env is not None:
        return res.stdout + res.stderr
    return res.stdout.strip().splitlines()[-1]


def _expected_neighbour():
    return [float((t + 1) % 64 + 1) for t in range(64)]


def test_barrier_makes_the_result_order_independent():
    for order in ORDERS:
        assert _run("neighbour_synced", order) == str(_expected_neighbour())


def test_missing_barrier_changes_the_result():
    """Threads run ahead to their next barrier in the chosen order, so a read
    of another thread's shared-memory write without a barrier between them
    sees a stale value under some order."""
    outs = {order: _run("neighbour_unsynced", order) for order in ORDERS}
    assert any(o != str(_expected_neighbour()) for o in outs.values()), outs


def test_blocks_reading_each_others_writes_depend_on_the_order():
    """Blocks run one after the other in the CUEMU_ORDER order too: a block
    that reads what another block of the same launch writes (a race on a
    GPU) gives a result that changes with the order."""
    prefix = [float((b + 1) * (b + 2) // 2) for b in range(64)]
    outs = {order: _run("cross_block", order) for order in ORDERS}
    assert outs["forward"] == str(prefix), outs
    assert any(o != str(prefix) for o in outs.values()), outs


def test_unwritten_shared_memory_reads_nan():
    """Shared memory is filled with NaN bytes before every block: a read of
    what no thread of the block wrote gives NaN (here the second block reads
    what the first left), not a value left by an earlier block."""
    out = _run("unwritten_shared")
    assert out == str([float("nan")] * 64), out


@pytest.mark.parametrize("name,message", [
    ("divergent_shuffle", "wait on each other"),
    ("exited_lanes", "does not take part"),
    ("grid_y", "grid.y = 70000"),
    ("block_size", "not a valid block"),
    ("misaligned", "misaligned"),
])
def test_defect_is_an_error(name, message):
    out = _run(name)
    assert out.startswith("ERROR") and message in out, out


def _gcc_lib(name):
    try:
        path = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return path if os.path.isabs(path) and os.path.exists(path) else None


def _asan_env():
    """The environment of `make test-emu-asan`: libasan first, then libstdc++
    (so that ASan finds the real __cxa_throw at start-up)."""
    libs = [_gcc_lib("libasan.so"), _gcc_lib("libstdc++.so")]
    if None in libs:
        return None
    return {"CUEMU_ASAN": "1", "LD_PRELOAD": " ".join(libs), "ASAN_OPTIONS": "detect_leaks=0"}


needs_asan = pytest.mark.skipif(_asan_env() is None, reason="gcc's libasan.so not found")


@needs_asan
def test_asan_build_reports_out_of_bounds_writes():
    """CUEMU_ASAN=1 (build.py) builds the emulator with AddressSanitizer: a
    kernel writing past the end of its tensor is reported."""
    out = _run("out_of_bounds", extra_env=_asan_env())
    assert "heap-buffer-overflow" in out and "copy_kernel" in out, out[-2000:]


@needs_asan
def test_asan_build_lets_errors_through():
    """Under ASan an op that raises (a C++ exception) raises in Python as
    without it; with libasan preloaded alone the process ended there."""
    out = _run("block_size", extra_env=_asan_env())
    assert "ERROR" in out and "not a valid block" in out, out[-2000:]


def test_aligned_vector_access_is_fine():
    out = _run("aligned")
    assert not out.startswith("ERROR"), out
    assert torch.tensor(eval(out))[8:12].tolist() == [0.0] * 4  # noqa: S307 (our own output)


@pytest.mark.parametrize("op", ["rms_norm", "group_norm", "local_response_norm",
                                "spatial_response_norm", "l2_norm", "channel_shuffle",
                                "style_loss", "conv2d", "conv2d_depthwise"])
def test_cuda_kernels_replace_the_cpu_ones(op):
    """Under TORCHFUSE_CUDA_EMU=1 each torchfuse op on CPU tensors runs the
    emulated CUDA kernels (so the rest of the suite tests them): every call
    launches kernels, forward and backward."""
    from torchfuse import functional as F

    x = torch.randn(2, 8, 5, 6, requires_grad=True)
    calls = {
        "rms_norm": lambda: F.rms_norm(x, [6]),
        "group_norm": lambda: F.group_norm(x, 4),
        "local_response_norm": lambda: F.local_response_norm(x, 3),
        "spatial_response_norm": lambda: F.spatial_response_norm(x, 3),
        "l2_norm": lambda: F.l2_norm(x, dim=1),
        "channel_shuffle": lambda: F.channel_shuffle(x, 2),
        "style_loss": lambda: F.style_loss(x, torch.zeros(8, 8)),
        "conv2d": lambda: F.conv2d(x, torch.randn(4, 4, 3, 3), None, 1, 1, 1, 2, 2),
        "conv2d_depthwise": lambda: F.conv2d(x, torch.randn(8, 1, 3, 3), None, 1, 1, 1, 8),
    }
    before = torch.ops.cuemu_selftest.launch_count()
    out = calls[op]()
    middle = torch.ops.cuemu_selftest.launch_count()
    out.backward(torch.ones_like(out))
    assert before < middle < torch.ops.cuemu_selftest.launch_count()
