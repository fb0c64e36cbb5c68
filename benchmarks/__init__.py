"""shapkern's benchmarks: one module per measurement, run from the repository root as
``python -m benchmarks.<name> [flags]`` (``--help`` lists the flags and their defaults).

Shared pieces:

- :mod:`benchmarks.harness`: timing (interleaved round-robin), the GEMM rate, the environment of a
  result (:mod:`benchmarks.machine`), results folders and Markdown tables (:mod:`benchmarks.tables`).
- :mod:`benchmarks.baselines`: every alternative way to evaluate coalitions that the benchmarks
  compare shapkern with; :mod:`benchmarks.baselines_train` the same for a ShapleyViT training step.
- :mod:`benchmarks.cases`: the models and inputs several benchmarks measure on.

Measurements: ``throughput`` (with ``bench_engine``, ``bench_scaling`` and ``profile_engine`` on
its command line), ``bench_train_step``, ``bench_attention``, ``tune_attention``, ``bench_fused``,
``bench_reductions``, ``fp8_error``, ``estimators``, ``estimators_large``, ``explanation_quality``,
``train_figures`` and ``recipe_epoch``. The studies with their own run caches and prose reports are
packages under :mod:`benchmarks.experiments` (``python -m benchmarks.experiments.train_sweeps``,
``python -m benchmarks.experiments.peers``). ``pytest benchmarks --benchmark-only`` runs the
pytest-benchmark micro-benchmarks of test_micro_cpu.py. Committed results live in results/.
"""
