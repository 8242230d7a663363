"""Where a DilateFormer training step's time goes: ms and % of the step by category of op, by wall clock.

The step (forward, backward, AdamW) is timed whole, interleaved with a 2048^3 fp32 matmul (the GEMM reference);
then every op it ran is replayed alone at its real shapes and timed (no profiler). See docs/performance.md.

python benchmarks/bench_breakdown.py --threads 2                  # Tiny, batch 8, 224x224
python benchmarks/bench_breakdown.py --threads 2 --repeats 5 --top 20
python benchmarks/bench_breakdown.py --threads 2 --recompute-ab   # training with / without the norm recompute
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from dilateformer.analysis.measure import interleaved_median_ms, saved_for_backward_bytes
from dilateformer.analysis.model_bench import format_training_breakdown, run_training_breakdown
from dilateformer.models import create_dilateformer


def recompute_ab(name: str, batch_size: int, img_size: int, repeats: int) -> None:
    """Training img/s and saved MB with the recomputed norms (stem BN + GELU, the blocks' second LayerNorm) and
    without them, in interleaved rounds. A no-op forward hook on a norm makes it take the plain path."""
    steps, saved = [], []
    for plain in (False, True):
        torch.manual_seed(0)
        model = create_dilateformer(name, drop_path_rate=0.1).train()
        if plain:
            for module_name, module in model.named_modules():
                if module_name.endswith("norm2") or isinstance(module, nn.BatchNorm2d):
                    module.register_forward_hook(lambda *args: None)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x, target = torch.randn(batch_size, 3, img_size, img_size), torch.randint(0, 1000, (batch_size,))

        def step(model=model, optimizer=optimizer, x=x, target=target) -> None:
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), target).backward()
            optimizer.step()

        steps.append(step)
        saved.append(saved_for_backward_bytes(lambda model=model, x=x: model(x)) / 1e6)
    ms = interleaved_median_ms(steps, repeats=repeats, warmup=1)
    for label, t, mb in zip(("recomputed norms", "plain norms"), ms, saved, strict=True):
        print(f"{label:>17}: train {batch_size / (t / 1e3):.2f} img/s, saved for backward {mb:.0f} MB")
    print(f"recomputed / plain speed: {ms[1] / ms[0]:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dilateformer_tiny")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--msda-backend", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--top", type=int, default=12, help="costliest op signatures to list")
    parser.add_argument("--recompute-ab", action="store_true", help="only the with/without norm-recompute A/B")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.recompute_ab:
        recompute_ab(args.model, args.batch_size, args.img_size, args.repeats)
        return
    result = run_training_breakdown(
        args.model, args.batch_size, args.img_size, args.msda_backend, args.repeats, args.threads, log=print
    )
    print()
    print(format_training_breakdown(result, top=args.top))


if __name__ == "__main__":
    main()
