"""``python -m benchmarks.experiments.train_sweeps``: see the package's docstring."""

from benchmarks.experiments.train_sweeps import main

if __name__ == "__main__":
    main()
