"""Repository-level checks: CI runs the README's test command, and the code stays ruff-clean."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command_verbatim():
    test_commands = [c for c in _readme_commands() if "pytest" in c]
    assert len(test_commands) == 1, test_commands
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_commands[0] in ci_lines


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]])
def test_ruff_is_clean(command):
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is a test dependency: pip install -e '.[test]'")
    result = subprocess.run([ruff, *command, "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_layers_point_one_way():
    """files|errors|argtypes -> ops -> nn -> models -> (train, analysis, ...) -> demo -> cli: none imports higher."""
    order = ["files|errors|argtypes", "ops", "nn", "models", "train|analysis|integrations|retrofit", "demo", "cli"]
    rank = {name: i for i, names in enumerate(order) for name in names.split("|")}
    package = ROOT / "dilateformer"
    problems = []
    for path in package.rglob("*.py"):
        parts = path.relative_to(package).parts
        layer = parts[0] if len(parts) > 1 else path.stem
        if layer not in rank:
            continue
        for imported in re.findall(r"^\s*(?:from|import) dilateformer\.(\w+)", path.read_text(), flags=re.M):
            if imported in rank and rank[imported] > rank[layer]:
                problems.append(f"{path.relative_to(ROOT)} imports dilateformer.{imported}")
    assert not problems, problems
