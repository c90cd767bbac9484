"""Shared fixtures for the test suite (plain pytest rootdir, no tests/__init__.py).

The conformance vectors are looked up in $NNC_CONFORMANCE_DIR, else ../shared/conformance/nncodec-2.1.3
next to the repository.
"""

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run from a checkout without `pip install -e .`

CONFORMANCE_DIR = Path(os.environ.get("NNC_CONFORMANCE_DIR")
                       or REPO.parent / "shared" / "conformance" / "nncodec-2.1.3")


def conformance_manifest():
    """The manifest's vector list, or [] when the conformance folder is missing."""
    path = CONFORMANCE_DIR / "manifest.json"
    if not path.exists():
        return []
    with open(path) as f:
        return json.load(f)["vectors"]


def bits_to_bytes(text):
    """Bytes from a string of '0'/'1' (spaces, '|' and '_' ignored); the length must be whole bytes.

    Used to assemble syntax structures by hand from the standard's tables, independently of
    nnc_edge.encoder.bitwriter, so a bug shared by the writer and the parser cannot hide.
    """
    s = "".join(c for c in text if c in "01")
    if len(s) != len(text.replace(" ", "").replace("|", "").replace("_", "")):
        raise ValueError("only 0, 1, spaces, '|' and '_' allowed: %r" % text)
    if len(s) % 8:
        raise ValueError("%d bits is not a whole number of bytes" % len(s))
    return bytes(int(s[i:i + 8], 2) for i in range(0, len(s), 8))


@pytest.fixture
def bits():
    return bits_to_bytes


def pytest_generate_tests(metafunc):
    """``conformance_vector``: one manifest entry (a dict with name, profile, tensors, ...) per test."""
    if "conformance_vector" in metafunc.fixturenames:
        vectors = conformance_manifest()
        metafunc.parametrize("conformance_vector", vectors, ids=[v["name"] for v in vectors])


@pytest.fixture(scope="session")
def conformance_dir():
    if not (CONFORMANCE_DIR / "manifest.json").exists():
        pytest.skip("conformance vectors not found in %s (set NNC_CONFORMANCE_DIR)" % CONFORMANCE_DIR)
    return CONFORMANCE_DIR


def require_compiled_backend():
    """Skip the calling test when decoder_core's compiled backend is not built, except in CI (CI=true),
    where it is always built and its absence fails the test."""
    from decoder_core import backend as core_backend
    if "cython" not in core_backend.available():
        if os.environ.get("CI") == "true":
            pytest.fail("the compiled backend decoder_core._deepcabac is not built (pip install -e .)")
        pytest.skip("the compiled backend decoder_core._deepcabac is not built")


@pytest.fixture(params=["python", "cython"])
def backend(request):
    """Run a test once per decoder_core backend (decoder_core.backend.use), restoring the previous one;
    see require_compiled_backend for when the compiled one is skipped."""
    from decoder_core import backend as core_backend
    name = request.param
    if name == "cython":
        require_compiled_backend()
    previous = core_backend.name()
    core_backend.use(name)
    try:
        yield name
    finally:
        core_backend.use(previous)
