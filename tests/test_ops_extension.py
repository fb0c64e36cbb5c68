import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Import the sources as a non-editable install sees them: setuptools' editable finder removed.
IMPORT_SOURCES = (
    "import sys, warnings; warnings.simplefilter('always');"
    "sys.meta_path[:] = [f for f in sys.meta_path"
    " if 'Editable' not in getattr(f, '__name__', type(f).__name__)];"
    "import shapkern.ops._extension as e; print(e.extension_loaded())"
)


def test_importing_the_sources_without_the_extension_says_what_to_run(tmp_path):
    # A checkout's root as a user running Python there sees it: sources without a compiled _C.
    ignore = shutil.ignore_patterns("_C*", "__pycache__")
    shutil.copytree(ROOT / "shapkern", tmp_path / "shapkern", ignore=ignore)
    shutil.copy(ROOT / "setup.py", tmp_path / "setup.py")
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_SOURCES], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
    assert "imported from its source folder" in result.stderr
    assert "pip install --no-build-isolation -e ." in result.stderr
