#!/usr/bin/env python3
"""torchfuse benchmarks: torchfuse vs torch eager vs torch.compile.

    python bench/run.py                         # every case on CPU
    python bench/run.py --device cuda --only rms_norm --dtype bfloat16
    python bench/run.py --quick --out bench/out/cpu.json

Prints a table, writes JSON and a PNG chart (speedups). See harness.py for
how times, peak memory and the memory floor are measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))

import torch  # noqa: E402

from cases import CASES  # noqa: E402
from harness import IMPLS, Progress, environment, format_table, run_case, save  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="", help="comma-separated dtypes, e.g. float32,bfloat16")
    p.add_argument("--only", default="", help="comma-separated substrings of case labels")
    p.add_argument("--quick", action="store_true", help="shorter timing (and smaller case set)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--out", default="", help="JSON path (PNG beside it); default bench/out/")
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    p.add_argument("--report", default="", help="print the table of a saved JSON file and exit")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for every implementation (default: torch's)")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    if args.report:
        with open(args.report) as f:
            saved = json.load(f)
        m = saved["meta"]
        threads = f", {m['threads']} threads" if m["device"] == "cpu" else ""
        print(f"{m['device_name']}{threads}, torch {m['torch']}, commit {m['commit'][:12]}, "
              f"{m['date']}{' (quick)' if m['quick'] else ''}\n")
        print(format_table(saved["results"]))
        return 0

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU visible", file=sys.stderr)
        return 2
    cases = CASES
    if args.dtype:
        want = {d.strip() for d in args.dtype.split(",")}
        cases = [c for c in cases if str(c.dtype).replace("torch.", "") in want]
    if args.only:
        keys = [k.strip() for k in args.only.split(",")]
        cases = [c for c in cases if any(k in c.label for k in keys)]
    if args.quick and not args.only:
        # One shape per op family and dtype: a smoke run of the harness.
        seen, quick = set(), []
        for c in cases:
            key = (c.op, c.dtype)
            if key not in seen:
                seen.add(key)
                quick.append(c)
        cases = quick
    if args.list:
        print("\n".join(c.label for c in cases))
        return 0
    if not cases:
        print("no case selected", file=sys.stderr)
        return 2

    impls = tuple(i for i in IMPLS if not (args.no_compile and i == "compile"))
    meta = environment(args.device, args.quick)
    print(f"# torchfuse benchmarks on {meta['device_name']}, torch {meta['torch']}, "
          f"commit {meta['commit'][:12]}, {meta['date']}", flush=True)
    progress = Progress(len(cases))
    results = []
    for case in cases:
        results.append(run_case(case, args.device, args.quick, impls))
        progress.step(case.label)
    print(format_table(results))
    out = args.out or os.path.join(
        HERE, "out", f"{args.device}-{meta['date'][:10]}{'-quick' if args.quick else ''}.json")
    for path in save(results, meta, out):
        print(f"wrote {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
