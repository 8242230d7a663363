"""Shared fixtures for the model tests: the official mini model's weights and reference outputs."""

import json
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="session")
def official_mini_state_dict():
    return load_file(FIXTURES / "official_mini_state_dict.safetensors")


@pytest.fixture(scope="session")
def official_mini_config():
    with safe_open(FIXTURES / "official_mini_state_dict.safetensors", "pt") as f:
        return json.loads(f.metadata()["config"])


@pytest.fixture(scope="session")
def official_mini_io():
    return load_file(FIXTURES / "official_mini_io.safetensors")


@pytest.fixture(scope="session")
def official_key_tables():
    return json.loads((FIXTURES / "official_state_dict_keys.json").read_text())
