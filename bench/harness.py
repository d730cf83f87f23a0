"""Benchmark machinery shared by every op: timing, peak memory, the memory
floor, reporting. Case definitions live in cases.py; the CLI in run.py.

Conventions (DESIGN.md):
  * torchfuse, torch eager and torch.compile run on the same inputs in one run;
  * forward is timed under no_grad (inference), forward+backward with
    torch.autograd.grad on every differentiable input; backward = (f+b) - f;
  * CPU: the implementations of a case are timed in alternating rounds
    (torch.utils.benchmark blocked_autorange, CPU_ROUNDS rounds that share
    min_run_time), median per call over every block of every round: a VM whose
    speed drifts slows all of them alike instead of whichever ran last;
    CUDA: median over repeats of CUDA-event timed batches, inputs rotated
    through copies that together exceed twice the L2 cache;
  * memory floor: bytes the op must move / copy bandwidth measured in this run
    at the same size (CPU: clone(), which pays for a freshly allocated output,
    as the ops do; CUDA: copy_ into a preallocated tensor);
  * peak memory: CUDA max_memory_allocated above the starting point; CPU the
    process's peak resident set (VmHWM, reset through /proc/self/clear_refs)
    above its starting RSS.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPLS = ("torchfuse", "eager", "compile")


@dataclass
class Case:
    """One benchmark: an op at one real layer shape and dtype."""

    op: str  # op family, e.g. "rms_norm"
    name: str  # shape label, e.g. "4096x4096"
    dtype: torch.dtype
    make_inputs: Callable[[str, torch.dtype], dict]  # (device, dtype) -> kwargs
    torchfuse: Callable[..., object]
    eager: Callable[..., object]
    grad_inputs: tuple[str, ...]  # kwargs that get gradients in forward+backward
    bytes_fwd: int  # bytes that must move, forward
    bytes_bwd: int  # bytes that must move, backward
    tags: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        extra = "".join(f" {k}={v}" for k, v in self.tags.items())
        return f"{self.op} {self.name} {dt}{extra}"


# ----------------------------------------------------------------- helpers
def _outputs(result) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for t in result if isinstance(t, torch.Tensor)]


def fwd_bwd_fn(fn, inputs: dict, grad_names, grad_cache: dict):
    wrt = [inputs[n] for n in grad_names]

    def run():
        outs = _outputs(fn(**inputs))
        if "g" not in grad_cache:
            grad_cache["g"] = [torch.randn_like(o) for o in outs]
        return torch.autograd.grad(outs, wrt, grad_cache["g"])

    return run


def fwd_fn(fn, inputs: dict):
    def run():
        with torch.no_grad():
            return fn(**inputs)

    return run


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


CPU_ROUNDS = 5


def time_cpu(fns: dict[str, Callable[[], object]], min_run_time: float,
             rounds: int = CPU_ROUNDS) -> dict[str, tuple[float, float]]:
    """(median seconds per call, relative spread) of each function, timed in
    `rounds` alternating rounds of blocked_autorange(min_run_time / rounds),
    with torch's current thread count (Timer's own default is one thread).
    The order within a round alternates too, so no implementation always runs
    right after another's cache traffic. The spread is the interquartile range
    of the per-block times over the median.

    Timing each implementation once, one after another, moved single rows of
    the 2026-12-03 files by up to 2x on a VM whose speed drifted; alternating
    puts the drift into every implementation's samples alike.
    """
    from torch.utils import benchmark

    nthreads = torch.get_num_threads()
    timers = {}
    for name, fn in fns.items():
        fn()  # warm: compile, allocator, first-touch
        timers[name] = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=nthreads)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            m = timers[name].blocked_autorange(min_run_time=min_run_time / rounds)
            samples[name].extend(m.times)
    out = {}
    for name, ts in samples.items():
        med = statistics.median(ts)
        if len(ts) >= 4:
            q = statistics.quantiles(ts, n=4)
            spread = (q[2] - q[0]) / med
        else:
            spread = float("nan")
        out[name] = (med, spread)
    return out


def time_cuda(fns: list[Callable[[], object]], repeats: int) -> float:
    """Median seconds per call; calls rotate through `fns` (one per input
    copy) so inputs are not served from L2."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    # Enough calls per timed batch to dwarf the event overhead (~5 ms batches).
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for f in fns:
        f()
    end.record()
    torch.cuda.synchronize()
    per = max(start.elapsed_time(end) / 1e3 / len(fns), 1e-6)
    inner = max(len(fns), int(5e-3 / per))
    times = []
    for _ in range(repeats):
        start.record()
        for i in range(inner):
            fns[i % len(fns)]()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / inner)
    return statistics.median(times)


