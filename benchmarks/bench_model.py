"""DilateFormer model benchmark: inference (eager and torch.compile), training, saved-for-backward memory.

Rows are measured in interleaved rounds, each round also timing a 2048^3 fp32 matmul: the GEMM floor row is its
rate at the model's FLOPs (x3 for training). The attainable floor row is the sum of the model's own ops, each
replayed alone at its real shapes. Then each row's share of both floors (%), and each row relative to the
official-style model (the official architecture with unfold MSDA, same weights) from the same run.

python benchmarks/bench_model.py --threads 2           # Tiny, its global twin, the official-style model, floors
python benchmarks/bench_model.py --threads 2 --no-twin --no-official --repeats 3    # Tiny and its floors only
python benchmarks/bench_model.py --msda-backends auto eager --no-compile --no-floors
python benchmarks/bench_model.py --threads 2 --keep-buffers   # the allocator setting the dilateformer CLI runs with
"""

from __future__ import annotations

import argparse
import os

from dilateformer.analysis.model_bench import format_model_benchmark, run_model_benchmark
from dilateformer.ops import native


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["dilateformer_tiny"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--msda-backends", nargs="+", default=["auto"])
    parser.add_argument("--no-twin", action="store_true", help="skip the global-attention twin")
    parser.add_argument("--no-official", action="store_true", help="skip the official-style baseline")
    parser.add_argument("--no-compile", action="store_true", help="skip whole-model torch.compile inference")
    parser.add_argument("--no-train", action="store_true", help="skip the training step and memory")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-floors", action="store_true", help="skip the GEMM and attainable floor rows")
    parser.add_argument(
        "--keep-buffers",
        action="store_true",
        help="keep freed large buffers mapped, as the dilateformer CLI does (native.keep_large_buffers_mapped)",
    )
    args = parser.parse_args()
    if args.keep_buffers or os.environ.get("DILATEFORMER_KEEP_BUFFERS") == "1":
        print("allocator: freed large buffers kept mapped:", native.keep_large_buffers_mapped())
    else:
        print("allocator: glibc defaults (freed buffers over 32 MB, and a trimmed heap top, go back to the OS)")
    rows = run_model_benchmark(
        models=args.models,
        batch_size=args.batch_size,
        img_size=args.img_size,
        include_twin=not args.no_twin,
        include_official=not args.no_official,
        msda_backends=args.msda_backends,
        compiled=not args.no_compile,
        train=not args.no_train,
        repeats=args.repeats,
        warmup=args.warmup,
        threads=args.threads,
        floors=not args.no_floors,
        log=print,
    )
    print()
    print(format_model_benchmark(rows))


if __name__ == "__main__":
    main()
