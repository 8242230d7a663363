"""YOLOv8n with and without attention: params, GMACs, memory saved for backward and forward time.

    python benchmarks/bench_yolo.py                     # 640x640, batch 1, CPU, eager MSDA backend
    python benchmarks/bench_yolo.py --device cuda --backend auto --batch 8

Three models, all built from YAML (no weights are downloaded):

- ``YOLOv8n``: Ultralytics' own ``yolov8n.yaml``;
- ``YOLOv8n-MSDA``: ``yolov8n-msda.yaml``, MSDA after the P3, P4 and P5 backbone outputs;
- ``YOLOv8n-Global``: ``yolov8n-global.yaml``, the same network with global attention in those places.

and, unless ``--no-naive``, the two attention models once more as a textbook implementation runs them: MSDA on
its ``reference`` backend (probabilities materialised) and global attention on the ``math`` SDPA kernel (the
``(H*W)^2`` attention matrix materialised). That is where swapping attention in changes memory.

GMACs (billions of multiply-adds) are counted by :func:`dilateformer.analysis.measure.count_macs` (matmuls,
convolutions and attention), so they include the attention maths that Ultralytics' thop-based count cannot see;
Ultralytics prints GFLOPs, 2 per multiply-add, twice these numbers. The saved-for-backward bytes are those
autograd keeps for one training-mode forward; forward times are medians in eval mode under ``torch.no_grad``.
Needs ``pip install dilateformer[yolo]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os

os.environ.setdefault("YOLO_OFFLINE", "1")

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from dilateformer.analysis.measure import format_table, gmacs, median_ms, saved_for_backward_bytes, to_mb  # noqa: E402

# (row label, model YAML, MSDA backend or None for the run's own, force the math SDPA kernel)
MODELS = [
    ("YOLOv8n", "yolov8n.yaml", None, False),
    ("YOLOv8n-MSDA", "yolov8n-msda.yaml", None, False),
    ("YOLOv8n-Global", "yolov8n-global.yaml", None, False),
]
NAIVE = [
    ("YOLOv8n-MSDA, reference backend", "yolov8n-msda.yaml", "reference", False),
    ("YOLOv8n-Global, math SDPA", "yolov8n-global.yaml", None, True),
]


def measure(cfg: str, x: torch.Tensor, repeats: int) -> list[object]:
    """params, GMACs, MB saved for backward and forward ms of one model."""
    from ultralytics.nn.tasks import DetectionModel

    import dilateformer.integrations.ultralytics  # noqa: F401  (registers the layers)

    model = DetectionModel(cfg, verbose=False).to(x.device)
    params = sum(p.numel() for p in model.parameters())
    compute = gmacs(model, x)
    model.train()
    saved = to_mb(saved_for_backward_bytes(lambda: model(x)))
    model.eval()
    with torch.no_grad():
        ms = median_ms(lambda: model(x), repeats=repeats, warmup=2, device=x.device)
    return [params, compute, saved, ms]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--imgsz", type=int, default=640, help="square input size (default 640)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument(
        "--backend",
        default=None,
        help="MSDA backend (default: eager on CPU, where compiling takes ~30 s per shape; auto elsewhere)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed forward passes per model (default 5)")
    parser.add_argument("--no-naive", action="store_true", help="skip the reference/math-kernel attention rows")
    args = parser.parse_args(argv)
    if args.imgsz < 32 or args.imgsz % 32:
        raise ValueError(f"--imgsz must be a positive multiple of 32 (the YOLO stride), got {args.imgsz}")
    device = torch.device(args.device)
    backend = args.backend or ("eager" if device.type == "cpu" else "auto")
    os.environ["DILATEFORMER_BACKEND"] = backend

    torch.manual_seed(0)
    x = torch.rand(args.batch, 3, args.imgsz, args.imgsz, device=device)
    rows = []
    for name, cfg, row_backend, math in MODELS + ([] if args.no_naive else NAIVE):
        os.environ["DILATEFORMER_BACKEND"] = row_backend or backend
        with sdpa_kernel(SDPBackend.MATH) if math else contextlib.nullcontext():
            rows.append([name, *measure(cfg, x, args.repeats)])
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(
        f"{args.imgsz}x{args.imgsz}, batch {args.batch}, {device}{threads}, MSDA backend {backend!r}, "
        f"torch {torch.__version__}"
    )
    print(format_table(["model", "params", "GMACs", "MB saved for backward", "forward ms"], rows))


if __name__ == "__main__":
    main()
