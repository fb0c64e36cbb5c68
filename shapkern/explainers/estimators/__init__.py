"""Shapley value estimators: one module per method behind one :class:`Estimator` interface.

- ``exact``: all 2^N coalitions (:mod:`.exact`).
- ``permutation``: marginal contributions along random orderings (:mod:`.permutation`).
- ``kernel``, ``leverage``: KernelSHAP and LeverageSHAP on distinct stratified coalitions (:mod:`.kernel`).
- ``bayes``: Bayesian quadrature on greedily chosen complementary pairs (:mod:`.bayes`).

``ESTIMATORS`` maps each name to its class; :func:`shapkern.estimate` is a lookup in it.
"""

from shapkern.explainers.estimators.base import (
    ACC_DTYPE,
    DEFAULT_COALITIONS_PER_CALL,
    Estimate,
    Estimator,
    EstimatorName,
    endpoints,
    evaluate_rows,
)
from shapkern.explainers.estimators.bayes import Bayes
from shapkern.explainers.estimators.exact import Exact, check_exact
from shapkern.explainers.estimators.kernel import KernelSHAP, LeverageSHAP
from shapkern.explainers.estimators.permutation import Permutation

__all__ = [
    "ACC_DTYPE",
    "DEFAULT_COALITIONS_PER_CALL",
    "ESTIMATORS",
    "Bayes",
    "Estimate",
    "Estimator",
    "EstimatorName",
    "Exact",
    "KernelSHAP",
    "LeverageSHAP",
    "Permutation",
    "check_exact",
    "endpoints",
    "evaluate_rows",
]

# In the order of EstimatorName (tests/test_explain.py checks that the two agree).
ESTIMATORS: dict[EstimatorName, type[Estimator]] = {
    cls.name: cls for cls in (Exact, Permutation, KernelSHAP, LeverageSHAP, Bayes)
}
