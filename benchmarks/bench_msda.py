"""MSDA op benchmark: backends vs the official-style unfold, SDPA global attention and the byte floor.

    python benchmarks/bench_msda.py            # full run: standard shapes, 32..512 sweep, first-call latency
    python benchmarks/bench_msda.py --quick    # fewer repeats, smaller sweep, no latency subprocesses
    python benchmarks/bench_msda.py --floor    # native only, against the addcmul floor: stage 1, 256, 512 (~1 min)

Prints medians; speed-ups are ratios against the unfold baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from dilateformer.analysis.measure import format_table
from dilateformer.analysis.op_bench import (
    STANDARD_SHAPES,
    format_floor_rows,
    format_op_rows,
    format_sweep_rows,
    run_floor_ratios,
    run_op_benchmark,
    run_scaling_sweep,
)

_FIRST_CALL = r"""
import json, sys, time, torch
from dilateformer.functional import multi_scale_dilated_attention as msda
shapes = {"first shape": (8, 56, 56, 3, 24), "new size": (8, 28, 36, 3, 24), "third size": (4, 40, 44, 3, 24)}
result = {}
for label, shape in shapes.items():
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    start = time.perf_counter()
    out = msda(q, k, v, backend=sys.argv[1])
    forward = time.perf_counter() - start
    out.sum().backward()
    result[label] = (forward, time.perf_counter() - start)
print(json.dumps(result))
"""


def first_call_latency(backend: str, cold: bool) -> dict:
    """Seconds to the first forward and forward+backward in a fresh process, for each new image size.

    Cold: empty build caches (inductor's and dilateformer's), as on a new machine; warm: caches from earlier runs.
    """
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as cache:
        if cold:
            env["TORCHINDUCTOR_CACHE_DIR"] = env["DILATEFORMER_CACHE_DIR"] = cache
        out = subprocess.run(
            [sys.executable, "-c", _FIRST_CALL, backend], env=env, capture_output=True, text=True, check=True
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and sizes, no latency runs")
    parser.add_argument("--floor", action="store_true", help="only the native backend against the addcmul floor")
    parser.add_argument("--repeats", type=_positive, help="timed rounds per measurement (default 10, 3 with --quick)")
    parser.add_argument("--json", help="also write all rows to this JSON file")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 10)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, CPU", flush=True)

    def progress(message: str) -> None:
        print(f"  .. {message}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    if args.floor:
        floor = run_floor_ratios(repeats=repeats, progress=progress)
        print("\nnative vs the addcmul floor (reads 3 tensors, writes 1), interleaved rounds; fwd+bwd through")
        print("autograd.grad with a fixed upstream gradient; growth = fwd+bwd ms / that of the row above")
        print(format_floor_rows(floor), flush=True)
        print(f"\nwall time {time.perf_counter() - started:.0f} s")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"floor": floor}, f, indent=1)
        return
    rows = run_op_benchmark(STANDARD_SHAPES, repeats=repeats, progress=progress)
    print("\nMSDA op, kernel 3, dilations (1, 2, 3); x = speed-up over unfold; saved/qkvo = MB saved / (q+k+v+out)")
    print(format_op_rows(rows), flush=True)
    sizes = (32, 64, 128) if args.quick else (32, 64, 128, 256, 512)
    sweep = run_scaling_sweep(
        sizes, backends=("eager", "native", "compiled"), repeats=max(3, repeats // 2), progress=progress
    )
    print("\nScaling sweep, B=1, 3 heads x 24 (global attention only up to 64x64 tokens)")
    print(format_sweep_rows(sweep), flush=True)
    latency = {}
    if not args.quick:
        for backend in ("native", "compiled"):
            for cold in (True, False):
                key = f"{backend}, {'cold' if cold else 'warm'} cache"
                progress(f"first-call latency: {key}")
                latency[key] = first_call_latency(backend, cold)
        table = [[key, label, fwd, total] for key, runs in latency.items() for label, (fwd, total) in runs.items()]
        print("\nFirst calls in a fresh process, seconds (stage-1 shape, then two new image sizes)")
        print(format_table(["backend, build cache", "call", "forward s", "forward+backward s"], table))
    print(f"\nwall time {time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"op": rows, "sweep": sweep, "first_call": latency}, f, indent=1)


if __name__ == "__main__":
    main()
