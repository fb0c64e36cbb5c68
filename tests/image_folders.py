"""A tiny image folder on disk for the imagefolder tests (test_data.py, test_cli_explain.py)."""

from PIL import Image


def make_folder(root, classes=("cat", "dog"), count=5, size=40):
    """``count`` size×size RGB PNGs per class folder under ``root``, with class-dependent colours."""
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (size, size), color=(i * 40, 10, 200 if cls == "cat" else 0)).save(
                root / cls / f"{i}.png"
            )
