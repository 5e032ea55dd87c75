"""Shared fixtures: tiny random-weight GGUF models written once per session, the default model, test text."""

from __future__ import annotations

import os
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from tiny_models import cached_tiny_model  # noqa: E402

DATA = pathlib.Path(__file__).parent / "data"


@pytest.fixture(scope="session", autouse=True)
def timings_cache(tmp_path_factory):
    """The converter's measured FFN times go to a session file, never the user's cache (converters/timing.py);
    the CLI's subprocesses inherit it."""
    from converters.timing import CACHE_ENV

    path = tmp_path_factory.getbasetemp() / "timings.json"
    before = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(path)
    yield path
    if before is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = before


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(arch, weight_type, **kw) -> path of a cached tiny random-weight model."""
    root = tmp_path_factory.getbasetemp() / "tiny_models"
    root.mkdir(exist_ok=True)

    def make(arch: str, weight_type: str = "F32", **kw) -> pathlib.Path:
        return cached_tiny_model(root, arch, weight_type, **kw)

    return make


@pytest.fixture(scope="session")
def default_model():
    from sparse_gguf.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def test_text() -> str:
    return (DATA / "prose_test.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def sparse_llm(default_model):
    """SparseLlama on the default model, shared by the API tests (n_ctx 512)."""
    from sparse_gguf import SparseLlama

    return SparseLlama(str(default_model), n_ctx=512, verbose=False)
