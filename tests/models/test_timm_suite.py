"""timm's own model test suite, run on the DilateFormer models.

The suite is ``tests/test_models.py`` from the sdist of the installed timm (downloaded once with pip and cached in
``~/.cache/dilateformer/timm-sdist``). It runs in a subprocess restricted to ``SUITE_VARIANTS`` with ``-k``, and
``-p dilateformer`` so that importing the package registers the models before timm's test module lists them.
``SUITE_VARIANTS`` is one model per default input size (64, 224, 384); Small and Base are the same code with more
and wider blocks, and would triple the run time (all seven pass: 77 tests, about 7 CPU minutes with timm 1.0.31).

Two adjustments to what timm would run by itself, both so that more of it runs on our models:

- ``dilateformer`` joins ``FEAT_INTER_FILTERS``, timm's list of the model modules that implement
  ``forward_intermediates``, so the intermediates and pruning contracts run too;
- ``GITHUB_ACTIONS`` is unset in the subprocess: under it timm leaves out ``test_model_forward_fx_torchscript``.

``test_model_load_pretrained`` is excluded: it needs downloadable weights, which this project does not publish.
Note on input sizes: timm tests at ``min_input_size`` (ours is 1x1) whenever the default size exceeds a test's
target size, so the 224 and 384 models run most tests at 1x1; ``dilateformer_nano`` (64x64) runs them at 64x64.
"""

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import timm

from dilateformer.models import VARIANTS

SUITE_VARIANTS = ("dilateformer_nano", "dilateformer_tiny", "dilateformer_tiny_384")
REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dilateformer" / "timm-sdist"

# Each of these timm tests must pass for every variant in SUITE_VARIANTS.
EXPECTED_TESTS = (
    "test_model_forward",
    "test_model_backward",
    "test_model_default_cfgs",
    "test_model_forward_torchscript",
    "test_model_forward_features",
    "test_model_forward_intermediates_features",
    "test_model_forward_intermediates",
    "test_prune_intermediate_layers_contract",
    "test_model_forward_fx",
    "test_model_backward_fx",
    "test_model_forward_fx_torchscript",
)
FEAT_INTER_LINE = "FEAT_INTER_FILTERS = ["


def _timm_sdist_tests(version: str) -> Path:
    """The sdist's root (``tests/`` and ``pyproject.toml``, which registers timm's markers), downloaded once."""
    root = CACHE / f"timm-{version}"
    if (root / "tests" / "test_models.py").is_file() and (root / "pyproject.toml").is_file():
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        cmd += [f"timm=={version}", "-d", tmp]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            pytest.fail(f"downloading the timm {version} sdist from PyPI timed out: {' '.join(cmd)}")
        archives = sorted(Path(tmp).glob("timm-*.tar.gz"))
        if done.returncode != 0 or not archives:
            pytest.fail(
                f"could not download the timm {version} sdist (needed to run timm's test suite) with "
                f"{' '.join(cmd)}: return code {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
            )
        prefix = f"timm-{version}/"
        with tarfile.open(archives[0]) as tar:
            members = [
                m
                for m in tar.getmembers()
                if m.name.startswith(prefix + "tests/") or m.name == prefix + "pyproject.toml"
            ]
            # filter="data" (no links out, no special files) where this Python has it (3.10.12+, 3.11.4+).
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, members=members, **safe)
        # Moved into place whole, so an interrupted run never leaves a half-extracted cache.
        shutil.rmtree(root, ignore_errors=True)
        os.replace(Path(tmp) / f"timm-{version}", root)
    return root


def _prepare(sdist: Path, workdir: Path) -> Path:
    source = (sdist / "tests" / "test_models.py").read_text()
    if source.count(FEAT_INTER_LINE) != 1:
        pytest.fail(f"timm's test_models.py no longer has one {FEAT_INTER_LINE!r} line to add 'dilateformer' to")
    tests = workdir / "tests"
    tests.mkdir()
    (tests / "test_models.py").write_text(source.replace(FEAT_INTER_LINE, FEAT_INTER_LINE + "'dilateformer', "))
    shutil.copy(sdist / "tests" / "conftest.py", tests / "conftest.py")
    return tests / "test_models.py"


def _outcomes(junit_xml: Path) -> dict[str, tuple[str, str]]:
    """test id -> (outcome, message) from pytest's JUnit report."""
    outcomes = {}
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        result = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        outcome = "passed" if result is None else result.tag
        outcomes[case.get("name")] = (outcome, "" if result is None else result.get("message", ""))
    return outcomes


def _variant(test_id: str) -> str:
    # "test_model_default_cfgs[1-dilateformer_nano.untrained]" -> "dilateformer_nano"
    params = test_id.partition("[")[2].rstrip("]")
    return next(p for p in params.split("-") if p.startswith("dilateformer")).split(".")[0]


def test_suite_variants_are_registered():
    assert set(SUITE_VARIANTS) <= set(VARIANTS)


@pytest.mark.slow
def test_timm_model_suite_passes_for_every_variant(tmp_path):
    sdist = _timm_sdist_tests(timm.__version__)
    test_file = _prepare(sdist, tmp_path)
    junit_xml = tmp_path / "report.xml"
    env = {k: v for k, v in os.environ.items() if k not in ("GITHUB_ACTIONS", "TORCH_DEVICE", "TORCH_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "pytest", str(test_file), "-p", "dilateformer", "-p", "no:cacheprovider"]
    cmd += ["-c", str(sdist / "pyproject.toml"), "--rootdir", str(tmp_path), "-q", "-rfEs"]
    selection = f"({' or '.join(SUITE_VARIANTS)}) and not load_pretrained"
    cmd += ["-W", "ignore::pytest.PytestUnknownMarkWarning", "-k", selection]
    cmd += [f"--junitxml={junit_xml}"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    report = f"{' '.join(cmd)}\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    assert junit_xml.is_file(), f"timm's suite wrote no report:\n{report}"
    outcomes = _outcomes(junit_xml)

    not_passed = {t: o for t, o in outcomes.items() if o[0] != "passed"}
    assert not not_passed, f"timm tests that did not pass: {not_passed}\n{report}"
    assert done.returncode == 0, report
    passed = {(t.partition("[")[0], _variant(t)) for t in outcomes}
    assert {v for _, v in passed} == set(SUITE_VARIANTS)
    missing = sorted({(test, v) for test in EXPECTED_TESTS for v in SUITE_VARIANTS} - passed)
    assert not missing, f"timm tests that did not run (renamed or filtered in timm {timm.__version__}?): {missing}"
    assert len(outcomes) >= len(EXPECTED_TESTS) * len(SUITE_VARIANTS)
