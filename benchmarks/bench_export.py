"""ONNX export of a DilateFormer: graph size and onnxruntime latency against PyTorch eager.

    python benchmarks/bench_export.py                        # dilateformer_tiny, batch 1, 224x224, both exporters
    python benchmarks/bench_export.py --model dilateformer_small --size 384 --repeats 50

Exports with the standard ``torch.onnx.export`` calls (``dynamo=True`` with dynamic batch, height and width, and the
TorchScript-based ``dynamo=False`` with dynamic axes), then reports each file's node count, its most frequent op
types, and the median forward time of onnxruntime (CPU provider) next to PyTorch eager, timed in interleaved
rounds, with the largest difference between their outputs. Needs ``pip install dilateformer[export]``.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import tempfile
import time
from pathlib import Path

import onnx
import onnxruntime as ort
import timm
import torch

import dilateformer  # noqa: F401  (registers the models)
from dilateformer.analysis.measure import format_table


def export(model: torch.nn.Module, x: torch.Tensor, path: Path, dynamo: bool) -> None:
    if dynamo:
        dim = torch.export.Dim.DYNAMIC
        # The example batch of 2 keeps the batch symbolic (torch.export specialises a batch of 1).
        example = x.expand(2, *x.shape[1:]).contiguous()
        program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes={"x": {0: dim, 2: dim, 3: dim}})
        program.save(str(path))
    else:
        axes = {"images": {0: "batch", 2: "height", 3: "width"}}
        torch.onnx.export(model, (x,), path, dynamo=False, input_names=["images"], dynamic_axes=axes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dilateformer_tiny")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--top", type=int, default=8, help="op types listed per file")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    with torch.no_grad():
        expected = model(x)
    runs = {"PyTorch eager": torch.no_grad()(lambda: model(x))}
    rows, histograms = {"PyTorch eager": ["-", 0.0]}, []
    with tempfile.TemporaryDirectory() as folder:
        for dynamo in (True, False):
            label = f"onnxruntime, dynamo={dynamo}"
            path = Path(folder) / f"model_{dynamo}.onnx"
            export(model, x, path, dynamo)
            ops = collections.Counter(node.op_type for node in onnx.load(str(path)).graph.node)
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            feed = {session.get_inputs()[0].name: x.numpy()}
            (actual,) = session.run(None, feed)
            runs[label] = lambda session=session, feed=feed: session.run(None, feed)
            rows[label] = [sum(ops.values()), float(abs(torch.from_numpy(actual) - expected).max())]
            histograms.append([label, ", ".join(f"{op} {n}" for op, n in ops.most_common(args.top))])
    # Interleaved rounds: on a shared machine whose speed drifts, every runtime sees the same conditions.
    times = {label: [] for label in runs}
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for label, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[label].append((time.perf_counter() - start) * 1e3)
    eager_ms = statistics.median(times["PyTorch eager"])
    table = []
    for label, (nodes, error) in rows.items():
        ms = statistics.median(times[label])
        table.append([label, nodes, ms, ms / eager_ms, error])
    print(
        f"{args.model}, batch {args.batch}, {args.size}x{args.size}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, onnxruntime {ort.__version__}"
    )
    print(format_table(["runtime", "ONNX nodes", "median ms", "x eager", "max abs diff"], table))
    print()
    print(format_table(["file", f"top {args.top} op types"], histograms))


if __name__ == "__main__":
    main()
