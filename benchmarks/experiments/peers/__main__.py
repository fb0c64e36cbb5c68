"""``python -m benchmarks.experiments.peers``: see the package's docstring."""

from benchmarks.experiments.peers import main

if __name__ == "__main__":
    main()
