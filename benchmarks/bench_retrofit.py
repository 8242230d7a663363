"""Retrofit benchmark: a ViT-S/16-like model (random weights) before and after swapping its first 6 of 12 blocks
to MSDA (prefix="global" and "keys"), against timm's fused (SDPA) and unfused attention: GMACs, MB saved for
backward, forward and training-step img/s.

    python benchmarks/bench_retrofit.py                 # 224 and 512, batch 1, 3 interleaved repeats
    python benchmarks/bench_retrofit.py --sizes 224 --repeats 5 --batch 2

The three models are timed in interleaved rounds (one call of each in turn), so machine drift slows all alike;
ratios are against the unmodified model in the same run. MB = 1e6 bytes.
"""

from __future__ import annotations

import argparse

import timm
import torch

from dilateformer.analysis.measure import format_table, gmacs, interleaved_median_ms, saved_for_backward_bytes, to_mb
from dilateformer.retrofit import msda_vit

# (label, retrofit prefix or None, timm's fused SDPA attention in the global blocks)
VARIANTS = (
    ("ViT-S/16 (global, fused SDPA)", None, True),
    ("ViT-S/16 (global, unfused)", None, False),
    ("retrofit 0-5, prefix global", "global", True),
    ("retrofit 0-5, prefix keys", "keys", True),
)


def _models(name: str, size: int) -> list[torch.nn.Module]:
    models = []
    for _, prefix, fused in VARIANTS:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, img_size=size, num_classes=1000)
        for block in model.blocks:
            # timm's unfused path materialises the N x N probabilities, as it does wherever attention maps are read.
            block.attn.fused_attn = fused
        if prefix is not None:
            msda_vit(model, range(6), prefix=prefix, measure=False)
        models.append(model)
    return models


def measure(name: str, size: int, batch: int, repeats: int) -> list[list[object]]:
    models = _models(name, size)
    x = torch.randn(batch, 3, size, size)
    macs = [gmacs(m, x[:1], on_meta=True) for m in models]
    saved = []
    for model in models:
        model.train()
        saved.append(to_mb(saved_for_backward_bytes(lambda m=model: m(x))))

    def forward(m):
        m.eval()
        with torch.no_grad():
            m(x)

    def train_step(m):
        m.train()
        m(x).sum().backward()
        m.zero_grad(set_to_none=True)

    fwd_ms = interleaved_median_ms([lambda m=m: forward(m) for m in models], repeats=repeats, warmup=1)
    train_ms = interleaved_median_ms([lambda m=m: train_step(m) for m in models], repeats=repeats, warmup=1)
    rows = []
    for i, (label, _, _) in enumerate(VARIANTS):
        fwd_ips, train_ips = batch * 1e3 / fwd_ms[i], batch * 1e3 / train_ms[i]
        rows.append([
            size, label, macs[i], macs[i] / macs[0], saved[i], saved[i] / saved[0],
            fwd_ips, fwd_ms[0] / fwd_ms[i], train_ips, train_ms[0] / train_ms[i],
        ])  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--sizes", default="224,512", help="comma-separated input sizes")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        rows += measure(args.model, size, args.batch, args.repeats)
    headers = ["size", "model", "GMACs", "x", "MB saved", "x", "fwd img/s", "x speed", "train img/s", "x speed"]
    print(f"{args.model}, random weights, batch {args.batch}, median of {args.repeats} interleaved rounds, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(format_table(headers, rows))


if __name__ == "__main__":
    main()
