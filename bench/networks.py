#!/usr/bin/env python3
"""Whole networks: a torchvision model as it is (eager) against the same
model after torchfuse.convert(), same weights, same input.

    python bench/networks.py                         # CPU, every model and mode
    python bench/networks.py --only mobilenet_v2 --threads 2
    python bench/networks.py --device cuda --out bench/results/cuda-networks.json

What the layer benchmarks (run.py) cannot show: whether a converted model is
faster where users run it, per-call overheads included (the layers of a
batch-1 inference are small, so the Python and dispatch cost of each call is
a visible part of the total). Models are built with random weights (no
downloads). Modes: batch-1 inference under inference_mode, and a training
step (forward, backward of the sum of the logits) at batch 8; each in
contiguous and channels_last memory. On the CPU the two models are timed in
alternating rounds (harness.time_cpu); on CUDA with events (time_cuda).
The converted model's output is compared with eager's before timing.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))

from run import STEADY_MALLOC, steady_malloc  # noqa: E402

if __name__ == "__main__":
    steady_malloc(sys.argv[1:], __file__)

import torch  # noqa: E402

from harness import environment, time_cpu, time_cuda  # noqa: E402

# (torchvision builder, modes): the networks whose layers torchfuse swaps in
# (depthwise, grouped + shuffle, grouped).
MODELS = [
    ("mobilenet_v2", ("inference", "training")),
    ("shufflenet_v2_x1_0", ("inference", "training")),
    ("resnext50_32x4d", ("inference",)),
]
BATCH = {"inference": 1, "training": 8}


def _step(model, x, mode):
    if mode == "inference":
        def run():
            with torch.inference_mode():
                return model(x)
    else:
        params = [p for p in model.parameters() if p.requires_grad]

        def run():
            out = model(x)
            return torch.autograd.grad(out.sum(), params)
    return run


def run_network(name: str, mode: str, layout: str, device: str, min_run_time: float,
                dtype: torch.dtype = torch.float32) -> dict:
    import torchvision

    import torchfuse

    torch.manual_seed(0)
    eager = getattr(torchvision.models, name)(weights=None).to(device, dtype)
    eager.train(mode == "training")
    converted = torchfuse.convert(copy.deepcopy(eager))
    x = torch.randn(BATCH[mode], 3, 224, 224, device=device).to(dtype)
    if layout == "channels_last":
        fmt = torch.channels_last
        eager, converted = eager.to(memory_format=fmt), converted.to(memory_format=fmt)
        x = x.contiguous(memory_format=fmt)
    fns = {"torchfuse": _step(converted, x, mode), "eager": _step(eager, x, mode)}
    with torch.inference_mode():  # same function (batch norm in eval: no state change)
        ref, got = eager.eval()(x), converted.eval()(x)
    eager.train(mode == "training")
    converted.train(mode == "training")
    err = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
    if device == "cpu":
        t = {k: v[0] for k, v in time_cpu(fns, min_run_time).items()}
    else:
        t = {k: time_cuda([f], 15) for k, f in fns.items()}
    swapped = sum(type(m).__module__.startswith("torchfuse") for m in converted.modules())
    return {"network": name, "mode": mode, "batch": BATCH[mode], "layout": layout,
            "dtype": str(dtype).replace("torch.", ""),
            "swapped_modules": swapped, "max_rel_diff": err,
            "ms": {k: 1e3 * v for k, v in t.items()},
            "speedup": t["eager"] / t["torchfuse"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--only", default="", help="comma-separated substrings of network names")
    p.add_argument("--mode", default="", choices=["", "inference", "training"])
    p.add_argument("--time", type=float, default=4.0,
                   help="CPU seconds of timing per model and case (default 4)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    p.add_argument("--dtype", default="float32",
                   help="the models' parameters and input: float32 (default), bfloat16, ...")
    p.add_argument("--out", default="", help="JSON path; default bench/out/")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU visible", file=sys.stderr)
        return 2
    meta = environment(args.device, False)
    meta["malloc"] = ("glibc " + " ".join(f"{k}={os.environ[k]}" for k in STEADY_MALLOC)
                      if os.environ.get("TORCHFUSE_BENCH_MALLOC") == "steady" else "system")
    meta["what"] = "whole networks: eager vs torchfuse.convert(), bench/networks.py"
    meta["dtype"] = args.dtype
    print(f"# {meta['device_name']}, {meta['threads']} threads, torch {meta['torch']}, "
          f"{args.dtype}, "
          f"commit {meta['commit'][:12]}, {meta['date']}", flush=True)
    print("| network | mode (batch) | layout | torchfuse / eager ms | speed-up | "
          "modules swapped | max rel. diff |")
    print("| --- | --- | --- | --- | --- | --- | --- |", flush=True)
    only = [k.strip() for k in args.only.split(",") if k.strip()]
    results = []
    for name, modes in MODELS:
        if only and not any(k in name for k in only):
            continue
        for mode in modes:
            if args.mode and mode != args.mode:
                continue
            for layout in ("contiguous", "channels_last"):
                r = run_network(name, mode, layout, args.device, args.time,
                                getattr(torch, args.dtype))
                results.append(r)
                print(f"| {name} | {mode} ({r['batch']}) | {layout} | "
                      f"{r['ms']['torchfuse']:.2f} / {r['ms']['eager']:.2f} | "
                      f"{r['speedup']:.2f}x | {r['swapped_modules']} | "
                      f"{r['max_rel_diff']:.1e} |", flush=True)
    out = args.out or os.path.join(HERE, "out", f"{args.device}-networks-{meta['date'][:10]}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1, default=str)
    print(f"wrote {os.path.relpath(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
