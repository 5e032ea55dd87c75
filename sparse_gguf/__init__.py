"""sparse-gguf: a Numba CPU decoder for GGUF models that plugs into the llama.cpp / llama-cpp-python stack."""

from .api import SparseLlama
from .errors import SparseGGUFError
from .model import Model

__all__ = ["Model", "SparseGGUFError", "SparseLlama"]
__version__ = "0.1.0"
