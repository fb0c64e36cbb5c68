"""README's Python snippets run as pasted (the CPU ones; a snippet that names CUDA needs a GPU)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_snippets():
    assert len(SNIPPETS) >= 3


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs_as_pasted(index, tmp_path):
    code = SNIPPETS[index]
    if "cuda" in code and not torch.cuda.is_available():
        pytest.skip("the snippet needs a GPU")
    # A fresh interpreter in an empty folder: the snippet's own imports, nothing from the tests.
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"README snippet {index} failed:\n{code}\n{done.stderr[-3000:]}"
