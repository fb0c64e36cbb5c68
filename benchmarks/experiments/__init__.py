"""Studies with their own run caches and prose reports, one package each (config, runner, render):

- :mod:`benchmarks.experiments.train_sweeps`: training sweeps of the loss options
  (``python -m benchmarks.experiments.train_sweeps``);
- :mod:`benchmarks.experiments.peers`: Captum, shap and shapiq against ``shapkern.explain`` on one
  image (``python -m benchmarks.experiments.peers``).
"""
