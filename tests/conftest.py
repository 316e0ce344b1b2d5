"""Shared pytest set-up: markers' behaviour and the Triton interpreter switch.

Triton decides at decoration time whether kernels are interpreted, so
TRITON_INTERPRET must be set before anything imports triton: here, first.
Without a GPU every Triton test runs on CPU tensors under the interpreter.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    # torchvision tests run in the wheel-install venv (tests/test_wheel_install.py), which has it.
    skip_tv = pytest.mark.skip(reason="needs torchvision (runs in tests/test_wheel_install.py's venv)")
    has_tv = importlib.util.find_spec("torchvision") is not None
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "torchvision" in item.keywords and not has_tv:
            item.add_marker(skip_tv)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
