import os
import sys
from pathlib import Path

import pytest
import torch

# Helper modules of the tests import by name under --import-mode=importlib too: tiny_models.py (the
# tiny ViTs and self-explaining ViTs every test builds), sm90_compile.py, image_folders.py.
sys.path.insert(0, str(Path(__file__).parent))
# The benchmarks package (benchmarks/, never installed) imports from the checkout. Appended, not
# prepended: where shapkern is installed (the GPU session's `python -P -m pytest`), the installed
# package with its compiled extension still wins over the source folder.
sys.path.append(str(Path(__file__).resolve().parents[1]))

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
