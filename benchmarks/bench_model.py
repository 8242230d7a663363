"""DilateFormer model benchmark: inference (eager and torch.compile), training, saved-for-backward memory.

Rows are measured in interleaved rounds, and a second table gives each row relative to the official-style model
(the official architecture with unfold MSDA, same weights) from the same run.

python benchmarks/bench_model.py                       # Tiny, its global twin and the official-style model
python benchmarks/bench_model.py --msda-backends auto eager --no-compile
"""

from __future__ import annotations

import argparse

from dilateformer.analysis.model_bench import format_model_benchmark, run_model_benchmark


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
    args = parser.parse_args()
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
        log=print,
    )
    print()
    print(format_model_benchmark(rows))


if __name__ == "__main__":
    main()
