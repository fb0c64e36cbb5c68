import os
import sys
from pathlib import Path

import pytest
import torch

# Helper modules of the tests (sm90_compile.py) import by name under --import-mode=importlib too.
sys.path.insert(0, str(Path(__file__).parent))

# Triton kernels run in the interpreter when no GPU is present; must be set before triton.jit runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
