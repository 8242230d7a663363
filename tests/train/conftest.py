"""Fixtures for the train command tests: a tiny ImageFolder, and a helper to run the CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# A DilateFormer small enough that a CPU epoch over the tiny dataset takes well under a second.
TINY_MODEL = ["--model", "dilateformer_nano", "--model-kwargs", "embed_dim=12", "--img-size", "32"]


def make_image_folder(root: Path, per_class=(12, 4), classes=("blue", "green", "red"), size=40) -> Path:
    """train/ and val/ of colour-coded noise images: learnable in a couple of epochs."""
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "val"), per_class, strict=True):
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
                pixels[..., index % 3] += 150
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data")


@pytest.fixture(name="cli_env")
def cli_env_fixture() -> dict[str, str]:
    return _cli_env()


def _cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", DILATEFORMER_BACKEND="eager", PYTHONUNBUFFERED="1")
    return env


def _run_cli(*args: str, timeout: float = 240, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dilateformer", *args],
        capture_output=True,
        text=True,
        env=_cli_env(),
        timeout=timeout,
        cwd=cwd,
    )


@pytest.fixture
def run_cli():
    """``run_cli("train", ...)``: the CLI in a fresh single-threaded process, output captured."""
    return _run_cli


@pytest.fixture
def tiny_model() -> list[str]:
    return list(TINY_MODEL)
