"""The loops use timm's helpers: ``unwrap_model`` sees through DDP and ``torch.compile``; ``accuracy`` counts."""

from __future__ import annotations

import torch
import torch.distributed as dist
from timm.utils import unwrap_model

from dilateformer.train.distributed import DistInfo
from dilateformer.train.engine import evaluate


def test_unwrap_model_sees_through_compile_and_ddp(tmp_path) -> None:
    model = torch.nn.Linear(3, 2)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = torch.compile(torch.nn.parallel.DistributedDataParallel(model))
        assert unwrap_model(wrapped) is model
        assert unwrap_model(torch.compile(model)) is model
    finally:
        dist.destroy_process_group()


def test_evaluate_counts_top1_and_top5_like_a_float64_reference() -> None:
    torch.manual_seed(0)
    logits = torch.randn(50, 7, dtype=torch.float64)
    target = torch.randint(0, 7, (50,))

    class Fixed(torch.nn.Module):  # the prepared logits of the samples whose indices come in
        def __init__(self, columns: int) -> None:
            super().__init__()
            self.columns = columns

        def forward(self, index: torch.Tensor) -> torch.Tensor:
            return logits[index, : self.columns]

    loader = [(torch.arange(i, min(i + 16, 50)), target[i : i + 16]) for i in range(0, 50, 16)]  # batches 16,16,16,2
    stats = evaluate(Fixed(7), loader, DistInfo())
    ranks = (logits > logits.gather(1, target[:, None])).sum(1)  # how many classes score above the true one
    assert stats.images == 50
    assert stats.top1 == 100.0 * int((ranks < 1).sum()) / 50
    assert stats.top5 == 100.0 * int((ranks < 5).sum()) / 50
    three = evaluate(Fixed(3), [(torch.arange(50), target.clamp(max=2))], DistInfo())
    assert three.top5 == 100.0  # k above the class count: every sample is in its top-3
