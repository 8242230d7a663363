"""``eval`` and ``predict``: load a checkpoint (ours, self-describing, or an official one) and use it.

:func:`load_for_inference` is also what ``retrofit`` uses to rebuild a model that ``train`` wrote.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from dilateformer.errors import CommandError


def _resolve_checkpoint_file(path: str) -> Path:
    from dilateformer.train.checkpoint import read_metadata

    target = Path(path)
    if target.is_dir():
        if (target / "best.safetensors").exists():
            return target / "best.safetensors"
        if (target / "last.safetensors").exists():
            print(
                f"dilateformer: note: {target} has no best.safetensors; using last.safetensors "
                f"(epoch {read_metadata(target / 'last.safetensors').get('epoch', '?')})",
                file=sys.stderr,
            )
            return target / "last.safetensors"
        raise CommandError(f"--checkpoint: {target} holds no best.safetensors or last.safetensors")
    if not target.exists():
        raise CommandError(f"--checkpoint: {target} does not exist")
    return target


def load_for_inference(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Model + metadata from our checkpoint (self-describing) or an official one (needs --model)."""
    from timm.data import resolve_data_config

    from dilateformer.models import load_checkpoint_file
    from dilateformer.train.checkpoint import read_checkpoint_weights, read_metadata
    from dilateformer.train.modeling import create_model, load_state_into, retrofit

    path = _resolve_checkpoint_file(args.checkpoint)
    meta = read_metadata(path) if path.suffix == ".safetensors" else {}
    if "model" in meta:
        state, _ = read_checkpoint_weights(path)
        name = args.model or meta["model"]
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in (meta.get("model_kwargs") or {}).items()}
        num_classes = int(meta["num_classes"])
    else:
        if not args.model:
            raise CommandError(f"{path} has no model metadata (not written by dilateformer train); pass --model NAME")
        try:
            state = load_checkpoint_file(path, use_ema=getattr(args, "use_ema", False))
        except (ValueError, FileNotFoundError) as error:
            raise CommandError(str(error).splitlines()[0]) from None
        head = state.get("head.weight")
        num_classes = int(head.shape[0]) if head is not None else 1000
        name, kwargs = args.model, {}
    model = create_model(name, num_classes, model_kwargs=kwargs)
    if meta.get("retrofit"):
        settings = {k: v for k, v in meta["retrofit"].items() if k != "blocks"}
        settings["dilations"] = tuple(settings.get("dilations", (1, 2, 3)))
        model = retrofit(model, meta["retrofit"]["blocks"], settings)
    load_state_into(model, state, source=str(path))
    model.to(device).eval()
    data_cfg = resolve_data_config({}, model=model)
    img_size = getattr(args, "img_size", None) or meta.get("img_size") or data_cfg["input_size"][-1]
    info = {
        "path": str(path),
        "model": name,
        "num_classes": num_classes,
        "class_names": meta.get("class_names"),
        "img_size": img_size,
        "mean": tuple(meta.get("mean", data_cfg["mean"])),
        "std": tuple(meta.get("std", data_cfg["std"])),
        "crop_pct": meta.get("crop_pct", data_cfg["crop_pct"]),
        "interpolation": meta.get("interpolation", data_cfg["interpolation"]),
    }
    return model, info


def _eval_transform(info: dict[str, Any]):
    from timm.data import create_transform

    return create_transform(
        info["img_size"],
        interpolation=info["interpolation"],
        mean=info["mean"],
        std=info["std"],
        crop_pct=info["crop_pct"],
    )


def run_eval(args: argparse.Namespace) -> int:
    from dilateformer.train import distributed
    from dilateformer.train.data import ImageFolderDataset, build_dataset
    from dilateformer.train.engine import evaluate

    dist_info = distributed.init(args.device)
    model, info = load_for_inference(args, dist_info.device)
    transform = _eval_transform(info)
    if args.dataset:
        dataset = build_dataset(args.dataset, None, "val", transform, info["img_size"])
    elif args.data_dir:
        root = Path(args.data_dir)
        split = next((root / n for n in ("val", "validation") if (root / n).is_dir()), root)
        dataset = ImageFolderDataset(split, transform=transform)
    else:
        raise CommandError("no data: pass --data-dir DIR (ImageFolder, its val/ is used) or --dataset digits")
    names = info["class_names"]
    if names is not None and list(dataset.classes) != list(names):
        raise CommandError(
            f"the dataset's classes {dataset.classes[:5]}... differ from the checkpoint's {names[:5]}..."
        )
    if len(dataset.classes) != info["num_classes"]:
        raise CommandError(f"the dataset has {len(dataset.classes)} classes, the model {info['num_classes']}")
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=distributed.ShardSampler(len(dataset), dist_info.rank, dist_info.world_size),
        num_workers=args.workers if args.workers is not None else 2,
    )
    start = time.perf_counter()
    stats = evaluate(model, loader, dist_info, amp=args.amp)
    if dist_info.is_main:
        print(
            f"{info['model']} {info['path']}: top-1 {stats.top1:.2f}%  top-5 {stats.top5:.2f}%  loss {stats.loss:.4f}  "
            f"({stats.images} images at {info['img_size']}px, {time.perf_counter() - start:.1f}s)"
        )
        print(json.dumps({"top1": stats.top1, "top5": stats.top5, "loss": stats.loss, "images": stats.images}))
    return 0


def _class_names(info: dict[str, Any]) -> list[str]:
    if info["class_names"]:
        return list(info["class_names"])
    if info["num_classes"] == 1000:
        from timm.data import ImageNetInfo

        imagenet = ImageNetInfo()
        return [imagenet.index_to_description(i) for i in range(1000)]
    return [f"class {i}" for i in range(info["num_classes"])]


@torch.no_grad()
def run_predict(args: argparse.Namespace) -> int:
    from dilateformer.train.data import load_image

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))  # fmt: skip
    for image_path in args.images:
        if not Path(image_path).is_file():
            raise CommandError(f"image {image_path} does not exist")
    model, info = load_for_inference(args, device)
    transform = _eval_transform(info)
    names = _class_names(info)
    k = min(args.topk, info["num_classes"])
    for image_path in args.images:
        batch = transform(load_image(image_path)).unsqueeze(0).to(device)
        probs = model(batch).float().softmax(-1)[0]
        top = probs.topk(k)
        print(image_path)
        for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            print(f"  {100 * p:6.2f}%  {names[i]}")
    return 0
