"""Loads the compiled libraries and says what is usable.

``_C`` (op schemas + CPU kernels) is always needed; ``_C_cuda`` (CUDA C++
kernels) is loaded only when torch was built with CUDA, because it refers to
symbols that only CUDA builds of torch have.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
from pathlib import Path

import torch

_BUILD_HINT = (
    "fastvision's compiled library {name} is missing or failed to load ({err}). "
    "Build it from a checkout with: pip install --no-build-isolation -e . "
    "(needs torch>=2.11, a C++17 compiler, cmake and ninja)."
)


def _load(name: str):
    try:
        return importlib.import_module(f"fastvision.{name}")
    except ImportError as err:
        raise ImportError(_BUILD_HINT.format(name=name, err=err)) from err


C = _load("_C")

CUDA_BUILT = importlib.util.find_spec("fastvision._C_cuda") is not None
CUDA_LOADED = False
CUDA_ERROR: str | None = None
if CUDA_BUILT and torch.version.cuda is not None:
    # _C_cuda calls the stable C shim's CUDA functions (aoti_torch_get_current_cuda_stream),
    # defined in libtorch_cuda.so. It cannot link that library (a wheel is built against
    # any torch, a CPU one too), and torch loads it privately (RTLD_LOCAL): make its
    # symbols global before loading _C_cuda (already loaded: this only widens them).
    _torch_cuda = Path(torch.__file__).parent / "lib" / "libtorch_cuda.so"
    if _torch_cuda.exists():
        ctypes.CDLL(str(_torch_cuda), mode=ctypes.RTLD_GLOBAL)
    try:
        _load("_C_cuda")
        CUDA_LOADED = True
    except ImportError as err:  # a CUDA torch that lacks a symbol we need
        CUDA_ERROR = str(err)


def triton_available() -> bool:
    """Whether triton imports (GPU kernels; on CPU only under TRITON_INTERPRET=1)."""
    return importlib.util.find_spec("triton") is not None
