"""A tiny image folder on disk for the imagefolder tests (test_data.py, test_cli_explain.py)."""

from PIL import Image


def make_folder(root, classes=("cat", "dog"), count=5):
    """``count`` 40×40 RGB PNGs per class folder under ``root``, with class-dependent colours."""
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (40, 40), color=(i * 40, 10, 200 if cls == "cat" else 0)).save(
                root / cls / f"{i}.png"
            )
