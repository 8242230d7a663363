"""The training and evaluation loops: one epoch each, progress bar, metrics reduced across ranks."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from dilateformer.errors import CommandError
from dilateformer.train.distributed import DistInfo, all_reduce_sum


@dataclass
class EpochStats:
    loss: float
    top1: float
    top5: float = float("nan")
    images: int = 0
    seconds: float = 0.0

    @property
    def img_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


def amp_dtype(device: torch.device) -> torch.dtype:
    """The ``--amp`` dtype: fp16 on CUDA (with a gradient scaler), bf16 elsewhere (no scaler needed)."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def autocast(device: torch.device, enabled: bool):
    """Autocast in :func:`amp_dtype`; a no-op context when disabled."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype(device))


class Progress:
    """tqdm bar on a terminal; plain lines every ``log_interval`` steps otherwise (logs, CI, tests)."""

    def __init__(self, total: int, desc: str, enabled: bool, log_interval: int):
        self.total, self.desc, self.enabled, self.log_interval = total, desc, enabled, max(1, log_interval)
        self.bar = None
        self.start = time.perf_counter()
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True, file=sys.stderr)

    def update(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        text = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in values.items()}
        if self.bar is not None:
            self.bar.set_postfix(text, refresh=False)
            self.bar.update(1)
        elif step % self.log_interval == 0 or (step == self.total and self.log_interval <= self.total):
            elapsed = time.perf_counter() - self.start
            eta = elapsed / step * (self.total - step)
            fields = "  ".join(f"{k} {v}" for k, v in text.items())
            print(f"{self.desc} step {step}/{self.total}  {fields}  eta {eta:.0f}s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    scheduler,
    info: DistInfo,
    *,
    epoch: int,
    num_epochs: int,
    num_updates: int,
    mixup_fn: Callable | None = None,
    model_ema=None,
    amp: bool = False,
    scaler=None,
    clip_grad: float | None = None,
    log_interval: int = 50,
) -> tuple[EpochStats, int]:
    """One pass over ``loader``; returns the reduced stats and the updated optimizer-step count."""
    from timm.utils import unwrap_model

    model.train()
    device = info.device
    progress = Progress(len(loader), f"epoch {epoch + 1}/{num_epochs}", info.is_main, log_interval)
    loss_sum, correct, seen = 0.0, 0.0, 0
    start = time.perf_counter()
    for step, (images, target) in enumerate(loader, start=1):
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        hard_target = target
        if mixup_fn is not None:
            images, target = mixup_fn(images, target)
        with autocast(device, amp):
            logits = model(images)
            loss = criterion(logits, target)
        if not math.isfinite(loss.item()):
            raise CommandError(
                f"loss became {loss.item()} at epoch {epoch + 1} step {step}; lower --lr or add --clip-grad"
            )
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            optimizer.step()
        num_updates += 1
        if model_ema is not None:
            model_ema.update(unwrap_model(model), step=num_updates)
        scheduler.step_update(num_updates=num_updates)
        batch = images.shape[0]
        loss_sum += loss.item() * batch
        # With mixup the label is a blend; accuracy counts the dominant (unmixed) label.
        correct += float((logits.detach().argmax(-1) == hard_target).sum())
        seen += batch
        elapsed = time.perf_counter() - start
        progress.update(
            step,
            loss=loss_sum / seen,
            acc=100.0 * correct / seen,
            **{"img/s": seen * info.world_size / max(elapsed, 1e-9)},
        )
    progress.close()
    seconds = time.perf_counter() - start
    loss_sum, correct, seen_all = all_reduce_sum([loss_sum, correct, float(seen)], info)
    stats = EpochStats(
        loss=loss_sum / max(seen_all, 1),
        top1=100.0 * correct / max(seen_all, 1),
        images=int(seen_all),
        seconds=seconds,
    )
    return stats, num_updates


@torch.no_grad()
def evaluate(model: nn.Module, loader, info: DistInfo, amp: bool = False, desc: str = "eval") -> EpochStats:
    """Loss, top-1 and top-5 (percent) over ``loader``, every sample counted once across ranks."""
    from timm.utils import accuracy

    model.eval()
    device = info.device
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss_sum, top1, top5, seen = 0.0, 0.0, 0.0, 0
    progress = Progress(len(loader), desc, info.is_main, log_interval=10**9)
    start = time.perf_counter()
    for step, (images, target) in enumerate(loader, start=1):
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images)
        logits = logits.float()
        loss_sum += float(criterion(logits, target))
        batch = images.shape[0]
        # timm's accuracy is a percentage of the batch; counts are summed so that every sample weighs the same.
        acc1, acc5 = accuracy(logits, target, topk=(1, 5))
        top1 += round(float(acc1) * batch / 100)
        top5 += round(float(acc5) * batch / 100)
        seen += batch
        progress.update(step, top1=100.0 * top1 / seen)
    progress.close()
    seconds = time.perf_counter() - start
    loss_sum, top1, top5, seen_all = all_reduce_sum([loss_sum, top1, top5, float(seen)], info)
    n = max(seen_all, 1)
    return EpochStats(
        loss=loss_sum / n, top1=100.0 * top1 / n, top5=100.0 * top5 / n, images=int(seen_all), seconds=seconds
    )
