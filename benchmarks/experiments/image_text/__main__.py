"""``python -m benchmarks.experiments.image_text``: see the package's docstring."""

from benchmarks.experiments.image_text import main

if __name__ == "__main__":
    main()
