"""``dilateformer visualize``, ``profile``, ``benchmark`` and ``locality``: argument parsing and error reporting only.

Bad input (a missing image, a query off the image, a stage without MSDA, malformed sizes) ends the command
with one ``dilateformer COMMAND: error: ...`` line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from dilateformer.argtypes import int_list, positive_float
from dilateformer.errors import CommandError, one_line
from dilateformer.files import atomic_write_json

DEFAULT_MODEL = "dilateformer_tiny"
# Largest visualize --size: the figure and the model input grow with its square; above this a typo is likelier.
MAX_VISUALIZE_SIZE = 4096


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _create_model(name: str, checkpoint: str | None, *, any_timm: bool = False, **kwargs):
    """A registered model in eval mode, with ``checkpoint``'s weights if given.

    ``any_timm``: a timm model that is not a DilateFormer is accepted too (built by
    :func:`dilateformer.models.create_model`, never downloaded).
    """
    from dilateformer.analysis.visualize import create_registered_model

    if checkpoint is not None and not Path(checkpoint).exists():
        raise CommandError(f"--checkpoint: {checkpoint} does not exist")
    other_timm = any_timm and not name.startswith("dilateformer")
    if other_timm:
        from dilateformer.models import create_model

        try:
            model = create_model(name, **{"num_classes": 1000, **kwargs})
        except ValueError as error:
            raise CommandError(one_line(str(error))) from None
    else:
        model = create_registered_model(name, **kwargs)
    if checkpoint is not None and Path(checkpoint).is_dir():
        # A training run directory, as eval and predict accept: its best weights, else its last.
        found = [
            Path(checkpoint) / n for n in ("best.safetensors", "last.safetensors") if (Path(checkpoint) / n).is_file()
        ]
        if not found:
            raise CommandError(f"--checkpoint: {checkpoint} holds no best.safetensors or last.safetensors")
        checkpoint = str(found[0])
    if checkpoint is not None:
        from dilateformer.models import load_checkpoint_file, load_into

        try:
            if other_timm:
                # timm's own reader (safetensors or weights_only torch.load), not ours: our official-DilateFormer
                # key conversion would rename a ViT's patch_embed.proj.
                from timm.models import load_checkpoint

                load_checkpoint(model, checkpoint, weights_only=True)
            else:
                load_into(model, load_checkpoint_file(checkpoint), source=checkpoint)
        except (ValueError, RuntimeError) as error:
            raise CommandError(f"--checkpoint {checkpoint}: {one_line(str(error))}") from error
    return model.eval()


# ------------------------------------------------------------------------------------------------- visualize


def _run_visualize(args: argparse.Namespace) -> int:
    from dilateformer.analysis.visualize import (
        attention_figure,
        load_image,
        parse_query,
        pick_msda_layer,
    )

    if not 1 <= args.size <= MAX_VISUALIZE_SIZE:
        raise CommandError(f"--size must be 1..{MAX_VISUALIZE_SIZE} pixels, got {args.size}")
    suffix = Path(args.output).suffix.lstrip(".").lower()
    if suffix:
        from matplotlib.figure import Figure

        supported = Figure().canvas.get_supported_filetypes()
        if suffix not in supported:
            raise CommandError(
                f"--output {args.output}: unknown image format .{suffix}; use one of {sorted(supported)}"
            )
    image = load_image(args.image)  # fail on the image before building any model
    queries = [parse_query(q) for q in args.query] if args.query else None
    model = _create_model(args.model, args.checkpoint)
    pick_msda_layer(model, args.stage, args.block)  # fail on the stage before the twin costs anything
    from dilateformer.models import global_twin

    twin = global_twin(model).eval() if args.compare == "twin" else None
    attention_figure(image, model, queries, args.stage, args.block, args.output, twin=twin, size=args.size)
    print(f"wrote {args.output}")
    return 0


def _add_visualize(subparsers) -> None:
    p = subparsers.add_parser(
        "visualize",
        help="draw where an MSDA layer's queries look, next to global attention",
        description="Draw, for each query pixel, the k x k dilated window of every dilation group of an MSDA "
        "layer with its attention weights, next to the attention map of a global-attention layer.",
    )
    p.add_argument("image", help="image file (anything Pillow reads)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"timm model name (default {DEFAULT_MODEL})")
    p.add_argument("--checkpoint", help="weights: .safetensors, or an official or torch.save checkpoint")
    p.add_argument(
        "--query",
        action="append",
        metavar="Y,X",
        help="query pixel in the original image, row then column; repeat for several (default: the centre)",
    )
    p.add_argument("--stage", type=int, default=0, help="stage of the MSDA layer (default 0)")
    p.add_argument("--block", type=int, default=0, help="block within the stage (default 0)")
    p.add_argument(
        "--compare",
        choices=("twin", "stage"),
        default="twin",
        help="global attention from the global twin with this model's weights, at the same stage and block "
        "(default), or from this model's first global stage",
    )
    p.add_argument(
        "--size",
        type=int,
        default=224,
        help=f"shorter side of the model input in pixels, 1..{MAX_VISUALIZE_SIZE} (default 224)",
    )
    p.add_argument(
        "--output",
        default="attention.png",
        help="image to write; the format follows the suffix (default attention.png)",
    )
    # "--query -1,-1" is a (bad) value to report, not an unknown flag.
    p._negative_number_matcher = re.compile(r"^-\d[\d.,\-]*$")
    p.set_defaults(func=_run_visualize)


# --------------------------------------------------------------------------------------------------- profile


def _run_profile(args: argparse.Namespace) -> int:
    from dilateformer.analysis.profile import parse_sizes, profile_figure, profile_models, profile_table

    sizes = parse_sizes(args.sizes)
    if args.batch < 1 or args.repeats < 1:
        raise ValueError(f"--batch and --repeats must be positive ints, got {args.batch} and {args.repeats}")
    context = _backend_context(args.backend)
    with context:
        rows = profile_models(
            args.model,
            sizes,
            args.batch,
            timing=not args.no_timing,
            repeats=args.repeats,
            warmup=args.warmup,
            memory_budget=int(args.memory_gb * 1e9) if args.memory_gb else None,
            time_budget_s=args.time_budget,
            device=args.device,
            progress=_progress,
        )
    print(profile_table(rows))
    print("~ estimate (saved MB: meta-device upper bound with explicit attention matrices); - not measured")
    atomic_write_json(args.json, {"command": "profile", "backend": args.backend, "rows": [r.as_dict() for r in rows]})
    profile_figure(rows, args.plot)
    print(f"wrote {args.json} and {args.plot}")
    return 0


def _backend_context(name: str):
    import contextlib

    from dilateformer import use_backend

    return contextlib.nullcontext() if name == "auto" else use_backend(name)


def _add_profile(subparsers) -> None:
    from dilateformer.functional import BACKEND_NAMES

    p = subparsers.add_parser(
        "profile",
        help="params, GMACs, memory and time by input size, for a model and its global-attention twin",
        description="For a DilateFormer model and its global-attention twin at each input size: parameters, "
        "forward GMACs (multiply-adds, MSDA and attention included), MB saved for backward, forward "
        "and forward+backward ms. Writes a table, a JSON file and a log-log plot.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"timm model name (default {DEFAULT_MODEL})")
    p.add_argument(
        "--sizes", default="224,384,512", help="square input sides, 1..4096, comma-separated (default 224,384,512)"
    )
    p.add_argument("--batch", type=int, default=1, help="images per forward (default 1)")
    p.add_argument("--no-timing", action="store_true", help="count GMACs and estimate memory only (seconds)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per measurement, median kept (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first, e.g. to compile (default 1)")
    p.add_argument("--backend", default="auto", choices=BACKEND_NAMES, help="MSDA backend (default auto)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument(
        "--memory-gb", type=positive_float, help="memory a run may use, > 0 (default 70%% of what is free now)"
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=120.0,
        help="seconds: a run predicted to take longer is estimated, not run (default 120)",
    )
    p.add_argument("--json", default="profile.json", help="JSON output (default profile.json)")
    p.add_argument("--plot", default="profile.png", help="PNG output (default profile.png)")
    p.set_defaults(func=_run_profile)


# ------------------------------------------------------------------------------------------------- benchmark


def _int_list(text: str, option: str) -> tuple[int, ...]:
    from dilateformer.analysis.profile import parse_sizes

    try:
        return tuple(parse_sizes(text))
    except ValueError:
        raise CommandError(f"{option} takes positive integers separated by commas, got {text!r}") from None


def _run_benchmark(args: argparse.Namespace) -> int:
    from dilateformer.analysis.plots import benchmark_figure

    sizes = _int_list(args.sizes, "--sizes")
    backends = tuple(b for b in args.backends.split(",") if b)
    for option, value in (("--repeats", args.repeats), ("--batch", args.batch), ("--img-size", args.img_size)):
        if value < 1:
            raise CommandError(f"{option} must be a positive int, got {value}")
    payload: dict[str, object] = {"command": "benchmark"}
    op_rows: list[dict] = []
    sweep_rows: list[dict] = []
    model_rows: list[dict] = []
    if args.part in ("op", "all"):
        from dilateformer.analysis import op_bench

        shapes = op_bench.STANDARD_SHAPES
        if args.quick:  # the pipeline on tiny shapes: for smoke tests, numbers mean nothing
            shapes = (op_bench.OpShape("quick B1 12x12 3x8", 1, 12, 12, 3, head_dim=8),)
        op_rows = op_bench.run_op_benchmark(shapes, backends, repeats=args.repeats, progress=_progress)
        sweep_rows = op_bench.run_scaling_sweep(sizes, backends, repeats=args.repeats, progress=_progress)
        print("MSDA op (speedups against the unfold baseline of the same shape):")
        print(op_bench.format_op_rows(op_rows))
        print("\nscaling sweep:")
        print(op_bench.format_sweep_rows(sweep_rows))
        payload.update(op=op_rows, sweep=sweep_rows)
    if args.part in ("model", "all"):
        try:
            from dilateformer.analysis import model_bench
        except ModuleNotFoundError as error:
            if error.name != "dilateformer.analysis.model_bench":
                raise
            print("model benchmark: not available in this version", file=sys.stderr)
        else:
            model_rows = model_bench.run_model_benchmark(
                models=(args.model,),
                batch_size=args.batch,
                img_size=args.img_size,
                msda_backends=backends,
                compiled=not args.no_compile,
                repeats=args.repeats,
                log=_progress,
            )
            print("\nmodels:")
            print(model_bench.format_model_benchmark(model_rows))
            payload["models"] = model_rows
    atomic_write_json(args.json, payload)
    benchmark_figure(op_rows, sweep_rows, model_rows, args.plot)
    print(f"wrote {args.json} and {args.plot}")
    return 0


def _add_benchmark(subparsers) -> None:
    p = subparsers.add_parser(
        "benchmark",
        help="the MSDA op benchmark and the model benchmark, with baselines, as a table, JSON and a PNG",
        description="Times MSDA's backends against an official-style unfold implementation, global attention "
        "through scaled_dot_product_attention and the byte floor, in one process; sweeps image sizes; and runs "
        "the model benchmark. Prints tables, writes JSON and a PNG.",
    )
    p.add_argument("--part", choices=("op", "model", "all"), default="all", help="what to run (default all)")
    p.add_argument(
        "--backends",
        default="eager,native,compiled",
        help="MSDA backends to time, in the op and the model benchmark (default eager,native,compiled)",
    )
    p.add_argument("--sizes", default="32,64,128,256", help="square sizes of the op scaling sweep")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (default 5)")
    p.add_argument("--quick", action="store_true", help="tiny op shapes, to check the pipeline only")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model of the model benchmark (default {DEFAULT_MODEL})")
    p.add_argument("--batch", type=int, default=8, help="model benchmark batch (default 8)")
    p.add_argument("--img-size", type=int, default=224, help="model benchmark input side (default 224)")
    p.add_argument("--no-compile", action="store_true", help="skip whole-model torch.compile inference")
    p.add_argument("--json", default="benchmark.json", help="JSON output (default benchmark.json)")
    p.add_argument("--plot", default="benchmark.png", help="PNG output (default benchmark.png)")
    p.set_defaults(func=_run_benchmark)


# -------------------------------------------------------------------------------------------------- locality

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def _image_sources(items: list[str] | None) -> dict[str, object]:
    """Name -> PIL image: the files given (a directory: its image files, sorted), else the offline samples."""
    from dilateformer.analysis.locality import sample_images
    from dilateformer.analysis.visualize import load_image

    if not items:
        return sample_images()
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise CommandError(f"--images: {path} holds no image file ({', '.join(IMAGE_SUFFIXES)})")
            paths += found
        else:
            paths.append(path)
    return {str(p): load_image(p) for p in paths}


def _run_locality(args: argparse.Namespace) -> int:
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from dilateformer.analysis.locality import (
        TABLE_LEGEND,
        images_tensor,
        locality_figure,
        locality_table,
        measure_locality,
    )

    if not 1 <= args.size <= MAX_VISUALIZE_SIZE:
        raise CommandError(f"--size must be 1..{MAX_VISUALIZE_SIZE} pixels, got {args.size}")
    if args.kernel_size < 1 or args.kernel_size % 2 == 0:
        raise CommandError(f"--kernel-size must be an odd positive int, got {args.kernel_size}")
    if args.twin and not args.model.startswith("dilateformer"):
        raise CommandError(f"--twin needs a DilateFormer model, got {args.model}")
    sources = _image_sources(args.images)  # fail on the images before building any model
    from dilateformer.train.modeling import parse_model_kwargs

    kwargs = parse_model_kwargs(args.model_kwargs)
    model = None
    if not args.model.startswith("dilateformer") and "dynamic_img_size" not in kwargs:
        try:  # a ViT then takes any --size, with the checkpoint's position embeddings
            model = _create_model(args.model, args.checkpoint, any_timm=True, dynamic_img_size=True, **kwargs)
        except CommandError as error:
            if "dynamic_img_size" not in str(error):
                raise
    if model is None:
        model = _create_model(args.model, args.checkpoint, any_timm=True, **kwargs)
    if args.twin:
        from dilateformer.models import global_twin

        model = global_twin(model).eval()
    cfg = getattr(model, "pretrained_cfg", None) or {}
    images = images_tensor(
        sources.values(), args.size, cfg.get("mean", IMAGENET_DEFAULT_MEAN), cfg.get("std", IMAGENET_DEFAULT_STD)
    )
    try:
        results = measure_locality(
            model, images, kernel_size=args.kernel_size, dilations=args.dilations, batch_size=args.batch
        )
    except ValueError as error:
        raise CommandError(str(error)) from None
    print(f"{args.model}{' (global twin)' if args.twin else ''} at {args.size}x{args.size}, {len(sources)} images:")
    print(locality_table(results))
    print(TABLE_LEGEND)
    out = Path(args.output)
    payload = dict(
        command="locality",
        model=args.model,
        checkpoint=args.checkpoint,
        twin=args.twin,
        size=args.size,
        images=list(sources),
        layers=[r.as_dict() for r in results],
    )
    atomic_write_json(out / "locality.json", payload)
    title = f"How local is attention? {args.model}{' global twin' if args.twin else ''}, {args.size}x{args.size} px"
    locality_figure(results, out / "locality.png", title=title)
    print(f"wrote {out / 'locality.json'} and {out / 'locality.png'}")
    return 0


def _add_locality(subparsers) -> None:
    p = subparsers.add_parser(
        "locality",
        help="how local a model's attention is: distance, mass inside MSDA's windows, entropy, per layer",
        description="Runs a model on images and, for every global attention layer (DilateFormer's global stages "
        "or its global twin, timm ViT/DeiT), reports the mean attention distance in input pixels, the attention "
        "mass inside MSDA's dilated k x k windows (and what uniform attention would put there), the mass on "
        "prefix tokens and the entropy against uniform. Prints a table, writes locality.json and locality.png.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"timm model name (default {DEFAULT_MODEL})")
    p.add_argument("--checkpoint", help="weights: .safetensors, a torch checkpoint, or a training run directory")
    p.add_argument(
        "--model-kwargs", nargs="*", metavar="KEY=VALUE", help="model arguments, e.g. embed_dim=24 num_classes=10"
    )
    p.add_argument(
        "--twin", action="store_true", help="measure the DilateFormer's global-attention twin, with its weights"
    )
    p.add_argument(
        "--images",
        nargs="+",
        help="image files or directories (default: the offline photos chelsea, coffee, astronaut, china, flower)",
    )
    p.add_argument("--size", type=int, default=224, help="square model input side in pixels (default 224)")
    p.add_argument("--kernel-size", type=int, default=3, help="MSDA window side k (default 3)")
    p.add_argument(
        "--dilations", type=int_list(distinct=True), default=(1, 2, 3), help="MSDA dilations (default 1,2,3)"
    )
    p.add_argument("--batch", type=int, default=4, help="images per forward (default 4)")
    p.add_argument("--output", default="locality", help="directory for locality.json and locality.png")
    p.set_defaults(func=_run_locality)


def register(subparsers) -> None:
    """Add ``visualize``, ``profile``, ``benchmark`` and ``locality`` to the ``dilateformer`` command line."""
    _add_visualize(subparsers)
    _add_profile(subparsers)
    _add_benchmark(subparsers)
    _add_locality(subparsers)
