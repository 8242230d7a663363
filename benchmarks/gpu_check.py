"""One-command GPU check of the triton backend: its tests on CUDA, then op and model measurements.

    python benchmarks/gpu_check.py --out DIR            # on a CUDA machine; about 6 minutes on one H200
    python benchmarks/gpu_check.py --out DIR --dry-run  # CPU, Triton's interpreter, tiny shapes (< 60 s)

Writes a table to stdout and DIR/gpu_check.md, and every number to DIR/gpu_check.json. Sections:

- ``tests``: ``pytest tests/ops/test_triton.py`` (natively on CUDA; a fast subset in the dry run).
- ``op``: forward, forward+backward and peak memory of the op in fp16 and fp32 at Tiny stage 1 (B=64, 56x56,
  3x24), stage 2 (B=64, 28x28, 6x24) and 256x256 (B=4, 3x32), k=3, dilations 1,2,3: triton, the official-style
  unfold, SDPA global attention, and achieved GB/s (the bytes a fused op must move: q, k, v, out forward, twelve
  tensors forward+backward) against the device's peak HBM bandwidth.
- ``natten``: NATTEN (if importable), one call per dilation group, against triton with border "clamp".
- ``first_call``: first-call latency per configuration (compiling), and calls at new sizes with the number of
  compiled kernels before and after (it must not grow).
- ``model``: DilateFormer-Tiny training step with AMP (bf16) at batch 128: img/s and peak memory, against its
  global-attention twin and the official-style model.
- ``yolo``: YOLOv8n, YOLOv8n-MSDA and YOLOv8n-Global training steps at 640, batch 16, AMP: ms and peak memory.
- ``op_compiled``: the ``compiled`` backend on the op shapes (last: it spends the most time compiling).

Every section is guarded: an error is recorded in its place and the next section runs. A time budget
(``--budget-s``) skips what would not fit, saying so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("tests", "op", "natten", "first_call", "model", "yolo", "op_compiled")
# Peak HBM bandwidth in GB/s by device-name substring; --peak-gbps overrides.
PEAK_GBPS = {"H200": 4800, "H100": 3350, "A100": 2039, "L40S": 864, "A10": 600, "RTX 4090": 1008}


def _prepare_environment(dry_run: bool, cache: str) -> None:
    # Before torch (and through it triton) is imported: triton reads both when its modules load.
    if dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(cache, "triton"))  # cold compiles for first_call
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_CONFIG_DIR", os.path.join(cache, "yolo"))
    os.environ.setdefault("YOLO_VERBOSE", "False")
    sys.path.insert(0, str(ROOT))


class Check:
    """Runs sections, each guarded, within a time budget; collects rows for the JSON and the markdown."""

    def __init__(self, args) -> None:
        import torch

        self.args, self.dry = args, args.dry_run
        self.device = torch.device("cpu" if self.dry else "cuda")
        self.deadline = time.monotonic() + args.budget_s
        self.results: dict[str, dict] = {}
        self.name = "cpu (dry run, Triton interpreter)" if self.dry else torch.cuda.get_device_name()
        # The dry run trains the models with the eager backend: whole models in the interpreter take minutes.
        self.model_backend = "eager" if self.dry else "triton"
        self.peak_gbps = args.peak_gbps or next((v for k, v in PEAK_GBPS.items() if k in self.name), None)

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, fn) -> None:
        start = time.monotonic()
        entry: dict = {"ok": True, "error": None, "rows": []}
        try:
            if self.time_left() <= 0:
                raise TimeoutError("skipped: time budget spent")
            fn(entry["rows"])
        except Exception as error:  # a failed section must not stop the others
            entry["ok"], entry["error"] = False, f"{type(error).__name__}: {error}"
            traceback.print_exc()
        entry["seconds"] = round(time.monotonic() - start, 1)
        self.results[name] = entry
        print(_section_markdown(name, entry), flush=True)

    # ------------------------------------------------------------------------------------------------ helpers

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, fn, repeats: int | None = None) -> float:
        from dilateformer.analysis.measure import median_ms

        repeats = repeats or (1 if self.dry else 10)
        return median_ms(fn, repeats=repeats, warmup=0 if self.dry else 3, device=self.device)

    def peak_mb(self, fn) -> float | None:
        """Peak memory above what was allocated before ``fn()``, in MB (None on CPU)."""
        import torch

        from dilateformer.analysis.measure import to_mb

        if self.device.type != "cuda":
            fn()
            return None
        self.sync()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        self.sync()
        return to_mb(torch.cuda.max_memory_allocated() - before)

    def op_shapes(self):
        if self.dry:
            return [("tiny", (1, 3, 4, 3, 4))]
        return [
            ("stage1 B64 56x56 3x24", (64, 56, 56, 3, 24)),
            ("stage2 B64 28x28 6x24", (64, 28, 28, 6, 24)),
            ("256x256 B4 3x32", (4, 256, 256, 3, 32)),
        ]

    # ----------------------------------------------------------------------------------------------- sections

    def tests(self, rows: list) -> None:
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/ops/test_triton.py"]
        if self.dry:
            command += ["-k", "new_sizes or unavailable or auto_picks"]
        env = {**os.environ, "TRITON_CACHE_DIR": tempfile.mkdtemp(prefix="gpu-check-tests-")}
        timeout = max(30.0, min(240.0, self.time_left() - 120))
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        summary = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
        rows.append({"command": " ".join(command[1:]), "returncode": result.returncode, "summary": summary})
        if result.returncode != 0:
            raise RuntimeError(f"pytest failed: {summary}\n{result.stdout[-3000:]}{result.stderr[-2000:]}")

    def _op_candidates(self, shape, names):
        from dilateformer.analysis.baselines import heads_last_to_channels_first, sdpa_global, unfold_msda
        from dilateformer.functional import multi_scale_dilated_attention as msda

        heads, head_dim = shape[3], shape[4]
        scale = head_dim**-0.5
        table = {
            "triton": (lambda q, k, v: msda(q, k, v, 3, (1, 2, 3), scale=scale, backend="triton"), None),
            "compiled": (lambda q, k, v: msda(q, k, v, 3, (1, 2, 3), scale=scale, backend="compiled"), None),
            "unfold": (
                lambda q, k, v: unfold_msda(q, k, v, heads, 3, (1, 2, 3), scale),
                heads_last_to_channels_first,
            ),
            "sdpa-global": (lambda q, k, v: sdpa_global(q, k, v, scale), None),
        }
        return {name: table[name] for name in names}

    def _measure_op(self, rows: list, names: tuple[str, ...]) -> None:
        import torch

        for label, shape in self.op_shapes():
            for dtype in (torch.float16, torch.float32):
                for name, (fn, layout) in self._op_candidates(shape, names).items():
                    row = {"shape": label, "dtype": str(dtype).removeprefix("torch."), "impl": name}
                    rows.append(row)
                    if self.time_left() < 30:
                        row["error"] = "skipped: time budget"
                        continue
                    try:
                        row.update(self._measure_one(fn, layout, shape, dtype))
                    except Exception as error:
                        row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
                    finally:
                        if self.device.type == "cuda":
                            torch.cuda.empty_cache()

    def _measure_one(self, fn, layout, shape, dtype) -> dict:
        import torch

        generator = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(shape, generator=generator, dtype=dtype) for _ in range(3))
        if layout is not None:
            q, k, v = (layout(t) for t in (q, k, v))
        q, k, v = (t.to(self.device).requires_grad_() for t in (q, k, v))
        with torch.no_grad():
            grad = torch.randn_like(fn(q, k, v))

        def forward():
            with torch.no_grad():
                fn(q, k, v)

        def forward_backward():
            torch.autograd.backward(fn(q, k, v), grad)
            q.grad = k.grad = v.grad = None

        forward_ms, total_ms = self.timed(forward), self.timed(forward_backward)
        tensor_bytes = q.numel() * q.element_size()
        result = {
            "forward_ms": forward_ms,
            "forward_backward_ms": total_ms,
            "peak_mb": self.peak_mb(forward_backward),
            "forward_gbps": 4 * tensor_bytes / forward_ms / 1e6,
            "forward_backward_gbps": 12 * tensor_bytes / total_ms / 1e6,
        }
        if self.peak_gbps:
            result["forward_pct_peak"] = 100 * result["forward_gbps"] / self.peak_gbps
            result["forward_backward_pct_peak"] = 100 * result["forward_backward_gbps"] / self.peak_gbps
        return result

    def op(self, rows: list) -> None:
        self._measure_op(rows, ("triton", "unfold", "sdpa-global"))

    def op_compiled(self, rows: list) -> None:
        if self.dry:
            rows.append({"impl": "compiled", "error": "skipped in the dry run (a CPU compile takes minutes)"})
            return
        self._measure_op(rows, ("compiled",))

    def natten(self, rows: list) -> None:
        import torch

        from dilateformer.functional import multi_scale_dilated_attention as msda

        try:
            import natten.functional as nf
        except ImportError as error:
            rows.append({"impl": "natten", "error": f"not importable: {error}"})
            return
        label, shape = self.op_shapes()[0]
        heads, dilations = shape[3], (1, 2, 3)
        per_group = heads // len(dilations)
        q, k, v = (torch.randn(shape, dtype=torch.float16, device=self.device) for _ in range(3))

        def natten_msda():
            outs = [
                nf.na2d(*(t[..., i * per_group : (i + 1) * per_group, :] for t in (q, k, v)), 3, dilation=d)
                for i, d in enumerate(dilations)
            ]
            return torch.cat(outs, dim=3)

        def ours():
            return msda(q, k, v, 3, dilations, border="clamp", backend="triton")

        with torch.no_grad():
            difference = (natten_msda().float() - ours().float()).abs().max().item()
            rows.append({"shape": label, "impl": "natten (clamp)", "forward_ms": self.timed(natten_msda)})
            rows.append({"shape": label, "impl": "triton (clamp)", "forward_ms": self.timed(ours)})
        rows[-1]["max_abs_difference_to_natten"] = difference

    def first_call(self, rows: list) -> None:
        import torch

        from dilateformer.functional import multi_scale_dilated_attention as msda
        from dilateformer.ops import triton as backend

        configs = [(3, (1, 2, 3), 24, torch.float16), (3, (1, 2, 3), 24, torch.float32), (7, (1, 2), 32, torch.float16)]
        if self.dry:
            configs = [(3, (1, 2, 3), 4, torch.float16)]
        kernels = backend.load_kernels()
        names = ("msda_forward_kernel", "msda_backward_queries_kernel", "msda_backward_keys_kernel")

        def compiled_count() -> int | None:
            if kernels.INTERPRETED:
                return None  # the interpreter keeps no kernel cache
            device = torch.cuda.current_device()
            return sum(len(getattr(kernels, n).device_caches[device][0]) for n in names)

        sizes = [(1, 2, 3), (1, 1, 1), (2, 3, 2)] if self.dry else [(8, 56, 56), (1, 1, 1), (16, 33, 47)]
        for kernel_size, dilations, head_dim, dtype in configs:
            config = f"k={kernel_size} d={dilations} hd={head_dim} {str(dtype).removeprefix('torch.')}"
            heads = 2 * len(dilations)
            for i, (b, h, w) in enumerate(sizes):
                q, k, v = (torch.randn(b, h, w, heads, head_dim, dtype=dtype, device=self.device) for _ in range(3))
                q.requires_grad_()
                before = compiled_count()
                self.sync()
                start = time.perf_counter()
                msda(q, k, v, kernel_size, dilations, backend="triton").float().sum().backward()
                self.sync()
                rows.append(
                    {
                        "config": config,
                        "call": "first" if i == 0 else f"new size {b}x{h}x{w}",
                        "fwd_bwd_s": time.perf_counter() - start,
                        "compiled_before": before,
                        "compiled_after": compiled_count(),
                    }
                )
                if i > 0 and before is not None and rows[-1]["compiled_after"] != before:
                    raise RuntimeError(f"{config}: a new size compiled ({before} -> {rows[-1]['compiled_after']})")

    def _train_step(self, model, x, target, steps_label: str, rows: list, extra: dict) -> None:
        import torch

        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x), target) if target is not None else model(x)
                if not isinstance(loss, torch.Tensor):
                    loss = _yolo_surrogate_loss(loss)
            loss.backward()
            optimizer.step()

        ms = self.timed(step, repeats=1 if self.dry else 5)
        rows.append(
            {
                "model": steps_label,
                **extra,
                "step_ms": ms,
                "img_s": x.shape[0] / ms * 1e3,
                "peak_mb": self.peak_mb(step),
            }
        )

    def model(self, rows: list) -> None:
        import torch

        from dilateformer.analysis.baselines import official_style_twin
        from dilateformer.functional import use_backend
        from dilateformer.models import create_dilateformer

        batch, size = (2, 32) if self.dry else (128, 224)
        x = torch.randn(batch, 3, size, size, device=self.device)
        target = torch.randint(0, 1000, (batch,), device=self.device)
        torch.manual_seed(0)
        tiny = create_dilateformer("dilateformer_tiny", drop_path_rate=0.1).to(self.device).train()
        subjects = [
            ("Tiny (MSDA triton)", tiny, self.model_backend),
            ("Tiny global twin", create_dilateformer("dilateformer_tiny", attn_types="global"), "auto"),
            ("official-style Tiny", official_style_twin(tiny), "auto"),
        ]
        for label, model, backend in subjects:
            model = model.to(self.device).train()
            with use_backend(backend):
                self._train_step(model, x, target, label, rows, {"batch": batch, "img": size})
            del model
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def yolo(self, rows: list) -> None:
        import torch
        from ultralytics.nn.tasks import DetectionModel

        import dilateformer.integrations.ultralytics  # noqa: F401  (registers the layers)
        from dilateformer.functional import use_backend

        batch, size = (2, 32) if self.dry else (16, 640)
        x = torch.rand(batch, 3, size, size, device=self.device)
        for label, cfg in (
            ("YOLOv8n", "yolov8n.yaml"),
            ("YOLOv8n-MSDA", "yolov8n-msda.yaml"),
            ("YOLOv8n-Global", "yolov8n-global.yaml"),
        ):
            model = DetectionModel(cfg, verbose=False).to(self.device).train()
            with use_backend(self.model_backend):
                self._train_step(model, x, None, label, rows, {"batch": batch, "img": size})


def _yolo_surrogate_loss(outputs):
    """A loss over the detection head's raw outputs: times the whole network's backward without a dataset."""
    tensors = outputs if isinstance(outputs, (list, tuple)) else list(outputs.values())
    flat = [t for t in tensors if hasattr(t, "float")]
    return sum(t.float().square().mean() for t in flat)


def _section_markdown(name: str, entry: dict) -> str:
    from dilateformer.analysis.measure import format_table

    title = f"## {name} ({'ok' if entry['ok'] else 'FAILED'}, {entry.get('seconds', 0)} s)"
    lines = [title]
    if entry["error"]:
        lines.append(f"error: {entry['error'].splitlines()[0][:500]}")
    rows = entry["rows"]
    if rows:
        headers = list(dict.fromkeys(key for row in rows for key in row))
        cells = [["-" if row.get(h) is None else row[h] for h in headers] for row in rows]
        lines += ["```", format_table(headers, cells), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for gpu_check.md and gpu_check.json")
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    parser.add_argument("--peak-gbps", type=float, default=None, help="peak HBM bandwidth (default: by device)")
    parser.add_argument("--budget-s", type=float, default=330.0, help="stop starting work after this many s")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    args = parser.parse_args(argv)
    cache = tempfile.mkdtemp(prefix="gpu-check-")
    _prepare_environment(args.dry_run, cache)

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --dry-run to check the script on CPU")
    check = Check(args)
    for name in args.sections.split(","):
        if name not in SECTIONS:
            parser.error(f"unknown section {name!r}; choose from {SECTIONS}")
        check.run(name, getattr(check, name))
    header = f"# gpu_check: {check.name}, torch {torch.__version__}, peak HBM {check.peak_gbps} GB/s\n"
    markdown = header + "\n".join(_section_markdown(n, e) for n, e in check.results.items())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.md").write_text(markdown)
    payload = {"device": check.name, "dry_run": args.dry_run, "peak_gbps": check.peak_gbps, "sections": check.results}
    (args.out / "gpu_check.json").write_text(json.dumps(payload, indent=1, default=str))
    print(header)
    return 0 if all(entry["ok"] for entry in check.results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
