"""The training config has one source: ``TrainConfig`` derives the flags and their help; ``-c`` reads YAML."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

import pytest

from dilateformer.cli import build_parser, main
from dilateformer.errors import CommandError
from dilateformer.train.checkpoint import load_last
from dilateformer.train.commands import RUN_FLAGS
from dilateformer.train.recipes import (
    CONFIG_KEYS,
    DIGITS,
    IMAGENET,
    TrainConfig,
    changed_on_resume,
    resolve_config,
    show,
)


def _train_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def _parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["train", *argv])


def _yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def _parse_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        _parse(*argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_every_field_has_a_flag_and_every_flag_a_field() -> None:
    actions = {a.dest: a for a in _train_parser()._actions if a.dest != "help"}
    assert set(actions) - set(RUN_FLAGS) == {f.name for f in fields(TrainConfig)} == set(CONFIG_KEYS)
    for item in fields(TrainConfig):
        action = actions[item.name]
        assert "--" + item.name.replace("_", "-") in action.option_strings
        assert action.default is None  # unset until the recipe (or a resumed run) fills it
        if isinstance(item.default, bool):
            assert action.nargs == 0  # a switch
        else:
            assert action.type is item.metadata["type"]


def test_the_help_is_derived_from_the_dataclass_and_shows_both_recipes() -> None:
    helps = {a.dest: a.help for a in _train_parser()._actions}
    differ = 0
    for item in fields(TrainConfig):
        imagenet, digits = getattr(IMAGENET, item.name), getattr(DIGITS, item.name)
        assert helps[item.name].startswith(item.metadata["help"])
        shown = all(v is not None and v is not False for v in (imagenet, digits))  # 0.0 == False, but is shown
        if shown and imagenet != digits:
            assert helps[item.name].endswith(f"[{show(imagenet)}; digits: {show(digits)}]"), item.name
            differ += 1
    assert differ >= 10  # epochs, batch size, model, mixup, ...: the recipes really differ
    assert helps["epochs"].endswith("[300; digits: 20]") and helps["lr_base"].endswith("[1e-3]")
    assert helps["img_size"].endswith("[the model's; digits: 32]")


def test_yaml_sets_values_that_resolve_like_flags(tmp_path: Path) -> None:
    config_file = _yaml(
        tmp_path,
        "batch_size: 32\nlr: 1e-3\nmodel_ema: true\naa: off\nscale: [0.5, 1.0]\n"
        "model_kwargs: {embed_dim: 12, depths: [1, 1, 1, 1]}\nclip_grad: null\n",
    )
    args = _parse("-c", config_file)
    assert args.batch_size == 32 and args.lr == pytest.approx(1e-3) and args.model_ema is True
    assert args.scale == (0.5, 1.0) and args.model_kwargs == ["embed_dim=12", "depths=1,1,1,1"]
    assert args.clip_grad is None  # null: as if absent
    config, notes = resolve_config(args, None)
    assert config["batch_size"] == 32 and config["aa"] is None and config["epochs"] == IMAGENET.epochs
    chosen = {note.split("=")[0] for note in notes[1:]}
    assert "batch-size" not in chosen and "scale" not in chosen and "epochs" in chosen


@pytest.mark.parametrize("before", [True, False])
def test_command_line_flags_override_the_yaml_wherever_they_stand(tmp_path: Path, before: bool) -> None:
    config_file = _yaml(tmp_path, "batch_size: 32\nepochs: 7\ndevice: cpu\n")
    argv = ["-b", "8", "--device", "auto", "-c", config_file] if before else ["-c", config_file, "-b", "8"]
    args = _parse(*argv)
    assert args.batch_size == 8 and args.epochs == 7
    assert args.device == ("auto" if before else "cpu")


@pytest.mark.parametrize(
    "text, pieces",
    [
        ("batch_size: 32\nbatchsize: 3\n", ["unknown key 'batchsize'", "did you mean batch_size"]),
        ("epochs: 0\n", ["epochs:", "expected an integer >= 1, got '0'"]),
        ("smoothing: 2\n", ["smoothing:", "< 1"]),
        ("opt: adamww\n", ["opt:", "unknown optimizer 'adamww'"]),
        ("amp: 1\n", ["amp:", "expected true or false"]),
        ("- batch_size\n", ["must hold a mapping"]),
        ("batch_size: [\n", ["not valid YAML"]),
    ],
)
def test_bad_yaml_is_one_line_naming_the_key(tmp_path: Path, capsys, text: str, pieces: list[str]) -> None:
    err = _parse_error(capsys, "-c", _yaml(tmp_path, text))
    assert err.startswith("dilateformer train: error: argument -c/--config: ") and "config.yaml" in err
    for piece in pieces:
        assert piece in err, piece


def test_missing_yaml_file_is_one_line(tmp_path: Path, capsys) -> None:
    err = _parse_error(capsys, "-c", str(tmp_path / "nope.yaml"))
    assert "cannot read" in err and "nope.yaml" in err


def test_resume_precedence_is_cli_then_yaml_then_saved_then_recipe(tmp_path: Path) -> None:
    saved = {**{k: getattr(DIGITS, k) for k in CONFIG_KEYS}, "dataset": "digits", "batch_size": 16, "epochs": 5,
             "mixup": 0.3, "img_size": 32}  # fmt: skip
    saved.pop("warmup_epochs")  # a setting the run did not save comes from the recipe
    args = _parse("-c", _yaml(tmp_path, "mixup: 0.5\nepochs: 9\n"), "--epochs", "12")
    config, notes = resolve_config(args, saved)
    assert config["epochs"] == 12  # command line
    assert config["mixup"] == 0.5  # YAML
    assert config["batch_size"] == 16  # the run's saved config
    assert config["warmup_epochs"] == DIGITS.warmup_epochs and notes == ["digits", "warmup-epochs=2"]
    warnings = changed_on_resume(args, saved)
    assert any("--mixup 0.5 instead of the run's 0.3" in line for line in warnings)
    # A setting a resumed run cannot change is refused from the YAML as from a flag.
    with pytest.raises(CommandError, match="cannot change in a resumed run"):
        changed_on_resume(_parse("-c", _yaml(tmp_path, "model: dilateformer_tiny\n")), saved)


@pytest.mark.slow
def test_train_from_a_yaml_file(tmp_path: Path, image_folder: Path, capsys) -> None:
    out = tmp_path / "run"
    config_file = _yaml(
        tmp_path,
        f"data_dir: {image_folder}\nmodel: dilateformer_nano\nmodel_kwargs: [embed_dim=12]\nimg_size: 32\n"
        f"batch_size: 4\nepochs: 5\nworkers: 0\nmixup: 0\ncutmix: 0\naa: none\noutput: {out}\n",
    )
    assert main(["train", "-c", config_file, "--epochs", "1"]) == 0
    defaults = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("defaults"))
    chosen = dict(note.split("=", 1) for note in defaults.split(": ", 1)[1].split(", "))
    assert "epochs" not in chosen and "batch-size" not in chosen and chosen["opt"] == "adamw"
    _, _, state = load_last(out / "last.safetensors")
    assert state["config"]["epochs"] == 1 and state["config"]["batch_size"] == 4 and state["epoch"] == 0
    assert state["config"]["model_kwargs"] == ["embed_dim=12"]
