"""The ``train``, ``eval`` and ``predict`` commands (registered into ``dilateformer.cli``): parsing only.

``train``'s flags are derived from :class:`dilateformer.train.recipes.TrainConfig`; the work is in
:mod:`dilateformer.train.run` (train) and :mod:`dilateformer.train.inference` (eval, predict).
"""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path
from typing import Any

import torch

from dilateformer.argtypes import positive_int, ranged
from dilateformer.errors import one_line
from dilateformer.train import recipes
from dilateformer.train.inference import run_eval, run_predict
from dilateformer.train.recipes import IMG_SIZE, MAX_IMG_SIZE
from dilateformer.train.run import DEFAULT_DEVICE, DEFAULT_LOG_INTERVAL, run_train

# train's flags that are not part of the training config: where the run goes and how it is run.
RUN_FLAGS = ("config", "output", "resume", "device", "log_interval")


def _device(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``, checked against the devices this machine has."""
    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r} asked for, but this machine has no usable CUDA GPU; use cpu")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r} asked for, but there are only {count} GPU(s)")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except ``None`` (not given: the recipe, or the command, decides)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_train(subparsers)
    _register_eval(subparsers)
    _register_predict(subparsers)


def _register_train(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model on an ImageFolder or the digits dataset (DeiT recipe, resumable, DDP via torchrun)",
        description=(
            "Train a DilateFormer (or any timm model). Flags follow timm's train.py; -c FILE reads them from a "
            "YAML file (batch_size: 32), and flags on the command line win over it. Defaults are the DeiT/"
            "DilateFormer ImageNet recipe; --dataset digits gets small-data defaults ([imagenet; digits: ...] "
            "below). Every unset flag is printed with the value chosen. "
            "Multi-process: torchrun --nproc_per_node=N -m dilateformer train ..."
        ),
        formatter_class=_HelpFormatter,
    )
    groups = recipes.add_arguments(p)
    r = groups[recipes.RUN]
    r.add_argument(
        "-c",
        "--config",
        action=_ConfigFile,
        metavar="FILE",
        help="YAML file of flag values, keys as timm's train.py writes them (batch_size: 32); a flag given on "
        "the command line wins, the recipe (or a resumed run's config) fills the rest",
    )
    r.add_argument("--output", metavar="DIR", help="run directory [output/train/MODEL-DATASET]")
    r.add_argument(
        "--resume",
        metavar="PATH",
        help="continue a run: its directory or last.safetensors; 'auto' resumes --output if it holds a run",
    )
    r.add_argument("--device", type=_device, help=f"cpu, cuda, cuda:N or auto [{DEFAULT_DEVICE}]")
    r.add_argument(
        "--log-interval",
        type=positive_int,
        metavar="N",
        help=f"steps between log lines when not a TTY [{DEFAULT_LOG_INTERVAL}]",
    )
    p.set_defaults(func=run_train)


class _ConfigFile(argparse.Action):
    """``-c FILE``: flag values from a YAML file, as in timm's train.py.

    A value is taken only for a flag that is still unset, so a flag given before ``-c`` keeps its value and one
    given after it replaces the file's: the command line wins either way. Every value goes through its flag's
    parser, so the file is checked as strictly as the command line.
    """

    def __call__(self, parser, namespace, path, option_string=None) -> None:
        try:
            values = read_config_file(path, parser)
        except argparse.ArgumentTypeError as error:
            raise argparse.ArgumentError(self, str(error)) from None
        for dest, value in values.items():
            if getattr(namespace, dest, None) is None:
                setattr(namespace, dest, value)
        setattr(namespace, self.dest, path)


def read_config_file(path: str | Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """``{dest: value}`` from a YAML mapping of ``parser``'s flags (``batch_size: 32``), each value parsed and
    checked by its flag's ``type``; an unknown key or a bad value is an ``ArgumentTypeError`` naming it."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        raise argparse.ArgumentTypeError(f"{path} is not valid YAML: {one_line(str(error))}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise argparse.ArgumentTypeError(f"{path} must hold a mapping of flag names to values, e.g. batch_size: 32")
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    values = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            close = difflib.get_close_matches(dest, list(actions), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise argparse.ArgumentTypeError(f"{path}: unknown key {key!r} (not a train flag){hint}")
        if value is None:  # null: as if the key were absent
            continue
        try:
            values[dest] = _flag_value(actions[dest], value)
        except argparse.ArgumentTypeError as error:
            raise argparse.ArgumentTypeError(f"{path}: {key}: {error}") from None
    return values


def _flag_value(action: argparse.Action, value: Any) -> Any:
    """A YAML value as its flag would parse it: switches take true/false, list flags a list or a mapping."""
    if action.nargs == 0:  # store_true
        if not isinstance(value, bool):
            raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
        return value
    if action.nargs in ("*", "+"):
        if isinstance(value, dict):  # model_kwargs: {embed_dim: 24} as well as [embed_dim=24]
            value = [f"{k}={_text(v)}" for k, v in value.items()]
        return [_parse(action, _text(item)) for item in (value if isinstance(value, list) else [value])]
    return _parse(action, _text(value))


def _text(value: Any) -> str:
    if value is False:
        return "off"  # YAML reads a bare off/no as false: aa: off
    if isinstance(value, (list, tuple)):
        return ",".join(_text(v) for v in value)  # scale: [0.08, 1.0]
    return str(value)


def _parse(action: argparse.Action, text: str) -> Any:
    if action.type is None:
        return text
    try:
        return action.type(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}") from None


def _register_eval(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="top-1/top-5 of a checkpoint (ours or official) on a dataset",
        description="Evaluate a checkpoint: one of ours (a run dir or .safetensors) or an official .pth with --model.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="run directory, .safetensors or official .pth")
    p.add_argument("--model", metavar="NAME", help="model name, needed for checkpoints without our metadata")
    p.add_argument("--use-ema", action="store_true", help="official training checkpoints: evaluate model_ema")
    group = p.add_argument_group("data")
    group.add_argument(
        "--data-dir", metavar="DIR", help="ImageFolder root (its val/ is used) or a folder of class folders"
    )
    group.add_argument("--dataset", metavar="NAME", help="built-in offline dataset instead of --data-dir: 'digits'")
    group.add_argument(
        "--img-size", type=IMG_SIZE, metavar="N", help=f"input resolution, 1..{MAX_IMG_SIZE} [the checkpoint's]"
    )
    group.add_argument("--workers", "-j", type=ranged(int, 0), metavar="N", help="data-loading worker processes [2]")
    p.add_argument("-b", "--batch-size", type=positive_int, default=64, metavar="N")
    p.add_argument("--amp", action="store_true", help="mixed precision")
    p.add_argument("--device", type=_device, default="auto", help="cpu, cuda, cuda:N or auto")
    p.set_defaults(func=run_eval)


def _register_predict(subparsers) -> None:
    p = subparsers.add_parser(
        "predict",
        help="top-k class names and probabilities for images",
        description="Classify images with a checkpoint; class names come from the checkpoint (ImageNet for 1000).",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="run directory, .safetensors or official .pth")
    p.add_argument("--model", metavar="NAME", help="model name, needed for checkpoints without our metadata")
    p.add_argument("--use-ema", action="store_true", help="official training checkpoints: use model_ema")
    p.add_argument("--topk", type=positive_int, default=5, metavar="K")
    p.add_argument(
        "--img-size", type=IMG_SIZE, metavar="N", help=f"input resolution, 1..{MAX_IMG_SIZE} [the checkpoint's]"
    )
    p.add_argument("--device", type=_device, default="auto", help="cpu, cuda, cuda:N or auto")
    p.set_defaults(func=run_predict)