def _rss() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


def peak_bytes(fn: Callable[[], object], device: str) -> int | None:
    """Peak memory allocated while fn() runs, above what was live before."""
    fn()  # warm (compile, caching allocator)
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        before = _rss()["VmRSS"]
        fn()
        return max(0, _rss()["VmHWM"] - before)
    except OSError:
        return None


_BW_CACHE: dict[tuple[str, int], float] = {}


def copy_bandwidth(device: str, nbytes: int, min_run_time: float, repeats: int) -> float:
    """Bytes/s of a copy of `nbytes` (read + write counted), measured now."""
    key = (device, nbytes)
    if key not in _BW_CACHE:
        n = max(nbytes // 4, 1)
        if device == "cuda":
            copies = max(1, -(-2 * _l2_bytes() // nbytes) + 1)
            srcs = [torch.empty(n, device=device).normal_() for _ in range(copies)]
            dst = torch.empty(n, device=device)
            t = time_cuda([lambda s=s: dst.copy_(s) for s in srcs], repeats)
        else:
            src = torch.randn(n)
            t = time_cpu({"clone": lambda: src.clone()}, min_run_time)["clone"][0]
        _BW_CACHE[key] = 2 * n * 4 / t
    return _BW_CACHE[key]


def _l2_bytes() -> int:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 50 * 2**20))


def _input_bytes(inputs: dict) -> int:
    return sum(t.numel() * t.element_size() for t in inputs.values() if isinstance(t, torch.Tensor))


# --------------------------------------------------------------------- run
def run_case(case: Case, device: str, quick: bool, impls=IMPLS) -> dict:
    """Times and measures one case for each implementation."""
    min_run_time = 0.2 if quick else 1.0
    repeats = 10 if quick else 30
    base_inputs = case.make_inputs(device, case.dtype)
    copies = 1
    if device == "cuda":
        copies = max(1, min(8, -(-2 * _l2_bytes() // max(_input_bytes(base_inputs), 1))))
    input_sets = [base_inputs] + [case.make_inputs(device, case.dtype) for _ in range(copies - 1)]
    fns = {"torchfuse": case.torchfuse, "eager": case.eager}
    if "compile" in impls:
        torch._dynamo.reset()
        fns["compile"] = torch.compile(case.eager)
    result: dict = {"case": case.label, "op": case.op, "shape": case.name,
                    "dtype": str(case.dtype).replace("torch.", ""), "tags": case.tags,
                    "bytes_fwd": case.bytes_fwd, "bytes_bwd": case.bytes_bwd}
    fwd = {impl: [fwd_fn(fns[impl], inp) for inp in input_sets] for impl in impls}
    fb = {}
    for impl in impls:
        grad_cache: dict = {}
        fb[impl] = [fwd_bwd_fn(fns[impl], inp, case.grad_inputs, grad_cache)
                    for inp in input_sets]
    if device == "cuda":
        t_fwd = {impl: (time_cuda(fwd[impl], repeats), None) for impl in impls}
        t_fb = {impl: (time_cuda(fb[impl], repeats), None) for impl in impls}
    else:
        t_fwd = time_cpu({impl: fwd[impl][0] for impl in impls}, min_run_time)
        t_fb = time_cpu({impl: fb[impl][0] for impl in impls}, min_run_time)
    for impl in impls:
        result[impl] = {
            "fwd_ms": t_fwd[impl][0] * 1e3,
            "fwdbwd_ms": t_fb[impl][0] * 1e3,
            "peak_fwd_bytes": peak_bytes(fwd[impl][0], device),
            "peak_fwdbwd_bytes": peak_bytes(fb[impl][0], device),
        }
        if t_fwd[impl][1] is not None:
            result[impl]["fwd_spread"] = t_fwd[impl][1]
            result[impl]["fwdbwd_spread"] = t_fb[impl][1]
    largest = max(t.numel() * t.element_size() for t in base_inputs.values()
                  if isinstance(t, torch.Tensor))
    bw = copy_bandwidth(device, largest, min_run_time, repeats)
    result["copy_GBps"] = bw / 1e9
    floor_fwd = case.bytes_fwd / bw
    floor_bwd = case.bytes_bwd / bw
    result["floor_fwd_ms"] = floor_fwd * 1e3
    result["floor_fwdbwd_ms"] = (floor_fwd + floor_bwd) * 1e3
    tf = result["torchfuse"]
    bwd_ms = tf["fwdbwd_ms"] - tf["fwd_ms"]
    result["torchfuse"]["frac_floor_fwd"] = result["floor_fwd_ms"] / tf["fwd_ms"]
    # backward = (f+b) - f: undefined when noise (or a forward that pays page
    # faults the f+b loop does not) puts f+b at or below f
    result["torchfuse"]["frac_floor_bwd"] = (floor_bwd * 1e3 / bwd_ms if bwd_ms > 0
                                             else float("nan"))
    result["torchfuse"]["frac_floor_fwdbwd"] = result["floor_fwdbwd_ms"] / tf["fwdbwd_ms"]
    for other in impls:
        if other == "torchfuse":
            continue
        result[f"speedup_vs_{other}_fwd"] = result[other]["fwd_ms"] / tf["fwd_ms"]
        result[f"speedup_vs_{other}_fwdbwd"] = result[other]["fwdbwd_ms"] / tf["fwdbwd_ms"]
    return result


# ------------------------------------------------------------------ report
def environment(device: str, quick: bool) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    cwd=ROOT, capture_output=True, text=True).stdout.strip())
    except OSError:
        commit, dirty = "", False
    import torchfuse

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit + ("-dirty" if dirty else ""),
        "torchfuse": torchfuse.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "device_name": (torch.cuda.get_device_name() if device == "cuda"
                        else _cpu_name()),
        "threads": torch.get_num_threads(),
        "quick": quick,
        "cpu_timing": (f"{CPU_ROUNDS} alternating rounds, median per call"
                       if device == "cpu" else None),
        "build": torchfuse.info(),
    }
    return meta


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def _pct(frac) -> str:
    return "n/a" if frac is None or frac != frac else f"{100 * frac:.0f}%"


def _mb(b) -> str:
    return "-" if b is None else f"{b / 2**20:.0f}"


def format_table(results: list[dict]) -> str:
    head = ("| case | fwd ms: torchfuse / eager / compile | fwd speedup vs eager, compile "
            "| fwd % of floor | f+b ms: torchfuse / eager / compile "
            "| f+b speedup vs eager, compile | bwd % of floor "
            "| f+b peak MB: torchfuse / eager / compile |")
    lines = [head, "|" + "---|" * 8]
    for r in results:
        tf, ea, co = r["torchfuse"], r["eager"], r.get("compile")

        def ms(k, tf=tf, ea=ea, co=co):
            return f"{tf[k]:.3f} / {ea[k]:.3f} / " + (f"{co[k]:.3f}" if co else "-")

        def sp(k, r=r, co=co):
            s = f"{r[f'speedup_vs_eager_{k}']:.2f}x"
            return s + (f", {r[f'speedup_vs_compile_{k}']:.2f}x" if co else "")

        peak = (f"{_mb(tf['peak_fwdbwd_bytes'])} / {_mb(ea['peak_fwdbwd_bytes'])} / "
                + (_mb(co["peak_fwdbwd_bytes"]) if co else "-"))
        lines.append(
            f"| {r['case']} | {ms('fwd_ms')} | {sp('fwd')} | {100 * tf['frac_floor_fwd']:.0f}% "
            f"| {ms('fwdbwd_ms')} | {sp('fwdbwd')} | {_pct(tf['frac_floor_bwd'])} | {peak} |"
        )
    return "\n".join(lines)


def write_chart(results: list[dict], meta: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels = [r["case"] for r in results]
    series = [(k, f"speedup_vs_{k.split()[0]}_{k.split()[1]}") for k in
              ("eager fwd", "eager fwdbwd", "compile fwd", "compile fwdbwd")]
    series = [(name, key) for name, key in series if all(key in r for r in results)]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels) + 2), 5))
    width = 0.8 / max(len(series), 1)
    for i, (name, key) in enumerate(series):
        xs = [j + i * width for j in range(len(labels))]
        label = f"vs {name.replace('fwdbwd', 'fwd+bwd')}"
        ax.bar(xs, [r[key] for r in results], width, label=label)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))])
    ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("speedup of torchfuse (x)")
    ax.set_title(f"torchfuse on {meta['device_name']} (torch {meta['torch']}, "
                 f"{meta['commit'][:12]})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def save(results: list[dict], meta: dict, path: str) -> list[str]:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1, default=str)
    written = [path]
    png = os.path.splitext(path)[0] + ".png"
    if write_chart(results, meta, png):
        written.append(png)
    return written


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int):
        self.total, self.done = total, 0

    def step(self, label: str) -> None:
        self.done += 1
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] "
                         f"{self.done}/{self.total} {label[:60]:<60}")
        sys.stderr.flush()
        if self.done == self.total:
            sys.stderr.write("\n")


__all__ = ["Case", "IMPLS", "run_case", "fwd_fn", "fwd_bwd_fn", "environment", "format_table",
           "save", "Progress"]
